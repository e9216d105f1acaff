"""Analysis of tissue patches by the active model, run by Celery workers.

The database is the source of truth for work to do; broker messages are only wake-ups.
A patch is claimed atomically (QUEUED -> RUNNING with a claim token) so a redelivered message
or a second worker does no second analysis, and a unique (patch, model version) constraint
makes a second Prediction impossible even for a worker that was presumed dead. A batch's results
are written in a constant number of queries.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import IntegrityError, InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import Case, F, Q, When
from django.utils import timezone

from audit.services import WORKER, audit_record_many
from cases.models import BiopsyCase, TissuePatch
from inference.core import pipeline
from inference.core.model import Predictor
from inference.core.pipeline import PatchOutcome
from inference.models import AnalysisClaim, ModelVersion, Prediction
from inference.registry import ModelUnavailable, model_load_active
from inference.selectors import operating_point, workers_lost
from inference.writer import write_behind

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


def _queue_order():
    """Waiting patches in the order workers take them: urgent cases first, then the longest waiting."""
    return (Case(When(case__priority=BiopsyCase.Priority.URGENT, then=0), default=1), "enqueued_at", "pk")


def prediction_run(*, patch_ids: list[int], worker: str = "") -> dict[str, int]:
    """Analyse the queued patches among ``patch_ids`` with the active model.

    ``worker`` names the Celery worker running this (as its heartbeat does): the claim records it,
    so that if the worker dies the reconciler hands its patches on within WORKER_LOST_AFTER_SECONDS.
    Returns counts of outcomes. Patches not QUEUED (done, or claimed by another worker) are skipped.
    """
    try:
        version, loaded = model_load_active()
    except (ModelUnavailable, OSError, ValueError):
        logger.exception("cannot analyse patches %s: no usable model; they stay queued", patch_ids)
        return {"skipped": len(patch_ids)}
    token = uuid.uuid4()
    with transaction.atomic():  # the claim and its audit events commit together
        if _claim(patch_ids, token) == 0:
            # 0 rows updated: already analysed, or another worker claimed them first.
            return {"claimed": 0}
        if worker:
            AnalysisClaim.objects.create(token=token, worker=worker, claimed_at=timezone.now())
        patches = list(TissuePatch.objects.filter(claim_token=token).select_related("case").order_by("id"))
        audit_record_many(
            [
                _status_event(patch, TissuePatch.Status.QUEUED, TissuePatch.Status.RUNNING, attempt=patch.attempts)
                for patch in patches
            ]
        )
    counts: dict[str, int] = {"claimed": len(patches)}
    size = max(1, settings.INFERENCE_BATCH_SIZE)
    try:
        for start in range(0, len(patches), size):
            outcomes = _analyse(patches[start : start + size], loaded)
            for _, outcome in outcomes:
                counts[outcome.status] = counts.get(outcome.status, 0) + 1
            # Stored on the writer thread in a worker process, while the next batch is analysed.
            write_behind(_store, outcomes=outcomes, version=version, token=token)
    except (OperationalError, InterfaceError):
        # The database went away mid-run (a restart, a failover): hand back what this run holds as
        # soon as it is back, rather than leave it RUNNING until the stale timeout.
        _claim_release(token, reason="database unavailable during analysis: re-enqueued")
        raise
    return counts


RELEASE_WAITS_S = (1, 2, 4, 8, 15)  # about half a minute: a database restart or failover


def _claim_release(token: uuid.UUID, *, reason: str) -> int:
    """Queue again the patches still RUNNING under ``token`` (results already stored stay), with
    their audit events, and send them after commit; retried while the database is out of reach.
    Returns how many were released (0 if the database did not come back in time: then the
    reconciler's stale timeout applies)."""
    from cases.signals import patches_queued

    for wait in (0, *RELEASE_WAITS_S):
        time.sleep(wait)
        try:
            if wait and not connection.in_atomic_block:
                close_old_connections()  # drop the connection that broke; the next query reconnects
            with transaction.atomic():
                held = list(
                    TissuePatch.objects.select_for_update()
                    .filter(claim_token=token, status=TissuePatch.Status.RUNNING)
                    .select_related("case")
                    .order_by("pk")
                )
                ids = _running_requeue(held, now=timezone.now())
                audit_record_many(
                    [_status_event(p, TissuePatch.Status.RUNNING, TissuePatch.Status.QUEUED, reason) for p in held]
                )
                transaction.on_commit(lambda ids=ids: patches_queued.send(sender=TissuePatch, patch_ids=ids))
            logger.warning("released %d patches of claim %s: %s", len(held), token, reason)
            return len(held)
        except (OperationalError, InterfaceError) as exc:
            logger.warning("cannot release claim %s yet: %s", token, exc)
    logger.error("claim %s not released: the reconciler will re-queue its patches after the stale timeout", token)
    return 0


def _running_requeue(patches: list[TissuePatch], *, now) -> list[int]:
    """Put RUNNING patches back in the queue: claim dropped, waiting time restarted. Their audit
    events are the caller's, in the same append as its others. Returns their ids."""
    ids = [patch.pk for patch in patches]
    TissuePatch.objects.filter(id__in=ids, status=TissuePatch.Status.RUNNING).update(
        status=TissuePatch.Status.QUEUED, claim_token=None, enqueued_at=now
    )
    return ids


def _claim(patch_ids: list[int], token: uuid.UUID) -> int:
    """Claim the queued patches among ``patch_ids`` and, with ANALYSIS_COALESCE, other waiting
    patches (urgent cases first, then the longest waiting) up to a full batch: under a stream of
    single-patch uploads a worker then runs full batches instead of one patch per message. The
    messages of patches claimed this way find nothing left to do."""
    queued = TissuePatch.Status.QUEUED
    with transaction.atomic():
        extra: list[int] = []
        room = settings.INFERENCE_BATCH_SIZE - len(patch_ids)
        if settings.ANALYSIS_COALESCE and room > 0:
            waiting = TissuePatch.objects.filter(status=queued).exclude(pk__in=patch_ids).order_by(*_queue_order())
            if connection.features.has_select_for_update_skip_locked:
                # Rows another worker is claiming right now are left to it, not waited for.
                waiting = waiting.select_for_update(skip_locked=True, of=("self",))
            extra = list(waiting.values_list("pk", flat=True)[:room])
        return TissuePatch.objects.filter(id__in=[*patch_ids, *extra], status=queued).update(
            status=TissuePatch.Status.RUNNING, claim_token=token, claimed_at=timezone.now(), attempts=F("attempts") + 1
        )


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
        rows = TissuePatch.objects.filter(pk__in=[patch.pk for patch, _ in outcomes]).values_list(
            "pk", "status", "claim_token"
        )
        statuses = {pk: status for pk, status, _ in rows}
        mine = {pk for pk, _, claim in rows if claim == token}
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
        # A slide still being analysed will add its suspicious regions as patches (slides.Slide.PENDING).
        .exclude(slides__status__in=("queued", "tiling", "analysing", "finishing"))
        .values_list("pk", flat=True)
    )
    moved = case_transition(case_ids=ready, to=BiopsyCase.Status.READY_FOR_REVIEW, actor=WORKER)
    if moved:
        events_for_cases(case_ids=moved, event=WebhookEndpoint.Event.CASE_READY)


def analysis_reconcile(*, stale_after: timedelta | None = None, broker_waiting: int | None = None) -> dict[str, int]:
    """Re-enqueue patches whose analysis was lost (message lost, worker killed).

    - A patch RUNNING for longer than ``stale_after`` (default ANALYSIS_STALE_AFTER_SECONDS) lost its
      worker: it is queued again, or after MAX_ATTEMPTS claims marked failed, so nothing stays
      pending for ever.
    - A patch QUEUED for longer than ``stale_after`` is sent again.
    - A patch QUEUED for longer than ANALYSIS_REQUEUE_AFTER_SECONDS while the broker holds no
      analysis message (``broker_waiting`` == 0, as the task finds it) lost its message to a broker
      flush or restart: it is sent again at once rather than after the long timeout. When the
      broker still holds messages, the workers are behind, not stuck, and nothing is re-sent.

    - A patch RUNNING under a claim whose worker has sent no heartbeat for WORKER_LOST_AFTER_SECONDS,
      or has restarted since the claim (a SIGKILL, an out-of-memory kill, a host reboot), is treated
      as stale at once. A claim made outside a worker (eager tasks) names none and waits for the
      timeout.

    A re-sent patch's ``enqueued_at`` is reset, so it is sent at most once per interval; a duplicate
    message finds the patch claimed and does nothing. Should a worker taken for lost still finish,
    its results are dropped: the claim is no longer its own, and a patch gets one prediction per model.
    """
    from cases.signals import patches_queued

    if stale_after is None:
        stale_after = timedelta(seconds=settings.ANALYSIS_STALE_AFTER_SECONDS)
    now = timezone.now()
    cutoff = now - stale_after
    lost_cutoff = cutoff
    if broker_waiting == 0:
        lost_cutoff = max(cutoff, now - timedelta(seconds=settings.ANALYSIS_REQUEUE_AFTER_SECONDS))
    with transaction.atomic():
        running = TissuePatch.objects.filter(status=TissuePatch.Status.RUNNING).filter(
            Q(claimed_at__lt=cutoff) | Q(claim_token__in=_claims_of_lost_workers(now))
        )
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
        requeued_running = _running_requeue(stale, now=now)
        # Oldest first, urgent cases first: the order the workers' claims take them in.
        lost = list(
            TissuePatch.objects.filter(status=TissuePatch.Status.QUEUED, enqueued_at__lt=lost_cutoff)
            .order_by(*_queue_order())
            .values_list("id", flat=True)
        )
        TissuePatch.objects.filter(id__in=lost).update(enqueued_at=now)
        to_send = [*requeued_running, *lost]  # the re-queued running ones were just stamped: not in lost
        if exhausted:
            case_status_refresh(case_ids=sorted(set(exhausted)))
        AnalysisClaim.objects.filter(claimed_at__lt=now - timedelta(days=1)).delete()  # long settled
        transaction.on_commit(lambda: patches_queued.send(sender=TissuePatch, patch_ids=to_send))
    if to_send or failed:
        logger.warning("reconciler: re-enqueued %d patches, failed %d", len(to_send), failed)
    return {"requeued": len(to_send), "failed": failed}


def _claims_of_lost_workers(now) -> list[uuid.UUID]:
    """Tokens of the batches now RUNNING whose worker is gone (``workers_lost``)."""
    tokens = (
        TissuePatch.objects.filter(status=TissuePatch.Status.RUNNING)
        .exclude(claim_token=None)
        .values_list("claim_token", flat=True)
        .distinct()
    )
    claims = AnalysisClaim.objects.filter(token__in=tokens)
    return list(workers_lost(((c.token, c.worker, c.claimed_at) for c in claims), now))
