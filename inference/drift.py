"""Drift monitoring: this week's inputs and AI results at an institution against its site baseline.

Per institution and ISO week (of the prediction's ``created_at``; of the claim time for a patch the
quality check rejected) the figures below are compared with ``metrics["baseline"]`` of the site
validation of the active model version at that institution (the latest passing one; failing that,
the latest of any status; with none the institution has "no baseline" and nothing is judged).

Input figures describe the images, whatever model analysed them, so they count every patch analysed
that week: mean haematoxylin and eosin optical density (``od_h``, ``od_e``), mean sharpness, the
share of patches the quality check rejected and the share per reason. Output figures describe the
active model version's results only (the baseline belongs to that version): mean uncertainty, the
share needing attention, the predicted class mix, the share suspected of tumour, and agreement with
pathologists (reviewed patches whose latest review's class is the AI's class, as on the agreement
page; counted in the week of the prediction, so it fills in as reviews arrive).

Bands (``band_mean``, ``band_rate``):

- A mean leaves its band when it is both statistically and practically different from the
  baseline: ``|z| > MEAN_Z`` with ``z = (week mean - baseline mean) / (baseline std / sqrt(n))``,
  and a relative shift above ``MEAN_MIN_RELATIVE_SHIFT``. That is the band
  ``baseline ± max(MEAN_Z · std / sqrt(n), MEAN_MIN_RELATIVE_SHIFT · |baseline|)``: small weeks are
  held to the z-test, large weeks do not alarm on shifts too small to matter. The baseline has no
  standard deviation of the uncertainty, so its z uses the week's own sample standard deviation.
- A rate (a share, 0..1) leaves its band when it differs from the baseline rate by more than
  ``RATE_Z`` two-proportion standard errors, ``sqrt(p0 (1 - p0) (1/n + 1/n0))`` with ``n0`` the
  baseline's patch count, and by at least ``RATE_MIN_SHIFT`` (10 points) so that a baseline rate of
  0 or 1 (standard error 0) does not alarm on one patch.
- A figure counted over fewer than ``min_patches`` patches (``DRIFT_MIN_PATCHES``, default 20) is
  shown but not judged.

Only the latest complete week and the current week raise an alarm (``DriftReport.drifted``); older
weeks are history. With about twenty figures a week, a 4-sigma mean test and a 3-sigma rate test
keep false alarms on a stable site rare while a re-stained or blurred batch moves its figure far
past either band.
"""

from __future__ import annotations

import datetime
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Q
from django.utils import timezone

from inference.models import ModelVersion, Prediction, SiteValidation
from inference.selectors import site_validation_latest

MEAN_Z = 4.0
MEAN_MIN_RELATIVE_SHIFT = 0.15
RATE_Z = 3.0
RATE_MIN_SHIFT = 0.10
DEFAULT_MIN_PATCHES = 20
DEFAULT_WEEKS = 8
JUDGED_WEEKS = 2  # the latest complete week and the current one
BANNER_CACHE_SECONDS = 300
QC_CODES = {"blank": "blank", "background": "empty glass", "out_of_focus": "out of focus", "not_he": "not H&E"}

OK, DRIFT, TOO_FEW, NO_BASELINE = "ok", "drift", "too_few", "no_baseline"

# Chart groups: one PNG per group, one panel per figure.
INPUTS, QC, OUTPUTS, CLASSES = "inputs", "qc", "outputs", "classes"
GROUPS = {
    INPUTS: "Inputs: stain, focus, quality control",
    QC: "Quality-control rejections by reason",
    OUTPUTS: "AI results",
    CLASSES: "Predicted class mix",
}


def min_patches_default() -> int:
    return int(getattr(settings, "DRIFT_MIN_PATCHES", DEFAULT_MIN_PATCHES))


@dataclass(frozen=True)
class Figure:
    """One figure of one week, judged against the baseline.

    ``value`` is a mean (``kind`` "mean") or a share 0..1 (``kind`` "rate") over ``n`` patches;
    ``low``..``high`` is the band it must stay in (None when there is nothing to judge);
    ``status`` is ok, drift, too_few (n below the minimum) or no_baseline.
    """

    key: str
    label: str
    group: str
    kind: str
    value: float | None
    n: int
    baseline: float | None
    low: float | None
    high: float | None
    status: str

    @property
    def drifted(self) -> bool:
        return self.status == DRIFT

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "kind": self.kind,
            "value": _round(self.value),
            "n": self.n,
            "baseline": _round(self.baseline),
            "low": _round(self.low),
            "high": _round(self.high),
            "status": self.status,
        }


@dataclass(frozen=True)
class Week:
    week: str  # ISO week, "2026-W07"
    monday: datetime.date
    judged: bool  # the latest complete or the current week: drift here raises the alarm
    analysed: int  # patches through the quality check (done or unassessable)
    figures: tuple[Figure, ...]


@dataclass(frozen=True)
class DriftReport:
    institution: Any
    model_version: ModelVersion | None
    validation: SiteValidation | None
    min_patches: int
    weeks: tuple[Week, ...] = ()
    note: str = ""  # why nothing was judged: no active model, no baseline

    @property
    def drifted(self) -> list[tuple[str, Figure]]:
        """(week, figure) for every figure out of band in the judged weeks, latest week first."""
        return [(w.week, f) for w in reversed(self.weeks) if w.judged for f in w.figures if f.drifted]

    @property
    def figure_keys(self) -> list[str]:
        return [f.key for f in self.weeks[0].figures] if self.weeks else []

    def series(self, key: str) -> list[Figure]:
        """The figure ``key`` of every week, oldest first."""
        return [next(f for f in w.figures if f.key == key) for w in self.weeks]

    def as_dict(self) -> dict[str, Any]:
        validation = self.validation
        return {
            "institution": self.institution.slug,
            "model_version": str(self.model_version) if self.model_version else None,
            "baseline": {
                "site_validation": validation.pk,
                "created_at": validation.created_at.isoformat(),
                "passed": validation.passed,
            }
            if validation
            else None,
            "note": self.note,
            "min_patches": self.min_patches,
            "drifted": [{"week": week, **figure.as_dict()} for week, figure in self.drifted],
            "weeks": [
                {
                    "week": w.week,
                    "judged": w.judged,
                    "analysed": w.analysed,
                    "figures": [f.as_dict() for f in w.figures],
                }
                for w in self.weeks
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def band_mean(*, baseline: float, std: float, n: int) -> tuple[float, float]:
    """The band a mean of ``n`` patches stays in: baseline ± max(MEAN_Z · SE, relative minimum)."""
    half = max(MEAN_Z * std / math.sqrt(max(n, 1)), MEAN_MIN_RELATIVE_SHIFT * abs(baseline))
    return baseline - half, baseline + half


def band_rate(*, baseline: float, baseline_n: int, n: int) -> tuple[float, float]:
    """The band a share over ``n`` patches stays in: baseline ± max(RATE_MIN_SHIFT, RATE_Z two-proportion SE)."""
    p = min(max(baseline, 0.0), 1.0)
    se = math.sqrt(p * (1 - p) * (1 / max(n, 1) + (1 / baseline_n if baseline_n > 0 else 0.0)))
    half = max(RATE_MIN_SHIFT, RATE_Z * se)
    return max(0.0, p - half), min(1.0, p + half)


def _figure(*, key, label, group, kind, value, n, base, band, min_patches) -> Figure:
    status = _judge(value, n, band, min_patches)
    low, high = band if band is not None and n else (None, None)  # no band to show for an empty week
    return Figure(key, label, group, kind, value, n, base, low, high, status)


def _judge(value: float | None, n: int, band: tuple[float, float] | None, min_patches: int) -> str:
    if band is None:
        return NO_BASELINE
    if n < min_patches or value is None:
        return TOO_FEW
    return DRIFT if not band[0] <= value <= band[1] else OK


def judge_mean(
    *, key: str, label: str, group: str, values: list[float], baseline: dict | None, min_patches: int
) -> Figure:
    """A mean against ``baseline`` {"mean", "std"}; without "std" the week's own std is used."""
    n = len(values)
    value = statistics.fmean(values) if values else None
    band = None
    base = None
    if isinstance(baseline, dict) and isinstance(baseline.get("mean"), int | float):
        base = float(baseline["mean"])
        std = baseline.get("std")
        if not isinstance(std, int | float):
            std = statistics.stdev(values) if n >= 2 else 0.0
        band = band_mean(baseline=base, std=float(std), n=n)
    return _figure(
        key=key, label=label, group=group, kind="mean", value=value, n=n, base=base, band=band, min_patches=min_patches
    )


def judge_rate(
    *, key: str, label: str, group: str, hits: int, n: int, baseline: float | None, baseline_n: int, min_patches: int
) -> Figure:
    value = hits / n if n else None
    band = band_rate(baseline=baseline, baseline_n=baseline_n, n=n) if isinstance(baseline, int | float) else None
    base = float(baseline) if band else None
    return _figure(
        key=key, label=label, group=group, kind="rate", value=value, n=n, base=base, band=band, min_patches=min_patches
    )


def drift_baseline(*, institution_id: int, model_version: ModelVersion) -> SiteValidation | None:
    """The validation whose baseline applies: the latest passing one, else the latest of any status."""
    return (
        site_validation_latest(institution_id=institution_id, model_version=model_version)
        or SiteValidation.objects.filter(institution_id=institution_id, model_version=model_version)
        .order_by("-created_at", "-id")
        .first()
    )


def _week_key(day: datetime.date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def _mondays(*, weeks: int, now: datetime.datetime) -> list[datetime.date]:
    today = timezone.localtime(now).date()
    monday = today - datetime.timedelta(days=today.weekday())
    return [monday - datetime.timedelta(weeks=i) for i in reversed(range(weeks))]


@dataclass
class _Tally:
    inputs: dict[str, list[float]] = field(default_factory=lambda: {"od_h": [], "od_e": [], "sharpness": []})
    done: set[int] = field(default_factory=set)  # patch ids analysed by any version
    rejected: Counter = field(default_factory=Counter)  # QC code -> patches
    outputs: list[dict] = field(default_factory=list)  # the active version's predictions
    reviewed: int = 0
    agreed: int = 0


def _tallies(*, institution_id: int, model_version: ModelVersion, since: datetime.datetime) -> dict[str, _Tally]:
    """Three queries: predictions, rejected patches and reviews since ``since``, tallied by ISO week."""
    from cases.models import Review, TissuePatch

    tallies: dict[str, _Tally] = {}

    def tally(moment: datetime.datetime) -> _Tally:
        return tallies.setdefault(_week_key(timezone.localtime(moment).date()), _Tally())

    predictions = Prediction.objects.filter(patch__case__institution_id=institution_id, created_at__gte=since)
    week_of_prediction: dict[int, str] = {}
    labels: dict[int, str] = {}
    rows = predictions.values_list(
        "id",
        "patch_id",
        "model_version_id",
        "created_at",
        "label",
        "uncertainty",
        "needs_attention",
        "suspected_tumour",
        "input_stats",
    ).order_by("id")
    for pk, patch_id, version_id, created_at, label, uncertainty, attention, suspected, stats in rows.iterator(
        chunk_size=2000
    ):
        week = tally(created_at)
        if patch_id not in week.done:  # inputs once per patch, whichever versions analysed it
            week.done.add(patch_id)
            for key, values in week.inputs.items():
                value = (stats or {}).get(key)
                if isinstance(value, int | float):
                    values.append(float(value))
        if version_id == model_version.pk:
            week.outputs.append(
                {"label": label, "uncertainty": uncertainty, "attention": attention, "suspected": suspected}
            )
            week_of_prediction[pk] = _week_key(timezone.localtime(created_at).date())
            labels[pk] = label

    rejected = TissuePatch.objects.filter(
        case__institution_id=institution_id, status=TissuePatch.Status.UNASSESSABLE
    ).filter(Q(claimed_at__gte=since) | Q(claimed_at__isnull=True, created_at__gte=since))
    for code, claimed_at, created_at in rejected.values_list("failure_code", "claimed_at", "created_at"):
        tally(claimed_at or created_at).rejected[code or "other"] += 1

    reviews = Review.objects.filter(
        prediction__model_version=model_version,
        prediction__created_at__gte=since,
        patch__case__institution_id=institution_id,
    ).order_by("id")
    latest: dict[int, tuple[int, str]] = {}
    for patch_id, prediction_id, final_label in reviews.values_list("patch_id", "prediction_id", "final_label"):
        latest[patch_id] = (prediction_id, final_label)  # the latest review of a patch counts
    for prediction_id, final_label in latest.values():
        if prediction_id in week_of_prediction:
            week = tallies[week_of_prediction[prediction_id]]
            week.reviewed += 1
            week.agreed += final_label == labels[prediction_id]
    return tallies


def _figures(tally: _Tally, *, baseline: dict | None, classes: list[str], min_patches: int) -> list[Figure]:
    base = baseline or {}
    base_n = int(base.get("n") or 0)

    def rate(key: str, label: str, group: str, count: tuple[int, int], baseline_rate) -> Figure:
        hits, n = count
        return judge_rate(
            key=key,
            label=label,
            group=group,
            hits=hits,
            n=n,
            baseline=baseline_rate if baseline is not None else None,
            baseline_n=base_n,
            min_patches=min_patches,
        )

    def mean(key: str, label: str, group: str, values: list[float], baseline_figure) -> Figure:
        return judge_mean(
            key=key,
            label=label,
            group=group,
            values=values,
            baseline=baseline_figure if baseline is not None else None,
            min_patches=min_patches,
        )

    analysed = len(tally.done) + sum(tally.rejected.values())
    outputs = tally.outputs
    sharpness = "Sharpness (mean Laplacian energy)"
    figures = [
        mean("od_h", "Haematoxylin OD (mean)", INPUTS, tally.inputs["od_h"], base.get("od_h")),
        mean("od_e", "Eosin OD (mean)", INPUTS, tally.inputs["od_e"], base.get("od_e")),
        mean("sharpness", sharpness, INPUTS, tally.inputs["sharpness"], base.get("sharpness")),
        rate(
            "qc_rejection_rate",
            "Rejected by quality control (share)",
            INPUTS,
            (sum(tally.rejected.values()), analysed),
            base.get("qc_rejection_rate"),
        ),
    ]
    reasons = base.get("qc_rejections") or {}
    for code in list(QC_CODES) + sorted((set(reasons) | set(tally.rejected)) - set(QC_CODES)):
        label = f"Rejected: {QC_CODES.get(code, code.replace('_', ' '))} (share)"
        figures.append(
            rate(f"qc_rejections.{code}", label, QC, (tally.rejected[code], analysed), reasons.get(code, 0.0))
        )
    uncertainty = base.get("mean_uncertainty")
    attention = sum(o["attention"] for o in outputs)
    suspected = [o["suspected"] for o in outputs if o["suspected"] is not None]
    figures += [
        mean(
            "mean_uncertainty",
            "Uncertainty (mean)",
            OUTPUTS,
            [o["uncertainty"] for o in outputs if o["uncertainty"] is not None],
            {"mean": uncertainty} if isinstance(uncertainty, int | float) else None,
        ),
        rate(
            "needs_attention_rate",
            "Needs attention (share)",
            OUTPUTS,
            (attention, len(outputs)),
            base.get("needs_attention_rate"),
        ),
        rate(
            "suspected_tumour_rate",
            "Suspected tumour (share)",
            OUTPUTS,
            (sum(suspected), len(suspected)),
            base.get("suspected_tumour_rate"),
        ),
        rate(
            "agreement",
            "Agreement with pathologists (share of reviewed)",
            OUTPUTS,
            (tally.agreed, tally.reviewed),
            base.get("agreement"),
        ),
    ]
    mix = base.get("class_mix") or {}
    labels = Counter(o["label"] for o in outputs)
    for name in classes + sorted((set(mix) | set(labels)) - set(classes)):
        figures.append(
            rate(
                f"class_mix.{name}",
                f"Predicted {name} (share)",
                CLASSES,
                (labels[name], len(outputs)),
                mix.get(name, 0.0),
            )
        )
    return figures


def drift_report(
    *,
    institution,
    model_version: ModelVersion | None = None,
    weeks: int = DEFAULT_WEEKS,
    min_patches: int | None = None,
    now: datetime.datetime | None = None,
) -> DriftReport:
    """The weekly figures of ``institution`` for the last ``weeks`` ISO weeks (the current one last),
    each judged against the baseline of ``model_version`` (default: the active one) there."""
    min_patches = min_patches_default() if min_patches is None else min_patches
    if model_version is None:
        model_version = ModelVersion.objects.filter(is_active=True).first()
    if model_version is None:
        return DriftReport(institution, None, None, min_patches, note="no active model version")
    validation = drift_baseline(institution_id=institution.pk, model_version=model_version)
    baseline = (validation.metrics or {}).get("baseline") if validation else None
    mondays = _mondays(weeks=max(1, weeks), now=now or timezone.now())
    since = timezone.make_aware(datetime.datetime.combine(mondays[0], datetime.time.min))
    tallies = _tallies(institution_id=institution.pk, model_version=model_version, since=since)
    rows = []
    for index, monday in enumerate(mondays):
        tally = tallies.get(_week_key(monday), _Tally())
        rows.append(
            Week(
                week=_week_key(monday),
                monday=monday,
                judged=index >= len(mondays) - JUDGED_WEEKS,
                analysed=len(tally.done) + sum(tally.rejected.values()),
                figures=tuple(
                    _figures(tally, baseline=baseline, classes=list(model_version.classes), min_patches=min_patches)
                ),
            )
        )
    note = ""
    if validation is None:
        note = f"no baseline: {model_version} has no site validation at this institution"
    elif not isinstance(baseline, dict):
        note = f"no baseline: site validation #{validation.pk} recorded no input baseline"
    return DriftReport(institution, model_version, validation, min_patches, tuple(rows), note)


def _banner_key(institution_id: int) -> str:
    return f"inference:drift-banner:{institution_id}"


def drift_banner(*, institution_id: int) -> dict | None:
    """What the admin banner says: {"week", "figures": [labels]} when a figure of the latest complete
    or current week is out of band, else None. Cached per institution for BANNER_CACHE_SECONDS."""

    def compute() -> dict:
        from accounts.models import Institution

        report = drift_report(institution=Institution.objects.get(pk=institution_id), weeks=JUDGED_WEEKS)
        drifted = report.drifted
        if not drifted:
            return {}  # cached too: quiet is an answer
        labels = list(dict.fromkeys(figure.label for _, figure in drifted))
        return {"week": drifted[0][0], "figures": labels}

    return cache.get_or_set(_banner_key(institution_id), compute, BANNER_CACHE_SECONDS) or None


def drift_record(*, report: DriftReport):
    """Record a ``drift.detected`` audit event for the report's out-of-band figures; None when quiet.

    Also drops the cached banner so that administrators see the alarm on their next page.
    """
    from audit.models import AuditEvent
    from audit.services import Actor, audit_record

    drifted = report.drifted
    if not drifted:
        return None
    event = audit_record(
        actor=Actor(AuditEvent.ActorType.SYSTEM, label="check_drift"),
        action="drift.detected",
        target=report.model_version,
        institution_id=report.institution.pk,
        after={
            "model_version": str(report.model_version),
            "site_validation": report.validation.pk if report.validation else None,
            "min_patches": report.min_patches,
            "figures": [{"week": week, **figure.as_dict()} for week, figure in drifted],
        },
    )
    cache.delete(_banner_key(report.institution.pk))
    return event
