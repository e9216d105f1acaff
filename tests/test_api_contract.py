"""The lab-system API contract: OpenAPI schema and docs, problem-details errors, token scopes,
expiry and revocation on every endpoint, idempotent POSTs, filters and rate limits."""

from __future__ import annotations

import datetime
import itertools

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import LabSystem, Scope
from accounts.services import lab_system_create
from cases.models import BiopsyCase, TissuePatch
from cases.services import patch_upload
from tests.conftest import CASE_PAYLOAD, fixture_patch, new_case

pytestmark = pytest.mark.django_db
_accessions = itertools.count()


def client_for(lab: LabSystem | None, key: str | None) -> APIClient:
    api = APIClient()
    if key:
        api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return api


def token(institution, scopes=None, name=None, **fields):
    lab, key = lab_system_create(institution=institution, name=name or f"LIS {next(_accessions)}", scopes=scopes)
    if fields:
        LabSystem.objects.filter(pk=lab.pk).update(**fields)
    return client_for(lab, key)


@pytest.fixture
def world(institution, clinician):
    case = new_case(clinician)
    patch = patch_upload(
        case=case, uploaded_by=clinician, files=[("a.png", fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes())]
    ).patches[0]
    return case, patch


ENDPOINTS = [
    ("GET", "/api/v1/cases/", None, Scope.CASES_READ, 200, "collection"),
    ("POST", "/api/v1/cases/", "case", Scope.CASES_WRITE, 201, "collection"),
    ("GET", "/api/v1/cases/{case}/", None, Scope.CASES_READ, 200, "object"),
    ("POST", "/api/v1/cases/{case}/patches/", "image", Scope.PATCHES_WRITE, 202, "object"),
    ("GET", "/api/v1/patches/{patch}/", None, Scope.CASES_READ, 200, "object"),
    ("GET", "/api/v1/patches/{patch}/image/", None, Scope.CASES_READ, 200, "object"),
    ("GET", "/api/v1/cases/{case}/fhir/", None, (Scope.CASES_READ, Scope.RESULTS_READ), 200, "object"),
]
KINDS = ["valid", "lacking scope", "other institution", "revoked", "expired", "none"]


def call(api: APIClient, method, url, body):
    if body == "case":
        payload = {**CASE_PAYLOAD, "accession": f"T-{next(_accessions)}"}
        return api.post(url, payload, format="json")
    if body == "image":
        with open(fixture_patch("NORM-TCGA-INTLNRAV.png"), "rb") as image:
            return api.post(url, {"image": [image]}, format="multipart")
    return api.generic(method, url)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "path", "body", "scope", "ok", "shape"), ENDPOINTS)
def test_every_endpoint_checks_token_scope_institution_and_validity(
    world, institution, other_institution, kind, method, path, body, scope, ok, shape
):
    case, patch = world
    needed = [scope] if isinstance(scope, str) else list(scope)
    api = {
        "valid": lambda: token(institution, needed),
        "lacking scope": lambda: token(institution, [s for s in Scope.values if s != needed[-1]]),
        "other institution": lambda: token(other_institution),
        "revoked": lambda: token(institution, revoked_at=timezone.now()),
        "expired": lambda: token(institution, expires_at=timezone.now() - datetime.timedelta(minutes=1)),
        "none": lambda: client_for(None, None),
    }[kind]()
    response = call(api, method, path.format(case=case.pk, patch=patch.pk), body)
    expected = {
        "valid": ok,
        "lacking scope": 403,
        "other institution": ok if shape == "collection" else 404,
        "revoked": 401,
        "expired": 401,
        "none": 401,
    }[kind]
    assert response.status_code == expected, response.content[:300]
    if expected >= 400:
        problem = response.json()
        assert problem["status"] == expected and problem["title"] and problem["detail"]
        assert response["Content-Type"] == "application/problem+json"
    if kind == "other institution" and method == "GET" and shape == "collection":
        assert response.json()["count"] == 0


@pytest.mark.parametrize("kind", ["valid", "lacking scope"])
@pytest.mark.parametrize(
    ("path", "scope"), sorted({(path, scope) for method, path, _, scope, _, _ in ENDPOINTS if method == "GET"})
)
def test_head_needs_the_get_scope_and_options_is_refused_to_tokens(world, institution, kind, path, scope):
    """HEAD tells whether a case exists and its size: it needs what GET needs. OPTIONS (and any
    method a view does not declare a scope for) is refused to tokens, whatever their scopes."""
    case, patch = world
    needed = [scope] if isinstance(scope, str) else list(scope)
    scopes = needed if kind == "valid" else [s for s in Scope.values if s != needed[-1]]
    url = path.format(case=case.pk, patch=patch.pk)
    head = token(institution, scopes).head(url)
    assert head.status_code == (200 if kind == "valid" else 403)
    options = token(institution, Scope.values).options(url)
    assert options.status_code == 403 and options.json()["status"] == 403


def test_write_only_token_gets_ids_back_not_the_stored_patient(institution, clinician):
    from audit.models import AuditEvent

    new_case(clinician, accession="S-OLD", mrn="MRN-001")  # the patient is on file: "Patient MRN-001"
    writer = token(institution, [Scope.CASES_WRITE])
    payload = {**CASE_PAYLOAD, "accession": "S-NEW", "patient": {"mrn": "MRN-001"}}  # attach to the one on file
    response = writer.post("/api/v1/cases/", payload, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["id"] and body["accession"] == "S-NEW"
    assert body["patient"] == {"mrn": "MRN-001", "name": None, "birth_date": None, "sex": None}
    assert "Patient MRN-001" not in response.content.decode()
    assert not AuditEvent.objects.filter(action="patient.read").exists()

    reader = token(institution, [Scope.CASES_WRITE, Scope.CASES_READ])
    again = reader.post("/api/v1/cases/", {**payload, "accession": "S-NEW-2"}, format="json").json()
    assert again["patient"]["name"] == "Patient MRN-001"  # a reader may see it, and the read is recorded
    assert AuditEvent.objects.filter(action="patient.read").count() == 1


def test_results_need_the_results_scope(world, institution, demo_model):
    from inference import services

    _, patch = world
    services.prediction_run(patch_ids=[patch.pk])
    without = token(institution, [Scope.CASES_READ]).get(f"/api/v1/patches/{patch.pk}/").json()
    with_results = token(institution, [Scope.CASES_READ, Scope.RESULTS_READ]).get(f"/api/v1/patches/{patch.pk}/")
    assert without["status"] == "done" and without["prediction"] is None
    prediction = with_results.json()["prediction"]
    assert prediction["label"] == "TUM" and prediction["model_version"] == str(demo_model)
    assert set(prediction) == {
        "label", "scores", "uncertainty", "needs_attention", "model_version", "created_at",
        "suspected_tumour", "tumour_threshold", "validated_at_site",
    }  # fmt: skip


def test_patch_image_is_the_stored_pixels_as_png(world, institution):
    from PIL import Image

    _, patch = world
    response = token(institution).get(f"/api/v1/patches/{patch.pk}/image/")
    assert response["Content-Type"] == "image/png"
    import io

    with Image.open(io.BytesIO(response.content)) as got, Image.open(fixture_patch("TUM-TCGA-KECNIDCQ.png")) as sent:
        assert got.convert("RGB").tobytes() == sent.convert("RGB").tobytes()


def test_unknown_api_url_is_a_json_404(lab_api):
    response = lab_api.get("/api/v1/no-such-thing/")
    assert response.status_code == 404 and response.json()["status"] == 404
    assert response["Content-Type"] == "application/problem+json"


def test_schema_documents_every_endpoint_and_the_token_scheme(client):
    response = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert set(schema["paths"]) == {
        "/api/v1/cases/",
        "/api/v1/cases/{id}/",
        "/api/v1/cases/{id}/patches/",
        "/api/v1/cases/{id}/fhir/",
        "/api/v1/cases/{id}/slides/",
        "/api/v1/slide-uploads/{id}/",
        "/api/v1/slides/{id}/",
        "/api/v1/patches/{id}/",
        "/api/v1/patches/{id}/image/",
    }
    assert schema["components"]["securitySchemes"]["LabSystemToken"]["in"] == "header"
    create = schema["paths"]["/api/v1/cases/"]["post"]
    assert {"201", "400", "401", "403", "429"} <= set(create["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])


def test_docs_page_uses_local_assets_only(client):
    response = client.get("/api/v1/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html and "/static/drf_spectacular_sidecar/" in html
    assert "cdn" not in html.lower() and "https://" not in html


def test_case_create_retried_with_the_same_key_creates_one_case(lab_api):
    headers = {"HTTP_IDEMPOTENCY_KEY": "order-42"}
    first = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json", **headers)
    again = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json", **headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert BiopsyCase.objects.count() == 1
    changed = lab_api.post("/api/v1/cases/", {**CASE_PAYLOAD, "priority": "routine"}, format="json", **headers)
    assert changed.status_code == 422 and "different request" in changed.json()["detail"]
    assert BiopsyCase.objects.count() == 1


def test_failed_request_is_replayed_as_it_failed(lab_api):
    headers = {"HTTP_IDEMPOTENCY_KEY": "bad-1"}
    first = lab_api.post("/api/v1/cases/", {"accession": "X"}, format="json", **headers)
    again = lab_api.post("/api/v1/cases/", {"accession": "X"}, format="json", **headers)
    assert first.status_code == again.status_code == 400 and again.json() == first.json()


def test_patch_upload_retried_with_a_new_boundary_stores_one_set(world, lab_api):
    case, _ = world
    before = TissuePatch.objects.count()
    responses = []
    for _ in range(2):  # the test client picks a new multipart boundary each time, as real clients do
        with (
            open(fixture_patch("NORM-TCGA-INTLNRAV.png"), "rb") as a,
            open(fixture_patch("TUM-AACHEHDV.tif"), "rb") as b,
        ):
            responses.append(
                lab_api.post(
                    f"/api/v1/cases/{case.pk}/patches/",
                    {"image": [a, b]},
                    format="multipart",
                    HTTP_IDEMPOTENCY_KEY="upload-7",
                )
            )
    assert [r.status_code for r in responses] == [202, 202]
    assert responses[0].json() == responses[1].json()
    assert TissuePatch.objects.count() == before + 2


def test_idempotency_keys_are_per_caller(institution):
    first, second = token(institution), token(institution)
    for api in (first, second):
        assert api.post("/api/v1/cases/", {**CASE_PAYLOAD, "accession": f"K-{id(api)}"}, format="json",
                        HTTP_IDEMPOTENCY_KEY="same").status_code == 201  # fmt: skip
    assert BiopsyCase.objects.count() == 2


def test_idempotency_keys_are_purged_after_their_ttl(institution, settings):
    from accounts.models import IdempotencyRecord
    from accounts.tasks import idempotency_purge

    settings.IDEMPOTENCY_TTL_HOURS = 24
    api = token(institution)
    for key in ("old", "recent"):
        api.post("/api/v1/cases/", {**CASE_PAYLOAD, "accession": f"P-{key}"}, format="json", HTTP_IDEMPOTENCY_KEY=key)
    IdempotencyRecord.objects.filter(key="old").update(created_at=timezone.now() - datetime.timedelta(hours=25))
    assert idempotency_purge() == 1  # the beat task, run here directly
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["recent"]
    assert "accounts.tasks.idempotency_purge" in {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}


def test_case_list_filters(lab_api):
    for i in range(3):
        lab_api.post("/api/v1/cases/", {**CASE_PAYLOAD, "accession": f"F-{i}"}, format="json")
    BiopsyCase.objects.filter(accession="F-1").update(status=BiopsyCase.Status.READY_FOR_REVIEW)
    assert [c["accession"] for c in lab_api.get("/api/v1/cases/?status=ready_for_review").json()["results"]] == ["F-1"]
    assert lab_api.get("/api/v1/cases/?accession=F-2").json()["count"] == 1
    future = (timezone.now() + datetime.timedelta(hours=1)).isoformat()
    assert lab_api.get("/api/v1/cases/", {"updated_since": future}).json()["count"] == 0
    bad = lab_api.get("/api/v1/cases/?status=lost")
    assert bad.status_code == 400 and "status" in bad.json()["errors"]
    assert lab_api.get("/api/v1/cases/", {"updated_since": "yesterday"}).status_code == 400


def test_rate_limit_answers_429_with_retry_after(institution, settings):
    from django.core.cache import cache
    from rest_framework.settings import api_settings

    from cloudiopsy.api import LabSystemRateThrottle

    cache.clear()
    original = LabSystemRateThrottle.THROTTLE_RATES
    LabSystemRateThrottle.THROTTLE_RATES = {**api_settings.DEFAULT_THROTTLE_RATES, "lab_system": "3/min"}
    try:
        api = token(institution)
        codes = [api.get("/api/v1/cases/").status_code for _ in range(4)]
        limited = api.get("/api/v1/cases/")
    finally:
        LabSystemRateThrottle.THROTTLE_RATES = original
        cache.clear()
    assert codes == [200, 200, 200, 429]
    assert limited.status_code == 429 and int(limited["Retry-After"]) > 0
    assert limited.json()["status"] == 429


def test_oversized_request_body_is_a_json_400(lab_api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = lab_api.post("/api/v1/cases/", {**CASE_PAYLOAD, "clinical_notes": "x" * 5000}, format="json")
    assert response.status_code == 400 and response.json()["status"] == 400


@pytest.mark.parametrize(
    ("scopes", "method", "expected"),
    [
        ([Scope.PATCHES_WRITE], "head", 403),  # a write-only token learns nothing about the case
        ([Scope.CASES_READ], "head", 200),
        ([Scope.CASES_READ, Scope.PATCHES_WRITE], "options", 403),  # not a declared method
        ([Scope.CASES_READ], "put", 403),
    ],
)
def test_every_method_needs_its_scope(world, institution, scopes, method, expected):
    case, _ = world
    response = getattr(token(institution, scopes), method)(f"/api/v1/cases/{case.pk}/")
    assert response.status_code == expected, response.content
    if expected == 403 and method != "head":
        assert response["Content-Type"].startswith("application/problem+json")


def test_fhir_needs_case_and_results_scopes(world, institution):
    case, _ = world
    url = f"/api/v1/cases/{case.pk}/fhir/"
    response = token(institution, [Scope.RESULTS_READ]).get(url)  # demographics need cases:read too
    assert response.status_code == 403 and "cases:read" in response.json()["detail"]
    assert token(institution, [Scope.CASES_READ, Scope.RESULTS_READ]).get(url).status_code == 200
