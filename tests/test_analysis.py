"""Analysis services, in process, with the real demo model and real patches."""

from __future__ import annotations

import datetime
import uuid

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone

from cases.models import BiopsyCase, TissuePatch
from cases.services import patch_upload
from inference import services
from inference.models import ModelVersion, Prediction
from tests.conftest import fixture_patch, new_case, png_bytes

pytestmark = pytest.mark.django_db

HOLDOUT = {
    "NORM-TCGA-CWFDHWAH.png": "NORM",
    "NORM-TCGA-INTLNRAV.png": "NORM",
    "TUM-TCGA-KECNIDCQ.png": "TUM",
    "TUM-TCGA-NHQGDFVF.png": "TUM",
}


@pytest.fixture
def sent(monkeypatch):
    """Records the analysis tasks that would be sent to the broker (unit tests only)."""
    calls: list[list[int]] = []
    monkeypatch.setattr("inference.tasks.prediction_run.delay", lambda ids: calls.append(list(ids)))
    return calls


def upload(case, clinician, names_or_bytes):
    files = [
        (n, fixture_patch(n).read_bytes()) if isinstance(n, str) else (f"f{i}.png", n)
        for i, n in enumerate(names_or_bytes)
    ]
    return patch_upload(case=case, uploaded_by=clinician, files=files).patches


def test_upload_enqueues_ids_on_commit_in_batches(case, clinician, sent, settings, django_capture_on_commit_callbacks):
    settings.INFERENCE_BATCH_SIZE = 2
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        patches = upload(case, clinician, list(HOLDOUT) + ["TUM-AACHEHDV.tif"])
    assert sent == []  # nothing is sent before the transaction commits
    for callback in callbacks:
        callback()
    assert sent == [[p.pk for p in patches[:2]], [p.pk for p in patches[2:4]], [patches[4].pk]]


def test_prediction_run_classifies_held_out_patches_and_readies_case(case, clinician, demo_model):
    patches = upload(case, clinician, list(HOLDOUT))
    counts = services.prediction_run(patch_ids=[p.pk for p in patches])
    assert counts == {"claimed": 4, "done": 4}
    for patch in patches:
        patch.refresh_from_db()
        prediction = patch.predictions.get()
        assert patch.status == TissuePatch.Status.DONE
        assert prediction.model_version == demo_model
        assert prediction.label == HOLDOUT[patch.original_name], (patch.original_name, prediction.scores)
        assert set(prediction.scores) == set(demo_model.classes)
        assert abs(sum(prediction.scores.values()) - 1) < 1e-4
        assert prediction.inference_seconds > 0
        assert 0 <= prediction.uncertainty <= 1 and set(prediction.heatmaps) == {prediction.label, "TUM"}
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW


def test_rerun_of_same_patches_creates_no_second_prediction(case, clinician, demo_model):
    patches = upload(case, clinician, ["TUM-TCGA-KECNIDCQ.png"])
    ids = [p.pk for p in patches]
    services.prediction_run(patch_ids=ids)
    assert services.prediction_run(patch_ids=ids) == {"claimed": 0}
    # A redelivered task after a crash that lost the status update: the claim succeeds again,
    # but the unique (patch, model version) constraint keeps the first prediction.
    TissuePatch.objects.filter(pk__in=ids).update(status=TissuePatch.Status.QUEUED)
    assert services.prediction_run(patch_ids=ids)["claimed"] == 1
    assert Prediction.objects.count() == 1
    assert TissuePatch.objects.get().status == TissuePatch.Status.DONE


def test_blank_patch_is_unassessable_with_reason(case, clinician, demo_model):
    patches = upload(case, clinician, [png_bytes(color=(240, 240, 240)), "NORM-TCGA-CWFDHWAH.png"])
    services.prediction_run(patch_ids=[p.pk for p in patches])
    blank, tissue = (TissuePatch.objects.get(pk=p.pk) for p in patches)
    assert blank.status == TissuePatch.Status.UNASSESSABLE and "blank" in blank.failure_reason
    assert not blank.predictions.exists()
    assert tissue.status == TissuePatch.Status.DONE
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW


def test_unreadable_stored_image_fails_with_reason(case, clinician, demo_model):
    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    with default_storage.open(patch.storage_name, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n broken")
    services.prediction_run(patch_ids=[patch.pk])
    patch.refresh_from_db()
    assert patch.status == TissuePatch.Status.FAILED and "cannot be read" in patch.failure_reason


def test_without_active_model_patches_stay_queued(case, clinician):
    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    assert services.prediction_run(patch_ids=[patch.pk]) == {"skipped": 1}
    patch.refresh_from_db()
    assert patch.status == TissuePatch.Status.QUEUED


def test_changed_model_file_is_refused(case, clinician, demo_model):
    ModelVersion.objects.filter(pk=demo_model.pk).update(file_sha256="0" * 64)
    services._models.clear()
    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    assert services.prediction_run(patch_ids=[patch.pk]) == {"skipped": 1}
    assert not Prediction.objects.exists()


def test_model_is_loaded_once_per_process(case, clinician, demo_model, monkeypatch):
    services._models.clear()
    loads = []
    real_predictor = services.core.Predictor
    monkeypatch.setattr(services.core, "Predictor", lambda d, **kw: loads.append(d) or real_predictor(d, **kw))
    for name in ("NORM-TCGA-CWFDHWAH.png", "TUM-TCGA-KECNIDCQ.png"):
        (patch,) = upload(case, clinician, [name])
        services.prediction_run(patch_ids=[patch.pk])
    assert len(loads) == 1


def test_reconciler_requeues_stale_running_and_lost_queued(case, clinician, sent):
    patches = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png", "TUM-TCGA-KECNIDCQ.png", "TUM-TCGA-NHQGDFVF.png"])
    old = timezone.now() - datetime.timedelta(hours=1)
    running, lost, fresh = patches
    TissuePatch.objects.filter(pk=running.pk).update(status=TissuePatch.Status.RUNNING, claimed_at=old, attempts=1)
    TissuePatch.objects.filter(pk=lost.pk).update(enqueued_at=old)
    sent.clear()
    result = services.analysis_reconcile(stale_after=datetime.timedelta(minutes=10))
    assert result == {"requeued": 2, "failed": 0}
    running.refresh_from_db()
    assert running.status == TissuePatch.Status.QUEUED and running.claim_token is None
    fresh.refresh_from_db()
    assert fresh.status == TissuePatch.Status.QUEUED


def test_reconciler_enqueues_after_commit(case, clinician, sent, django_capture_on_commit_callbacks):
    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    TissuePatch.objects.filter(pk=patch.pk).update(enqueued_at=timezone.now() - datetime.timedelta(hours=1))
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.analysis_reconcile()
    assert sent == [[patch.pk]]


@pytest.mark.parametrize(
    ("waited_s", "broker_waiting", "requeued"),
    [
        (60, 0, 1),  # the broker lost its message: sent again after ANALYSIS_REQUEUE_AFTER_SECONDS
        (60, 5, 0),  # messages still wait on the broker: the workers are behind, not stuck
        (60, None, 0),  # the broker cannot say: only the long timeout applies
        (20, 0, 0),  # not waiting long enough yet
        (3600, 5, 1),  # past ANALYSIS_STALE_AFTER_SECONDS, whatever the broker says
    ],
)
def test_reconciler_resends_patches_whose_message_the_broker_lost(
    case, clinician, sent, settings, django_capture_on_commit_callbacks, waited_s, broker_waiting, requeued
):
    settings.ANALYSIS_REQUEUE_AFTER_SECONDS = 45
    urgent_case = new_case(clinician, "URG-1", "M-URG")
    BiopsyCase.objects.filter(pk=urgent_case.pk).update(priority=BiopsyCase.Priority.URGENT)
    (routine,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    (urgent,) = upload(urgent_case, clinician, ["TUM-TCGA-KECNIDCQ.png"])
    waited = timezone.now() - datetime.timedelta(seconds=waited_s)
    TissuePatch.objects.filter(pk=routine.pk).update(enqueued_at=waited - datetime.timedelta(seconds=1))
    TissuePatch.objects.filter(pk=urgent.pk).update(enqueued_at=waited)
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True):
        result = services.analysis_reconcile(broker_waiting=broker_waiting)
    assert result == {"requeued": 2 * requeued, "failed": 0}
    # Urgent first, then the longest waiting; each re-sent patch waits a new interval before the next.
    assert sent == ([[urgent.pk, routine.pk]] if requeued else [])
    if requeued:
        assert services.analysis_reconcile(broker_waiting=0) == {"requeued": 0, "failed": 0}


@pytest.mark.parametrize(
    ("heartbeat", "claimed_s_ago", "requeued"),
    [
        ({"last_seen_s_ago": 2, "started_s_ago": 300}, 5, False),  # alive, busy with it
        ({"last_seen_s_ago": 60, "started_s_ago": 300}, 5, True),  # silent for a minute: gone
        ({"last_seen_s_ago": 1, "started_s_ago": 2}, 5, True),  # restarted since the claim
        (None, 5, False),  # no heartbeat yet, just claimed: give it time
        (None, 60, True),  # no heartbeat a minute after the claim
    ],
)
def test_reconciler_hands_on_the_patches_of_a_lost_worker_before_the_timeout(
    case, clinician, sent, settings, heartbeat, claimed_s_ago, requeued
):
    from inference.models import AnalysisClaim, WorkerHeartbeat

    settings.WORKER_LOST_AFTER_SECONDS = 30
    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    now = timezone.now()
    claimed_at = now - datetime.timedelta(seconds=claimed_s_ago)
    token = uuid.uuid4()
    TissuePatch.objects.filter(pk=patch.pk).update(
        status=TissuePatch.Status.RUNNING, claim_token=token, claimed_at=claimed_at, attempts=1
    )
    AnalysisClaim.objects.create(token=token, worker="w1@host", claimed_at=claimed_at)
    if heartbeat:
        WorkerHeartbeat.objects.create(
            hostname="w1@host",
            last_seen=now - datetime.timedelta(seconds=heartbeat["last_seen_s_ago"]),
            started_at=now - datetime.timedelta(seconds=heartbeat["started_s_ago"]),
        )
    result = services.analysis_reconcile()  # the 10-minute stale timeout has not passed
    assert result == {"requeued": int(requeued), "failed": 0}
    patch.refresh_from_db()
    assert patch.status == (TissuePatch.Status.QUEUED if requeued else TissuePatch.Status.RUNNING)


def test_a_worker_claim_names_the_worker(case, clinician, demo_model):
    from inference.models import AnalysisClaim

    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    services.prediction_run(patch_ids=[patch.pk], worker="w2@host")
    patch.refresh_from_db()
    assert AnalysisClaim.objects.get(token=patch.claim_token).worker == "w2@host"


def test_a_run_that_loses_the_database_hands_its_patches_back(
    case, clinician, demo_model, sent, monkeypatch, django_capture_on_commit_callbacks
):
    """The database restarting mid-run (here: the store raising as psycopg does) queues the run's
    patches again at once, with their audit events, instead of leaving them RUNNING for 10 minutes."""
    from django.db import OperationalError

    from audit.models import AuditEvent
    from inference import analysis

    patches = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png", "TUM-TCGA-KECNIDCQ.png"])

    def store_fails(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(analysis, "_store", store_fails)
    sent.clear()
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(OperationalError):
        services.prediction_run(patch_ids=[p.pk for p in patches])
    assert set(TissuePatch.objects.values_list("status", flat=True)) == {TissuePatch.Status.QUEUED}
    assert not TissuePatch.objects.exclude(claim_token=None).exists()
    assert sent == [[p.pk for p in patches]]
    released = AuditEvent.objects.filter(action="patch.status", reason__startswith="database unavailable")
    assert released.count() == 2


def test_reconciler_fails_patch_after_max_attempts_and_case_moves_on(case, clinician, sent):
    (patch,) = upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    TissuePatch.objects.filter(pk=patch.pk).update(
        status=TissuePatch.Status.RUNNING,
        claimed_at=timezone.now() - datetime.timedelta(hours=1),
        attempts=services.MAX_ATTEMPTS,
    )
    assert services.analysis_reconcile() == {"requeued": 0, "failed": 1}
    patch.refresh_from_db()
    assert patch.status == TissuePatch.Status.FAILED and "attempts" in patch.failure_reason
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW


def test_upload_to_signed_out_case_is_refused(case, clinician):
    from cases.services import CaseError

    BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.SIGNED_OUT)
    case.refresh_from_db()
    with pytest.raises(CaseError, match="signed out"):
        upload(case, clinician, ["NORM-TCGA-CWFDHWAH.png"])
    assert not TissuePatch.objects.exists()


def test_case_page_shows_prediction(case, clinician, clinician_client, demo_model):
    (patch,) = upload(case, clinician, ["TUM-TCGA-KECNIDCQ.png"])
    page = clinician_client.get(f"/cases/{case.pk}/")
    assert b'http-equiv="refresh"' in page.content  # still analysing: the page refreshes itself
    services.prediction_run(patch_ids=[patch.pk])
    page = clinician_client.get(f"/cases/{case.pk}/")
    assert page.status_code == 200
    assert b'http-equiv="refresh"' not in page.content
    assert b'<strong class="label">TUM</strong>' in page.content
    image = clinician_client.get(f"/cases/{case.pk}/patches/{patch.pk}/image/")
    assert image.status_code == 200 and image["Content-Type"] == "image/png"


def test_a_batch_is_stored_in_the_same_number_of_queries_whatever_its_size(clinician, demo_model, settings):
    """Claim, predictions, statuses, audit and case refresh per batch, not per patch."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from audit.services import audit_verify
    from tests.conftest import new_case

    settings.INFERENCE_BATCH_SIZE = 64
    names = ["NORM-TCGA-CWFDHWAH.png", "TUM-TCGA-KECNIDCQ.png", "TUM-TCGA-NHQGDFVF.png"]
    services.model_load_active()  # loaded once per process: not part of what is counted
    counts = []
    for size in (2, 6):
        case = new_case(clinician, accession=f"Q{size}", mrn=f"M{size}")
        patches = upload(case, clinician, [names[i % len(names)] for i in range(size)] + [png_bytes(color=(255,) * 3)])
        with CaptureQueriesContext(connection) as queries:
            result = services.prediction_run(patch_ids=[p.pk for p in patches])
        assert result["done"] == size and result["unassessable"] == 1  # a blank image is refused by quality control
        counts.append(len(queries))
    assert counts[0] == counts[1], counts
    assert Prediction.objects.count() == 8
    assert audit_verify().bad is None


def test_a_message_fills_its_batch_with_waiting_patches_urgent_first(clinician, demo_model, settings, sent):
    from tests.conftest import new_case

    settings.INFERENCE_BATCH_SIZE = 3
    routine, urgent = new_case(clinician, accession="ROUTINE", mrn="R"), new_case(clinician, accession="URG", mrn="U")
    BiopsyCase.objects.filter(pk=urgent.pk).update(priority=BiopsyCase.Priority.URGENT)
    first, older, newer = upload(routine, clinician, ["NORM-TCGA-CWFDHWAH.png"] * 3)
    (urgent_patch,) = upload(urgent, clinician, ["TUM-TCGA-KECNIDCQ.png"])

    assert services.prediction_run(patch_ids=[first.pk])["claimed"] == 3
    done = set(TissuePatch.objects.filter(status=TissuePatch.Status.DONE).values_list("pk", flat=True))
    assert done == {first.pk, urgent_patch.pk, older.pk}  # its own, the urgent one, then the longest waiting
    # Its own message finds it done, and takes the one still waiting instead.
    assert services.prediction_run(patch_ids=[older.pk])["claimed"] == 1
    assert TissuePatch.objects.get(pk=newer.pk).status == TissuePatch.Status.DONE
    assert services.prediction_run(patch_ids=[newer.pk]) == {"claimed": 0}

    settings.ANALYSIS_COALESCE = False
    alone, waiting = upload(routine, clinician, ["NORM-TCGA-CWFDHWAH.png"] * 2)
    assert services.prediction_run(patch_ids=[alone.pk])["claimed"] == 1
    assert TissuePatch.objects.get(pk=waiting.pk).status == TissuePatch.Status.QUEUED
