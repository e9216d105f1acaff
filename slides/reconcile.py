"""The reconciler's part for slides: what a lost message or a killed worker left behind is handed
on again, by the rules of ``inference.analysis.analysis_reconcile`` for patches. Run by the
worker's beat every RECONCILE_INTERVAL_SECONDS (``slides.tasks.slide_reconcile``)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import WORKER, audit_record, audit_record_many
from inference.selectors import workers_lost
from slides.jobs import MAX_ATTEMPTS, chunks_count_finished, slide_event, slide_fail
from slides.models import Slide, SlideChunk
from slides.signals import slide_chunks_queued, slide_finishing, slide_queued

logger = logging.getLogger(__name__)


def slide_reconcile(*, stale_after: timedelta | None = None, broker_waiting: int | None = None) -> dict[str, int]:
    """Hand on the slide work a lost message or a lost worker left behind (the rules of
    ``inference.analysis.analysis_reconcile``): stages and chunks held by a worker that is gone or
    for longer than ANALYSIS_STALE_AFTER_SECONDS are queued again (given up after MAX_ATTEMPTS);
    queued ones whose message is lost are sent again. Returns counts."""
    if stale_after is None:
        stale_after = timedelta(seconds=settings.ANALYSIS_STALE_AFTER_SECONDS)
    now = timezone.now()
    cutoff = now - stale_after
    resend_cutoff = cutoff
    if broker_waiting == 0:
        resend_cutoff = max(cutoff, now - timedelta(seconds=settings.ANALYSIS_REQUEUE_AFTER_SECONDS))
    counts = {"chunks_requeued": 0, "chunks_failed": 0, "chunks_resent": 0, "slides_resent": 0, "slides_failed": 0}
    to_tile: list[int] = []
    to_finish: list[int] = []
    chunks_to_send: dict[int, list[int]] = {}

    with transaction.atomic():
        running = list(
            SlideChunk.objects.select_for_update()
            .filter(status=SlideChunk.Status.RUNNING)
            .select_related("slide__case")
        )
        lost = workers_lost(((c.pk, c.worker, c.claimed_at) for c in running), now)
        for chunk in running:
            if not (chunk.claimed_at < cutoff or chunk.pk in lost):
                continue
            if chunk.attempts >= MAX_ATTEMPTS:
                SlideChunk.objects.filter(pk=chunk.pk).update(
                    status=SlideChunk.Status.FAILED,
                    claim_token=None,
                    tiles_failed=chunk.stop - chunk.start,
                    finished_at=now,
                )
                audit_record(
                    actor=WORKER,
                    action="slide.chunk_failed",
                    target=chunk.slide,
                    institution_id=chunk.slide.case.institution_id,
                    after={"chunk": chunk.index, "tiles": chunk.stop - chunk.start, "attempts": chunk.attempts},
                    reason="analysis of the chunk never completed",
                )
                chunks_count_finished(
                    chunk.slide, tiles_done=0, tiles_unassessable=0, tiles_failed=chunk.stop - chunk.start, chunks=1
                )
                counts["chunks_failed"] += 1
            else:
                SlideChunk.objects.filter(pk=chunk.pk).update(
                    status=SlideChunk.Status.QUEUED, claim_token=None, enqueued_at=now
                )
                chunks_to_send.setdefault(chunk.slide_id, []).append(chunk.index)
                counts["chunks_requeued"] += 1
        waiting = list(
            SlideChunk.objects.filter(
                status=SlideChunk.Status.QUEUED, enqueued_at__lt=resend_cutoff, slide__status=Slide.Status.ANALYSING
            ).values_list("pk", "slide_id", "index")
        )
        SlideChunk.objects.filter(pk__in=[pk for pk, _, _ in waiting]).update(enqueued_at=now)
        for _, slide_id, index in waiting:
            chunks_to_send.setdefault(slide_id, []).append(index)
            counts["chunks_resent"] += 1

        held = list(
            Slide.objects.select_for_update()
            .filter(Q(status=Slide.Status.TILING) | Q(status=Slide.Status.FINISHING, claim_token__isnull=False))
            .select_related("case")
        )
        lost = workers_lost(((s.pk, s.worker, s.claimed_at) for s in held), now)
        for slide in held:
            if not (slide.claimed_at < cutoff or slide.pk in lost):
                continue
            if slide.attempts >= MAX_ATTEMPTS:
                transaction.on_commit(
                    lambda s=slide: slide_fail(
                        s.pk, None, s.status, f"{s.get_status_display().lower()} never completed"
                    )
                )
                counts["slides_failed"] += 1
                continue
            back = Slide.Status.QUEUED if slide.status == Slide.Status.TILING else Slide.Status.FINISHING
            Slide.objects.filter(pk=slide.pk).update(status=back, claim_token=None, enqueued_at=now)
            audit_record_many([slide_event(slide, slide.status, back, "worker lost: re-enqueued")])
            (to_tile if back == Slide.Status.QUEUED else to_finish).append(slide.pk)
        for status, bucket in ((Slide.Status.QUEUED, to_tile), (Slide.Status.FINISHING, to_finish)):
            ids = list(
                Slide.objects.filter(status=status, claim_token=None, enqueued_at__lt=resend_cutoff).values_list(
                    "pk", flat=True
                )
            )
            Slide.objects.filter(pk__in=ids).update(enqueued_at=now)
            bucket.extend(i for i in ids if i not in bucket)
        counts["slides_resent"] = len(to_tile) + len(to_finish)

        def send() -> None:
            for slide_id in to_tile:
                slide_queued.send(sender=Slide, slide_id=slide_id)
            for slide_id, indexes in chunks_to_send.items():
                slide_chunks_queued.send(sender=Slide, slide_id=slide_id, indexes=sorted(indexes))
            for slide_id in to_finish:
                slide_finishing.send(sender=Slide, slide_id=slide_id)

        transaction.on_commit(send)
    if any(counts.values()):
        logger.warning("slide reconciler: %s", counts)
    return counts
