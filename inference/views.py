"""Administrators' model-monitoring pages. Thin: figures come from inference.drift."""

from __future__ import annotations

import math

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import render

from accounts.models import Institution, User
from accounts.permissions import institution_of
from cloudiopsy.charts import figure_response
from inference import drift

MAX_WEEKS = 52
_IN_BAND, _DRIFT, _UNJUDGED, _BAND = "#7a1f5c", "#c0261b", "#9aa1ad", "#2f7d4f"


def is_admin(user) -> bool:
    return getattr(user, "role", None) == User.Role.ADMIN or bool(getattr(user, "is_superuser", False))


def _report(request) -> drift.DriftReport | None:
    """The report for the institution asked for (superusers: ?institution=slug, default their own
    or the first); administrators only ever see their own institution."""
    if not is_admin(request.user):
        raise PermissionDenied("Only administrators see drift monitoring.")
    institution = institution_of(request.user)
    if request.user.is_superuser:
        slug = request.GET.get("institution", "")
        if slug:
            institution = Institution.objects.filter(slug=slug).first()
            if institution is None:
                raise Http404("No such institution.")
        institution = institution or Institution.objects.order_by("name").first()
    if institution is None:
        return None
    try:
        weeks = min(max(int(request.GET.get("weeks", drift.DEFAULT_WEEKS)), 1), MAX_WEEKS)
    except ValueError:
        weeks = drift.DEFAULT_WEEKS
    return drift.drift_report(institution=institution, weeks=weeks)


@login_required
def drift_page(request):
    """Weekly input and output figures against the site-validation baseline, out-of-band ones named."""
    report = _report(request)
    rows = []
    if report is not None and report.weeks:
        for key in report.figure_keys:
            series = report.series(key)
            rows.append({"figure": series[-1], "weeks": series})
    groups = []
    if report is not None and report.weeks and not report.note:
        present = {f.group for f in report.weeks[0].figures}
        groups = [(group, title) for group, title in drift.GROUPS.items() if group in present]
    return render(
        request,
        "inference/drift.html",
        {
            "report": report,
            "rows": rows,
            "groups": groups,
            "institutions": Institution.objects.order_by("name") if request.user.is_superuser else [],
            "weeks": len(report.weeks) if report else drift.DEFAULT_WEEKS,
            "bands": {
                "mean_z": drift.MEAN_Z,
                "mean_shift": round(100 * drift.MEAN_MIN_RELATIVE_SHIFT),
                "rate_z": drift.RATE_Z,
                "rate_shift": round(100 * drift.RATE_MIN_SHIFT),
            },
        },
    )


@login_required
def drift_chart(request, group: str):
    """One group of figures as a PNG: a panel per figure, its weekly values as a line over the
    shaded band (matplotlib's Figure, no pyplot); out-of-band weeks red, unjudged weeks grey."""
    if group not in drift.GROUPS:
        raise Http404("No such chart.")
    report = _report(request)
    if report is None or not report.weeks:
        raise Http404("Nothing to chart.")
    from matplotlib.figure import Figure  # drawn off-screen: no pyplot, no global backend

    keys = [f.key for f in report.weeks[0].figures if f.group == group]
    columns = 2 if len(keys) <= 4 else 3
    lines = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.5 * lines + 0.5), dpi=90)
    figure.suptitle(drift.GROUPS[group])
    axes_grid = figure.subplots(lines, columns, squeeze=False)
    labels = [w.week.split("-")[1] for w in report.weeks]
    x = list(range(len(labels)))
    for index, axes in enumerate(axes_grid.flat):
        if index >= len(keys):
            axes.set_visible(False)
            continue
        series = report.series(keys[index])
        nan = float("nan")
        values = [f.value if f.value is not None else nan for f in series]
        # The band of each week (its width depends on that week's n): a shaded box per week.
        banded = [(i, f) for i, f in enumerate(series) if f.low is not None]
        axes.bar(
            [i for i, _ in banded],
            [f.high - f.low for _, f in banded],
            bottom=[f.low for _, f in banded],
            width=0.8,
            color=_BAND,
            alpha=0.18,
        )
        baseline = next((f.baseline for f in series if f.baseline is not None), None)
        if baseline is not None:
            axes.axhline(baseline, color=_BAND, linestyle="--", linewidth=1)
        axes.plot(x, values, color=_IN_BAND, linewidth=1.2)
        colours = [_DRIFT if f.drifted else _IN_BAND if f.status == drift.OK else _UNJUDGED for f in series]
        axes.scatter(x, values, c=colours, s=22, zorder=3)
        axes.set_title(series[0].label, fontsize=9, color=_DRIFT if any(f.drifted for f in series) else "black")
        axes.set_xticks(x, labels, fontsize=7)
        axes.set_xlim(-0.6, len(x) - 0.4)
        axes.tick_params(axis="y", labelsize=7)
        if series[0].kind == "rate":
            axes.set_ylim(-0.02, 1.02)
    return figure_response(figure)
