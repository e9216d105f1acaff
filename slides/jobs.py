"""A slide's analysis as a distributed job, run by Celery workers (``slides.tasks``).

::

    slide_tile       QUEUED -> TILING -> ANALYSING: tissue mask, tile grid at the model's µm/px,
                     the grid's arrays in storage, one SlideChunk row per few hundred tiles
    slide_chunk_run  one chunk: claimed (QUEUED -> RUNNING with a token), analysed through the patch
                     path, its arrays written to storage under the claim's name, committed (DONE)
                     only if the claim is still its own; the last chunk moves the slide to FINISHING
    slide_finish     the per-slide arrays from the committed chunks, heatmap source, tumour fraction
                     at the site's operating point, and the top suspicious tiles as TissuePatches of
                     the case (queued for the usual analysis, review, audit and export) -> DONE
    slide_reconcile  (slides/reconcile.py) what a lost message or a killed worker left behind,
                     handed on again

As with patches, the database is the source of truth and broker messages are wake-ups: every stage
is claimed with a conditional UPDATE, so a redelivered message or a second worker does nothing, and
a chunk's results count only if its claim commits. A killed worker loses at most the chunk it held;
its tiles are analysed again and committed once.

Memory per worker is bounded by the chunk and batch sizes (``inference.core.slides``), not by the
slide: tile results travel as one small array file per chunk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import uuid
from collections import OrderedDict

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from audit.services import WORKER, audit_record_many
from cases.models import BiopsyCase, TissuePatch
from inference.core import slides as core
from inference.core.model import Predictor
from inference.models import ModelVersion
from inference.registry import ModelUnavailable, model_load_active
from inference.selectors import POSITIVE_CLASS, operating_point
from slides import storage
from slides.models import Slide, SlideChunk, SlideRegion
from slides.signals import slide_chunks_queued, slide_finishing

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # claims of one stage (tiling, a chunk, finishing) before it is given up


class _ClaimLost(Exception):
    """The reconciler handed this work on while we held it: what we did is dropped."""


# ---------------------------------------------------------------------------------------------
# What a worker process keeps between tasks: the model, each slide's grid, open slides
# ---------------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_grids: OrderedDict[int, core.TileGrid] = OrderedDict()
_open: OrderedDict[int, object] = OrderedDict()
_predictors: dict[int, Predictor] = {}
CACHED_SLIDES = 4


def _predictor(version: ModelVersion) -> Predictor:
    """The slide's model (fixed at tiling), even if another version has been activated since."""
    active, loaded = model_load_active()
    if active.pk == version.pk:
        return loaded
    with _cache_lock:
        if version.pk not in _predictors:
            predictor = Predictor(version.directory, num_threads=settings.INFERENCE_THREADS or None)
            if predictor.file_sha256 != version.file_sha256:
                raise ModelUnavailable(f"{version}: the model file changed since it was registered")
            _predictors.clear()
            _predictors[version.pk] = predictor
        return _predictors[version.pk]


def _grid_name(slide: Slide) -> str:
    return f"{slide.work_prefix}/grid.npz"


def _grid(slide: Slide) -> core.TileGrid:
    with _cache_lock:
        if slide.pk in _grids:
            _grids.move_to_end(slide.pk)
            return _grids[slide.pk]
    arrays = storage.npz_read(_grid_name(slide))
    g = slide.grid
    grid = core.TileGrid(
        cols=int(g["cols"]),
        rows=int(g["rows"]),
        tile_px=int(g["tile_px"]),
        model_mpp=float(g["model_mpp"]),
        step=float(g["step"]),
        level=int(g["level"]),
        level_downsample=float(g["level_downsample"]),
        coords=arrays["coords"],
        tissue_fraction=arrays["tissue_fraction"],
    )
    with _cache_lock:
        _grids[slide.pk] = grid
        while len(_grids) > CACHED_SLIDES:
            _grids.popitem(last=False)
    return grid


def _opened(slide: Slide, grid: core.TileGrid):
    """An OpenSlide handle of the slide and, for a tiled JPEG TIFF, its direct tile reader
    (``core.tile_reader``), kept open for its next chunks (both are thread-safe)."""
    import openslide

    with _cache_lock:
        if slide.pk in _open:
            _open.move_to_end(slide.pk)
            return _open[slide.pk]
    path = storage.slide_local_path(slide.storage_name, slide.sha256)
    handle = openslide.OpenSlide(str(path))
    reader = core.tile_reader(path, grid, level_size=slide.levels[grid.level][:2], slide=handle)
    with _cache_lock:
        _open[slide.pk] = (handle, reader)
        while len(_open) > CACHED_SLIDES:
            old_handle, old_reader = _open.popitem(last=False)[1]
            old_handle.close()
            if old_reader is not None:
                old_reader.close()
    return handle, reader


def _slide_mpp(slide: Slide) -> float | None:
    """The µm/px the uploader gave, for a file that does not say; the file's own otherwise."""
    return slide.mpp if slide.mpp_source == "given" else None


def slide_event(slide: Slide, before: str, after: str, reason: str = "", **extra) -> dict:
    return {
        "actor": WORKER,
        "action": "slide.status",
        "target": slide,
        "institution_id": slide.case.institution_id,
        "before": {"status": before},
        "after": {"status": after, **extra},
        "reason": reason,
    }


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------


def slide_tile(*, slide_id: int, worker: str = "") -> dict[str, int]:
    """Find the slide's tissue, lay the model's tile grid over it and queue its chunks."""
    token = uuid.uuid4()
    now = timezone.now()
    with transaction.atomic():
        claimed = Slide.objects.filter(pk=slide_id, status=Slide.Status.QUEUED).update(
            status=Slide.Status.TILING, claim_token=token, claimed_at=now, worker=worker, attempts=F("attempts") + 1
        )
        if not claimed:
            return {"claimed": 0}  # tiled already, or another worker has it
        slide = Slide.objects.select_related("case").get(pk=slide_id)
        audit_record_many([slide_event(slide, Slide.Status.QUEUED, Slide.Status.TILING, attempt=slide.attempts)])
    try:
        version, predictor = model_load_active()
    except (ModelUnavailable, OSError, ValueError) as exc:
        logger.error("cannot tile slide %s: no usable model (%s); it stays queued", slide_id, exc)
        Slide.objects.filter(pk=slide_id, claim_token=token).update(status=Slide.Status.QUEUED, claim_token=None)
        return {"skipped": 1}
    try:
        path = storage.slide_local_path(slide.storage_name, slide.sha256)
        info = core.slide_inspect(path, mpp=_slide_mpp(slide), max_pixels=settings.SLIDE_MAX_PIXELS)
        with core.slide_open(path) as handle:
            mask = core.tissue_detect(handle, info)
        grid = core.tile_grid(
            info,
            mask,
            model_mpp=core.model_mpp_of(predictor.metadata, default=0.5),
            tile_px=predictor.input_size,
            min_tissue=settings.SLIDE_MIN_TISSUE,
        )
    except core.SlideError as exc:
        slide_fail(slide_id, token, Slide.Status.TILING, f"the slide cannot be analysed: {exc}")
        return {"failed": 1}
    storage.bytes_store(_grid_name(slide), storage.npz_bytes(coords=grid.coords, tissue_fraction=grid.tissue_fraction))
    pieces = core.chunks(grid.coords, settings.SLIDE_CHUNK_TILES)
    now = timezone.now()
    next_status = Slide.Status.ANALYSING if pieces else Slide.Status.FINISHING
    try:
        with transaction.atomic():
            moved = Slide.objects.filter(pk=slide_id, claim_token=token, status=Slide.Status.TILING).update(
                status=next_status,
                claim_token=None,
                attempts=0,
                model_version=version,
                grid={
                    "cols": grid.cols,
                    "rows": grid.rows,
                    "tile_px": grid.tile_px,
                    "model_mpp": grid.model_mpp,
                    "step": grid.step,
                    "level": grid.level,
                    "level_downsample": grid.level_downsample,
                },
                tiles_total=len(grid),
                chunks_total=len(pieces),
                analysis_started_at=now,
                enqueued_at=now,
            )
            if not moved:
                raise _ClaimLost
            SlideChunk.objects.bulk_create(
                [
                    SlideChunk(slide_id=slide_id, index=p.index, start=p.start, stop=p.stop, enqueued_at=now)
                    for p in pieces
                ]
            )
            audit_record_many(
                [
                    slide_event(
                        slide,
                        Slide.Status.TILING,
                        next_status,
                        model_version=str(version),
                        tiles=len(grid),
                        chunks=len(pieces),
                        grid=f"{grid.cols} x {grid.rows} tiles of {grid.tile_px} px at {grid.model_mpp} µm/px",
                    )
                ]
            )
            indexes = [p.index for p in pieces]
            if indexes:
                transaction.on_commit(
                    lambda: slide_chunks_queued.send(sender=Slide, slide_id=slide_id, indexes=indexes)
                )
            else:
                transaction.on_commit(lambda: slide_finishing.send(sender=Slide, slide_id=slide_id))
    except _ClaimLost:
        logger.warning("slide %s: tiling finished after its claim was handed on; dropped", slide_id)
        return {"claimed": 0}
    logger.info("slide %s: %d tissue tiles in %d chunks", slide_id, len(grid), len(pieces))
    return {"tiles": len(grid), "chunks": len(pieces)}


def slide_fail(slide_id: int, token: uuid.UUID | None, before: str, reason: str) -> bool:
    from inference.analysis import case_status_refresh

    with transaction.atomic():
        rows = Slide.objects.filter(pk=slide_id, status=before)
        if token is not None:
            rows = rows.filter(claim_token=token)
        if not rows.update(
            status=Slide.Status.FAILED, failure_reason=reason, claim_token=None, finished_at=timezone.now()
        ):
            return False
        slide = Slide.objects.select_related("case").get(pk=slide_id)
        audit_record_many([slide_event(slide, before, Slide.Status.FAILED, reason)])
        case_status_refresh(case_ids=[slide.case_id])
    logger.warning("slide %s failed: %s", slide_id, reason)
    return True


# ---------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------


def _chunk_name(slide: Slide, index: int, token: uuid.UUID) -> str:
    return f"{slide.work_prefix}/chunks/{index:06d}-{token.hex}.npz"


def slide_chunk_run(*, slide_id: int, index: int, worker: str = "") -> dict[str, int]:
    """Analyse one chunk of a slide's tiles, if it is still queued; commit it only under its claim."""
    token = uuid.uuid4()
    claimed = SlideChunk.objects.filter(
        slide_id=slide_id, index=index, status=SlideChunk.Status.QUEUED, slide__status=Slide.Status.ANALYSING
    ).update(
        status=SlideChunk.Status.RUNNING,
        claim_token=token,
        claimed_at=timezone.now(),
        worker=worker,
        attempts=F("attempts") + 1,
    )
    if not claimed:
        return {"claimed": 0}  # done already, or another worker has it
    chunk = SlideChunk.objects.select_related("slide__case", "slide__model_version").get(slide_id=slide_id, index=index)
    slide = chunk.slide
    try:
        predictor = _predictor(slide.model_version)
        grid = _grid(slide)
        piece = core.TileChunk(
            index=index, start=chunk.start, stop=chunk.stop, coords=grid.coords[chunk.start : chunk.stop]
        )
        handle, reader = _opened(slide, grid)
        result = core.chunk_analyse(predictor, handle, grid, piece, reader=reader)
        name = storage.bytes_store(
            _chunk_name(slide, index, token),
            storage.npz_bytes(
                coords=result.coords,
                probabilities=result.probabilities,
                status=result.status,
                reasons=np.array(json.dumps({str(k): v for k, v in result.reasons.items()})),
            ),
        )
    except Exception:
        # Give the chunk back at once (a missing model, unreadable storage): the reconciler sends
        # it again, and after MAX_ATTEMPTS claims gives it up.
        SlideChunk.objects.filter(pk=chunk.pk, claim_token=token).update(
            status=SlideChunk.Status.QUEUED, claim_token=None
        )
        raise
    done = int(np.count_nonzero(result.status == core.TILE_DONE))
    unassessable = int(np.count_nonzero(result.status == core.TILE_UNASSESSABLE))
    failed = len(result.status) - done - unassessable
    try:
        with transaction.atomic():
            committed = SlideChunk.objects.filter(
                pk=chunk.pk, claim_token=token, status=SlideChunk.Status.RUNNING
            ).update(
                status=SlideChunk.Status.DONE,
                claim_token=None,
                tiles_done=done,
                tiles_unassessable=unassessable,
                tiles_failed=failed,
                seconds=result.seconds,
                result_name=name,
                finished_at=timezone.now(),
            )
            if not committed:
                raise _ClaimLost
            chunks_count_finished(
                slide, tiles_done=done, tiles_unassessable=unassessable, tiles_failed=failed, chunks=1
            )
    except _ClaimLost:
        logger.warning("slide %s chunk %s: analysed after its claim was handed on; dropped", slide_id, index)
        storage.discard(name)
        return {"claimed": 0}
    return {"tiles": len(result.status), "done": done}


def chunks_count_finished(
    slide: Slide, *, tiles_done: int, tiles_unassessable: int, tiles_failed: int, chunks: int
) -> None:
    """Count finished chunks into the slide (in the caller's transaction); the last one moves the
    slide to FINISHING and sends the finish after commit."""
    Slide.objects.filter(pk=slide.pk).update(
        tiles_done=F("tiles_done") + tiles_done,
        tiles_unassessable=F("tiles_unassessable") + tiles_unassessable,
        tiles_failed=F("tiles_failed") + tiles_failed,
        chunks_finished=F("chunks_finished") + chunks,
    )
    # The row lock taken by the update above orders concurrent chunks: exactly one sees the last.
    if Slide.objects.filter(pk=slide.pk, status=Slide.Status.ANALYSING, chunks_finished__gte=F("chunks_total")).update(
        status=Slide.Status.FINISHING, enqueued_at=timezone.now()
    ):
        audit_record_many([slide_event(slide, Slide.Status.ANALYSING, Slide.Status.FINISHING)])
        slide_id = slide.pk
        transaction.on_commit(lambda: slide_finishing.send(sender=Slide, slide_id=slide_id))


# ---------------------------------------------------------------------------------------------
# Finishing: the slide's results, and its suspicious regions as patches of the case
# ---------------------------------------------------------------------------------------------


def slide_results(slide: Slide) -> core.SlideResults:
    """The per-tile arrays of the committed chunks (failed chunks' tiles marked failed)."""
    grid = _grid(slide)
    results = core.results_new(grid, slide.model_version.classes)
    for chunk in slide.chunks.all().order_by("index"):
        coords = grid.coords[chunk.start : chunk.stop]
        if chunk.status == SlideChunk.Status.DONE:
            arrays = storage.npz_read(chunk.result_name)
            core.results_add(
                results,
                core.ChunkResult(
                    index=chunk.index,
                    coords=arrays["coords"],
                    probabilities=arrays["probabilities"],
                    status=arrays["status"],
                ),
            )
        else:
            results.status[coords[:, 1], coords[:, 0]] = core.TILE_FAILED
    return results


def _region_png(handle, grid: core.TileGrid, region: core.Region) -> bytes:
    buffer = io.BytesIO()
    core.tile_image(handle, grid, region.col, region.row).save(buffer, format="PNG")
    return buffer.getvalue()


def slide_finish(*, slide_id: int, worker: str = "") -> dict[str, int]:
    """Put the slide's results together and hand its most suspicious tiles to review."""
    token = uuid.uuid4()
    claimed = Slide.objects.filter(pk=slide_id, status=Slide.Status.FINISHING, claim_token=None).update(
        claim_token=token, claimed_at=timezone.now(), worker=worker, attempts=F("attempts") + 1
    )
    if not claimed:
        return {"claimed": 0}
    slide = Slide.objects.select_related("case", "model_version").get(pk=slide_id)
    version = slide.model_version
    results = slide_results(slide)
    results_bytes = core.results_save(results)
    results_name = storage.bytes_store(f"{slide.work_prefix}/results.npz", results_bytes)
    point = operating_point(institution_id=slide.case.institution_id, model_version=version)
    has_tumour_class = POSITIVE_CLASS in results.classes
    regions: list[core.Region] = []
    fraction = suspected = None
    if has_tumour_class:
        fraction = core.tumour_fraction(results, class_name=POSITIVE_CLASS, threshold=point.threshold)
        regions = core.suspicious_regions(results, class_name=POSITIVE_CLASS, k=settings.SLIDE_REGIONS)
        suspected = bool(regions) and regions[0].score >= point.threshold
    images: list[tuple[str, bytes]] = []
    if regions:
        grid = _grid(slide)
        with core.slide_open(storage.slide_local_path(slide.storage_name, slide.sha256)) as handle:
            stem = slide.original_name.rsplit(".", 1)[0]
            images = [(f"{stem} region {i:02d}.png", _region_png(handle, grid, r)) for i, r in enumerate(regions, 1)]
    summary = {
        "tiles": slide.tiles_total,
        "tiles_done": slide.tiles_done,
        "tiles_unassessable": slide.tiles_unassessable,
        "tiles_failed": slide.tiles_failed,
        "tumour_fraction": None if fraction is None else round(fraction, 4),
        "threshold": point.threshold,
        "suspected_tumour": suspected,
        "regions": len(regions),
        "model_version": str(version),
    }

    def finish_in(transaction_patches: list[TissuePatch]) -> None:
        done = Slide.objects.filter(pk=slide_id, claim_token=token, status=Slide.Status.FINISHING).update(
            status=Slide.Status.DONE,
            claim_token=None,
            results_name=results_name,
            results_sha256=hashlib.sha256(results_bytes).hexdigest(),
            tumour_fraction=fraction,
            tumour_threshold=point.threshold if has_tumour_class else None,
            site_validation=point.validation if has_tumour_class else None,
            suspected_tumour=suspected,
            finished_at=timezone.now(),
        )
        if not done:
            raise _ClaimLost
        SlideRegion.objects.filter(slide_id=slide_id).delete()  # none unless an earlier finish was dropped
        patches = transaction_patches or [None] * len(regions)
        SlideRegion.objects.bulk_create(
            [
                SlideRegion(
                    slide_id=slide_id,
                    rank=rank,
                    patch=patch,
                    col=r.col,
                    row=r.row,
                    x=r.x,
                    y=r.y,
                    width=r.width,
                    height=r.height,
                    score=r.score,
                )
                for rank, (r, patch) in enumerate(zip(regions, patches, strict=True), 1)
            ]
        )
        audit_record_many([slide_event(slide, Slide.Status.FINISHING, Slide.Status.DONE, **summary)])

    from inference.analysis import case_status_refresh

    actor = slide.uploaded_by_lab or slide.uploaded_by
    try:
        if images and slide.case.status != BiopsyCase.Status.SIGNED_OUT:
            from cases.services import patch_upload

            patch_upload(case=slide.case, uploaded_by=actor, files=images, on_created=finish_in)
        else:
            with transaction.atomic():
                finish_in([])
                case_status_refresh(case_ids=[slide.case_id])
    except _ClaimLost:
        logger.warning("slide %s: finished after its claim was handed on; dropped", slide_id)
        return {"claimed": 0}
    _orphans_remove(slide)
    logger.info("slide %s done: %s", slide_id, summary)
    return {"regions": len(regions)}


def _orphans_remove(slide: Slide) -> None:
    """Chunk arrays of claims that never committed (a killed worker's) are removed."""
    from django.core.files.storage import default_storage

    kept = set(SlideChunk.objects.filter(slide=slide).exclude(result_name="").values_list("result_name", flat=True))
    folder = f"{slide.work_prefix}/chunks"
    try:
        _, files = default_storage.listdir(folder)
    except (FileNotFoundError, NotImplementedError):
        return
    for name in files:
        if f"{folder}/{name}" not in kept:
            storage.discard(f"{folder}/{name}")


# ---------------------------------------------------------------------------------------------
# The whole job in this process (tests, the import command's --wait, a notebook)
# ---------------------------------------------------------------------------------------------


def slide_run_inline(slide_id: int) -> Slide:
    """Run every stage of a queued slide here, in order, with the same functions the workers run."""
    slide_tile(slide_id=slide_id)
    for index in SlideChunk.objects.filter(slide_id=slide_id, status=SlideChunk.Status.QUEUED).values_list(
        "index", flat=True
    ):
        slide_chunk_run(slide_id=slide_id, index=index)
    slide_finish(slide_id=slide_id)
    return Slide.objects.get(pk=slide_id)


def slide_progress(slide: Slide, now=None) -> dict:
    """Tiles finished of the total, as a fraction, and the estimated seconds left (None until
    the first chunk is in)."""
    finished = slide.tiles_finished
    total = slide.tiles_total
    eta = None
    if slide.status == Slide.Status.ANALYSING and finished and slide.analysis_started_at:
        elapsed = ((now or timezone.now()) - slide.analysis_started_at).total_seconds()
        eta = round(elapsed / finished * (total - finished), 1)
    elif slide.status in (Slide.Status.DONE, Slide.Status.FAILED):
        eta = 0.0
    return {
        "tiles_total": total,
        "tiles_finished": finished,
        "tiles_done": slide.tiles_done,
        "tiles_unassessable": slide.tiles_unassessable,
        "tiles_failed": slide.tiles_failed,
        "chunks_total": slide.chunks_total,
        "chunks_finished": slide.chunks_finished,
        "fraction": round(finished / total, 4) if total else (1.0 if slide.status == Slide.Status.DONE else 0.0),
        "eta_seconds": eta,
    }
