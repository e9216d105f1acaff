"""Slides on the platform: upload protocol, registration, the distributed job's stages and their
exactly-once rules, the reconciler's part, results turned into patches for review."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.utils import timezone

from audit.models import AuditEvent
from cases.models import BiopsyCase, TissuePatch
from inference.core import slides as core
from slides import jobs, reconcile
from slides.models import Slide, SlideChunk, SlideRegion, SlideUpload
from slides.services import (
    OffsetMismatch,
    SlideRejected,
    SlideTooLarge,
    slide_register,
    slide_upload_abort,
    slide_upload_append,
    slide_upload_start,
    slide_uploads_expire,
    upload_path,
)

FIXTURE = Path(__file__).parent / "fixtures" / "slides" / "mosaic-small.tiff"
TRUTH = json.loads(FIXTURE.with_suffix(".json").read_text())


@pytest.fixture
def media_root(_media_root):
    return Path(_media_root)


@pytest.fixture(autouse=True)
def _small_chunks(settings):
    settings.SLIDE_CHUNK_TILES = 16  # the committed slide's 98 tissue tiles in 7 chunks


def _upload_whole(case, actor, data: bytes, *, name="slide.tiff", piece=400_000, **kwargs) -> SlideUpload:
    upload = slide_upload_start(case=case, actor=actor, name=name, size=len(data), **kwargs)
    for offset in range(0, len(data), piece):
        part = data[offset : offset + piece]
        slide_upload_append(upload=upload, offset=offset, data=io.BytesIO(part), length=len(part))
    upload.refresh_from_db()
    return upload


def _truth_tumour() -> np.ndarray:
    layout = TRUTH["layout"]
    return np.array([[cell == "TUM" for cell in row] for row in layout])


# Upload protocol ---------------------------------------------------------------------------------


def test_slide_uploaded_in_pieces_is_stored_as_uploaded_and_queued(case, clinician, media_root):
    data = FIXTURE.read_bytes()
    upload = _upload_whole(case, clinician, data, sha256=hashlib.sha256(data).hexdigest())
    assert upload.status == SlideUpload.Status.COMPLETE
    slide = upload.slide
    assert slide.status == Slide.Status.QUEUED
    assert (slide.width, slide.height, slide.mpp, slide.mpp_source) == (TRUTH["width"], TRUTH["height"], 0.5, "file")
    stored = media_root / slide.storage_name
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == slide.sha256 == hashlib.sha256(data).hexdigest()
    assert not upload_path(upload).exists()  # moved into storage, not copied
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.ANALYSING
    assert AuditEvent.objects.filter(action="slide.create", target_id=str(slide.pk)).count() == 1


def test_piece_at_the_wrong_offset_is_refused_with_the_offset_to_resume_from(case, clinician):
    data = FIXTURE.read_bytes()
    upload = slide_upload_start(case=case, actor=clinician, name="s.svs", size=len(data))
    slide_upload_append(upload=upload, offset=0, data=io.BytesIO(data[:1000]), length=1000)
    with pytest.raises(OffsetMismatch) as refused:
        slide_upload_append(upload=upload, offset=5000, data=io.BytesIO(data[5000:6000]), length=1000)
    assert refused.value.expected == 1000 and refused.value.status_code == 409
    # The connection drops half-way through a piece: the bytes that arrived count, the rest is resent.
    with pytest.raises(SlideRejected, match="resume from offset 1500"):
        slide_upload_append(upload=upload, offset=1000, data=io.BytesIO(data[1000:1500]), length=1000)
    upload.refresh_from_db()
    assert upload.received_bytes == 1500
    rest = data[1500:]
    slide_upload_append(upload=upload, offset=1500, data=io.BytesIO(rest), length=len(rest))
    upload.refresh_from_db()
    assert upload.status == SlideUpload.Status.COMPLETE and upload.slide is not None


@pytest.mark.parametrize(
    ("name", "size", "error", "message"),
    [
        ("slide.png", 100, SlideRejected, "not a whole-slide image format"),
        ("slide", 100, SlideRejected, "no extension"),
        ("../etc/slide.svs", 100, SlideRejected, "plain name"),
        ("slide.svs", 0, SlideRejected, "empty"),
        ("slide.svs", 10**13, SlideTooLarge, "limit for a slide"),
    ],
)
def test_bad_upload_is_refused_before_any_byte_is_sent(case, clinician, name, size, error, message):
    with pytest.raises(error, match=message):
        slide_upload_start(case=case, actor=clinician, name=name, size=size)
    assert not SlideUpload.objects.exists()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _single_level(tmp_path) -> bytes:
    from PIL import Image

    path = tmp_path / "flat.tiff"
    Image.new("RGB", (600, 400), (230, 180, 200)).save(path, format="TIFF", tiled=True)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda data, tmp: _truncated(data), "truncated"),
        (lambda data, tmp: _single_level(tmp), "pyramidal"),
        (lambda data, tmp: b"this is not a slide at all" * 100, "not"),
    ],
    ids=["truncated", "not-pyramidal", "not-a-slide"],
)
def test_bad_slide_file_is_rejected_with_its_reason_and_nothing_is_kept(
    case, clinician, media_root, tmp_path, make, message
):
    data = make(FIXTURE.read_bytes(), tmp_path)
    with pytest.raises(SlideRejected, match=message):
        _upload_whole(case, clinician, data)
    upload = SlideUpload.objects.get()
    assert upload.status == SlideUpload.Status.REJECTED and message in upload.error
    assert not upload_path(upload).exists()
    assert not Slide.objects.exists()
    assert not list(media_root.rglob("*.tif*"))


def test_checksum_that_does_not_match_rejects_the_upload(case, clinician):
    data = FIXTURE.read_bytes()
    with pytest.raises(SlideRejected, match="SHA-256"):
        _upload_whole(case, clinician, data, sha256="0" * 64)
    assert not Slide.objects.exists()


def test_aborted_and_expired_uploads_lose_their_partial_files(case, clinician):
    first = slide_upload_start(case=case, actor=clinician, name="a.svs", size=10)
    slide_upload_abort(upload=first)
    assert not upload_path(first).exists()
    second = slide_upload_start(case=case, actor=clinician, name="b.svs", size=10)
    SlideUpload.objects.filter(pk=second.pk).update(updated_at=timezone.now() - timedelta(days=3))
    assert slide_uploads_expire() == 1
    assert not upload_path(second).exists()
    with pytest.raises(SlideRejected, match="aborted"):
        slide_upload_append(upload=SlideUpload.objects.get(pk=second.pk), offset=0, data=io.BytesIO(b"x"), length=1)


def test_signed_out_case_takes_no_slide(case, clinician):
    BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.SIGNED_OUT)
    case.refresh_from_db()
    with pytest.raises(SlideRejected, match="signed out"):
        slide_upload_start(case=case, actor=clinician, name="a.svs", size=10)


# The job -----------------------------------------------------------------------------------------


@pytest.fixture
def slide(case, clinician, demo_model):
    return slide_register(case=case, actor=clinician, path=FIXTURE, name="mosaic.tiff")


def test_whole_job_finds_the_tumour_and_hands_its_regions_to_review(slide, media_root):
    done = jobs.slide_run_inline(slide.pk)
    assert done.status == Slide.Status.DONE, done.failure_reason
    assert done.tiles_total == TRUTH["counts"]["tissue"] == done.tiles_finished
    assert done.chunks_total == done.chunks_finished == 7
    results = jobs.slide_results(done)
    truth = _truth_tumour()
    scores = results.class_map("TUM")
    analysed = results.status == core.TILE_DONE
    positives, negatives = scores[analysed & truth], scores[analysed & ~truth]
    auc = (positives[:, None] > negatives[None, :]).mean() + 0.5 * (positives[:, None] == negatives[None, :]).mean()
    assert auc > 0.9
    # Regions: the best ones lie in the tumour, and each is a queued patch of the case.
    regions = list(done.regions.select_related("patch"))
    assert len(regions) == 12
    assert [r.rank for r in regions] == list(range(1, 13))
    top = regions[:4]
    assert all(truth[r.row, r.col] for r in top)
    assert all(r.patch.case_id == done.case_id and r.patch.status == TissuePatch.Status.QUEUED for r in regions)
    assert (regions[0].patch.width, regions[0].patch.height) == (224, 224)
    assert done.suspected_tumour is True
    # At the site's operating point (the demo model's sensitive default): at least the 16 of 98
    # tissue tiles that are tumour.
    assert done.tumour_fraction == pytest.approx(core.tumour_fraction(results, threshold=done.tumour_threshold))
    assert done.tumour_fraction >= 0.12
    assert (media_root / done.results_name).exists()
    # One array file per committed chunk, nothing else.
    files = sorted(p.name for p in (media_root / done.work_prefix / "chunks").iterdir())
    assert len(files) == 7 and set(files) == {Path(c.result_name).name for c in done.chunks.all()}


def test_the_case_waits_for_the_slide_and_its_regions(slide):
    from inference.analysis import prediction_run

    jobs.slide_tile(slide_id=slide.pk)
    case = BiopsyCase.objects.get(pk=slide.case_id)
    assert case.status == BiopsyCase.Status.ANALYSING
    for index in range(7):
        jobs.slide_chunk_run(slide_id=slide.pk, index=index)
    jobs.slide_finish(slide_id=slide.pk)
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.ANALYSING  # its 12 region patches are queued
    prediction_run(patch_ids=list(TissuePatch.objects.filter(case=case).values_list("pk", flat=True)))
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW


def test_each_stage_runs_once_however_often_its_message_arrives(slide):
    assert jobs.slide_tile(slide_id=slide.pk)["chunks"] == 7
    assert jobs.slide_tile(slide_id=slide.pk) == {"claimed": 0}
    assert jobs.slide_chunk_run(slide_id=slide.pk, index=0)["tiles"] == 16
    assert jobs.slide_chunk_run(slide_id=slide.pk, index=0) == {"claimed": 0}
    for index in range(1, 7):
        jobs.slide_chunk_run(slide_id=slide.pk, index=index)
    assert Slide.objects.get(pk=slide.pk).status == Slide.Status.FINISHING
    assert jobs.slide_finish(slide_id=slide.pk) == {"regions": 12}
    assert jobs.slide_finish(slide_id=slide.pk) == {"claimed": 0}
    assert SlideRegion.objects.filter(slide=slide).count() == 12
    assert TissuePatch.objects.filter(case=slide.case).count() == 12


def test_chunk_analysed_by_a_worker_taken_for_lost_is_dropped_and_analysed_once(slide, media_root):
    jobs.slide_tile(slide_id=slide.pk)
    # A worker claims chunk 0 and goes silent (the claim is old); the reconciler hands it on.
    SlideChunk.objects.filter(slide=slide, index=0).update(
        status=SlideChunk.Status.RUNNING,
        claim_token="00000000-0000-0000-0000-000000000001",
        worker="gone@host",
        claimed_at=timezone.now() - timedelta(minutes=5),
        attempts=1,
    )
    counts = reconcile.slide_reconcile()
    assert counts["chunks_requeued"] == 1
    chunk = SlideChunk.objects.get(slide=slide, index=0)
    assert chunk.status == SlideChunk.Status.QUEUED and chunk.claim_token is None
    for index in range(7):
        jobs.slide_chunk_run(slide_id=slide.pk, index=index)
    slide.refresh_from_db()
    assert slide.tiles_finished == slide.tiles_total == 98
    assert slide.chunks_finished == 7
    assert SlideChunk.objects.get(slide=slide, index=0).attempts == 2


def test_late_commit_of_a_lost_claim_changes_nothing(slide, monkeypatch, media_root):
    jobs.slide_tile(slide_id=slide.pk)
    original = core.chunk_analyse

    def handed_on_meanwhile(*args, **kwargs):
        result = original(*args, **kwargs)
        # While this worker analysed, the reconciler gave the chunk to another one.
        SlideChunk.objects.filter(slide=slide, index=0).update(status=SlideChunk.Status.QUEUED, claim_token=None)
        return result

    monkeypatch.setattr(core, "chunk_analyse", handed_on_meanwhile)
    assert jobs.slide_chunk_run(slide_id=slide.pk, index=0) == {"claimed": 0}
    slide.refresh_from_db()
    assert slide.tiles_finished == 0 and slide.chunks_finished == 0
    assert not list((media_root / slide.work_prefix / "chunks").glob("*.npz"))  # its arrays removed


def test_chunk_that_never_completes_is_given_up_and_the_slide_still_finishes(slide):
    jobs.slide_tile(slide_id=slide.pk)
    for index in range(1, 7):
        jobs.slide_chunk_run(slide_id=slide.pk, index=index)
    SlideChunk.objects.filter(slide=slide, index=0).update(
        status=SlideChunk.Status.RUNNING, claimed_at=timezone.now() - timedelta(hours=1), attempts=jobs.MAX_ATTEMPTS
    )
    assert reconcile.slide_reconcile()["chunks_failed"] == 1
    slide.refresh_from_db()
    assert slide.status == Slide.Status.FINISHING and slide.tiles_failed == 16
    jobs.slide_finish(slide_id=slide.pk)
    results = jobs.slide_results(Slide.objects.get(pk=slide.pk))
    assert np.count_nonzero(results.status == core.TILE_FAILED) == 16


def test_lost_messages_are_sent_again_when_the_broker_is_empty(slide, settings, django_capture_on_commit_callbacks):
    from slides.signals import slide_queued

    sent = []
    slide_queued.connect(lambda sender, slide_id, **kw: sent.append(slide_id), weak=False, dispatch_uid="test-sent")
    try:
        Slide.objects.filter(pk=slide.pk).update(enqueued_at=timezone.now() - timedelta(minutes=2))
        with django_capture_on_commit_callbacks(execute=True):
            assert reconcile.slide_reconcile(broker_waiting=5)["slides_resent"] == 0  # the workers are behind
        with django_capture_on_commit_callbacks(execute=True):
            assert reconcile.slide_reconcile(broker_waiting=0)["slides_resent"] == 1
        assert sent == [slide.pk]
    finally:
        slide_queued.disconnect(dispatch_uid="test-sent")


def test_slide_that_cannot_be_tiled_fails_with_its_reason_and_the_case_moves_on(case, clinician, demo_model, tmp_path):
    from inference.core.synthetic_slide import mosaic_slide_write, source_tiles
    from tests.conftest import FIXTURE_PATCHES

    path = tmp_path / "coarse.svs"
    tiles = source_tiles(FIXTURE_PATCHES, classes=("NORM",))
    mosaic_slide_write(path, layout=[["NORM"] * 3] * 3, tiles_by_class=tiles, mpp=1.0)  # 1 µm/px: a 10x scan
    slide = slide_register(case=case, actor=clinician, path=path, name="coarse.svs")
    assert jobs.slide_tile(slide_id=slide.pk) == {"failed": 1}
    slide.refresh_from_db()
    assert slide.status == Slide.Status.FAILED and "coarser than the model" in slide.failure_reason
    assert BiopsyCase.objects.get(pk=case.pk).status == BiopsyCase.Status.READY_FOR_REVIEW


def test_worker_without_a_local_path_keeps_a_checked_copy(slide, settings, monkeypatch):
    from django.core.files.storage import default_storage

    from slides import storage

    class ObjectStorage:  # as S3 is to this function: files to open, no local path
        def path(self, name):
            raise NotImplementedError("object storage")

        def open(self, name, mode="rb"):
            return default_storage.open(name, mode)

    monkeypatch.setattr(storage, "default_storage", ObjectStorage())
    copy = storage.slide_local_path(slide.storage_name, slide.sha256)
    assert copy.parent == Path(settings.SLIDE_CACHE_DIR) and copy.read_bytes() == FIXTURE.read_bytes()
    assert storage.slide_local_path(slide.storage_name, slide.sha256) == copy  # fetched once
    with pytest.raises(OSError, match="does not match its checksum"):
        storage.slide_local_path(slide.storage_name, "f" * 64)
    assert [p.name for p in Path(settings.SLIDE_CACHE_DIR).iterdir()] == [copy.name]  # nothing half-kept


def test_slide_cache_drops_the_least_recently_used_copies_over_its_size(tmp_path, settings):
    import os

    from slides.storage import cache_trim

    settings.SLIDE_CACHE_MAX_BYTES = 2500
    for age, name in enumerate(["newest.svs", "middle.svs", "oldest.svs"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))
    cache_trim(tmp_path, keep=tmp_path / "oldest.svs")  # the one just fetched stays whatever its age
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newest.svs", "oldest.svs"]
