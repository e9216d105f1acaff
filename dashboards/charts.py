"""The dashboards' charts, drawn off-screen on a matplotlib Figure (no pyplot, no global backend).

Each function draws one dashboard's figures on a Figure the view made; the view draws nothing when
the page says there is nothing to chart (the page shows a plain message instead). Time axes span
the whole period, so that weeks, months, days or hours without data show as gaps, not vanish.
"""

from __future__ import annotations

import datetime

from django.utils import timezone
from matplotlib.ticker import MaxNLocator

from dashboards import selectors
from dashboards.selectors import WAITING, AIPerformance, Queue, Throughput, Turnaround, Workload

ACCENT, URGENT, MUTED, GOOD = "#7a1f5c", "#c0261b", "#9aa1ad", "#2f7d4f"
PRIORITY_COLOURS = {"routine": ACCENT, "urgent": URGENT}
SERIES = ["#7a1f5c", "#2f7d4f", "#1f5c7a", "#b8860b", "#5c1f7a", "#7a5c1f", "#1f7a6b", "#9aa1ad"]
MAX_TICKS = 16


def _category_axis(axes, labels: list[str], short=lambda label: label) -> None:
    """Labels 0..n-1 on the x axis, at most MAX_TICKS of them written."""
    step = max(1, -(-len(labels) // MAX_TICKS))
    ticks = list(range(0, len(labels), step))
    axes.set_xticks(ticks, [short(labels[i]) for i in ticks], fontsize=7)
    axes.set_xlim(-0.6, len(labels) - 0.4)


def _week_labeller(weeks: list[str]):
    """Weeks as "W09" within one year, else in full ("2026-W09")."""
    if len({week[:4] for week in weeks}) > 1:
        return lambda label: label
    return lambda label: label.split("-", 1)[1]


def draw_turnaround(figure, data: Turnaround) -> None:
    """Upload to sign-out, p50 (circles) and p90 (triangles) per week of sign-out and priority,
    and the urgent target."""
    axes = figure.subplots()
    weeks = selectors.period_weeks(data.period)
    index = {week: i for i, week in enumerate(weeks)}
    for priority in ("routine", "urgent"):
        points = [(index[week], d) for week, p, d in data.signed_out_weeks if p == priority]
        if not points:
            continue
        x = [i for i, _ in points]
        colour = PRIORITY_COLOURS[priority]
        axes.plot(x, [d.p50 for _, d in points], marker="o", color=colour, label=f"{priority} p50")
        axes.plot(x, [d.p90 for _, d in points], marker="^", linestyle="--", color=colour, label=f"{priority} p90")
    axes.axhline(
        data.target_hours, color=URGENT, linewidth=1, linestyle=":", label=f"urgent target {data.target_hours} h"
    )
    _category_axis(axes, weeks, _week_labeller(weeks))
    axes.set_ylim(bottom=0)
    axes.set_ylabel("hours, upload → sign-out")
    axes.set_title("Turnaround per week of sign-out")
    axes.legend(fontsize=7, loc="upper left")


def draw_queue(figure, data: Queue) -> None:
    """Cases waiting now per status, routine and urgent stacked."""
    axes = figure.subplots()
    labels = [str(selectors.Status(row.status).label) for row in data.per_status]
    routine = [row.routine for row in data.per_status]
    urgent = [row.urgent for row in data.per_status]
    x = list(range(len(WAITING)))
    axes.bar(x, routine, color=ACCENT, label="routine")
    axes.bar(x, urgent, bottom=routine, color=URGENT, label="urgent")
    for i, row in enumerate(data.per_status):
        axes.annotate(str(row.total), (i, row.total), ha="center", va="bottom", fontsize=8)
    axes.set_xticks(x, labels)
    axes.set_ylim(0, max(row.total for row in data.per_status) * 1.15 + 0.5)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("cases")
    axes.set_title(f"Cases waiting at {timezone.localtime(data.now):%Y-%m-%d %H:%M}")
    axes.legend(fontsize=7)


def draw_workload(figure, data: Workload) -> None:
    """Patch reviews and sign-outs per week, one line per pathologist (0 in weeks without work)."""
    reviews_axes, sign_outs_axes = figure.subplots(1, 2)
    weeks = selectors.period_weeks(data.period)
    names = sorted({name for _, name, _ in data.weekly})
    for number, name in enumerate(names):
        work = {week: w for week, n, w in data.weekly if n == name}
        colour = SERIES[number % len(SERIES)]
        for axes, attribute in ((reviews_axes, "reviews"), (sign_outs_axes, "sign_outs")):
            values = [getattr(work[week], attribute) if week in work else 0 for week in weeks]
            axes.plot(range(len(weeks)), values, marker="o", markersize=4, color=colour, label=name)
    for axes, title in ((reviews_axes, "Patch reviews per week"), (sign_outs_axes, "Sign-outs per week")):
        _category_axis(axes, weeks, _week_labeller(weeks))
        axes.set_ylim(bottom=0)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title, fontsize=10)
    reviews_axes.legend(fontsize=7)


def draw_ai_performance(figure, data: AIPerformance) -> None:
    """ "Suspected tumour" sensitivity and specificity per month of sign-out, with Wilson 95%
    intervals, one colour per model version."""
    sensitivity_axes, specificity_axes = figure.subplots(1, 2, sharey=True)
    months = selectors.period_months(data.period)
    index = {month: i for i, month in enumerate(months)}
    versions = sorted({row.version for row in data.by_month})
    for number, version in enumerate(versions):
        rows = [row for row in data.by_month if row.version == version]
        colour = SERIES[number % len(SERIES)]
        shift = (number - (len(versions) - 1) / 2) * 0.12  # versions side by side within a month
        for axes, value, interval in (
            (sensitivity_axes, "sensitivity", "sensitivity_ci"),
            (specificity_axes, "specificity", "specificity_ci"),
        ):
            points = [(index[row.month] + shift, getattr(row, value), getattr(row, interval)) for row in rows]
            points = [p for p in points if p[1] is not None]
            if not points:
                continue
            axes.errorbar(
                [x for x, _, _ in points],
                [100 * v for _, v, _ in points],
                yerr=[[100 * (v - ci[0]) for _, v, ci in points], [100 * (ci[1] - v) for _, v, ci in points]],
                fmt="o",
                capsize=3,
                color=colour,
                label=version,
            )
    for axes, title in ((sensitivity_axes, "Sensitivity (final TUM)"), (specificity_axes, "Specificity (other)")):
        _category_axis(axes, months)
        axes.set_ylim(0, 102)
        axes.set_title(title, fontsize=10)
    sensitivity_axes.set_ylabel("% with 95% interval")
    sensitivity_axes.legend(fontsize=7, loc="lower left")


def draw_throughput(figure, data: Throughput) -> None:
    """AI results, unassessable and failed patches per hour or day (stacked bars), and uploads
    (dots), on a time axis spanning the period."""
    axes = figure.subplots()
    width = datetime.timedelta(hours=1) if data.unit == "hour" else datetime.timedelta(days=1)
    # Naive local times: matplotlib then writes the platform's time, as the tables do.
    x = [timezone.localtime(bucket).replace(tzinfo=None) + width / 2 for bucket, _ in data.buckets]
    flows = [flow for _, flow in data.buckets]
    results = [f.results for f in flows]
    unassessable = [f.unassessable for f in flows]
    stacked = [a + b for a, b in zip(results, unassessable, strict=True)]
    bar = width * 0.8
    axes.bar(x, results, width=bar, color=ACCENT, label="AI results")
    axes.bar(x, unassessable, width=bar, bottom=results, color=MUTED, label="unassessable")
    axes.bar(x, [f.failed for f in flows], width=bar, bottom=stacked, color=URGENT, label="failed")
    axes.plot(x, [f.uploaded for f in flows], linestyle="none", marker="o", markersize=4, color=GOOD, label="uploaded")
    since = timezone.localtime(data.period.since).replace(tzinfo=None)
    until = timezone.localtime(data.period.until).replace(tzinfo=None)
    axes.set_xlim(since, until)
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.tick_params(axis="x", labelsize=7)
    figure.autofmt_xdate()
    axes.set_ylabel(f"patches per {data.unit}")
    axes.set_title(f"Patches analysed per {data.unit}")
    axes.legend(fontsize=7)
