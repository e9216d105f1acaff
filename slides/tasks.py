"""Celery tasks of the slide job: thin wrappers that take ids and call ``slides.jobs``. The only
module of the app that talks to Celery: it also sends the tasks when the services announce work."""

import logging

from celery import group, shared_task
from django.conf import settings
from django.dispatch import receiver

from slides import jobs, reconcile
from slides.signals import slide_chunks_queued, slide_finishing, slide_queued

logger = logging.getLogger(__name__)


def _worker(task) -> str:
    return "" if task.request.is_eager else (task.request.hostname or "")


@shared_task(name="slides.tasks.slide_tile", bind=True)
def slide_tile(self, slide_id: int) -> dict[str, int]:
    return jobs.slide_tile(slide_id=int(slide_id), worker=_worker(self))


@shared_task(name="slides.tasks.slide_chunk_run", bind=True)
def slide_chunk_run(self, slide_id: int, index: int) -> dict[str, int]:
    return jobs.slide_chunk_run(slide_id=int(slide_id), index=int(index), worker=_worker(self))


@shared_task(name="slides.tasks.slide_finish", bind=True)
def slide_finish(self, slide_id: int) -> dict[str, int]:
    return jobs.slide_finish(slide_id=int(slide_id), worker=_worker(self))


@shared_task(name="slides.tasks.slide_reconcile", acks_late=False)
def slide_reconcile() -> dict[str, int]:
    from inference.tasks import broker_waiting
    from slides.services import slide_uploads_expire

    counts = reconcile.slide_reconcile(broker_waiting=broker_waiting(settings.CELERY_TASK_DEFAULT_QUEUE))
    counts["uploads_expired"] = slide_uploads_expire()
    return counts


@shared_task(name="slides.tasks.slides_import", acks_late=False)
def slides_import() -> dict[str, int]:
    """The scanner's import folder, when one is configured (SLIDE_IMPORT_DIR)."""
    from slides.imports import slides_import as run

    if not settings.SLIDE_IMPORT_DIR:
        return {}
    report = run()
    return {"imported": len(report.imported), "rejected": len(report.rejected), "waiting": len(report.waiting)}


# A lost message is never fatal: the reconciler sends queued work again (reconcile.slide_reconcile).


@receiver(slide_queued, dispatch_uid="slides.tasks.slide_tile_enqueue")
def slide_tile_enqueue(sender=None, *, slide_id: int, **kwargs) -> None:
    try:
        slide_tile.delay(slide_id)
    except Exception:
        logger.exception("could not enqueue tiling of slide %s; the reconciler will retry", slide_id)


@receiver(slide_chunks_queued, dispatch_uid="slides.tasks.slide_chunks_enqueue")
def slide_chunks_enqueue(sender=None, *, slide_id: int, indexes: list[int], **kwargs) -> None:
    """One task per chunk, as a group: every worker takes chunks of the slide at once."""
    try:
        group(slide_chunk_run.s(slide_id, index) for index in indexes).apply_async()
    except Exception:
        logger.exception("could not enqueue chunks of slide %s; the reconciler will retry", slide_id)


@receiver(slide_finishing, dispatch_uid="slides.tasks.slide_finish_enqueue")
def slide_finish_enqueue(sender=None, *, slide_id: int, **kwargs) -> None:
    try:
        slide_finish.delay(slide_id)
    except Exception:
        logger.exception("could not enqueue the finish of slide %s; the reconciler will retry", slide_id)
