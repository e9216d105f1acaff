"""The whole analysis path with real PostgreSQL, Redis and `celery worker` processes.

Locally these skip when PostgreSQL/Redis are not configured; under CI=true they fail instead.
"""

from __future__ import annotations

import datetime
import io

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from audit.services import audit_verify
from cases.models import BiopsyCase, TissuePatch
from cases.services import PatientData, case_create, patch_upload
from inference import services
from inference.models import Prediction
from inference.tasks import prediction_run
from tests.conftest import CASE_PAYLOAD, DEMO_MODEL_NAME, shared_data
from tests.integration.workers import queue_length, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def seeded():
    call_command("seed_demo", stdout=io.StringIO())


def _lab_api() -> APIClient:
    out = io.StringIO()
    call_command("create_lab_token", institution="demo", name="LIS", stdout=out, stderr=io.StringIO())
    key = next(line for line in out.getvalue().splitlines() if line.startswith("LAB_TOKEN=")).split("=", 1)[1]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return api


def _real_patches() -> list:
    data = shared_data()
    return sorted((data / "crc-val-he-7k-png" / "NORM").glob("*.png")) + sorted(
        (data / "crc-val-he-7k-png" / "TUM").glob("*.png")
    ) + sorted((data / "nct-crc-he-100k-samples").glob("*/*.tif"))  # fmt: skip


def test_uploaded_patches_are_analysed_by_a_real_worker(seeded, workers):
    worker = workers("e2e")
    api = _lab_api()
    case = api.post("/api/v1/cases/", CASE_PAYLOAD, format="json").json()
    files = _real_patches()
    handles = [open(path, "rb") for path in files]
    try:
        response = api.post(f"/api/v1/cases/{case['id']}/patches/", {"image": handles}, format="multipart")
    finally:
        for handle in handles:
            handle.close()
    assert response.status_code == 202, response.content
    assert len(response.json()["patches"]) == len(files) == 17

    def ready():
        body = api.get(f"/api/v1/cases/{case['id']}/").json()
        return body if body["status"] == "ready_for_review" else None

    try:
        body = wait_for(ready, 180, "the case to be ready for review")
    except AssertionError:
        pytest.fail(worker.log())
    for patch in body["patches"]:
        if patch["original_name"] == "BACK-AAQSHYMA.tif":  # empty glass (grey std 0.58): QC says so
            assert patch["status"] == "unassessable" and "blank" in patch["failure_reason"]
            assert patch["prediction"] is None
            continue
        assert patch["status"] == "done", patch
        prediction = patch["prediction"]
        assert prediction["model_version"] == DEMO_MODEL_NAME
        assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)
        if patch["original_name"].startswith(("NORM-TCGA-CWFDHWAH", "NORM-TCGA-INTLNRAV")):
            assert prediction["label"] == "NORM"  # held out from the demo model's training
        if patch["original_name"].startswith(("TUM-TCGA-KECNIDCQ", "TUM-TCGA-NHQGDFVF")):
            assert prediction["label"] == "TUM"
    assert Prediction.objects.count() == 16
    assert "succeeded" in worker.log()


def _case_with_patches(count: int) -> tuple[BiopsyCase, list[TissuePatch]]:
    from accounts.models import Institution, User

    institution = Institution.objects.get(slug="demo")
    clinician = User.objects.get(username="clinician")
    case = case_create(
        institution=institution,
        created_by=clinician,
        patient=PatientData(mrn="I-1", name="Integration Patient"),
        accession=f"I-{count}",
        specimen_site="colon",
    )
    tissue = [p for p in _real_patches() if not p.name.startswith("BACK")]
    files = [(p.name, p.read_bytes()) for p in tissue[:count]]
    return case, patch_upload(case=case, uploaded_by=clinician, files=files).patches


def test_task_delivered_twice_to_two_workers_yields_one_prediction(seeded, workers, broker):
    first, second = workers("twin-a"), workers("twin-b")
    case, patches = _case_with_patches(8)  # the upload itself sends one message on commit
    ids = [p.pk for p in patches]
    for _ in range(5):  # the same work delivered again and again, to whichever worker is free
        prediction_run.delay(ids)
        prediction_run.delay(ids[::-1])

    wait_for(lambda: not TissuePatch.objects.filter(status__in=TissuePatch.PENDING).exists(), 180, "analysis")
    wait_for(lambda: queue_length(broker) == 0, 60, "the queue to drain")
    for patch in patches:
        assert Prediction.objects.filter(patch=patch).count() == 1
    assert Prediction.objects.count() == 8
    assert "received" in first.log() and "received" in second.log()
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW
    assert audit_verify().bad is None  # two workers appending to the same chain, each batch in bulk


def test_worker_killed_mid_batch_recovers_with_one_prediction_each(seeded, workers, broker):
    # Small batches, each committed on its own, so the kill lands between two of them.
    first = workers("victim", INFERENCE_BATCH_SIZE="2")
    case, patches = _case_with_patches(16)
    ids = [p.pk for p in patches]

    def partly_done():
        done = Prediction.objects.filter(patch_id__in=ids).count()
        running = TissuePatch.objects.filter(pk__in=ids, status=TissuePatch.Status.RUNNING).count()
        return done >= 1 and running >= 1

    wait_for(partly_done, 180, "a batch in progress", interval=0.02)
    first.kill()
    stuck = TissuePatch.objects.filter(pk__in=ids, status=TissuePatch.Status.RUNNING).count()
    assert stuck >= 1, "the kill should leave claimed patches behind"
    assert Prediction.objects.filter(patch_id__in=ids).count() < len(ids)

    # The reconciler finds the patches the dead worker claimed, and re-sends them.
    result = services.analysis_reconcile(stale_after=datetime.timedelta(seconds=0))
    assert result["requeued"] >= stuck
    workers("rescuer")
    wait_for(
        lambda: not TissuePatch.objects.filter(pk__in=ids, status__in=TissuePatch.PENDING).exists(), 180, "recovery"
    )

    for patch in patches:
        patch.refresh_from_db()
        assert patch.status == TissuePatch.Status.DONE
        assert Prediction.objects.filter(patch=patch).count() == 1
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW
    assert audit_verify().bad is None  # the dead worker's half-written batch left no broken chain
