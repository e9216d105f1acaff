"""Analysis of tissue patches by the active model, run by Celery workers.

The database is the source of truth for work to do; broker messages are only wake-ups.
A patch is claimed atomically (QUEUED -> RUNNING with a claim token) so a redelivered message
or a second worker does no second analysis, and a unique (patch, model version) constraint
makes a second Prediction impossible even for a worker that was presumed dead.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import WORKER, Actor, audit_record, audit_record_many
from cases.models import BiopsyCase, TissuePatch
from inference import core
from inference.core import pipeline
from inference.core.datasets import CANONICAL_CLASSES
from inference.core.model import MODEL_FILE, SERVING_FILE, Predictor, file_sha256, read_metadata, verify_files
from inference.core.pipeline import PatchOutcome
from inference.models import ModelActivation, ModelVersion, Prediction
from inference.selectors import operating_point

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3

_models: dict[int, Predictor] = {}
_models_lock = threading.Lock()


class ModelUnavailable(RuntimeError):
    """No usable active model: patches stay queued until one is activated."""


class ModelRejected(ValueError):
    """A model directory the platform cannot register or serve; the message says why."""


def model_load_active() -> tuple[ModelVersion, Predictor]:
    """The active model version, loaded once per process and kept in memory."""
    version = ModelVersion.objects.filter(is_active=True).first()
    if version is None:
        raise ModelUnavailable("no active model version")
    with _models_lock:
        loaded = _models.get(version.pk)
        if loaded is None:
            loaded = core.Predictor(version.directory, num_threads=settings.INFERENCE_THREADS or None)
            if loaded.file_sha256 != version.file_sha256:
                raise ModelUnavailable(
                    f"{version}: model file hash {loaded.file_sha256} differs from the registered "
                    f"{version.file_sha256}; refusing to serve a changed model"
                )
            _models.clear()  # one model in memory: the previous active one is no longer needed
            _models[version.pk] = loaded
            logger.info("loaded model %s (%s) from %s", version, loaded.backend, version.directory)
    return version, loaded


def model_check(directory: str | Path) -> dict:
    """The metadata of a model directory the platform can serve, or ModelRejected saying why.

    Checks: required files and metadata, every recorded file hash, classes known to the
    platform, a supported input spec, and that the serving copy loads with matching outputs.
    """
    directory = Path(directory)
    try:
        metadata = read_metadata(directory)
        verify_files(directory, metadata)
    except (OSError, ValueError) as exc:
        raise ModelRejected(str(exc)) from None
    unknown = [c for c in metadata["classes"] if c not in CANONICAL_CLASSES]
    if unknown:
        raise ModelRejected(f"classes the platform does not know: {', '.join(unknown)}")
    if not (directory / SERVING_FILE).is_file():
        raise ModelRejected(f"{directory / SERVING_FILE} (the LiteRT serving copy) is missing")
    try:
        core.Predictor(directory)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelRejected(f"the serving copy cannot be loaded: {exc}") from None
    return metadata


def model_register(*, directory: str | Path) -> tuple[ModelVersion, bool]:
    """Register a model directory after ``model_check``. Returns (version, created).

    Registering the same name, version and files again is a no-op; the same name and version
    with different files is refused (bump the version).
    """
    directory = Path(directory).resolve()
    metadata = model_check(directory)
    sha = file_sha256(directory / MODEL_FILE)
    base = Path(settings.BASE_DIR).resolve()
    stored_path = str(directory.relative_to(base)) if directory.is_relative_to(base) else str(directory)
    with transaction.atomic():
        version, created = ModelVersion.objects.get_or_create(
            name=metadata["name"],
            version=str(metadata["version"]),
            defaults={
                "path": stored_path,
                "file_sha256": sha,
                "classes": metadata["classes"],
                "input_size": metadata["input_size"],
                "preprocessing": metadata["preprocessing"],
                "metadata": metadata,
            },
        )
        if created:
            audit_record(
                actor=None,
                action="model.register",
                target=version,
                after={"name": version.name, "version": version.version, "path": stored_path, "sha256": sha},
            )
    if not created and version.file_sha256 != sha:
        raise ModelRejected(f"{version} is already registered with a different model file; bump the version")
    return version, created


def shadow_evaluate(*, candidate: ModelVersion, baseline: ModelVersion) -> dict:
    """Both models on every reviewed patch, the pathologists' final classes as truth.

    Scores are restricted to the classes both models know and the reviews use; accuracy is over
    the reviewed patches whose final class is among them.
    """
    import numpy as np

    from cases.export import export_digest
    from cases.models import Review
    from inference.core import evaluation

    latest: dict[int, Review] = {}
    for review in Review.objects.select_related("patch").order_by("patch_id", "id"):
        latest[review.patch_id] = review
    shared = set(candidate.classes) & set(baseline.classes)
    reviews = [r for r in latest.values() if r.final_label in shared]
    result: dict = {"patches": len(reviews)}
    if not reviews:
        return result
    payloads = []
    for review in reviews:
        with default_storage.open(review.patch.storage_name, "rb") as handle:
            payloads.append(handle.read())
    # A version fine-tuned on reviewed patches is judged only on the reviews it did not see.
    seen = trained_on(candidate) | trained_on(baseline)
    if seen:
        kept = [(r, p) for r, p in zip(reviews, payloads, strict=True) if export_digest(p) not in seen]
        result["left_out_trained_on"] = len(reviews) - len(kept)
        result["patches"] = len(kept)
        reviews, payloads = [r for r, _ in kept], [p for _, p in kept]
        if not reviews:
            return result
    truth = [r.final_label for r in reviews]
    keep = sorted(set(truth))
    for name, version in (("candidate", candidate), ("active", baseline)):
        predictor = Predictor(version.directory)
        outcomes = pipeline.analyse(predictor, payloads)
        scores = np.array(
            [[o.prediction.scores[c] if o.prediction else 0.0 for c in predictor.classes] for o in outcomes]
        )
        restricted = evaluation.restrict_to_classes(scores, list(predictor.classes), keep)
        columns = [c for c in predictor.classes if c in keep]  # restrict_to_classes keeps the model's order
        predicted = [columns[i] for i in restricted.argmax(axis=1)]
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        result[name] = {"version": str(version), "accuracy": round(correct / len(truth), 6), "correct": correct}
    return result


def trained_on(version: ModelVersion) -> set[str]:
    """Export digests (``cases.export.export_digest``) of the reviewed patches a version was trained on."""
    lineage = ((version.metadata or {}).get("training") or {}).get("lineage") or {}
    return set(lineage.get("trained_on_sha256") or [])


def model_activate(
    *, version: ModelVersion, actor: str, user=None, reason: str = "", force: bool = False
) -> ModelActivation | None:
    """Make ``version`` the one the workers serve, after re-checking its files. Records who and when.

    When a model is active and patches have been reviewed, both are first evaluated on every
    reviewed patch (``shadow_evaluate``); a candidate that does worse is refused unless
    ``force`` is given with a ``reason`` (both audited).

    With REQUIRE_SITE_VALIDATION, every institution that has users or cases needs a passing
    SiteValidation of ``version`` (``validate_site``); without one, activation is refused unless
    ``force`` is given with a ``reason`` (both audited).

    Returns the activation record, or None when the version was already active.
    """
    from django.db.models import Q

    from accounts.models import Institution
    from inference.models import SiteValidation
    from inference.selectors import site_validation_required

    model_check(version.directory)
    if ModelVersion.objects.filter(pk=version.pk, is_active=True).exists():
        return None
    # Institutions in use (with users or cases) and whether each has a passing validation of it.
    in_use = Institution.objects.filter(Q(users__isnull=False) | Q(cases__isnull=False)).distinct().order_by("slug")
    validated = set(
        SiteValidation.objects.filter(model_version=version, passed=True).values_list("institution_id", flat=True)
    )
    sites = {
        "required": site_validation_required(),
        "validated": [i.slug for i in in_use if i.pk in validated],
        "missing": [i.slug for i in in_use if i.pk not in validated],
    }
    if sites["required"] and sites["missing"]:
        if not force:
            raise ModelRejected(
                f"{version} has no passing site validation at {', '.join(sites['missing'])}; run validate_site "
                "there first (REQUIRE_SITE_VALIDATION is on), or activate it only with force and a reason"
            )
        if not reason.strip():
            raise ModelRejected("forcing the activation of a model not validated at every site needs a reason")
    current_active = ModelVersion.objects.filter(is_active=True).first()
    shadow = None
    if current_active is not None and current_active.pk != version.pk:
        shadow = shadow_evaluate(candidate=version, baseline=current_active)
        worse = shadow["patches"] and shadow["candidate"]["accuracy"] < shadow["active"]["accuracy"]
        if worse and not force:
            raise ModelRejected(
                f"{version} is worse than the active {current_active} on the {shadow['patches']} reviewed patches "
                f"(accuracy {shadow['candidate']['accuracy']:.3f} against {shadow['active']['accuracy']:.3f}); "
                "activate it anyway only with force and a reason"
            )
        if worse and not reason.strip():
            raise ModelRejected("forcing the activation of a worse model needs a reason")
    if file_sha256(version.directory / MODEL_FILE) != version.file_sha256:
        raise ModelRejected(f"{version}: the model file changed since it was registered")
    with transaction.atomic():
        current = ModelVersion.objects.select_for_update().filter(is_active=True).first()
        if current is not None and current.pk == version.pk:
            return None
        ModelVersion.objects.filter(is_active=True).update(is_active=False)
        ModelVersion.objects.filter(pk=version.pk).update(
            is_active=True, activated_at=timezone.now(), activated_by=user
        )
        activation = ModelActivation.objects.create(
            model_version=version, previous=current, activated_by=user, actor=actor, reason=reason
        )
        audit_record(
            actor=user or Actor(AuditEvent.ActorType.SYSTEM, label=actor),
            action="model.activate",
            target=version,
            before={"active": str(current) if current else None},
            after={
                "active": str(version),
                "shadow_evaluation": shadow,
                "site_validation": sites,
                "forced": bool(force),
            },
            reason=reason,
        )
    logger.warning("model %s activated by %s (was %s)", version, actor, current)
    return activation


def prediction_run(*, patch_ids: list[int]) -> dict[str, int]:
    """Analyse the queued patches among ``patch_ids`` with the active model.

    Returns counts of outcomes. Patches not QUEUED (done, or claimed by another worker) are skipped.
    """
    try:
        version, loaded = model_load_active()
    except (ModelUnavailable, OSError, ValueError):
        logger.exception("cannot analyse patches %s: no usable model; they stay queued", patch_ids)
        return {"skipped": len(patch_ids)}
    token = uuid.uuid4()
    claimed = TissuePatch.objects.filter(id__in=patch_ids, status=TissuePatch.Status.QUEUED).update(
        status=TissuePatch.Status.RUNNING, claim_token=token, claimed_at=timezone.now(), attempts=F("attempts") + 1
    )
    if claimed == 0:
        # 0 rows updated: already analysed, or another worker claimed them first.
        return {"claimed": 0}
    patches = list(TissuePatch.objects.filter(claim_token=token).select_related("case").order_by("id"))
    audit_record_many(
        [
            _status_event(patch, TissuePatch.Status.QUEUED, TissuePatch.Status.RUNNING, attempt=patch.attempts)
            for patch in patches
        ]
    )
    counts: dict[str, int] = {"claimed": len(patches)}
    size = max(1, settings.INFERENCE_BATCH_SIZE)
    for start in range(0, len(patches), size):
        outcomes = _analyse(patches[start : start + size], loaded)
        for _, outcome in outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        _store(outcomes, version, token)
    return counts


INPUT_STATS = ("od_h", "od_e", "sharpness", "he_fraction", "background_fraction")


def input_stats(measures: dict[str, float]) -> dict[str, float]:
    """The quality measures kept with a prediction for drift monitoring (stain OD, focus, tissue)."""
    return {key: round(float(measures[key]), 5) for key in INPUT_STATS if key in measures}


def _status_event(patch: TissuePatch, before: str, after: str, reason: str = "", **extra) -> dict:
    """A patch's status change, as ``audit_record_many`` takes it."""
    return {
        "actor": WORKER,
        "action": "patch.status",
        "target": patch,
        "institution_id": patch.case.institution_id,
        "before": {"status": before},
        "after": {"status": after, **extra},
        "reason": reason,
    }


def _analyse(patches: list[TissuePatch], predictor: Predictor) -> list[tuple[TissuePatch, PatchOutcome]]:
    images = []
    for patch in patches:
        try:
            with default_storage.open(patch.storage_name, "rb") as handle:
                images.append(handle.read())
        except OSError as exc:
            logger.warning("patch %s: stored file unreadable: %s", patch.pk, exc)
            images.append(b"")  # decodes as a failure with its reason
    return list(zip(patches, pipeline.analyse(predictor, images), strict=True))


def _store(outcomes: list[tuple[TissuePatch, PatchOutcome]], version: ModelVersion, token: uuid.UUID) -> None:
    """Write one batch's results in a constant number of queries: the predictions in one insert,
    the patches' new statuses in one update each way, every fact's audit event in one append."""
    case_ids = sorted({patch.case_id for patch, _ in outcomes})
    # One operating point per institution in the batch: its validated threshold, or the model's default.
    points = {
        institution_id: operating_point(institution_id=institution_id, model_version=version)
        for institution_id in sorted({patch.case.institution_id for patch, _ in outcomes})
    }
    analysed = [(patch, outcome) for patch, outcome in outcomes if outcome.prediction is not None]
    refused = [(patch, outcome) for patch, outcome in outcomes if outcome.prediction is None]
    with transaction.atomic():
        # Lock the cases so that two workers finishing a case's last patches cannot both miss
        # the moment every patch has a result.
        list(BiopsyCase.objects.select_for_update().filter(pk__in=case_ids).order_by("pk"))
        # Rows still claimed by this run (the reconciler may have handed a slow one to another worker),
        # and every analysed patch's status now, for the audit trail's "before".
        statuses = dict(
            TissuePatch.objects.filter(pk__in=[patch.pk for patch, _ in outcomes]).values_list("pk", "status")
        )
        mine = set(
            TissuePatch.objects.filter(pk__in=[p.pk for p, _ in refused], claim_token=token).values_list(
                "pk", flat=True
            )
        )
        events: list[dict] = []
        failures = [(patch, outcome) for patch, outcome in refused if patch.pk in mine]
        for patch, outcome in failures:
            patch.status, patch.failure_reason, patch.failure_code = outcome.status, outcome.reason, outcome.reason_code
            events.append(_status_event(patch, TissuePatch.Status.RUNNING, outcome.status, outcome.reason))
        if failures:
            TissuePatch.objects.bulk_update(
                [patch for patch, _ in failures], ["status", "failure_reason", "failure_code"]
            )
        predictions = _predictions_create(analysed, version, points)
        for prediction, patch in predictions:
            point = points[patch.case.institution_id]
            events.append(
                {
                    "actor": WORKER,
                    "action": "prediction.create",
                    "target": prediction,
                    "institution_id": patch.case.institution_id,
                    "after": {
                        "patch": patch.pk,
                        "model_version": str(version),
                        "label": prediction.label,
                        "scores": prediction.scores,
                        "needs_attention": prediction.needs_attention,
                        "suspected_tumour": prediction.suspected_tumour,
                        "tumour_threshold": prediction.tumour_threshold,
                        "validated_at_site": point.validated,
                    },
                }
            )
        done = [patch for patch, _ in analysed if statuses.get(patch.pk) != TissuePatch.Status.DONE]
        if done:
            TissuePatch.objects.filter(pk__in=[patch.pk for patch in done]).update(
                status=TissuePatch.Status.DONE, failure_reason=""
            )
            events += [_status_event(patch, statuses[patch.pk], TissuePatch.Status.DONE) for patch in done]
        audit_record_many(events)
        case_status_refresh(case_ids=case_ids)


def _predictions_create(
    analysed: list[tuple[TissuePatch, PatchOutcome]], version: ModelVersion, points: dict
) -> list[tuple[Prediction, TissuePatch]]:
    """Insert the batch's predictions at once; a patch that has one by this version already (a
    worker presumed dead finished it meanwhile) keeps it."""
    existing = set(
        Prediction.objects.filter(patch_id__in=[patch.pk for patch, _ in analysed], model_version=version).values_list(
            "patch_id", flat=True
        )
    )
    rows = []
    for patch, outcome in analysed:
        if patch.pk in existing:
            logger.info("patch %s already has a prediction by %s", patch.pk, version)
            continue
        point = points[patch.case.institution_id]
        rows.append(
            (
                Prediction(
                    patch=patch,
                    model_version=version,
                    scores=outcome.prediction.scores,
                    label=outcome.prediction.label,
                    uncertainty=outcome.prediction.uncertainty,
                    needs_attention=outcome.prediction.needs_attention,
                    heatmaps=outcome.prediction.heatmaps,
                    inference_seconds=outcome.prediction.seconds,
                    suspected_tumour=point.suspected(outcome.prediction.scores),
                    tumour_threshold=point.threshold,
                    site_validation=point.validation,
                    input_stats=input_stats(outcome.measures),
                ),
                patch,
            )
        )
    if not rows:
        return []
    try:
        with transaction.atomic():
            Prediction.objects.bulk_create([prediction for prediction, _ in rows])
    except IntegrityError:
        # Another worker inserted one of them between our check and our insert: one at a time.
        created = []
        for prediction, patch in rows:
            try:
                with transaction.atomic():
                    prediction.save()
                created.append((prediction, patch))
            except IntegrityError:
                logger.info("patch %s already has a prediction by %s", patch.pk, version)
        return created
    return rows


def case_status_refresh(*, case_ids: list[int]) -> None:
    """Move analysing cases whose patches all have a result to 'ready for review', and queue
    the webhook event for each (in the same transaction, sent after commit)."""
    from cases.transitions import case_transition, cases_touch
    from webhooks.models import WebhookEndpoint
    from webhooks.services import events_for_cases

    cases_touch(case_ids=case_ids)  # their patches have results now
    ready = list(
        BiopsyCase.objects.filter(pk__in=case_ids, status=BiopsyCase.Status.ANALYSING)
        .exclude(patches__status__in=TissuePatch.PENDING)
        .values_list("pk", flat=True)
    )
    moved = case_transition(case_ids=ready, to=BiopsyCase.Status.READY_FOR_REVIEW, actor=WORKER)
    if moved:
        events_for_cases(case_ids=moved, event=WebhookEndpoint.Event.CASE_READY)


def analysis_reconcile(*, stale_after: timedelta | None = None) -> dict[str, int]:
    """Re-enqueue patches whose analysis was lost (message lost, worker killed).

    A patch RUNNING or QUEUED for longer than ``stale_after`` (default
    ANALYSIS_STALE_AFTER_SECONDS) is queued again; after MAX_ATTEMPTS claims it is marked failed,
    so nothing stays pending for ever.
    """
    from cases.services import analysis_enqueue

    if stale_after is None:
        stale_after = timedelta(seconds=settings.ANALYSIS_STALE_AFTER_SECONDS)
    now = timezone.now()
    cutoff = now - stale_after
    with transaction.atomic():
        running = TissuePatch.objects.filter(status=TissuePatch.Status.RUNNING, claimed_at__lt=cutoff)
        exhausted_patches = list(running.filter(attempts__gte=MAX_ATTEMPTS).select_related("case"))
        exhausted = [p.case_id for p in exhausted_patches]
        failed = running.filter(attempts__gte=MAX_ATTEMPTS).update(
            status=TissuePatch.Status.FAILED,
            failure_reason=f"analysis did not complete after {MAX_ATTEMPTS} attempts",
            claim_token=None,
        )
        stale = list(running.select_related("case"))
        audit_record_many(
            [
                *(
                    _status_event(
                        patch, TissuePatch.Status.RUNNING, TissuePatch.Status.FAILED, "analysis never completed"
                    )
                    for patch in exhausted_patches
                ),
                *(
                    _status_event(
                        patch, TissuePatch.Status.RUNNING, TissuePatch.Status.QUEUED, "worker lost: re-enqueued"
                    )
                    for patch in stale
                ),
            ]
        )
        requeued_running = [p.pk for p in stale]
        TissuePatch.objects.filter(id__in=requeued_running, status=TissuePatch.Status.RUNNING).update(
            status=TissuePatch.Status.QUEUED, claim_token=None, enqueued_at=now
        )
        lost = list(
            TissuePatch.objects.filter(status=TissuePatch.Status.QUEUED, enqueued_at__lt=cutoff).values_list(
                "id", flat=True
            )
        )
        TissuePatch.objects.filter(id__in=lost).update(enqueued_at=now)
        to_send = sorted(set(requeued_running) | set(lost))
        if exhausted:
            case_status_refresh(case_ids=sorted(set(exhausted)))
        transaction.on_commit(lambda: analysis_enqueue(to_send))
    if to_send or failed:
        logger.warning("reconciler: re-enqueued %d patches, failed %d", len(to_send), failed)
    return {"requeued": len(to_send), "failed": failed}
