"""The FHIR output, validated with the fhir.resources models (FHIR R4B, backwards compatible with
R4 for these resources)."""

from __future__ import annotations

import importlib

import pytest
from fhir.resources.R4B.bundle import Bundle

from accounts.models import Scope
from inference import services
from tests.conftest import fixture_patch, new_case
from tests.test_api_contract import token

pytestmark = pytest.mark.django_db


def _resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.fixture
def analysed_case(clinician, demo_model):
    from cases.services import patch_upload

    case = new_case(clinician)
    files = [(n, fixture_patch(n).read_bytes()) for n in ("TUM-TCGA-KECNIDCQ.png", "NORM-TCGA-INTLNRAV.png")]
    patches = patch_upload(case=case, uploaded_by=clinician, files=files).patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    return case


def test_fhir_bundle_validates_and_carries_patient_specimen_observations_report(analysed_case, institution):
    response = token(institution).get(f"/api/v1/cases/{analysed_case.pk}/fhir/")
    assert response.status_code == 200 and response["Content-Type"] == "application/fhir+json"
    bundle = response.json()
    Bundle.model_validate(bundle)  # raises on any invalid element
    for entry in bundle["entry"]:  # and each resource against its own model
        kind = entry["resource"]["resourceType"]
        module = importlib.import_module(f"fhir.resources.R4B.{kind.lower()}")
        getattr(module, kind).model_validate(entry["resource"])
    (patient,) = _resources(bundle, "Patient")
    assert patient["identifier"][0]["value"] == analysed_case.patient.mrn
    (specimen,) = _resources(bundle, "Specimen")
    assert specimen["accessionIdentifier"]["value"] == analysed_case.accession
    observations = _resources(bundle, "Observation")
    labels = sorted(o["valueCodeableConcept"]["coding"][0]["code"] for o in observations)
    assert labels == ["NORM", "TUM"]
    tum = next(o for o in observations if o["valueCodeableConcept"]["coding"][0]["code"] == "TUM")
    assert {"system": "http://snomed.info/sct", "code": "35917007", "display": "Adenocarcinoma, no subtype"} in tum[
        "valueCodeableConcept"
    ]["coding"]
    components = tum["component"]
    probabilities = [c["valueQuantity"]["value"] for c in components if "Probability" in c["code"].get("text", "")]
    assert len(probabilities) == 9 and abs(sum(probabilities) - 1) < 1e-4
    (report,) = _resources(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary" and len(report["result"]) == 2
    assert report["code"]["coding"][0]["code"] == "11526-1"
    assert "1 of 2 analysed patches" in report["conclusion"]
    urls = {e["fullUrl"] for e in bundle["entry"]}
    assert {r["reference"] for r in report["result"]} <= urls and patient and specimen


def test_fhir_needs_the_results_scope_and_the_institution(analysed_case, institution, other_institution):
    assert token(institution, [Scope.CASES_READ]).get(f"/api/v1/cases/{analysed_case.pk}/fhir/").status_code == 403
    assert token(other_institution).get(f"/api/v1/cases/{analysed_case.pk}/fhir/").status_code == 404
