"""The slide API: the resumable upload protocol over HTTP, slides with progress and results,
institution isolation, token scopes, and the OpenAPI description."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from accounts.models import User
from accounts.services import lab_system_create
from slides import jobs
from slides.models import Slide, SlideUpload
from slides.services import upload_path
from tests.conftest import make_user, new_case, stored_files

FIXTURE = Path(__file__).parent / "fixtures" / "slides" / "mosaic-small.tiff"
PIECE = "application/offset+octet-stream"


@pytest.fixture(autouse=True)
def _small_chunks(settings):
    settings.SLIDE_CHUNK_TILES = 32


def _start(api, case, data: bytes, name="mosaic.svs", headers=None, **extra):
    return api.post(
        f"/api/v1/cases/{case.pk}/slides/", {"name": name, "size": len(data), **extra}, format="json", **(headers or {})
    )


def _piece(api, url, data: bytes, offset: int):
    return api.generic("PATCH", url, data, content_type=PIECE, HTTP_UPLOAD_OFFSET=str(offset))


def _send(api, url, data: bytes, piece=300_000, start=0):
    response = None
    for offset in range(start, len(data), piece):
        response = _piece(api, url, data[offset : offset + piece], offset)
        assert response.status_code in (200, 201), response.json()
    return response


def test_lab_system_uploads_a_slide_in_pieces_resumes_and_reads_its_results(lab_api, case, demo_model):
    data = FIXTURE.read_bytes()
    started = _start(lab_api, case, data, sha256=hashlib.sha256(data).hexdigest())
    assert started.status_code == 201, started.json()
    url = started["Location"]
    assert started.json()["offset"] == 0 and started["Upload-Offset"] == "0"
    _send(lab_api, url, data[:600_000])
    # The connection drops; the client asks where to resume.
    head = lab_api.head(url)
    assert head.status_code == 200 and head["Upload-Offset"] == "600000"
    stale = _piece(lab_api, url, data[300_000:600_000], 300_000)  # a retry of a piece already stored
    assert stale.status_code == 409 and stale["Upload-Offset"] == "600000"
    assert "offset 600000" in stale.json()["detail"]
    last = _send(lab_api, url, data, start=600_000)
    assert last.status_code == 201
    body = last.json()
    assert body["status"] == "complete" and body["offset"] == len(data)
    slide_id = body["slide"]["id"]
    assert body["slide"]["status"] == "queued"
    assert body["slide"]["sha256"] == hashlib.sha256(data).hexdigest()

    jobs.slide_run_inline(slide_id)
    detail = lab_api.get(f"/api/v1/slides/{slide_id}/").json()
    assert detail["status"] == "done"
    assert detail["progress"]["tiles_finished"] == detail["progress"]["tiles_total"] == 98
    assert detail["progress"]["fraction"] == 1.0
    results = detail["results"]
    assert results["suspected_tumour"] is True and results["validated_at_site"] is False
    assert len(results["regions"]) == 12 and all(r["patch"] for r in results["regions"])
    assert [r["rank"] for r in results["regions"]] == list(range(1, 13))
    listed = lab_api.get(f"/api/v1/cases/{case.pk}/slides/").json()
    assert [s["id"] for s in listed] == [slide_id]
    # The regions are patches of the case, in the case's own API.
    patches = {p["id"] for p in lab_api.get(f"/api/v1/cases/{case.pk}/").json()["patches"]}
    assert {r["patch"] for r in results["regions"]} <= patches


def test_signed_in_user_uploads_with_the_session_and_csrf(client, clinician, case):
    from tests.conftest import verified_login

    verified_login(client, clinician)
    api = APIClient(enforce_csrf_checks=True)
    api.cookies = client.cookies
    data = FIXTURE.read_bytes()
    refused = _start(api, case, data)
    assert refused.status_code == 403  # no CSRF token
    client.get(f"/cases/{case.pk}/")  # a page with a form sets the CSRF cookie
    token = client.cookies["csrftoken"]
    started = _start(api, case, data, headers={"HTTP_X_CSRFTOKEN": token.value})
    assert started.status_code == 201
    last = _send_csrf(api, started["Location"], data, token.value)
    assert last.status_code == 201 and Slide.objects.get().uploaded_by == clinician


def _send_csrf(api, url, data, token):
    response = None
    for offset in range(0, len(data), 500_000):
        response = api.generic(
            "PATCH",
            url,
            data[offset : offset + 500_000],
            content_type=PIECE,
            HTTP_UPLOAD_OFFSET=str(offset),
            HTTP_X_CSRFTOKEN=token,
        )
    return response


@pytest.mark.parametrize(
    ("name", "size", "code", "message"),
    [
        ("slide.png", 1000, 400, "not a whole-slide image format"),
        ("slide.svs", 0, 400, "empty"),
        ("slide.svs", 10**13, 413, "limit for a slide"),
        ("../../slide.svs", 1000, 400, "plain name"),
    ],
)
def test_upload_that_cannot_be_a_slide_is_refused_at_the_start(lab_api, case, name, size, code, message):
    response = lab_api.post(f"/api/v1/cases/{case.pk}/slides/", {"name": name, "size": size}, format="json")
    assert response.status_code == code
    assert message in response.json()["detail"]
    assert not SlideUpload.objects.exists()


def test_bad_file_is_a_400_with_the_reason_and_nothing_is_stored(lab_api, case, media_root):
    data = FIXTURE.read_bytes()[:900_000]  # truncated
    url = _start(lab_api, case, data, name="cut.tiff")["Location"]
    response = _piece(lab_api, url, data, 0)
    assert response.status_code == 400
    assert "truncated" in response.json()["detail"]
    upload = SlideUpload.objects.get()
    assert upload.status == "rejected" and not upload_path(upload).exists()
    assert not Slide.objects.exists() and not stored_files(media_root)
    assert lab_api.get(url).json()["error"] == response.json()["detail"]


def test_piece_protocol_errors_are_clear(lab_api, case, settings):
    data = FIXTURE.read_bytes()
    url = _start(lab_api, case, data)["Location"]
    wrong_type = lab_api.generic("PATCH", url, data[:10], content_type="application/json", HTTP_UPLOAD_OFFSET="0")
    assert wrong_type.status_code == 415 and PIECE in wrong_type.json()["detail"]
    no_offset = lab_api.generic("PATCH", url, data[:10], content_type=PIECE)
    assert no_offset.status_code == 400 and "Upload-Offset" in no_offset.json()["detail"]
    settings.SLIDE_UPLOAD_PIECE_BYTES = 1000
    too_big = _piece(lab_api, url, data[:5000], 0)
    assert too_big.status_code == 413 and "at most 1,000 bytes" in too_big.json()["detail"]
    beyond = _piece(lab_api, url, data[:10], len(data))
    assert beyond.status_code == 409
    assert lab_api.delete(url).status_code == 204
    assert _piece(lab_api, url, data[:10], 0).status_code == 400


def test_other_institution_sees_no_upload_or_slide(lab_api, case, other_institution, demo_model):
    data = FIXTURE.read_bytes()
    url = _start(lab_api, case, data)["Location"]
    _, key = lab_system_create(institution=other_institution, name="Other LIS")
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert other.get(url).status_code == 404
    assert _piece(other, url, data[:1000], 0).status_code == 404
    assert other.delete(url).status_code == 404
    assert _start(other, case, data).status_code == 404
    assert other.get(f"/api/v1/cases/{case.pk}/slides/").status_code == 404
    slide_id = _send(lab_api, url, data).json()["slide"]["id"]
    assert other.get(f"/api/v1/slides/{slide_id}/").status_code == 404
    assert SlideUpload.objects.get().received_bytes == len(data)


def test_token_scopes_apply(institution, case):
    data = FIXTURE.read_bytes()
    _, reader_key = lab_system_create(institution=institution, name="Reader", scopes=["cases:read"])
    reader = APIClient()
    reader.credentials(HTTP_AUTHORIZATION=f"Token {reader_key}")
    assert _start(reader, case, data).status_code == 403
    assert reader.get(f"/api/v1/cases/{case.pk}/slides/").status_code == 200


def test_lab_manager_sees_no_slides(client, institution, case):
    from tests.conftest import verified_login

    verified_login(client, make_user(institution, User.Role.LAB_MANAGER))
    assert client.get(f"/api/v1/cases/{case.pk}/slides/").status_code == 403


def test_openapi_describes_the_slide_endpoints(client):
    schema = client.get("/api/v1/schema/?format=json").json()
    assert "/api/v1/cases/{id}/slides/" in schema["paths"]
    upload = schema["paths"]["/api/v1/slide-uploads/{id}/"]
    assert PIECE in upload["patch"]["requestBody"]["content"]
    assert {"200", "201", "409", "413", "415"} <= set(upload["patch"]["responses"])
    assert "/api/v1/slides/{id}/" in schema["paths"]


def test_other_case_upload_page_is_404(client, institution, other_institution):
    from tests.conftest import verified_login

    theirs = new_case(make_user(other_institution, User.Role.CLINICIAN), accession="B-1", mrn="B-1")
    verified_login(client, make_user(institution, User.Role.CLINICIAN))
    assert client.get(f"/cases/{theirs.pk}/slides/upload/").status_code == 404


@pytest.fixture
def media_root(_media_root):
    return Path(_media_root)


def test_fhir_bundle_holds_the_slide_result_and_its_regions(lab_api, case, demo_model):
    from slides.services import slide_register

    pending = slide_register(case=case, actor=case.created_by, path=FIXTURE, name="later.tiff")
    bundle = lab_api.get(f"/api/v1/cases/{case.pk}/fhir/").json()
    report = bundle["entry"][-1]["resource"]
    assert report["status"] == "partial" and "1 slides still being analysed" in report["conclusion"]
    done = jobs.slide_run_inline(pending.pk)
    bundle = lab_api.get(f"/api/v1/cases/{case.pk}/fhir/").json()
    observations = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    slide = observations[f"slide-{done.pk}"]
    assert slide["valueQuantity"]["value"] == pytest.approx(done.tumour_fraction, abs=1e-6)
    codes = [c["code"]["coding"][0]["code"] for c in slide["component"]]
    assert codes.count("suspicious-region") == 12 and "suspected-tumour" in codes
    assert slide["interpretation"][0]["coding"][0]["code"] == "POS"
    report = bundle["entry"][-1]["resource"]
    assert {
        "reference": next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["id"] == f"slide-{done.pk}")
    } in report["result"]


def test_full_slide_store_is_a_507_and_the_upload_can_be_finished_later(lab_api, case, media_root, monkeypatch):
    import errno

    from django.core.files.storage import default_storage

    data = FIXTURE.read_bytes()
    url = _start(lab_api, case, data)["Location"]

    def full(name, content):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(default_storage, "_save", full)
        response = _piece(lab_api, url, data, 0)
    assert response.status_code == 507 and "slide store is full" in response.json()["detail"]
    assert not Slide.objects.exists() and not stored_files(media_root)
    # Space freed: an empty piece at the end checks and stores the file that had arrived.
    retry = _piece(lab_api, url, b"", len(data))
    assert retry.status_code == 201, retry.json()
    assert retry.json()["slide"]["status"] == "queued"


def test_slide_keeps_the_site_validation_it_was_judged_by(lab_api, case, demo_model):
    from inference.models import SiteValidation
    from slides.services import slide_register

    before = jobs.slide_run_inline(slide_register(case=case, actor=case.created_by, path=FIXTURE, name="a.tiff").pk)
    validation = SiteValidation.objects.create(
        institution=case.institution, model_version=demo_model, data_source="site", data_manifest_sha256="0" * 64,
        counts={"NORM": 100, "TUM": 100}, metrics={}, target_sensitivity=0.98, threshold=0.6,
        sensitivity=0.99, specificity=0.9, passed=True, actor="test",
    )  # fmt: skip
    after = jobs.slide_run_inline(slide_register(case=case, actor=case.created_by, path=FIXTURE, name="b.tiff").pk)
    first = lab_api.get(f"/api/v1/slides/{before.pk}/").json()["results"]
    second = lab_api.get(f"/api/v1/slides/{after.pk}/").json()["results"]
    # The earlier slide stays judged by the model's default, as it was; the later by the site's.
    assert (first["validated_at_site"], first["tumour_threshold"]) == (False, before.tumour_threshold)
    assert (second["validated_at_site"], second["tumour_threshold"]) == (True, 0.6)
    assert after.site_validation == validation and before.site_validation is None
    bundle = lab_api.get(f"/api/v1/cases/{case.pk}/fhir/").json()
    flags = {
        e["resource"]["id"]: e["resource"]["extension"][0]["valueBoolean"]
        for e in bundle["entry"]
        if e["resource"]["id"].startswith("slide-")
    }
    assert flags == {f"slide-{before.pk}": False, f"slide-{after.pk}": True}


def test_case_slides_list_costs_the_same_with_more_slides(lab_api, case, demo_model, django_assert_num_queries):
    from slides.services import slide_register

    for count in (1, 3):
        while case.slides.count() < count:
            jobs.slide_run_inline(slide_register(case=case, actor=case.created_by, path=FIXTURE, name="s.tiff").pk)
        lab_api.get(f"/api/v1/cases/{case.pk}/slides/")
        # the token, the case, the slides with their case and model version, their regions
        with django_assert_num_queries(4):
            assert len(lab_api.get(f"/api/v1/cases/{case.pk}/slides/").json()) == count
