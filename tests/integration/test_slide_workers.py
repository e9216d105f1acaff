"""A whole slide through the API to real `celery worker` processes on PostgreSQL + Redis: tiles
spread over two workers, progress visible throughout, the tumour found, regions reviewable; and a
worker SIGKILLed mid-slide, after which every chunk is committed exactly once.

Locally these skip when PostgreSQL/Redis are not configured; under CI=true they fail instead.
"""

from __future__ import annotations

import datetime
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from audit.services import audit_verify
from cases.models import BiopsyCase, TissuePatch
from inference.core import slides as core
from slides import jobs, reconcile
from slides.models import Slide, SlideChunk, SlideUpload
from tests.conftest import CASE_PAYLOAD
from tests.integration.workers import wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FIXTURE = Path(__file__).parents[1] / "fixtures" / "slides" / "mosaic-small.tiff"
TRUTH = json.loads(FIXTURE.with_suffix(".json").read_text())
CHUNK_TILES = "8"  # 98 tissue tiles in 13 chunks: enough tasks to spread, and to kill one mid-way


@pytest.fixture
def slide_workers(workers):
    return lambda name: workers(name, SLIDE_CHUNK_TILES=CHUNK_TILES)


@pytest.fixture
def lab_api():
    call_command("seed_demo", stdout=io.StringIO())
    out = io.StringIO()
    call_command("create_lab_token", institution="demo", name="LIS", stdout=out, stderr=io.StringIO())
    key = next(line for line in out.getvalue().splitlines() if line.startswith("LAB_TOKEN=")).split("=", 1)[1]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return api


def _upload(api: APIClient) -> int:
    case = api.post("/api/v1/cases/", {**CASE_PAYLOAD, "accession": "WSI-1"}, format="json").json()
    data = FIXTURE.read_bytes()
    started = api.post(f"/api/v1/cases/{case['id']}/slides/", {"name": "mosaic.svs", "size": len(data)}, format="json")
    url = started["Location"]
    response = None
    for offset in range(0, len(data), 512 * 1024):
        response = api.generic(
            "PATCH",
            url,
            data[offset : offset + 512 * 1024],
            content_type="application/offset+octet-stream",
            HTTP_UPLOAD_OFFSET=str(offset),
        )
    assert response.status_code == 201, response.content
    return response.json()["slide"]["id"]


def _tile_auc(slide: Slide) -> float:
    results = jobs.slide_results(slide)
    truth = np.array([[cell == "TUM" for cell in row] for row in TRUTH["layout"]])
    scores, analysed = results.class_map("TUM"), results.status == core.TILE_DONE
    pos, neg = scores[analysed & truth], scores[analysed & ~truth]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def _each_chunk_committed_once(slide: Slide, media_root: Path) -> None:
    chunks = list(SlideChunk.objects.filter(slide=slide))
    assert len(chunks) == slide.chunks_total == slide.chunks_finished
    assert all(c.status == SlideChunk.Status.DONE and c.result_name for c in chunks)
    assert sum(c.tiles_done + c.tiles_unassessable + c.tiles_failed for c in chunks) == slide.tiles_total
    # One array file per chunk: the committed one (a killed claim's file is removed at the finish).
    on_disk = sorted(p.name for p in (media_root / slide.work_prefix / "chunks").iterdir())
    assert on_disk == sorted(Path(c.result_name).name for c in chunks)
    results = jobs.slide_results(slide)
    assert np.count_nonzero(results.status == core.TILE_DONE) == slide.tiles_done == slide.tiles_total


def test_slide_uploaded_through_the_api_is_analysed_across_two_real_workers(lab_api, slide_workers, settings):
    slide_workers("one")
    slide_workers("two")
    slide_id = _upload(lab_api)
    seen = []

    def finished():
        detail = lab_api.get(f"/api/v1/slides/{slide_id}/").json()
        seen.append((detail["status"], detail["progress"]["tiles_finished"]))
        return detail["status"] in ("done", "failed") and detail

    detail = wait_for(finished, 240, "the slide's analysis", interval=0.05)
    assert detail["status"] == "done", detail["failure_reason"]
    # Progress was visible as it went: tiles finished only grew, and was seen between 0 and the total.
    counts = [n for _, n in seen]
    assert counts == sorted(counts) and counts[-1] == TRUTH["counts"]["tissue"]
    slide = Slide.objects.get(pk=slide_id)
    workers_used = set(SlideChunk.objects.filter(slide=slide).values_list("worker", flat=True))
    assert len(workers_used) == 2, workers_used  # the chunks were spread over both workers
    _each_chunk_committed_once(slide, Path(settings.MEDIA_ROOT))
    assert _tile_auc(slide) > 0.9
    regions = detail["results"]["regions"]
    assert len(regions) == 12 and all(r["patch"] for r in regions)
    # The regions are analysed as patches by the same workers; then the case is ready for review.
    case = BiopsyCase.objects.get(pk=slide.case_id)
    wait_for(lambda: BiopsyCase.objects.get(pk=case.pk).status == BiopsyCase.Status.READY_FOR_REVIEW, 180, "review")
    region_patches = TissuePatch.objects.filter(pk__in=[r["patch"] for r in regions])
    assert all(p.status == TissuePatch.Status.DONE for p in region_patches)
    assert audit_verify().bad is None


def test_worker_killed_mid_slide_recovers_with_every_chunk_committed_once(lab_api, slide_workers, settings):
    victim = slide_workers("victim")
    slide_id = _upload(lab_api)

    def mid_slide():
        slide = Slide.objects.get(pk=slide_id)
        running = SlideChunk.objects.filter(slide_id=slide_id, status=SlideChunk.Status.RUNNING).exists()
        return slide.chunks_finished >= 2 and running

    wait_for(mid_slide, 240, "a chunk in progress", interval=0.005)
    victim.kill()
    time.sleep(0.2)
    stuck = list(SlideChunk.objects.filter(slide_id=slide_id, status=SlideChunk.Status.RUNNING))
    assert stuck, "the kill should leave a claimed chunk behind"
    assert Slide.objects.get(pk=slide_id).status == Slide.Status.ANALYSING

    # The reconciler hands the dead worker's chunk on; a new worker finishes the slide.
    counts = reconcile.slide_reconcile(stale_after=datetime.timedelta(seconds=0))
    assert counts["chunks_requeued"] >= len(stuck)
    slide_workers("rescuer")
    wait_for(lambda: Slide.objects.get(pk=slide_id).status == Slide.Status.DONE, 240, "recovery")
    slide = Slide.objects.get(pk=slide_id)
    _each_chunk_committed_once(slide, Path(settings.MEDIA_ROOT))
    for chunk in stuck:
        chunk.refresh_from_db()
        assert chunk.attempts == 2 and chunk.worker.startswith("rescuer@")
    assert _tile_auc(slide) > 0.9
    assert audit_verify().bad is None


def test_slide_uploaded_in_the_browser_interrupted_once_is_analysed_by_a_real_worker(
    browser, live_server, institution, settings, slide_workers, demo_model
):
    """The browser's resumable upload (the network cut once mid-upload) into the live server, the
    tiling, chunks and finish by a real worker, the page following it to the end."""
    from accounts.models import User
    from tests.browser import login, wait_text
    from tests.conftest import make_user, new_case
    from tests.test_slides_upload_browser import (
        SIZE,
        UPLOAD_BYTES_PER_S,
        assert_one_slide_as_uploaded,
        choose,
        click_upload,
        network,
        wait_received,
        wait_state,
    )

    settings.SLIDE_UPLOAD_PIECE_BYTES = 64 * 1024
    slide_workers("browser")
    clinician = make_user(institution, User.Role.CLINICIAN, username="dr-wsi")
    case = new_case(clinician, accession="WSI-BROWSER")
    login(browser, live_server.url, "dr-wsi")
    browser.get(f"{live_server.url}/cases/{case.pk}/slides/upload/")
    wait_text(browser, "h1", "Upload a whole-slide image")
    browser.execute_cdp_cmd("Network.enable", {})
    network(browser, upload_bytes_per_s=UPLOAD_BYTES_PER_S)
    choose(browser, FIXTURE)
    click_upload(browser)
    cut_at = wait_received(case, SIZE // 3)
    network(browser, offline=True)
    wait_state(browser, "retrying")
    network(browser, upload_bytes_per_s=-1)
    wait_state(browser, "analysing", "done")
    slide = assert_one_slide_as_uploaded(case)
    assert SlideUpload.objects.get(case=case).received_bytes == SIZE > cut_at
    # The page follows the worker's progress to the end.
    wait_state(browser, "done", timeout=180)
    wait_text(browser, "#slide-upload-analysis", "Done")
    slide.refresh_from_db()
    assert slide.status == Slide.Status.DONE and slide.tiles_finished == slide.tiles_total == 98
    assert all(
        w.startswith("browser@") for w in SlideChunk.objects.filter(slide=slide).values_list("worker", flat=True)
    )
    assert _tile_auc(slide) > 0.9
    assert slide.regions.exclude(patch=None).count() == 12
