"""Celery tasks: thin wrappers that take ids and call a service. The only module of the app that
talks to Celery: it also sends the analysis task when the case services announce queued patches."""

import logging

from celery import shared_task
from django.conf import settings
from django.dispatch import receiver

from cases.signals import patches_queued
from inference import analysis

logger = logging.getLogger(__name__)


@shared_task(name="inference.tasks.prediction_run", bind=True)
def prediction_run(self, patch_ids: list[int]) -> dict[str, int]:
    worker = "" if self.request.is_eager else (self.request.hostname or "")
    return analysis.prediction_run(patch_ids=[int(i) for i in patch_ids], worker=worker)


@shared_task(name="inference.tasks.analysis_reconcile", acks_late=False)
def analysis_reconcile() -> dict[str, int]:
    return analysis.analysis_reconcile(broker_waiting=broker_waiting(settings.CELERY_TASK_DEFAULT_QUEUE))


def broker_waiting(queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker, or None if the broker cannot be asked."""
    from cloudiopsy.celery import broker_queue_depths

    try:
        return broker_queue_depths(queues=[queue])[queue]
    except Exception as exc:  # the broker's own connection errors, whichever broker it is
        logger.warning("cannot read the depth of queue %s from the broker: %s", queue, exc)
        return None


@receiver(patches_queued, dispatch_uid="inference.tasks.analysis_enqueue")
def analysis_enqueue(sender=None, *, patch_ids: list[int], **kwargs) -> None:
    """Send the analysis task for these patches, in batches. A lost message is not fatal: the
    reconciler re-sends queued patches (``inference.analysis.analysis_reconcile``)."""
    size = settings.INFERENCE_BATCH_SIZE
    for start in range(0, len(patch_ids), size):
        try:
            prediction_run.delay(patch_ids[start : start + size])
        except Exception:
            logger.exception("could not enqueue analysis of patches %s; the reconciler will retry", patch_ids)
