"""Reads of model versions and site validations that more than one caller needs."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from inference.models import ModelVersion, SiteValidation

POSITIVE_CLASS = "TUM"
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class OperatingPoint:
    """The TUM-probability threshold a model version's results are judged by at one institution.

    ``validation`` is the latest passing SiteValidation that set it, or None: the model's own
    default threshold applies and its results are "not validated at this site".
    """

    threshold: float
    validation: SiteValidation | None

    @property
    def validated(self) -> bool:
        return self.validation is not None

    def suspected(self, scores: dict[str, float]) -> bool | None:
        """True when the TUM probability is at or above the threshold; None without a TUM class."""
        if POSITIVE_CLASS not in scores:
            return None
        return scores[POSITIVE_CLASS] >= self.threshold


def model_default_threshold(version: ModelVersion) -> float:
    """The threshold a model version brings from its own validation split (metadata), else 0.5."""
    point = (version.metadata or {}).get("operating_point") or {}
    value = point.get("threshold")
    return float(value) if isinstance(value, int | float) and 0.0 <= value <= 1.0 else DEFAULT_THRESHOLD


def site_validation_latest(*, institution_id: int, model_version: ModelVersion) -> SiteValidation | None:
    """The latest passing validation of ``model_version`` at the institution, or None."""
    return (
        SiteValidation.objects.filter(institution_id=institution_id, model_version=model_version, passed=True)
        .order_by("-created_at", "-id")
        .first()
    )


def operating_point(*, institution_id: int, model_version: ModelVersion) -> OperatingPoint:
    """The operating point for results of ``model_version`` at the institution (one query)."""
    validation = site_validation_latest(institution_id=institution_id, model_version=model_version)
    if validation is not None:
        return OperatingPoint(threshold=validation.threshold, validation=validation)
    return OperatingPoint(threshold=model_default_threshold(model_version), validation=None)


def site_validation_required() -> bool:
    return bool(getattr(settings, "REQUIRE_SITE_VALIDATION", not settings.DEBUG))


def workers_lost(claims, now) -> set:
    """Keys of the claims, given as (key, worker hostname, claimed at), whose worker is gone: no
    heartbeat for WORKER_LOST_AFTER_SECONDS (or none ever, that long after the claim), or a
    heartbeat from a new start of a worker of that name, begun after the claim. A claim made
    outside a worker (no hostname, e.g. an eager task) is never taken for lost here: it waits for
    the stale timeout."""
    from datetime import timedelta

    from django.conf import settings

    from inference.models import WorkerHeartbeat

    claims = [claim for claim in claims if claim[1]]
    beats = {b.hostname: b for b in WorkerHeartbeat.objects.filter(hostname__in={c[1] for c in claims})}
    silent = now - timedelta(seconds=settings.WORKER_LOST_AFTER_SECONDS)
    lost = set()
    for key, worker, claimed_at in claims:
        beat = beats.get(worker)
        gone = claimed_at < silent if beat is None else beat.last_seen < silent or beat.started_at > claimed_at
        if gone:
            lost.add(key)
    return lost
