"""What each dashboard page shows: key figures, tables (the same rows on the page and in its CSV)
and whether there is anything to chart."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from accounts.models import Institution
from cases.models import BiopsyCase, Review, TissuePatch
from dashboards import charts, selectors
from dashboards.periods import Period
from dashboards.selectors import STAGES, WAITING

TEXT, INT, HOURS, RATE, TIME, SECONDS = "text", "int", "hours", "rate", "time", "seconds"
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Column:
    header: str
    kind: str = TEXT


def shown(kind: str, value: Any) -> str:
    """A cell as the page shows it."""
    if value is None or value == "":
        return "—"
    if kind == HOURS:
        return f"{value:.1f}"
    if kind == SECONDS:
        return f"{value:.3f}"
    if kind == RATE:
        return f"{100 * value:.1f}%"
    if kind == TIME:
        return timezone.localtime(value).strftime("%Y-%m-%d %H:%M")
    return str(value)


def exported(kind: str, value: Any) -> str:
    """A cell as the CSV holds it: plain numbers (hours to 2 decimals, rates 0..1 to 4), ISO 8601
    times in the platform's time zone, empty for nothing; text that a spreadsheet would take for a
    formula is prefixed with an apostrophe."""
    if value is None:
        return ""
    if kind == HOURS:
        return f"{value:.2f}"
    if kind == SECONDS:
        return f"{value:.4f}"
    if kind == RATE:
        return f"{value:.4f}"
    if kind == TIME:
        return timezone.localtime(value).isoformat(timespec="seconds")
    text = str(value)
    return "'" + text if kind == TEXT and text.startswith(CSV_FORMULA_START) else text


@dataclass
class Table:
    key: str
    title: str
    columns: list[Column]
    rows: list[list[Any]]
    empty: str  # said instead of an empty table
    note: str = ""

    @property
    def shown_rows(self) -> list[list[str]]:
        return [[shown(c.kind, v) for c, v in zip(self.columns, row, strict=True)] for row in self.rows]

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]

    def exported_rows(self) -> list[list[str]]:
        return [[exported(c.kind, v) for c, v in zip(self.columns, row, strict=True)] for row in self.rows]


@dataclass
class Content:
    """One dashboard's page for one institution and period."""

    data: Any
    figures: list[tuple[str, str, str]]  # (id, label, value as shown)
    tables: list[Table]
    chart_empty: str | None  # the message shown instead of a chart; None: there is a chart
    chart_alt: str = ""
    notes: list[str] = field(default_factory=list)

    def table(self, key: str) -> Table | None:
        return next((t for t in self.tables if t.key == key), None)


@dataclass(frozen=True)
class Dashboard:
    key: str
    title: str
    intro: str
    content: Callable[..., Content]
    draw: Callable[[Any, Any], None]
    chart_size: tuple[float, float] = (9, 3.6)


def _label(choices, value: str) -> str:
    try:
        return str(choices(value).label)
    except ValueError:
        return value


def _unit(kind: str, value, unit: str) -> str:
    return shown(kind, value) + (f" {unit}" if value is not None else "")


def _ci(interval) -> list:
    return [interval[0], interval[1]] if interval else [None, None]


# --- Turnaround --------------------------------------------------------------------------------


def _stage_columns() -> list[Column]:
    columns = []
    for stage in STAGES:
        columns += [
            Column(f"{stage.label}: n", INT),
            Column(f"{stage.label}: p50 h", HOURS),
            Column(f"{stage.label}: p90 h", HOURS),
        ]
    return columns


def _stage_cells(durations: dict) -> list:
    cells = []
    for stage in STAGES:
        d = durations[stage.key]
        cells += [d.n, d.p50, d.p90]
    return cells


def turnaround_content(*, institution: Institution, period: Period, now: datetime.datetime | None = None) -> Content:
    data = selectors.turnaround(institution=institution, period=period, now=now)
    overall = dict(data.overall)
    within = data.urgent_within_target_rate
    figures = [
        ("target", "Urgent target", f"{data.target_hours} h from first upload to sign-out"),
        (
            "within-target",
            "Urgent cases signed out within target",
            f"{data.urgent_within_target} of {data.urgent_signed_out}"
            + (f" ({shown(RATE, within)})" if within is not None else ""),
        ),
        ("breaches", "Breaches listed", str(len(data.breaches))),
        ("median-total", "Median upload → sign-out (all)", _unit(HOURS, overall["all"]["total"].p50, "h")),
    ]
    tables = [
        Table(
            "overall",
            "Whole period, per priority",
            [Column("Priority"), *_stage_columns()],
            [
                [_label(BiopsyCase.Priority, p) if p != "all" else "All", *_stage_cells(d)]
                for p, d in data.overall
                if data.weekly
            ],
            "No stage was reached in this period.",
        ),
        Table(
            "weekly",
            "Per week and priority (the week in which each stage ended)",
            [Column("Week"), Column("Priority"), *_stage_columns()],
            [[week, _label(BiopsyCase.Priority, p), *_stage_cells(d)] for week, p, d in data.weekly],
            "No stage was reached in this period.",
        ),
        Table(
            "breaches",
            f"Urgent cases over the {data.target_hours} h target",
            [
                Column("Accession"),
                Column("Uploaded", TIME),
                Column("AI result", TIME),
                Column("Ready for review", TIME),
                Column("Signed out", TIME),
                Column("Hours since upload", HOURS),
                Column("State"),
            ],
            [
                [
                    b.case.accession,
                    b.case.uploaded,
                    b.case.ai_result,
                    b.case.ready,
                    b.case.signed_out,
                    b.hours,
                    "signed out late" if b.signed_out else "not signed out, overdue now",
                ]
                for b in data.breaches
            ],
            "No urgent case over the target in this period, and none overdue now.",
            note="Cases signed out late in the period, then urgent cases not signed out yet whose first upload is "
            "longer ago than the target (whatever the period).",
        ),
    ]
    return Content(
        data=data,
        figures=figures,
        tables=tables,
        chart_empty=None if data.signed_out_weeks else "No cases signed out in this period.",
        chart_alt="Upload to sign-out, p50 and p90 hours per week and priority",
    )


# --- Queue -------------------------------------------------------------------------------------


def queue_content(*, institution: Institution, period: Period, now: datetime.datetime | None = None) -> Content:
    data = selectors.queue(institution=institution, period=period, now=now)

    def waited(since) -> float | None:
        return selectors.hours_between(since, data.now)

    oldest = min((row for row in data.per_status if row.oldest_since), key=lambda r: r.oldest_since, default=None)
    figures = [
        ("waiting", "Cases waiting now", str(data.waiting)),
        ("urgent-waiting", "Urgent cases waiting", str(sum(row.urgent for row in data.per_status))),
        (
            "oldest",
            "Waiting longest",
            f"{oldest.oldest_accession} ({_label(BiopsyCase.Status, oldest.status).lower()} for "
            f"{shown(HOURS, waited(oldest.oldest_since))} h)"
            if oldest
            else "—",
        ),
    ]
    status_headers = [Column(_label(BiopsyCase.Status, status), INT) for status in WAITING]
    tables = [
        Table(
            "status",
            "Waiting now, per status",
            [
                Column("Status"),
                Column("Routine", INT),
                Column("Urgent", INT),
                Column("Total", INT),
                Column("Waiting longest (accession)"),
                Column("In this status since", TIME),
                Column("Hours waiting", HOURS),
            ],
            [
                [
                    _label(BiopsyCase.Status, row.status),
                    row.routine,
                    row.urgent,
                    row.total,
                    row.oldest_accession,
                    row.oldest_since,
                    waited(row.oldest_since),
                ]
                for row in data.per_status
                if data.waiting
            ],
            "No cases waiting.",
        ),
        Table(
            "pathologist",
            "Waiting now, per assigned pathologist",
            [Column("Pathologist"), *status_headers, Column("Total", INT), Column("Oldest in its status since", TIME)],
            [
                [row.pathologist or "(unassigned)", *(row.counts[s] for s in WAITING), row.total, row.oldest_since]
                for row in data.per_pathologist
            ],
            "No cases waiting.",
            note="Cases are assigned to a pathologist on the worklist; cases nobody took are '(unassigned)'.",
        ),
        Table(
            "flow",
            "In and out per week (the period)",
            [
                Column("Week"),
                Column("Cases created", INT),
                Column("Became ready for review", INT),
                Column("Signed out", INT),
            ],
            [list(row) for row in data.flow],
            "No case was created, made ready or signed out in this period.",
            note="'Became ready for review' counts each case once, in the week it last became ready.",
        ),
    ]
    return Content(
        data=data,
        figures=figures,
        tables=tables,
        chart_empty=None if data.waiting else "No cases waiting now.",
        chart_alt="Cases waiting now per status, routine and urgent",
        notes=["The queue is as it stands now; the period applies to the last table only."],
    )


# --- Workload ----------------------------------------------------------------------------------


def _work_cells(work: selectors.Work) -> list:
    return [work.reviews, work.overrides, work.cases, work.sign_outs]


WORK_COLUMNS = [
    Column("Patch reviews", INT),
    Column("Overrides", INT),
    Column("Cases reviewed", INT),
    Column("Sign-outs", INT),
]


def workload_content(*, institution: Institution, period: Period, now=None) -> Content:
    data = selectors.workload(institution=institution, period=period)
    figures = [
        ("reviews", "Patch reviews", str(sum(w.reviews for _, w in data.totals))),
        ("sign-outs", "Sign-outs", str(sum(w.sign_outs for _, w in data.totals))),
        ("pathologists", "Pathologists at work", str(len(data.totals))),
    ]
    tables = [
        Table(
            "totals",
            "Per pathologist, whole period",
            [Column("Pathologist"), *WORK_COLUMNS],
            [[name, *_work_cells(work)] for name, work in data.totals],
            "No reviews or sign-outs in this period.",
        ),
        Table(
            "weekly",
            "Per week and pathologist",
            [Column("Week"), Column("Pathologist"), *WORK_COLUMNS],
            [[week, name, *_work_cells(work)] for week, name, work in data.weekly],
            "No reviews or sign-outs in this period.",
        ),
    ]
    return Content(
        data=data,
        figures=figures,
        tables=tables,
        chart_empty=None if data.weekly else "No reviews or sign-outs in this period.",
        chart_alt="Patch reviews and sign-outs per week and pathologist",
    )


# --- AI performance ----------------------------------------------------------------------------

SENSITIVITY_COLUMNS = [
    Column("Sensitivity", RATE),
    Column("Sensitivity 95% CI low", RATE),
    Column("Sensitivity 95% CI high", RATE),
]
SPECIFICITY_COLUMNS = [
    Column("Specificity", RATE),
    Column("Specificity 95% CI low", RATE),
    Column("Specificity 95% CI high", RATE),
]
TUMOUR_COLUMNS = [
    Column("Final TUM", INT),
    Column("Suspected (TP)", INT),
    *SENSITIVITY_COLUMNS,
    Column("Final other", INT),
    Column("Not suspected (TN)", INT),
    *SPECIFICITY_COLUMNS,
]


def _tumour_cells(row: selectors.TumourCounts) -> list:
    return [
        row.tumour,
        row.tp,
        row.sensitivity,
        *_ci(row.sensitivity_ci),
        row.other,
        row.tn,
        row.specificity,
        *_ci(row.specificity_ci),
    ]


def ai_performance_content(*, institution: Institution, period: Period, now=None) -> Content:
    data = selectors.ai_performance(institution=institution, period=period)
    share = data.overridden / data.reviewed if data.reviewed else None
    figures = [
        ("reviewed", "Patches with a final diagnosis", str(data.reviewed)),
        (
            "overridden",
            "AI class overridden",
            f"{data.overridden}" + (f" ({shown(RATE, share)})" if share is not None else ""),
        ),
    ]
    tables = [
        Table(
            "tumour",
            "Suspected tumour against the final class TUM, per model version",
            [Column("Model version"), *TUMOUR_COLUMNS],
            [[row.version, *_tumour_cells(row)] for row in data.by_version],
            "No signed-out cases with reviewed patches in this period.",
        ),
        Table(
            "tumour_monthly",
            "Suspected tumour per model version and month of sign-out",
            [Column("Model version"), Column("Month"), *TUMOUR_COLUMNS],
            [[row.version, row.month, *_tumour_cells(row)] for row in data.by_month],
            "No signed-out cases with reviewed patches in this period.",
        ),
        Table(
            "classes",
            "AI class against final class, each class against the rest",
            [
                Column("Model version"),
                Column("Class"),
                Column("Final class", INT),
                Column("AI class", INT),
                Column("Both", INT),
                *SENSITIVITY_COLUMNS,
                *SPECIFICITY_COLUMNS,
            ],
            [
                [
                    row.version,
                    row.label,
                    row.final,
                    row.called,
                    row.both,
                    row.sensitivity,
                    *_ci(row.sensitivity_ci),
                    row.specificity,
                    *_ci(row.specificity_ci),
                ]
                for row in data.per_class
            ],
            "No signed-out cases with reviewed patches in this period.",
        ),
        Table(
            "overrides",
            "Overrides by reason",
            [Column("Reason"), Column("Patches", INT), Column("Share of overrides", RATE)],
            [
                [_label(Review.Reason, code) if code else "(none given)", n, n / data.overridden]
                for code, n in data.overrides
            ],
            "No overrides in this period.",
        ),
    ]
    return Content(
        data=data,
        figures=figures,
        tables=tables,
        chart_empty=None if data.by_month else "No signed-out cases with reviewed patches in this period.",
        chart_alt="Suspected-tumour sensitivity and specificity per month, with 95% intervals",
    )


# --- Throughput --------------------------------------------------------------------------------


def throughput_content(*, institution: Institution, period: Period, now=None) -> Content:
    data = selectors.throughput(institution=institution, period=period)
    totals = data.totals
    figures = [
        ("uploaded", "Patches uploaded", str(totals.uploaded)),
        ("results", "AI results", str(totals.results)),
        ("unassessable", "Unassessable", str(totals.unassessable)),
        ("failed", "Failed", str(totals.failed)),
        ("model-time", "Mean model time per patch", _unit(SECONDS, totals.mean_seconds, "s")),
    ]
    tables = [
        Table(
            "buckets",
            f"Per {data.unit}",
            [
                Column("Hour" if data.unit == "hour" else "Day", TIME),
                Column("Uploaded", INT),
                Column("AI results", INT),
                Column("Unassessable", INT),
                Column("Failed", INT),
                Column("Mean model time (s)", SECONDS),
            ],
            [[bucket, f.uploaded, f.results, f.unassessable, f.failed, f.mean_seconds] for bucket, f in data.buckets],
            "No patches uploaded or analysed in this period.",
            note=f"Periods up to {selectors.HOURLY_MAX_DAYS} days are counted per hour, longer ones per day.",
        ),
        Table(
            "reasons",
            "Unassessable and failed patches by reason",
            [Column("Outcome"), Column("Reason"), Column("Patches", INT)],
            [
                [_label(TissuePatch.Status, status), reason or "(none recorded)", n]
                for status, reason, n in data.reasons
            ],
            "No unassessable or failed patches in this period.",
        ),
    ]
    analysed = totals.results + totals.unassessable + totals.failed
    return Content(
        data=data,
        figures=figures,
        tables=tables,
        chart_empty=None if analysed else "No patches analysed in this period.",
        chart_alt=f"Patches analysed per {data.unit}",
    )


DASHBOARDS = {
    d.key: d
    for d in (
        Dashboard(
            "turnaround",
            "Turnaround",
            "Hours from the first patch uploaded to the AI result, to ready for review, to sign-out.",
            turnaround_content,
            charts.draw_turnaround,
        ),
        Dashboard(
            "queue",
            "Queue now",
            "Cases waiting now, per status and per assigned pathologist.",
            queue_content,
            charts.draw_queue,
            (7, 3.4),
        ),
        Dashboard(
            "workload",
            "Workload",
            "Patch reviews and sign-outs per pathologist and week.",
            workload_content,
            charts.draw_workload,
            (10, 3.4),
        ),
        Dashboard(
            "ai-performance",
            "AI performance",
            "The AI against the pathologists' final diagnoses on the cases signed out in the period.",
            ai_performance_content,
            charts.draw_ai_performance,
            (10, 3.6),
        ),
        Dashboard(
            "throughput",
            "Throughput",
            "Patches uploaded and analysed, and those refused, per hour or day.",
            throughput_content,
            charts.draw_throughput,
            (10, 3.8),
        ),
    )
}
