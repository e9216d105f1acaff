"""The lab-system API, and institution isolation on the web and the API (404, never 403)."""

from __future__ import annotations

import copy

import pytest

from accounts.models import LabSystem, User
from cases.models import BiopsyCase, Patient
from tests.conftest import CASE_PAYLOAD, fixture_patch, lab_client, make_user, new_case, verified_login

pytestmark = pytest.mark.django_db


@pytest.fixture
def other_case(other_institution):
    return new_case(make_user(other_institution, User.Role.CLINICIAN), accession="B-0001", mrn="B-1")


def test_lab_system_creates_case_with_new_patient(lab_api, institution):
    response = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] and body["status"] == "open" and body["priority"] == "urgent"
    assert body["patient"] == CASE_PAYLOAD["patient"]
    case = BiopsyCase.objects.get(pk=body["id"])
    assert case.institution == institution and case.created_by_lab is not None


def test_second_case_reuses_existing_patient(lab_api):
    lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json")
    payload = {**CASE_PAYLOAD, "accession": "S26-0002"}
    assert lab_api.post("/api/v1/cases/", payload, format="json").status_code == 201
    assert Patient.objects.count() == 1


def test_mismatched_patient_identity_is_refused(lab_api):
    lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json")
    payload = copy.deepcopy(CASE_PAYLOAD)
    payload["accession"] = "S26-0003"
    payload["patient"]["name"] = "Someone Else"
    response = lab_api.post("/api/v1/cases/", payload, format="json")
    assert response.status_code == 400
    assert "different name" in response.json()["detail"]
    assert BiopsyCase.objects.count() == 1


def test_duplicate_accession_is_400_and_stores_nothing(lab_api):
    assert lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json").status_code == 201
    response = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json")
    assert response.status_code == 400
    assert "already exists" in response.json()["detail"]
    assert BiopsyCase.objects.count() == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"patient": {"name": "No MRN"}}, "patient"),
        ({"accession": ""}, "accession"),
        ({"priority": "whenever"}, "priority"),
        ({"patient": {**CASE_PAYLOAD["patient"], "birth_date": "not-a-date"}}, "patient"),
    ],
)
def test_invalid_case_payload_names_the_field(lab_api, change, field):
    response = lab_api.post("/api/v1/cases/", {**CASE_PAYLOAD, **change}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert field in body["errors"] and body["status"] == 400 and field in body["detail"]
    assert response["Content-Type"] == "application/problem+json"
    assert BiopsyCase.objects.count() == 0 and Patient.objects.count() == 0


def test_new_patient_needs_a_name(lab_api):
    payload = {**CASE_PAYLOAD, "patient": {"mrn": "NEW-1"}}
    response = lab_api.post("/api/v1/cases/", payload, format="json")
    assert response.status_code == 400 and "needs a name" in response.json()["detail"]


def test_case_list_is_paginated_and_detail_has_patches(lab_api):
    for i in range(3):
        lab_api.post("/api/v1/cases/", {**CASE_PAYLOAD, "accession": f"P-{i}"}, format="json")
    listing = lab_api.get("/api/v1/cases/").json()
    assert listing["count"] == 3 and len(listing["results"]) == 3 and "next" in listing
    case_id = listing["results"][0]["id"]
    with open(fixture_patch("TUM-TCGA-KECNIDCQ.png"), "rb") as image:
        upload = lab_api.post(f"/api/v1/cases/{case_id}/patches/", {"image": [image]}, format="multipart")
    assert upload.status_code == 202
    detail = lab_api.get(f"/api/v1/cases/{case_id}/").json()
    assert detail["status"] == "analysing"
    assert detail["patches"][0]["status"] == "queued" and detail["patches"][0]["prediction"] is None


def test_requests_without_valid_token_are_refused(institution, lab_api):
    from rest_framework.test import APIClient

    anonymous = APIClient()
    assert anonymous.get("/api/v1/cases/").status_code in {401, 403}
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Token cldy_not-a-real-key")
    assert wrong.get("/api/v1/cases/").status_code == 401
    LabSystem.objects.update(revoked_at="2026-01-01T00:00:00Z")
    assert lab_api.get("/api/v1/cases/").status_code == 401


def test_only_the_token_hash_is_stored(institution):
    from accounts.services import lab_system_create

    lab_system, key = lab_system_create(institution=institution, name="LIS 2")
    assert key not in lab_system.token_hash and len(lab_system.token_hash) == 64


def test_lab_token_cannot_see_other_institution_case(lab_api, other_case):
    assert lab_api.get(f"/api/v1/cases/{other_case.pk}/").status_code == 404
    assert lab_api.get("/api/v1/cases/").json()["count"] == 0
    with open(fixture_patch("TUM-TCGA-KECNIDCQ.png"), "rb") as image:
        response = lab_api.post(f"/api/v1/cases/{other_case.pk}/patches/", {"image": [image]}, format="multipart")
    assert response.status_code == 404
    assert other_case.patches.count() == 0


def test_other_institution_token_lists_only_its_own(other_case, other_institution, lab_api):
    lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json")
    theirs = lab_client(other_institution).get("/api/v1/cases/").json()
    assert [c["accession"] for c in theirs["results"]] == ["B-0001"]


def test_clinician_cannot_see_other_institution_case(clinician_client, other_case):
    assert clinician_client.get(f"/cases/{other_case.pk}/").status_code == 404
    assert clinician_client.get(f"/api/v1/cases/{other_case.pk}/").status_code == 404
    assert clinician_client.post(f"/cases/{other_case.pk}/upload/", {}).status_code == 404
    listing = clinician_client.get("/cases/")
    assert b"B-0001" not in listing.content


def test_clinician_cannot_fetch_other_institution_patch_image(clinician_client, other_case, other_institution):
    from cases.services import patch_upload

    owner = User.objects.get(institution=other_institution)
    result = patch_upload(
        case=other_case, uploaded_by=owner, files=[("x.png", fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes())]
    )
    url = f"/cases/{other_case.pk}/patches/{result.patches[0].pk}/image/"
    assert clinician_client.get(url).status_code == 404
    client_b = type(clinician_client)()
    verified_login(client_b, owner)
    assert client_b.get(url).status_code == 200


def test_user_without_institution_sees_nothing(client, db, other_case):
    loner = User.objects.create_user(username="loner", password="not-a-real-pass-1")
    verified_login(client, loner)
    assert client.get("/api/v1/cases/").status_code == 403
    assert client.get(f"/cases/{other_case.pk}/").status_code == 404


def test_login_required_for_pages(client, db):
    response = client.get("/cases/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert client.get("/login/").status_code == 200


def test_web_case_creation_with_new_then_existing_patient(clinician_client):
    form = {
        "patient_mrn": "W-1",
        "patient_name": "Web Patient",
        "patient_birth_date": "1970-05-06",
        "patient_sex": "male",
        "accession": "W-0001",
        "specimen_site": "rectum",
        "priority": "routine",
        "clinical_notes": "",
    }
    response = clinician_client.post("/cases/new/", form)
    assert response.status_code == 302
    case = BiopsyCase.objects.get(accession="W-0001")
    assert response["Location"] == f"/cases/{case.pk}/"
    again = clinician_client.post("/cases/new/", {**form, "accession": "W-0002", "patient_name": ""})
    assert again.status_code == 302
    assert Patient.objects.count() == 1
    duplicate = clinician_client.post("/cases/new/", form)
    assert duplicate.status_code == 400 and b"already exists" in duplicate.content
    page = clinician_client.get(f"/cases/{case.pk}/")
    assert b"W-0001" in page.content and b"Web Patient" in page.content


def test_admin_staff_of_an_institution_see_only_its_rows(client, institution, other_case):
    from django.contrib.auth.models import Permission

    new_case(make_user(institution, User.Role.CLINICIAN, username="ours"), accession="OURS-1", mrn="O-1")
    staff = make_user(institution, User.Role.ADMIN, username="hospital-admin")
    staff.is_staff = True
    staff.save()
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_biopsycase", "view_patient", "view_user"])
    )
    verified_login(client, staff)
    cases = client.get("/admin/cases/biopsycase/").content.decode()
    assert "OURS-1" in cases and "B-0001" not in cases
    patients = client.get("/admin/cases/patient/").content.decode()
    assert "O-1" in patients and "Other Patient" not in patients and "B-1" not in patients
    assert client.get(f"/admin/cases/biopsycase/{other_case.pk}/change/").status_code in {302, 404}


def test_patient_data_is_never_cached(clinician_client, case, lab_api):
    from cases.services import patch_upload
    from tests.conftest import fixture_patch

    patch = patch_upload(
        case=case, uploaded_by=case.created_by, files=[("a.png", fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes())]
    ).patches[0]
    for response in (
        clinician_client.get(f"/cases/{case.pk}/"),
        clinician_client.get("/cases/"),
        clinician_client.get(f"/cases/{case.pk}/patches/{patch.pk}/image/"),
        lab_api.get(f"/api/v1/cases/{case.pk}/"),
    ):
        assert response.status_code == 200
        assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"]
