"""The figures of the operations dashboards, for one institution and one period.

Counting is done by the database (grouped ``annotate``/``aggregate`` queries); only percentiles are
computed here, from one ``values_list`` query of the period's cases, so that PostgreSQL and SQLite
give the same answers. Every function reads a fixed number of queries, whatever the number of rows.
docs/dashboards.md says what each figure means.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Avg, BooleanField, Case, CharField, Count, F, Max, Min, Q, QuerySet, Value, When
from django.db.models.functions import Coalesce, TruncDay, TruncHour, TruncMonth, TruncWeek
from django.utils import timezone

from accounts.models import Institution
from cases.models import BiopsyCase, Review, SignOut, TissuePatch
from dashboards.periods import Period
from dashboards.stats import percentile, rate, wilson
from inference.models import Prediction

Status = BiopsyCase.Status
Priority = BiopsyCase.Priority
WAITING = (Status.OPEN, Status.ANALYSING, Status.READY_FOR_REVIEW)
TUMOUR = "TUM"
HOURLY_MAX_DAYS = 7  # longer periods are counted per day
# The quality check's codes, as drift monitoring names them (inference/drift.py).
QC_REASONS = {"blank": "blank", "background": "empty glass", "out_of_focus": "out of focus", "not_he": "not H&E"}


def within(field_name: str, period: Period) -> Q:
    return Q(**{f"{field_name}__gte": period.since, f"{field_name}__lt": period.until})


def week_label(moment: datetime.datetime | datetime.date) -> str:
    """The ISO week of a moment in the platform's time zone, e.g. '2026-W09'."""
    if isinstance(moment, datetime.datetime):
        moment = timezone.localtime(moment)
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def month_label(moment: datetime.datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m")


def period_weeks(period: Period) -> list[str]:
    """Every ISO week the period touches, in order (a chart's axis, gaps included)."""
    monday = period.start - datetime.timedelta(days=period.start.weekday())
    return [week_label(monday + datetime.timedelta(weeks=i)) for i in range((period.end - monday).days // 7 + 1)]


def period_months(period: Period) -> list[str]:
    """Every calendar month the period touches, in order, as YYYY-MM."""
    months, year, month = [], period.start.year, period.start.month
    while (year, month) <= (period.end.year, period.end.month):
        months.append(f"{year}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def hours_between(start: datetime.datetime | None, end: datetime.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() / 3600


def version_label(name: str, version: str) -> str:
    return f"{name} v{version}"  # as ModelVersion.__str__ shows it


# --- Turnaround --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    key: str
    label: str
    start: str  # CaseTimes attribute
    end: str


STAGES = (
    Stage("upload_to_ai", "Upload → AI result", "uploaded", "ai_result"),
    Stage("ai_to_ready", "AI result → ready for review", "ai_result", "ready"),
    Stage("ready_to_sign_out", "Ready for review → sign-out", "ready", "signed_out"),
    Stage("total", "Upload → sign-out", "uploaded", "signed_out"),
)


@dataclass(frozen=True)
class CaseTimes:
    """When one case reached each stage (None: not yet, or not known)."""

    accession: str
    priority: str
    uploaded: datetime.datetime | None  # its first patch stored
    ai_result: datetime.datetime | None  # its last AI result before it became ready for review
    ready: datetime.datetime | None  # it last became ready for review
    signed_out: datetime.datetime | None

    def hours(self, stage: Stage) -> float | None:
        return hours_between(getattr(self, stage.start), getattr(self, stage.end))


@dataclass(frozen=True)
class Durations:
    """Hours of one stage over a group of cases."""

    n: int
    p50: float | None
    p90: float | None

    @classmethod
    def of(cls, hours: list[float]) -> Durations:
        return cls(n=len(hours), p50=percentile(hours, 50), p90=percentile(hours, 90))


@dataclass(frozen=True)
class Breach:
    case: CaseTimes
    hours: float  # upload to sign-out, or to now while not signed out
    signed_out: bool


@dataclass
class Turnaround:
    period: Period
    target_hours: int
    weekly: list[tuple[str, str, dict[str, Durations]]]  # (ISO week, priority, {stage: durations})
    overall: list[tuple[str, dict[str, Durations]]]  # (priority or "all", {stage: durations})
    urgent_signed_out: int
    urgent_within_target: int
    breaches: list[Breach]

    @property
    def urgent_within_target_rate(self) -> float | None:
        return rate(self.urgent_within_target, self.urgent_signed_out)

    @property
    def signed_out_weeks(self) -> list[tuple[str, str, Durations]]:
        """(week, priority, upload-to-sign-out durations) of the weeks with sign-outs, for the chart."""
        return [(week, priority, stages["total"]) for week, priority, stages in self.weekly if stages["total"].n]


def _case_times(cases: QuerySet[BiopsyCase]) -> QuerySet:
    # The last AI result up to the moment the case became ready: results of patches added after that
    # belong to its next round of analysis, which ends in a later ready_for_review_at.
    return cases.annotate(
        uploaded=Min("patches__created_at"),
        ai_result=Max(
            "patches__predictions__created_at",
            filter=Q(patches__predictions__created_at__lte=F("ready_for_review_at")),
        ),
    )


def turnaround(*, institution: Institution, period: Period, now: datetime.datetime | None = None) -> Turnaround:
    """Hours from upload to AI result to ready for review to sign-out, as p50/p90 per ISO week and
    priority. A stage counts in the period, and in the week, in which it ended. Two queries."""
    now = now or timezone.now()
    target = int(settings.TURNAROUND_URGENT_TARGET_HOURS)
    # Cheap first cut in WHERE (an AI result in the period means ready for review at or after its
    # start), so that only those cases are grouped; the exact test on the stage times follows.
    candidates = BiopsyCase.objects.filter(institution=institution).filter(
        Q(ready_for_review_at__gte=period.since, created_at__lt=period.until) | within("sign_out__created_at", period)
    )
    rows = (
        _case_times(candidates)
        .filter(
            within("ready_for_review_at", period) | within("sign_out__created_at", period) | within("ai_result", period)
        )
        .order_by("pk")
        .values_list("accession", "priority", "uploaded", "ai_result", "ready_for_review_at", "sign_out__created_at")
    )
    cases = [CaseTimes(*row) for row in rows]

    weekly: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    overall: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for case in cases:
        for stage in STAGES:
            end, hours = getattr(case, stage.end), case.hours(stage)
            if hours is None or not period.since <= end < period.until:
                continue
            weekly[(week_label(end), case.priority)][stage.key].append(hours)
            overall[case.priority][stage.key].append(hours)
            overall["all"][stage.key].append(hours)

    def durations(hours_by_stage) -> dict[str, Durations]:
        return {stage.key: Durations.of(hours_by_stage.get(stage.key, [])) for stage in STAGES}

    priorities = [*Priority.values, "all"]
    urgent_done = [
        c
        for c in cases
        if c.priority == Priority.URGENT and c.uploaded and c.signed_out and period.since <= c.signed_out < period.until
    ]
    late = [Breach(c, hours_between(c.uploaded, c.signed_out), True) for c in urgent_done]
    late = [b for b in late if b.hours > target]
    # Urgent cases not signed out whose first upload is longer ago than the target: overdue now,
    # whatever the period.
    open_rows = (
        _case_times(BiopsyCase.objects.filter(institution=institution, priority=Priority.URGENT))
        .exclude(status=Status.SIGNED_OUT)
        .filter(uploaded__lt=now - datetime.timedelta(hours=target))
        .order_by("uploaded", "pk")
        .values_list("accession", "priority", "uploaded", "ai_result", "ready_for_review_at")
    )
    overdue = [Breach(CaseTimes(*row, None), hours_between(row[2], now), False) for row in open_rows]
    return Turnaround(
        period=period,
        target_hours=target,
        weekly=[(week, priority, durations(weekly[(week, priority)])) for week, priority in sorted(weekly)],
        overall=[(priority, durations(overall[priority])) for priority in priorities],
        urgent_signed_out=len(urgent_done),
        urgent_within_target=len(urgent_done) - len(late),
        breaches=sorted(late, key=lambda b: -b.hours) + overdue,
    )


# --- Queue now ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusQueue:
    status: str
    routine: int
    urgent: int
    oldest_since: datetime.datetime | None
    oldest_accession: str

    @property
    def total(self) -> int:
        return self.routine + self.urgent


@dataclass(frozen=True)
class PathologistQueue:
    pathologist: str  # user name; "" for cases assigned to nobody
    counts: dict[str, int]  # {waiting status: cases}
    oldest_since: datetime.datetime | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Queue:
    now: datetime.datetime
    per_status: list[StatusQueue]
    per_pathologist: list[PathologistQueue]
    flow: list[tuple[str, int, int, int]]  # (ISO week, created, became ready for review, signed out)

    @property
    def waiting(self) -> int:
        return sum(row.total for row in self.per_status)


def _weekly_counts(queryset: QuerySet, field_name: str) -> dict[str, int]:
    rows = queryset.annotate(week=TruncWeek(field_name)).values("week").annotate(n=Count("pk")).values_list("week", "n")
    counts: dict[str, int] = defaultdict(int)
    for week, n in rows:
        counts[week_label(week)] += n
    return counts


def queue(*, institution: Institution, period: Period, now: datetime.datetime | None = None) -> Queue:
    """The cases waiting now, per status (with the one waiting longest) and per assigned
    pathologist; and, for the period, cases created, made ready for review and signed out per week.
    Eight queries."""
    now = now or timezone.now()
    waiting = BiopsyCase.objects.filter(institution=institution, status__in=WAITING)
    counts = {
        (status, priority): (n, oldest)
        for status, priority, n, oldest in waiting.values("status", "priority")
        .annotate(n=Count("pk"), oldest=Min("status_changed_at"))
        .values_list("status", "priority", "n", "oldest")
    }
    per_status = []
    for status in WAITING:
        routine = counts.get((status, Priority.ROUTINE), (0, None))
        urgent = counts.get((status, Priority.URGENT), (0, None))
        oldest = (
            waiting.filter(status=status)
            .order_by("status_changed_at", "pk")
            .values_list("accession", "status_changed_at")
            .first()
        )
        per_status.append(
            StatusQueue(
                status=status,
                routine=routine[0],
                urgent=urgent[0],
                oldest_since=oldest[1] if oldest else None,
                oldest_accession=oldest[0] if oldest else "",
            )
        )
    by_pathologist: dict[str, dict] = {}
    for name, status, n, oldest in (
        waiting.values("assigned_to__username", "status")
        .annotate(n=Count("pk"), oldest=Min("status_changed_at"))
        .values_list("assigned_to__username", "status", "n", "oldest")
    ):
        row = by_pathologist.setdefault(name or "", {"counts": dict.fromkeys(WAITING, 0), "oldest": None})
        row["counts"][status] = n
        row["oldest"] = oldest if row["oldest"] is None else min(row["oldest"], oldest)
    per_pathologist = [
        PathologistQueue(pathologist=name, counts=row["counts"], oldest_since=row["oldest"])
        for name, row in sorted(by_pathologist.items(), key=lambda item: (item[0] == "", item[0]))
    ]
    cases = BiopsyCase.objects.filter(institution=institution)
    created = _weekly_counts(cases.filter(within("created_at", period)), "created_at")
    ready = _weekly_counts(cases.filter(within("ready_for_review_at", period)), "ready_for_review_at")
    signed = _weekly_counts(
        SignOut.objects.filter(case__institution=institution).filter(within("created_at", period)), "created_at"
    )
    weeks = sorted(set(created) | set(ready) | set(signed))
    return Queue(
        now=now,
        per_status=per_status,
        per_pathologist=per_pathologist,
        flow=[(week, created.get(week, 0), ready.get(week, 0), signed.get(week, 0)) for week in weeks],
    )


# --- Workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    reviews: int = 0  # patch reviews written (a change of mind is a second one)
    overrides: int = 0
    cases: int = 0  # distinct cases with at least one of those reviews
    sign_outs: int = 0


@dataclass
class Workload:
    period: Period
    weekly: list[tuple[str, str, Work]]  # (ISO week, pathologist, work)
    totals: list[tuple[str, Work]]  # (pathologist, work over the whole period)


def _review_counts(reviews: QuerySet[Review], *group) -> QuerySet:
    return reviews.values(*group).annotate(
        reviews=Count("pk"),
        overrides=Count("pk", filter=Q(decision=Review.Decision.OVERRIDE)),
        cases=Count("patch__case", distinct=True),
    )


def workload(*, institution: Institution, period: Period) -> Workload:
    """Reviews and sign-outs per pathologist, per ISO week and over the period. Four queries."""
    reviews = Review.objects.filter(patch__case__institution=institution).filter(within("created_at", period))
    sign_outs = SignOut.objects.filter(case__institution=institution).filter(within("created_at", period))
    weekly: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in _review_counts(reviews.annotate(week=TruncWeek("created_at")), "week", "pathologist__username"):
        key = (week_label(row["week"]), row["pathologist__username"])
        for name in ("reviews", "overrides", "cases"):
            weekly[key][name] += row[name]
    for week, name, n in (
        sign_outs.annotate(week=TruncWeek("created_at"))
        .values("week", "pathologist__username")
        .annotate(n=Count("pk"))
        .values_list("week", "pathologist__username", "n")
    ):
        weekly[(week_label(week), name)]["sign_outs"] += n
    totals: dict[str, dict[str, int]] = defaultdict(dict)
    for row in _review_counts(reviews, "pathologist__username"):
        totals[row["pathologist__username"]].update(
            reviews=row["reviews"], overrides=row["overrides"], cases=row["cases"]
        )
    for name, n in (
        sign_outs.values("pathologist__username").annotate(n=Count("pk")).values_list("pathologist__username", "n")
    ):
        totals[name]["sign_outs"] = n
    return Workload(
        period=period,
        weekly=[(week, name, Work(**weekly[(week, name)])) for week, name in sorted(weekly)],
        totals=[(name, Work(**totals[name])) for name in sorted(totals)],
    )


# --- AI performance against final diagnoses ----------------------------------------------------


@dataclass(frozen=True)
class TumourCounts:
    """ "Suspected tumour" (the AI at the site's operating point) against the final class TUM."""

    version: str
    month: str  # YYYY-MM, or "" for the whole period
    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0

    @property
    def tumour(self) -> int:
        return self.tp + self.fn

    @property
    def other(self) -> int:
        return self.tn + self.fp

    @property
    def sensitivity(self) -> float | None:
        return rate(self.tp, self.tumour)

    @property
    def specificity(self) -> float | None:
        return rate(self.tn, self.other)

    @property
    def sensitivity_ci(self) -> tuple[float, float] | None:
        return wilson(self.tp, self.tumour)

    @property
    def specificity_ci(self) -> tuple[float, float] | None:
        return wilson(self.tn, self.other)


@dataclass(frozen=True)
class ClassCounts:
    """The AI's class against the final class, one class against the rest."""

    version: str
    label: str
    final: int  # patches whose final class is this one
    called: int  # patches the AI gave this class
    both: int  # ... of which the final class is this one too
    total: int  # every patch of the version

    @property
    def sensitivity(self) -> float | None:
        return rate(self.both, self.final)

    @property
    def specificity(self) -> float | None:
        return rate(self.true_negatives, self.total - self.final)

    @property
    def true_negatives(self) -> int:
        return self.total - self.final - (self.called - self.both)

    @property
    def sensitivity_ci(self) -> tuple[float, float] | None:
        return wilson(self.both, self.final)

    @property
    def specificity_ci(self) -> tuple[float, float] | None:
        return wilson(self.true_negatives, self.total - self.final)


@dataclass
class AIPerformance:
    period: Period
    by_version: list[TumourCounts]
    by_month: list[TumourCounts]
    per_class: list[ClassCounts]
    overrides: list[tuple[str, int]]  # (reason code, final reviews overriding the AI for it)
    reviewed: int  # patches with a final review in the period

    @property
    def overridden(self) -> int:
        return sum(n for _, n in self.overrides)


def final_reviews(*, institution: Institution, period: Period) -> QuerySet[Review]:
    """The review that holds each patch's final class, for the cases signed out in the period: the
    patch's latest adjudication if any, else its latest review (at sign-out every patch's reads
    agree or were adjudicated)."""
    finals = (
        Review.objects.filter(patch__case__institution=institution)
        .filter(within("patch__case__sign_out__created_at", period))
        .values("patch_id")
        .annotate(final=Coalesce(Max("pk", filter=Q(read=Review.Read.ADJUDICATION)), Max("pk")))
        .values("final")
    )
    return Review.objects.filter(pk__in=finals)


def ai_performance(*, institution: Institution, period: Period) -> AIPerformance:
    """Sensitivity and specificity of "suspected tumour" and of each class against the pathologists'
    final classes, per model version (and month of sign-out), with Wilson 95% intervals; overrides by
    reason. Three queries."""
    reviews = final_reviews(institution=institution, period=period)
    version = ("prediction__model_version__name", "prediction__model_version__version")
    # As the worklist counts it (cases.selectors.with_ai_summary): the judgement stored with the
    # prediction; for a prediction stored before operating points (no threshold), the AI's class.
    # A model without a TUM class judges nothing (threshold stored, judgement empty): left out.
    unjudged = Q(prediction__tumour_threshold__isnull=True)
    suspected = Case(
        When(Q(prediction__suspected_tumour=True) | (unjudged & Q(prediction__label=TUMOUR)), then=Value("yes")),
        When(Q(prediction__suspected_tumour=False) | unjudged, then=Value("no")),
        default=Value(""),
        output_field=CharField(),
    )
    tumour = Case(When(final_label=TUMOUR, then=Value(True)), default=Value(False), output_field=BooleanField())
    months: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, number, month, judged, is_tumour, n in (
        reviews.annotate(month=TruncMonth("patch__case__sign_out__created_at"), judged=suspected, tumour=tumour)
        .exclude(judged="")
        .values(*version, "month", "judged", "tumour")
        .annotate(n=Count("pk"))
        .values_list(*version, "month", "judged", "tumour", "n")
    ):
        cell = {("yes", True): "tp", ("no", True): "fn", ("no", False): "tn", ("yes", False): "fp"}[(judged, is_tumour)]
        label = version_label(name, number)
        months[(label, month_label(month))][cell] += n
        totals[label][cell] += n
    confusion: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    reviewed = 0
    for name, number, ai, final, n in (
        reviews.values(*version, "prediction__label", "final_label")
        .annotate(n=Count("pk"))
        .values_list(*version, "prediction__label", "final_label", "n")
    ):
        confusion[version_label(name, number)][(ai, final)] = n
        reviewed += n
    per_class = []
    for label, cells in sorted(confusion.items()):
        total = sum(cells.values())
        for cls in sorted({c for pair in cells for c in pair}):
            per_class.append(
                ClassCounts(
                    version=label,
                    label=cls,
                    final=sum(n for (_, final), n in cells.items() if final == cls),
                    called=sum(n for (ai, _), n in cells.items() if ai == cls),
                    both=cells.get((cls, cls), 0),
                    total=total,
                )
            )
    overrides = list(
        reviews.filter(decision=Review.Decision.OVERRIDE)
        .values("reason_code")
        .annotate(n=Count("pk"))
        .order_by("-n", "reason_code")
        .values_list("reason_code", "n")
    )
    return AIPerformance(
        period=period,
        by_version=[TumourCounts(label, "", **cells) for label, cells in sorted(totals.items())],
        by_month=[TumourCounts(label, month, **months[(label, month)]) for label, month in sorted(months)],
        per_class=per_class,
        overrides=overrides,
        reviewed=reviewed,
    )


# --- Throughput --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    uploaded: int = 0  # patches stored
    results: int = 0  # AI results written
    unassessable: int = 0  # refused by the quality check
    failed: int = 0  # analysis failed (unreadable file, attempts exhausted)
    mean_seconds: float | None = None  # model time per patch of the results


@dataclass
class Throughput:
    period: Period
    unit: str  # "hour" or "day"
    buckets: list[tuple[datetime.datetime, Flow]]
    reasons: list[tuple[str, str, int]]  # (status, reason, patches)

    @property
    def totals(self) -> Flow:
        flows = [flow for _, flow in self.buckets]
        results = sum(f.results for f in flows)
        seconds = sum((f.mean_seconds or 0) * f.results for f in flows)
        return Flow(
            uploaded=sum(f.uploaded for f in flows),
            results=results,
            unassessable=sum(f.unassessable for f in flows),
            failed=sum(f.failed for f in flows),
            mean_seconds=seconds / results if results else None,
        )


def throughput(*, institution: Institution, period: Period) -> Throughput:
    """Patches stored, analysed, unassessable and failed per hour (per day for periods over
    HOURLY_MAX_DAYS), and why patches were refused. A refused patch counts at the time a worker
    claimed it (its analysis ran then), as drift monitoring counts it. Four queries."""
    unit, trunc = ("hour", TruncHour) if period.days <= HOURLY_MAX_DAYS else ("day", TruncDay)
    patches = TissuePatch.objects.filter(case__institution=institution)
    flows: dict[datetime.datetime, dict] = defaultdict(dict)
    for bucket, n in (
        patches.filter(within("created_at", period))
        .annotate(bucket=trunc("created_at"))
        .values("bucket")
        .annotate(n=Count("pk"))
        .values_list("bucket", "n")
    ):
        flows[bucket]["uploaded"] = n
    for bucket, n, seconds in (
        Prediction.objects.filter(patch__case__institution=institution)
        .filter(within("created_at", period))
        .annotate(bucket=trunc("created_at"))
        .values("bucket")
        .annotate(n=Count("pk"), seconds=Avg("inference_seconds"))
        .values_list("bucket", "n", "seconds")
    ):
        flows[bucket].update(results=n, mean_seconds=seconds)
    refused = patches.filter(status__in=[TissuePatch.Status.UNASSESSABLE, TissuePatch.Status.FAILED]).filter(
        within("claimed_at", period)
    )
    for bucket, status, n in (
        refused.annotate(bucket=trunc("claimed_at"))
        .values("bucket", "status")
        .annotate(n=Count("pk"))
        .values_list("bucket", "status", "n")
    ):
        flows[bucket][status] = n
    reason = Case(
        When(status=TissuePatch.Status.UNASSESSABLE, then=F("failure_code")),
        default=F("failure_reason"),
        output_field=CharField(),
    )
    reasons = [
        (status, QC_REASONS.get(code, code) if status == TissuePatch.Status.UNASSESSABLE else code, n)
        for status, code, n in refused.annotate(reason=reason)
        .values("status", "reason")
        .annotate(n=Count("pk"))
        .order_by("status", "-n", "reason")
        .values_list("status", "reason", "n")
    ]
    return Throughput(
        period=period,
        unit=unit,
        buckets=[(bucket, Flow(**flows[bucket])) for bucket in sorted(flows)],
        reasons=reasons,
    )
