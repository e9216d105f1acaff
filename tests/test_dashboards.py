"""Operations dashboards: every figure against values computed by hand from a scenario of cases
with known timestamps; empty and single-point states; roles, institution isolation, CSV downloads
(audited), bad dates, and query counts that do not grow with the number of cases."""

from __future__ import annotations

import csv
import datetime
import importlib
import io
import uuid
from dataclasses import dataclass, field

import pytest
from django.apps import apps as django_apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from audit.models import AuditEvent
from cases.models import BiopsyCase, Patient, Review, SignOut, TissuePatch
from cases.selectors import cases_visible_to
from cases.transitions import case_transition
from dashboards import reports, selectors
from dashboards.periods import BadPeriod, Period, period_from
from dashboards.stats import percentile, wilson
from inference.models import ModelVersion, Prediction
from tests.conftest import make_user, new_case, verified_login

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
MARCH = Period(datetime.date(2026, 3, 2), datetime.date(2026, 3, 15))  # ISO weeks 2026-W10 and W11
NOW = datetime.datetime(2026, 3, 14, 0, 0, tzinfo=UTC)
MARCH_QUERY = "from=2026-03-02&to=2026-03-15"


def at(day: int, hour: int = 0, minute: int = 0, month: int = 3) -> datetime.datetime:
    return datetime.datetime(2026, month, day, hour, minute, tzinfo=UTC)


@dataclass
class P:
    """One patch: AI class (None: no result), suspected tumour, final class, and reviews as
    [(decision, final class, reason)] in order (the last one stands)."""

    ai: str | None = None
    suspected: bool | None = None
    reviews: list[tuple[str, str, str]] = field(default_factory=list)
    status: str = TissuePatch.Status.DONE
    failure_code: str = ""
    failure_reason: str = ""
    claimed: datetime.datetime | None = None
    seconds: float = 0.2


def confirm(label: str):
    return ("confirm", label, "")


def override(label: str, reason: str = "wrong_class"):
    return ("override", label, reason)


class Builder:
    """Cases written straight to the tables with the times given (auto_now_add is overwritten)."""

    def __init__(self, institution):
        self.institution = institution
        self.v1 = self.version("1")
        self.v2 = self.version("2")
        self.count = 0

    @staticmethod
    def version(number: str) -> ModelVersion:
        return ModelVersion.objects.get_or_create(
            name="demo",
            version=number,
            defaults={
                "path": "nowhere",
                "file_sha256": "0" * 64,
                "classes": ["MUC", "NORM", "STR", "TUM"],
                "input_size": 224,
                "preprocessing": "mobilenet_v2",
                "metadata": {},
            },
        )[0]

    def case(
        self,
        accession: str,
        *,
        priority: str = "routine",
        created: datetime.datetime,
        uploaded: datetime.datetime | None = None,
        ai: datetime.datetime | None = None,
        ready: datetime.datetime | None = None,
        signed: datetime.datetime | None = None,
        status: str | None = None,
        changed: datetime.datetime | None = None,
        version: ModelVersion | None = None,
        patches: list[P] = (),
        reader: User | None = None,
        assigned: User | None = None,
    ) -> BiopsyCase:
        self.count += 1
        patient = Patient.objects.create(institution=self.institution, mrn=f"MRN-{accession}", name="Test Patient")
        if status is None:
            status = "signed_out" if signed else "ready_for_review" if ready else "analysing" if uploaded else "open"
        case = BiopsyCase.objects.create(
            institution=self.institution,
            patient=patient,
            accession=accession,
            specimen_site="rectum",
            priority=priority,
            status=status,
            assigned_to=assigned,
        )
        BiopsyCase.objects.filter(pk=case.pk).update(
            created_at=created,
            ready_for_review_at=ready,
            status_changed_at=changed or signed or ready or uploaded or created,
        )
        version = version or self.v1
        for number, spec in enumerate(patches):
            patch = TissuePatch.objects.create(
                case=case,
                storage_name=f"patches/test/{uuid.uuid4().hex}.png",
                sha256="a" * 64,
                source_sha256="a" * 64,
                width=224,
                height=224,
                format="PNG",
                original_name=f"{accession}-{number}.png",
                status=spec.status,
                failure_code=spec.failure_code,
                failure_reason=spec.failure_reason,
                enqueued_at=uploaded,
                claimed_at=spec.claimed or (ai if spec.ai else None),
            )
            TissuePatch.objects.filter(pk=patch.pk).update(created_at=uploaded)
            if spec.ai is None:
                continue
            prediction = Prediction.objects.create(
                patch=patch,
                model_version=version,
                scores={spec.ai: 0.9},
                label=spec.ai,
                inference_seconds=spec.seconds,
                suspected_tumour=spec.suspected,
                tumour_threshold=0.5,
            )
            Prediction.objects.filter(pk=prediction.pk).update(created_at=ai)
            for index, (decision, final, reason) in enumerate(spec.reviews):
                review = Review.objects.create(
                    patch=patch,
                    prediction=prediction,
                    pathologist=reader,
                    decision=decision,
                    final_label=final,
                    reason_code=reason,
                )
                when = (signed or ai) - datetime.timedelta(hours=1) + datetime.timedelta(minutes=index)
                Review.objects.filter(pk=review.pk).update(created_at=when)
        if signed:
            sign_out = SignOut.objects.create(
                case=case, pathologist=reader, conclusion="no_tumour", tumour_fraction=0.0
            )
            SignOut.objects.filter(pk=sign_out.pk).update(created_at=signed)
        return case


@dataclass
class Scenario:
    reader: User
    reader2: User
    builder: Builder


def build(institution, prefix: str = "") -> Scenario:
    """The scenario the hand-computed figures below are for (docstring of each test)."""
    reader = make_user(institution, User.Role.PATHOLOGIST, username=f"{prefix}reader")
    reader2 = make_user(institution, User.Role.PATHOLOGIST, username=f"{prefix}reader2")
    b = Builder(institution)
    tum, norm = P("TUM", True, [confirm("TUM")]), P("NORM", False, [confirm("NORM")])
    # Routine, week 10: stages 1 / 1 / 24 h (A), 2 / 0.5 / 48 h (B), 6 / 0 / 12 h (C).
    b.case(f"{prefix}A", created=at(3, 7), uploaded=at(3, 8), ai=at(3, 9), ready=at(3, 10), signed=at(4, 10),
           patches=[tum, norm], reader=reader)  # fmt: skip
    b.case(f"{prefix}B", created=at(3, 11), uploaded=at(3, 12), ai=at(3, 14), ready=at(3, 14, 30), signed=at(5, 14, 30),
           patches=[P("TUM", True, [override("STR")]), P("NORM", False, [override("TUM")])], reader=reader)  # fmt: skip
    b.case(f"{prefix}C", created=at(5, 23), uploaded=at(6, 0), ai=at(6, 6), ready=at(6, 6), signed=at(6, 18),
           patches=[tum, P(status="unassessable", failure_code="out_of_focus", claimed=at(6, 1))],
           reader=reader)  # fmt: skip
    # Urgent, week 11: D within the 24 h target (12 h), E over it (36 h), F not signed out.
    b.case(f"{prefix}D", priority="urgent", created=at(10, 7), uploaded=at(10, 8), ai=at(10, 8, 30), ready=at(10, 9),
           signed=at(10, 20), version=b.v2, reader=reader2,
           patches=[P("NORM", False, [confirm("NORM")], seconds=0.4), P("TUM", True, [confirm("TUM")], seconds=0.4),
                    P(status="failed", failure_reason="stored image cannot be read: truncated",
                      claimed=at(10, 8, 10))])  # fmt: skip
    b.case(f"{prefix}E", priority="urgent", created=at(9, 23), uploaded=at(10, 0), ai=at(10, 1), ready=at(10, 2),
           signed=at(11, 12), version=b.v2, reader=reader2,
           patches=[P("MUC", False, [confirm("MUC")]),
                    P("NORM", False, [override("MUC", "poor_quality"), confirm("NORM")])])  # fmt: skip
    b.case(f"{prefix}F", priority="urgent", created=at(11, 23), uploaded=at(12, 0), ai=at(12, 1), ready=at(12, 1),
           version=b.v2, assigned=reader, patches=[P("TUM", True)])  # fmt: skip
    # Routine G: AI result and ready in week 11, signed out the day after the period.
    b.case(f"{prefix}G", created=at(14, 9), uploaded=at(14, 10), ai=at(14, 11), ready=at(15, 12), signed=at(16, 9),
           version=b.v2, patches=[norm], reader=reader)  # fmt: skip
    # M: signed out in February (outside the period; in the wider one of the monthly test).
    b.case(f"{prefix}M", created=at(24, 7, month=2), uploaded=at(24, 8, month=2), ai=at(24, 9, month=2),
           ready=at(24, 9, month=2), signed=at(25, 9, month=2), patches=[tum], reader=reader)  # fmt: skip
    # Waiting: J open (no patches), K analysing (a queued patch), L urgent analysing (running).
    b.case(f"{prefix}J", created=at(13, 9))
    b.case(f"{prefix}K", created=at(13, 9, 30), uploaded=at(13, 10), patches=[P(status="queued")])
    b.case(f"{prefix}L", priority="urgent", created=at(12, 4), uploaded=at(12, 5), patches=[P(status="running")])
    return Scenario(reader, reader2, b)


@pytest.fixture
def scenario(institution, other_institution):
    # The same cases at another institution must change nothing below.
    build(other_institution, prefix="X")
    return build(institution)


def by_key(durations) -> dict:
    return {key: (d.n, d.p50, d.p90) for key, d in durations.items()}


# --- Statistics --------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 90) == 7.0
    assert percentile([26, 50.5, 18], 50) == 26
    assert percentile([26, 50.5, 18], 90) == pytest.approx(45.6)  # 26 + 0.8 * (50.5 - 26)
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_wilson_interval_matches_published_values():
    low, high = wilson(2, 3)
    assert (round(low, 4), round(high, 4)) == (0.2077, 0.9385)
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and round(high, 4) == 0.2775
    low, high = wilson(10, 10)
    assert round(low, 4) == 0.7225 and high == pytest.approx(1.0)
    assert wilson(0, 0) is None


# --- Periods -----------------------------------------------------------------------------------


def test_default_period_is_the_last_twelve_weeks():
    period = period_from({}, today=datetime.date(2026, 3, 15))
    assert (period.start, period.end) == (datetime.date(2025, 12, 21), datetime.date(2026, 3, 15))
    assert period.since == at(21, month=12).replace(year=2025) and period.until == at(16)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"from": "2026-02-31"}, "'2026-02-31' is not a date"),
        ({"to": "yesterday"}, "'yesterday' is not a date"),
        ({"from": "2026-03-10", "to": "2026-03-01"}, "is after the end date"),
        ({"from": "1990-01-01", "to": "2026-01-01"}, "at most 3661 days"),
        ({"to": "9999-12-31"}, "at most"),
    ],
)
def test_bad_periods_are_refused_with_a_message(params, message):
    with pytest.raises(BadPeriod, match=message):
        period_from(params)


def test_chart_axes_span_every_week_and_month_of_the_period():
    assert selectors.period_weeks(MARCH) == ["2026-W10", "2026-W11"]
    assert selectors.period_weeks(Period(datetime.date(2026, 3, 4), datetime.date(2026, 3, 9))) == [
        "2026-W10",
        "2026-W11",
    ]
    new_year = Period(datetime.date(2025, 12, 28), datetime.date(2026, 1, 5))
    assert selectors.period_weeks(new_year) == ["2025-W52", "2026-W01", "2026-W02"]
    winter = Period(datetime.date(2025, 11, 15), datetime.date(2026, 2, 1))
    assert selectors.period_months(winter) == ["2025-11", "2025-12", "2026-01", "2026-02"]


# --- Turnaround --------------------------------------------------------------------------------


def test_turnaround_figures_match_hand_computed_values(scenario, institution):
    data = selectors.turnaround(institution=institution, period=MARCH, now=NOW)
    weekly = {(week, priority): by_key(d) for week, priority, d in data.weekly}
    assert set(weekly) == {("2026-W10", "routine"), ("2026-W11", "routine"), ("2026-W11", "urgent")}
    # A, B, C: upload->AI 1, 2, 6; AI->ready 1, 0.5, 0; ready->sign-out 24, 48, 12; total 26, 50.5, 18.
    assert weekly[("2026-W10", "routine")] == {
        "upload_to_ai": (3, 2.0, pytest.approx(5.2)),
        "ai_to_ready": (3, 0.5, pytest.approx(0.9)),
        "ready_to_sign_out": (3, 24.0, pytest.approx(43.2)),
        "total": (3, 26.0, pytest.approx(45.6)),
    }
    # G: its AI result (1 h) and ready (25 h) ended in week 11; its sign-out after the period.
    assert weekly[("2026-W11", "routine")] == {
        "upload_to_ai": (1, 1.0, 1.0),
        "ai_to_ready": (1, 25.0, 25.0),
        "ready_to_sign_out": (0, None, None),
        "total": (0, None, None),
    }
    # D, E, F: upload->AI 0.5, 1, 1; AI->ready 0.5, 1, 0; ready->sign-out 11, 34; total 12, 36.
    assert weekly[("2026-W11", "urgent")] == {
        "upload_to_ai": (3, 1.0, 1.0),
        "ai_to_ready": (3, 0.5, pytest.approx(0.9)),
        "ready_to_sign_out": (2, 22.5, pytest.approx(31.7)),
        "total": (2, 24.0, pytest.approx(33.6)),
    }
    overall = {priority: by_key(d) for priority, d in data.overall}
    assert overall["routine"]["upload_to_ai"] == (4, 1.5, pytest.approx(4.8))  # 1, 1, 2, 6
    assert overall["all"]["total"] == (5, 26.0, pytest.approx(44.7))  # 12, 18, 26, 36, 50.5
    assert overall["urgent"]["total"] == (2, 24.0, pytest.approx(33.6))


def test_urgent_cases_against_the_target_and_breaches(scenario, institution, settings):
    data = selectors.turnaround(institution=institution, period=MARCH, now=NOW)
    assert (data.target_hours, data.urgent_signed_out, data.urgent_within_target) == (24, 1 + 1, 1)
    assert data.urgent_within_target_rate == 0.5
    # E signed out 36 h after upload; F and L uploaded 48 and 43 h before "now", not signed out.
    assert [(b.case.accession, b.hours, b.signed_out) for b in data.breaches] == [
        ("E", 36.0, True),
        ("F", 48.0, False),
        ("L", 43.0, False),
    ]
    breach = data.breaches[0].case
    assert (breach.uploaded, breach.ai_result, breach.ready, breach.signed_out) == (
        at(10),
        at(10, 1),
        at(10, 2),
        at(11, 12),
    )

    settings.TURNAROUND_URGENT_TARGET_HOURS = 48
    data = selectors.turnaround(institution=institution, period=MARCH, now=NOW)
    assert (data.urgent_within_target, data.breaches) == (2, [])  # F: exactly 48 h is not over


def test_a_patch_added_after_ready_does_not_count_as_the_ai_result(institution, pathologist):
    b = Builder(institution)
    case = b.case("R", created=at(3), uploaded=at(3, 1), ai=at(3, 2), ready=at(3, 3),
                  patches=[P("NORM", False), P("NORM", False)])  # fmt: skip
    late = Prediction.objects.filter(patch__case=case).order_by("pk").last()
    Prediction.objects.filter(pk=late.pk).update(created_at=at(3, 5))  # after ready: the next round's
    data = selectors.turnaround(institution=institution, period=MARCH, now=NOW)
    (_, _, durations), = data.weekly  # fmt: skip
    assert (durations["upload_to_ai"].p50, durations["ai_to_ready"].p50) == (1.0, 1.0)


def test_turnaround_single_case_gives_its_own_hours(institution, pathologist):
    Builder(institution).case("S", created=at(3), uploaded=at(3, 1), ai=at(3, 2), ready=at(3, 4), signed=at(3, 10),
                              patches=[P("NORM", False, [confirm("NORM")])], reader=pathologist)  # fmt: skip
    data = selectors.turnaround(institution=institution, period=MARCH, now=NOW)
    assert [(w, p, by_key(d)) for w, p, d in data.weekly] == [
        ("2026-W10", "routine", {
            "upload_to_ai": (1, 1.0, 1.0), "ai_to_ready": (1, 2.0, 2.0),
            "ready_to_sign_out": (1, 6.0, 6.0), "total": (1, 9.0, 9.0),
        }),
    ]  # fmt: skip


# --- Queue -------------------------------------------------------------------------------------


def test_queue_now_per_status_and_pathologist(scenario, institution):
    data = selectors.queue(institution=institution, period=MARCH, now=NOW)
    assert [(q.status, q.routine, q.urgent, q.oldest_accession, q.oldest_since) for q in data.per_status] == [
        ("open", 1, 0, "J", at(13, 9)),
        ("analysing", 1, 1, "L", at(12, 5)),
        ("ready_for_review", 0, 1, "F", at(12, 1)),
    ]
    assert data.waiting == 4
    assert [(q.pathologist, q.counts, q.oldest_since) for q in data.per_pathologist] == [
        ("reader", {"open": 0, "analysing": 0, "ready_for_review": 1}, at(12, 1)),
        ("", {"open": 1, "analysing": 2, "ready_for_review": 0}, at(12, 5)),
    ]
    # Created: A B C | E D F L J K G; ready (last time): A B C | E D F G; signed out: A B C | D E.
    assert data.flow == [("2026-W10", 3, 3, 3), ("2026-W11", 7, 4, 2)]


# --- Workload ----------------------------------------------------------------------------------


def test_workload_per_pathologist_and_week(scenario, institution):
    data = selectors.workload(institution=institution, period=MARCH)
    W = selectors.Work
    # reader: A (2 confirms), B (2 overrides), C (1 confirm), 3 sign-outs; G's work is after the period.
    # reader2: D (2), E (3 reviews: a change of mind is a second review), 2 sign-outs.
    assert data.weekly == [
        ("2026-W10", "reader", W(reviews=5, overrides=2, cases=3, sign_outs=3)),
        ("2026-W11", "reader2", W(reviews=5, overrides=1, cases=2, sign_outs=2)),
    ]
    assert data.totals == [
        ("reader", W(reviews=5, overrides=2, cases=3, sign_outs=3)),
        ("reader2", W(reviews=5, overrides=1, cases=2, sign_outs=2)),
    ]


# --- AI performance ----------------------------------------------------------------------------


def counts(row) -> tuple:
    return (row.version, row.month, row.tp, row.fn, row.tn, row.fp)


def test_ai_performance_against_final_diagnoses(scenario, institution):
    data = selectors.ai_performance(institution=institution, period=MARCH)
    # v1: A TUM->TUM (TP), NORM->NORM (TN); B TUM->STR (FP), NORM->TUM (FN); C TUM->TUM (TP).
    # v2: D NORM (TN), TUM (TP); E MUC (TN), NORM (TN: the later confirm stands over the override).
    assert [counts(r) for r in data.by_version] == [("demo v1", "", 2, 1, 1, 1), ("demo v2", "", 1, 0, 3, 0)]
    v1, v2 = data.by_version
    assert v1.sensitivity == pytest.approx(2 / 3) and v1.specificity == 0.5
    assert tuple(round(x, 4) for x in v1.sensitivity_ci) == (0.2077, 0.9385)
    assert tuple(round(x, 4) for x in v1.specificity_ci) == (0.0945, 0.9055)  # Wilson 1/2
    assert v2.sensitivity == 1.0 and v2.specificity == 1.0
    assert tuple(round(x, 4) for x in v2.specificity_ci) == (0.4385, 1.0)  # Wilson 3/3
    assert [counts(r) for r in data.by_month] == [
        ("demo v1", "2026-03", 2, 1, 1, 1),
        ("demo v2", "2026-03", 1, 0, 3, 0),
    ]
    per_class = {
        (c.version, c.label): (c.final, c.called, c.both, c.sensitivity, c.specificity) for c in data.per_class
    }
    assert per_class == {
        ("demo v1", "NORM"): (1, 2, 1, 1.0, 0.75),
        ("demo v1", "STR"): (1, 0, 0, 0.0, 1.0),
        ("demo v1", "TUM"): (3, 3, 2, pytest.approx(2 / 3), 0.5),
        ("demo v2", "MUC"): (1, 1, 1, 1.0, 1.0),
        ("demo v2", "NORM"): (2, 2, 2, 1.0, 1.0),
        ("demo v2", "TUM"): (1, 1, 1, 1.0, 1.0),
    }
    assert data.overrides == [("wrong_class", 2)] and data.reviewed == 9 and data.overridden == 2


def test_ai_performance_per_month_of_sign_out(scenario, institution):
    wide = Period(datetime.date(2026, 2, 1), datetime.date(2026, 3, 31))
    data = selectors.ai_performance(institution=institution, period=wide)
    # M (v1, February): TP. G (v2, 16 March): NORM -> NORM, TN.
    assert [counts(r) for r in data.by_month] == [
        ("demo v1", "2026-02", 1, 0, 0, 0),
        ("demo v1", "2026-03", 2, 1, 1, 1),
        ("demo v2", "2026-03", 1, 0, 4, 0),
    ]


def test_adjudication_holds_the_final_class(institution, pathologist):
    b = Builder(institution)
    case = b.case("Q", created=at(3), uploaded=at(3, 1), ai=at(3, 2), ready=at(3, 3), signed=at(3, 9),
                  patches=[P("TUM", True, [confirm("TUM")])], reader=pathologist)  # fmt: skip
    BiopsyCase.objects.filter(pk=case.pk).update(second_read=True)
    first = Review.objects.get(patch__case=case)
    second = make_user(institution, User.Role.PATHOLOGIST, username="second")
    common = {"patch": first.patch, "prediction": first.prediction}
    adjudication = Review.objects.create(**common, pathologist=second, read=3, decision="override",
                                         final_label="STR", reason_code="wrong_class")  # fmt: skip
    # A reader changing their read after the adjudication does not overturn it.
    Review.objects.create(**common, pathologist=pathologist, read=1, decision="confirm", final_label="TUM")
    Review.objects.filter(patch__case=case).update(created_at=at(3, 8))
    data = selectors.ai_performance(institution=institution, period=MARCH)
    assert [counts(r) for r in data.by_version] == [("demo v1", "", 0, 0, 0, 1)]
    assert data.overrides == [("wrong_class", 1)]
    assert adjudication.pk in set(
        selectors.final_reviews(institution=institution, period=MARCH).values_list("pk", flat=True)
    )


# --- Throughput --------------------------------------------------------------------------------


def test_throughput_per_day_with_reasons(scenario, institution):
    data = selectors.throughput(institution=institution, period=MARCH)
    assert data.unit == "day"
    F = selectors.Flow
    assert data.buckets == [
        (at(3), F(uploaded=4, results=4, mean_seconds=pytest.approx(0.2))),
        (at(6), F(uploaded=2, results=1, unassessable=1, mean_seconds=pytest.approx(0.2))),
        (at(10), F(uploaded=5, results=4, failed=1, mean_seconds=pytest.approx(0.3))),  # D 0.4 0.4, E 0.2 0.2
        (at(12), F(uploaded=2, results=1, mean_seconds=pytest.approx(0.2))),  # F and L uploaded
        (at(13), F(uploaded=1)),  # K
        (at(14), F(uploaded=1, results=1, mean_seconds=pytest.approx(0.2))),  # G
    ]
    assert data.reasons == [
        ("failed", "stored image cannot be read: truncated", 1),
        ("unassessable", "out of focus", 1),
    ]
    totals = data.totals
    assert (totals.uploaded, totals.results, totals.unassessable, totals.failed) == (15, 11, 1, 1)
    assert totals.mean_seconds == pytest.approx((0.2 * 9 + 0.4 * 2) / 11)


def test_throughput_per_hour_for_short_periods(scenario, institution):
    day = Period(datetime.date(2026, 3, 10), datetime.date(2026, 3, 10))
    data = selectors.throughput(institution=institution, period=day)
    F = selectors.Flow
    assert data.unit == "hour"
    assert data.buckets == [
        (at(10, 0), F(uploaded=2)),
        (at(10, 1), F(results=2, mean_seconds=pytest.approx(0.2))),
        (at(10, 8), F(uploaded=3, results=2, failed=1, mean_seconds=pytest.approx(0.4))),
    ]


# --- Stage times: set by case_transition, filled from the audit trail ---------------------------


def test_case_transition_records_stage_times(clinician):
    case = new_case(clinician)
    assert case.status_changed_at is not None and case.ready_for_review_at is None
    case_transition(case_ids=[case.pk], to="analysing", actor=clinician)
    case.refresh_from_db()
    analysing_at = case.status_changed_at
    assert case.ready_for_review_at is None and analysing_at >= case.created_at
    case_transition(case_ids=[case.pk], to="ready_for_review", actor=None)
    case.refresh_from_db()
    assert case.ready_for_review_at == case.status_changed_at and case.ready_for_review_at >= analysing_at


def test_stage_times_migration_fills_from_the_audit_trail(clinician):
    fill = importlib.import_module("cases.migrations.0007_case_stage_times_fill").fill
    case = new_case(clinician)
    case_transition(case_ids=[case.pk], to="analysing", actor=clinician)
    case_transition(case_ids=[case.pk], to="ready_for_review", actor=None)
    case_transition(case_ids=[case.pk], to="analysing", actor=clinician)  # new patches
    case_transition(case_ids=[case.pk], to="ready_for_review", actor=None)
    events = list(
        AuditEvent.objects.filter(target_type="cases.biopsycase", target_id=str(case.pk), action="case.status")
    )
    assert [e.after["status"] for e in events] == ["analysing", "ready_for_review"] * 2
    untouched = new_case(clinician, accession="S2", mrn="M2")
    # As before the migration: nothing stored (a wrong time, and no ready time).
    BiopsyCase.objects.update(status_changed_at=at(1, month=1), ready_for_review_at=None)
    fill(django_apps, None)
    case.refresh_from_db()
    untouched.refresh_from_db()
    assert case.ready_for_review_at == events[3].created_at  # the last time it became ready
    assert case.status_changed_at == events[3].created_at
    created = AuditEvent.objects.get(action="case.create", target_id=str(untouched.pk))
    assert untouched.status_changed_at == created.created_at and untouched.ready_for_review_at is None


# --- Pages: roles, isolation, CSV, bad dates, empty and single-point states --------------------

PAGES = ["turnaround", "queue", "workload", "ai-performance", "throughput"]


@pytest.fixture
def lab_manager(institution):
    return make_user(institution, User.Role.LAB_MANAGER)


@pytest.fixture
def manager_client(client, lab_manager):
    return verified_login(client, lab_manager)


@pytest.mark.parametrize("page", PAGES)
def test_lab_managers_and_admins_see_dashboards_others_get_403(page, institution, client, scenario):
    for role in (User.Role.LAB_MANAGER, User.Role.ADMIN):
        verified_login(client, make_user(institution, role, username=f"{role}-{page}"))
        response = client.get(f"/dashboards/{page}/?{MARCH_QUERY}")
        assert response.status_code == 200, role
        assert f"/dashboards/{page}/chart.png?{MARCH_QUERY.replace('&', '&amp;')}" in response.content.decode()
        chart = client.get(f"/dashboards/{page}/chart.png?{MARCH_QUERY}")
        assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG"
    for role in (User.Role.CLINICIAN, User.Role.PATHOLOGIST):
        verified_login(client, make_user(institution, role, username=f"{role}-{page}"))
        for url in (f"/dashboards/{page}/", f"/dashboards/{page}/chart.png", f"/dashboards/{page}/weekly.csv"):
            assert client.get(url).status_code == 403, (role, url)
    client.logout()
    assert client.get(f"/dashboards/{page}/").status_code == 302  # to the login page


def test_nav_links_the_dashboards_for_admins_and_lab_managers_only(institution, client, lab_manager):
    verified_login(client, lab_manager)
    page = client.get("/dashboards/", follow=True)
    assert page.redirect_chain[-1][0] == "/dashboards/turnaround/"
    assert 'href="/dashboards/">Dashboards</a>' in page.content.decode()
    verified_login(client, make_user(institution, User.Role.PATHOLOGIST))
    assert "Dashboards</a>" not in client.get("/cases/").content.decode()


def test_lab_manager_needs_the_second_factor(client, lab_manager):
    client.force_login(lab_manager)
    response = client.get("/dashboards/turnaround/")
    assert response.status_code == 302 and "/account/two-factor" in response["Location"]


def test_lab_manager_gains_nothing_of_the_review_workflow(scenario, institution, manager_client):
    case = BiopsyCase.objects.get(institution=institution, accession="F")
    patch = case.patches.get()
    response = manager_client.post(f"/cases/{case.pk}/patches/{patch.pk}/review/", {"decision": "confirm"})
    assert response.status_code == 403 and not Review.objects.filter(patch=patch).exists()
    response = manager_client.post(f"/cases/{case.pk}/sign-out/", {"conclusion": "no_tumour"})
    assert response.status_code == 403 and not SignOut.objects.filter(case=case).exists()
    response = manager_client.post(f"/cases/{case.pk}/assign/", {"assignee": scenario.reader2.pk})
    assert response.status_code == 403
    assert manager_client.get("/cases/agreement/").status_code == 403
    assert manager_client.get("/monitoring/drift/").status_code == 403


def test_lab_manager_sees_no_patient_or_case(scenario, institution, manager_client, lab_manager):
    """The dashboards' figures, not the cases: every case page, the patient lookup and the API answer
    403 with where to go, and signing in or opening "/" leads to the dashboards."""
    case = BiopsyCase.objects.get(institution=institution, accession="F")
    patch = case.patches.get()
    for url in ("/cases/", "/cases/new/", "/cases/worklist/", f"/cases/{case.pk}/",
                f"/cases/{case.pk}/patches/{patch.pk}/image/"):  # fmt: skip
        response = manager_client.get(url)
        assert response.status_code == 403, url
        assert "Lab managers see the dashboards" in response.content.decode(), url
    response = manager_client.post("/cases/new/", {"lookup": "1", "patient_mrn": case.patient.mrn})
    assert response.status_code == 403
    response = manager_client.get("/api/v1/cases/")
    assert response.status_code == 403 and "Lab managers see the dashboards" in response.json()["detail"]
    response = manager_client.post("/api/v1/cases/", {}, content_type="application/json")
    assert response.status_code == 403
    assert not cases_visible_to(principal=lab_manager).exists()
    assert manager_client.get("/")["Location"] == "/dashboards/"
    assert "Cases</a>" not in manager_client.get("/dashboards/turnaround/").content.decode()


def test_home_leads_clinical_roles_to_the_case_list(client, clinician):
    client.force_login(clinician)
    assert client.get("/")["Location"] == "/cases/"


def test_other_institutions_figures_never_show(other_institution, client, scenario):
    outsider = make_user(other_institution, User.Role.LAB_MANAGER, username="outsider")
    verified_login(client, outsider)
    # The other institution has its own copy (accessions X...): only those appear.
    page = client.get(f"/dashboards/turnaround/?{MARCH_QUERY}").content.decode()
    assert ">XE<" in page and ">E<" not in page
    rows = list(csv.reader(io.StringIO(client.get(f"/dashboards/queue/status.csv?{MARCH_QUERY}").content.decode())))
    assert [row[4] for row in rows[1:]] == ["XJ", "XL", "XF"]


def test_page_shows_hand_computed_figures(scenario, manager_client):
    page = manager_client.get(f"/dashboards/turnaround/?{MARCH_QUERY}").content.decode()
    assert 'id="figure-within-target" style="margin:0; font-weight:600">1 of 2 (50.0%)<' in page
    assert 'id="figure-median-total" style="margin:0; font-weight:600">26.0 h<' in page
    assert "<td>2026-W10</td><td>Routine</td><td>3</td><td>2.0</td><td>5.2</td>" in page
    assert "<td>E</td><td>2026-03-10 00:00</td><td>2026-03-10 01:00</td>" in page
    page = manager_client.get(f"/dashboards/ai-performance/?{MARCH_QUERY}").content.decode()
    assert "<td>demo v1</td><td>3</td><td>2</td><td>66.7%</td><td>20.8%</td><td>93.9%</td>" in page
    assert "<td>Wrong class</td><td>2</td><td>100.0%</td>" in page
    page = manager_client.get(f"/dashboards/queue/?{MARCH_QUERY}").content.decode()
    assert "<td>(unassigned)</td><td>1</td><td>2</td><td>0</td><td>3</td>" in page


def test_csv_download_holds_the_table_and_is_audited(scenario, manager_client, lab_manager, institution):
    response = manager_client.get(f"/dashboards/turnaround/weekly.csv?{MARCH_QUERY}")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert 'filename="turnaround-weekly-2026-03-02-2026-03-15.csv"' in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0][:5] == [
        "Week",
        "Priority",
        "Upload → AI result: n",
        "Upload → AI result: p50 h",
        "Upload → AI result: p90 h",
    ]
    assert rows[1:] == [
        ["2026-W10", "Routine", "3", "2.00", "5.20", "3", "0.50", "0.90", "3", "24.00", "43.20", "3", "26.00", "45.60"],
        ["2026-W11", "Routine", "1", "1.00", "1.00", "1", "25.00", "25.00", "0", "", "", "0", "", ""],
        ["2026-W11", "Urgent", "3", "1.00", "1.00", "3", "0.50", "0.90", "2", "22.50", "31.70", "2", "24.00", "33.60"],
    ]
    event = AuditEvent.objects.get(action="dashboard.export")
    assert (event.actor_id, event.institution_id, event.target_id) == (
        str(lab_manager.pk),
        institution.pk,
        "turnaround/weekly",
    )
    assert event.after == {
        "dashboard": "turnaround",
        "table": "weekly",
        "from": "2026-03-02",
        "to": "2026-03-15",
        "rows": 3,
    }

    breaches = list(
        csv.reader(
            io.StringIO(manager_client.get(f"/dashboards/turnaround/breaches.csv?{MARCH_QUERY}").content.decode())
        )
    )
    assert breaches[1][:6] == ["E", "2026-03-10T00:00:00+00:00", "2026-03-10T01:00:00+00:00",
                               "2026-03-10T02:00:00+00:00", "2026-03-11T12:00:00+00:00", "36.00"]  # fmt: skip
    tumour = list(
        csv.reader(
            io.StringIO(manager_client.get(f"/dashboards/ai-performance/tumour.csv?{MARCH_QUERY}").content.decode())
        )
    )
    assert tumour[1] == ["demo v1", "3", "2", "0.6667", "0.2077", "0.9385", "2", "1", "0.5000", "0.0945", "0.9055"]
    assert AuditEvent.objects.filter(action="dashboard.export").count() == 3


@pytest.mark.parametrize("page", PAGES)
def test_every_table_downloads(page, scenario, manager_client):
    content = reports.DASHBOARDS[page].content(institution=scenario.reader.institution, period=MARCH)
    for table in content.tables:
        response = manager_client.get(f"/dashboards/{page}/{table.key}.csv?{MARCH_QUERY}")
        rows = list(csv.reader(io.StringIO(response.content.decode())))
        assert rows[0] == table.headers and len(rows) == len(table.rows) + 1, table.key
    assert manager_client.get(f"/dashboards/{page}/nonsense.csv").status_code == 404


def test_csv_cells_cannot_become_spreadsheet_formulas(institution, manager_client):
    Builder(institution).case("=HYPERLINK(1)", priority="urgent", created=at(1), uploaded=at(1, 1), ai=at(1, 2),
                              ready=at(1, 3), patches=[P("NORM", False)])  # fmt: skip
    rows = list(csv.reader(io.StringIO(manager_client.get("/dashboards/turnaround/breaches.csv").content.decode())))
    assert rows[1][0] == "'=HYPERLINK(1)"


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("from=2026-13-01", "&#x27;2026-13-01&#x27; is not a date"),
        ("from=2026-03-10&to=2026-03-01", "is after the end date"),
    ],
)
def test_bad_dates_are_a_400_with_a_message(page, query, message, manager_client):
    response = manager_client.get(f"/dashboards/{page}/?{query}")
    assert response.status_code == 400
    assert message in response.content.decode() and 'id="period-error"' in response.content.decode()
    for url in (f"/dashboards/{page}/chart.png?{query}", f"/dashboards/{page}/weekly.csv?{query}"):
        response = manager_client.get(url)
        assert response.status_code == 400 and message.replace("&#x27;", "'") in response.content.decode()
    assert not AuditEvent.objects.filter(action="dashboard.export").exists()


EMPTY = {
    "turnaround": "No cases signed out in this period.",
    "queue": "No cases waiting now.",
    "workload": "No reviews or sign-outs in this period.",
    "ai-performance": "No signed-out cases with reviewed patches in this period.",
    "throughput": "No patches analysed in this period.",
}


@pytest.mark.parametrize("page", PAGES)
def test_empty_period_says_so_instead_of_an_empty_chart(page, manager_client):
    response = manager_client.get(f"/dashboards/{page}/")
    text = response.content.decode()
    assert response.status_code == 200
    assert f'id="chart-empty">{EMPTY[page]}<' in text and "chart.png" not in text
    assert manager_client.get(f"/dashboards/{page}/chart.png").status_code == 404
    assert "<table" not in text  # every table says it is empty instead


def test_single_point_charts_draw(institution, pathologist, manager_client):
    Builder(institution).case("S", priority="urgent", created=at(3), uploaded=at(3, 1), ai=at(3, 2), ready=at(3, 4),
                              signed=at(3, 10), patches=[P("TUM", True, [confirm("TUM")])],
                              reader=pathologist)  # fmt: skip
    for page in ("turnaround", "workload", "ai-performance", "throughput"):
        text = manager_client.get(f"/dashboards/{page}/?{MARCH_QUERY}").content.decode()
        assert 'id="chart-empty"' not in text, page
        chart = manager_client.get(f"/dashboards/{page}/chart.png?{MARCH_QUERY}")
        assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG", page
    text = manager_client.get(f"/dashboards/turnaround/?{MARCH_QUERY}").content.decode()
    assert "<td>2026-W10</td><td>Urgent</td><td>1</td><td>1.0</td><td>1.0</td>" in text


def test_agreement_page_without_reviews_draws_no_chart(institution, client):
    verified_login(client, make_user(institution, User.Role.ADMIN))
    page = client.get("/cases/agreement/").content.decode()
    assert 'id="chart-empty">No reviews yet: nothing to chart.<' in page and "chart.png" not in page
    assert client.get("/cases/agreement/chart.png").status_code == 404


# --- Query counts ------------------------------------------------------------------------------

# Queries each dashboard's figures take, whatever the number of cases (docstrings of the selectors).
QUERIES = {"turnaround": 2, "queue": 8, "workload": 4, "ai-performance": 3, "throughput": 4}


def _queries(fn) -> int:
    with CaptureQueriesContext(connection) as context:
        fn()
    return len(context.captured_queries)


@pytest.mark.parametrize("page", PAGES)
def test_query_counts_do_not_grow_with_cases(page, institution, manager_client, django_assert_num_queries):
    build(institution, prefix="a")
    content = reports.DASHBOARDS[page].content
    with django_assert_num_queries(QUERIES[page]):
        content(institution=institution, period=MARCH)
    url = f"/dashboards/{page}/?{MARCH_QUERY}"
    manager_client.get(url)  # anything read once per process is read now
    few = _queries(lambda: manager_client.get(url))
    chart = _queries(lambda: manager_client.get(f"/dashboards/{page}/chart.png?{MARCH_QUERY}"))
    for prefix in ("b", "c", "d"):
        build(institution, prefix=prefix)
    with django_assert_num_queries(QUERIES[page]):
        content(institution=institution, period=MARCH)
    assert _queries(lambda: manager_client.get(url)) == few
    assert _queries(lambda: manager_client.get(f"/dashboards/{page}/chart.png?{MARCH_QUERY}")) == chart
