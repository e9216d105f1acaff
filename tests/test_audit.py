"""The audit trail: what is recorded, in the same transaction, in a verifiable chain. How the chain
and the database keep it from being changed: test_audit_integrity.py."""

from __future__ import annotations

import io
import itertools

import pytest
from django.core.management import call_command
from django.db import transaction

from audit.models import AuditEvent
from audit.services import audit_verify
from cases.models import BiopsyCase
from cases.services import PatientData, case_create
from inference import services
from tests.conftest import CASE_PAYLOAD, fixture_patch

pytestmark = pytest.mark.django_db


def actions() -> list[str]:
    return list(AuditEvent.objects.order_by("id").values_list("action", flat=True))


def test_case_upload_and_analysis_are_recorded_in_a_verifiable_chain(lab_api, demo_model):
    case = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json").json()
    with open(fixture_patch("TUM-TCGA-KECNIDCQ.png"), "rb") as image:
        patch_id = lab_api.post(f"/api/v1/cases/{case['id']}/patches/", {"image": [image]}, format="multipart").json()[
            "patches"
        ][0]["id"]
    services.prediction_run(patch_ids=[patch_id])
    recorded = actions()
    for action in ("patient.create", "case.create", "patch.create", "case.status", "patch.status", "prediction.create"):
        assert action in recorded, (action, recorded)
    created = AuditEvent.objects.get(action="case.create")
    assert (created.actor_type, created.actor_label) == ("lab_system", "LIS")
    assert created.after["accession"] == CASE_PAYLOAD["accession"] and created.target_id == str(case["id"])
    statuses = [(e.before["status"], e.after["status"]) for e in AuditEvent.objects.filter(action="patch.status")]
    assert statuses == [("queued", "running"), ("running", "done")]
    assert AuditEvent.objects.filter(action="case.status").last().after == {"status": "ready_for_review"}
    prediction = AuditEvent.objects.get(action="prediction.create")
    assert prediction.actor_type == "worker" and prediction.after["label"] == "TUM"
    checked, bad, _ = audit_verify()
    assert bad is None and checked == AuditEvent.objects.count()
    # The institution's events chain onto each other; the model's registration is the platform's.
    events = list(AuditEvent.objects.filter(chain=created.institution_id).order_by("id"))
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events)) and len(events) >= 6
    assert AuditEvent.objects.get(action="model.register").chain == 0


def test_event_and_change_commit_or_roll_back_together(institution, clinician):
    with pytest.raises(RuntimeError), transaction.atomic():
        case_create(
            institution=institution,
            created_by=clinician,
            patient=PatientData(mrn="R1", name="Rolled Back"),
            accession="RB-1",
            specimen_site="colon",
        )
        assert AuditEvent.objects.filter(action="case.create").exists()
        raise RuntimeError("the request failed after the change")
    assert not BiopsyCase.objects.exists() and not AuditEvent.objects.exists()


def test_reads_of_patient_data_are_recorded_with_actor_and_address(lab_api, clinician_client):
    case_id = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json").json()["id"]
    lab_api.get(f"/api/v1/cases/{case_id}/", REMOTE_ADDR="10.1.2.3")
    read = AuditEvent.objects.filter(action="patient.read").last()
    assert (read.actor_type, read.client_address, read.after["via"]) == ("lab_system", "10.1.2.3", "api case")
    clinician_client.get(f"/cases/{case_id}/")
    read = AuditEvent.objects.filter(action="patient.read").last()
    assert read.actor_type == "user" and read.after == {"via": "web case page", "case": case_id}
    lab_api.get("/api/v1/cases/")
    assert AuditEvent.objects.filter(action="patient.read", after__via="api case list").exists()


def test_logins_failed_logins_and_logouts_are_recorded(client, clinician):
    client.post("/login/", {"username": clinician.username, "password": "wrong"})
    client.post("/login/", {"username": clinician.username, "password": "not-a-real-pass-1"})
    client.post("/logout/")
    assert actions() == ["auth.login_failed", "auth.login", "auth.logout"]
    failed = AuditEvent.objects.get(action="auth.login_failed")
    assert failed.actor_label == clinician.username and "wrong" not in str(failed.after)


def test_token_creation_revocation_and_model_activation_are_recorded(institution, demo_model):
    call_command(
        "create_lab_token", institution=institution.slug, name="LIS 9", stdout=io.StringIO(), stderr=io.StringIO()
    )
    call_command("revoke_lab_token", institution=institution.slug, name="LIS 9", stdout=io.StringIO())
    recorded = actions()
    assert "lab_system.create" in recorded and "lab_system.revoke" in recorded
    assert "model.register" in recorded and "model.activate" in recorded
    created = AuditEvent.objects.get(action="lab_system.create")
    assert "cldy_" not in str(created.after.get("hint", ""))[12:]  # never the key itself


def test_case_page_shows_its_own_history(clinician_client, clinician, demo_model):
    from cases.services import patch_upload

    case = case_create(
        institution=clinician.institution,
        created_by=clinician,
        patient=PatientData(mrn="H1", name="History"),
        accession="H-1",
        specimen_site="colon",
    )
    other = case_create(
        institution=clinician.institution,
        created_by=clinician,
        patient=PatientData(mrn="H2", name="Other"),
        accession="H-2",
        specimen_site="colon",
    )
    (patch,) = patch_upload(
        case=case, uploaded_by=clinician, files=[("h.png", fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes())]
    ).patches
    services.prediction_run(patch_ids=[patch.pk])
    page = clinician_client.get(f"/cases/{case.pk}/").content.decode()
    history = page[page.index('id="history"') :]
    for action in ("case.create", "patch.create", "patch.status", "prediction.create", "case.status"):
        assert action in history
    assert f"biopsycase {other.pk}<" not in history
