"""Operations dashboards for administrators and lab managers of an institution. Thin: figures come
from dashboards.selectors through dashboards.reports; the one write (the audit event of a CSV
download) from dashboards.services."""

from __future__ import annotations

import csv
import io
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render

from accounts.models import User
from accounts.permissions import institution_of
from cloudiopsy.charts import figure_response
from dashboards.periods import DEFAULT_WEEKS, BadPeriod, period_from
from dashboards.reports import DASHBOARDS, Dashboard
from dashboards.services import dashboard_export_record

DASHBOARD_ROLES = {User.Role.ADMIN, User.Role.LAB_MANAGER}


def can_see_dashboards(user) -> bool:
    return getattr(user, "role", None) in DASHBOARD_ROLES or bool(getattr(user, "is_superuser", False))


def _institution(request):
    if not can_see_dashboards(request.user):
        raise PermissionDenied("Only administrators and lab managers see the dashboards.")
    institution = institution_of(request.user)
    if institution is None:
        raise PermissionDenied("Your account belongs to no institution: the dashboards show an institution's figures.")
    return institution


def _dashboard(key: str) -> Dashboard:
    dashboard = DASHBOARDS.get(key)
    if dashboard is None:
        raise Http404("No such dashboard.")
    return dashboard


def _bad_period(message: str) -> HttpResponse:
    return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")


def _content(request, dashboard: str):
    """The dashboard's spec, its content for the request's period and the period; or, for a bad
    period, the 400 to answer."""
    spec = _dashboard(dashboard)
    institution = _institution(request)
    try:
        period = period_from(request.GET)
    except BadPeriod as exc:
        return _bad_period(str(exc))
    return spec, spec.content(institution=institution, period=period), period


@login_required
def index(request):
    _institution(request)
    return redirect("dashboards:page", dashboard="turnaround")


@login_required
def page(request, dashboard: str):
    spec = _dashboard(dashboard)
    institution = _institution(request)
    context = {
        "dashboard": spec,
        "dashboards": DASHBOARDS.values(),
        "values": {"from": request.GET.get("from", ""), "to": request.GET.get("to", "")},
        "default_weeks": DEFAULT_WEEKS,
    }
    try:
        period = period_from(request.GET)
    except BadPeriod as exc:
        return render(request, "dashboards/page.html", {**context, "error": str(exc)}, status=400)
    content = spec.content(institution=institution, period=period)
    query = urlencode(period.params())
    context.update(
        period=period,
        query=query,
        content=content,
        values=period.params(),
        time_zone=settings.TIME_ZONE,
    )
    return render(request, "dashboards/page.html", context)


@login_required
def chart(request, dashboard: str):
    """The dashboard's chart as a PNG; 404 when the page says there is nothing to chart."""
    found = _content(request, dashboard)
    if isinstance(found, HttpResponse):
        return found
    spec, content, _ = found
    if content.chart_empty:
        raise Http404(content.chart_empty)
    from matplotlib.figure import Figure  # drawn off-screen: no pyplot, no global backend

    figure = Figure(figsize=spec.chart_size, dpi=100)
    spec.draw(figure, content.data)
    return figure_response(figure)


@login_required
def table_csv(request, dashboard: str, table: str):
    """One table of the dashboard as CSV, for the same period; the download is audited."""
    found = _content(request, dashboard)
    if isinstance(found, HttpResponse):
        return found
    spec, content, period = found
    found = content.table(table)
    if found is None:
        raise Http404("No such table.")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(found.headers)
    writer.writerows(found.exported_rows())
    dashboard_export_record(
        user=request.user,
        institution_id=_institution(request).pk,
        dashboard=spec.key,
        table=found.key,
        period=period,
        rows=len(found.rows),
        request=request,
    )
    response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    name = f"{spec.key}-{found.key}-{period.start.isoformat()}-{period.end.isoformat()}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    response["Cache-Control"] = "private, no-store"
    return response
