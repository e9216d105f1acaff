"""The site's operating point wherever a result appears: the worker's stored judgement, the case
page, the worklist, the API and FHIR. Real fixture patches through the demo model; the site
thresholds are set just above and just below the TUM probability the model really gives."""

from __future__ import annotations

import importlib
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from fhir.resources.R4B.bundle import Bundle

from accounts.models import Scope, User
from cases.models import BiopsyCase, TissuePatch
from cases.selectors import worklist
from cases.services import patch_upload
from inference import services
from inference.models import Prediction, SiteValidation
from inference.selectors import model_default_threshold
from tests.conftest import fixture_patch, make_user, new_case, verified_login
from tests.test_api_contract import token

pytestmark = pytest.mark.django_db

IMAGE = "TUM-TCGA-KECNIDCQ.png"  # the demo model calls it TUM with a moderate TUM probability
STEP = 1e-4  # how far above or below the real score a site's threshold is set


def site_validation(institution, model, threshold: float, passed: bool = True) -> SiteValidation:
    return SiteValidation.objects.create(
        institution=institution,
        model_version=model,
        data_source="tests",
        data_manifest_sha256="0" * 64,
        counts={"TUM": 50, "NORM": 50},
        metrics={},
        target_sensitivity=0.95,
        threshold=threshold,
        sensitivity=0.96,
        specificity=0.8,
        passed=passed,
        actor="test",
    )


def analysed(user, accession: str, names=(IMAGE,)) -> BiopsyCase:
    """A case of ``user``'s institution whose patches the worker's service has analysed."""
    case = new_case(user, accession=accession, mrn=accession)
    files = [(n, fixture_patch(n).read_bytes()) for n in names]
    patches = patch_upload(case=case, uploaded_by=user, files=files).patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    return case


def prediction_of(case: BiopsyCase, name: str = IMAGE) -> Prediction:
    return Prediction.objects.select_related("site_validation").get(patch__case=case, patch__original_name=name)


def fhir_observations(api, case: BiopsyCase) -> list[dict]:
    response = api.get(f"/api/v1/cases/{case.pk}/fhir/")
    assert response.status_code == 200
    bundle = response.json()
    Bundle.model_validate(bundle)
    for entry in bundle["entry"]:
        kind = entry["resource"]["resourceType"]
        getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind).model_validate(entry["resource"])
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


def component(observation: dict, code: str) -> dict:
    (found,) = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    return found


@pytest.fixture
def tum_score(clinician, demo_model) -> float:
    """The demo model's TUM probability for IMAGE, as the worker stores it (no site validation yet)."""
    return prediction_of(analysed(clinician, "PROBE")).scores["TUM"]


def test_without_site_validation_the_default_threshold_applies_and_is_marked(
    clinician, pathologist, client, institution, demo_model
):
    case = analysed(clinician, "NV", names=(IMAGE, "NORM-TCGA-INTLNRAV.png"))
    prediction = prediction_of(case)
    default = model_default_threshold(demo_model)
    assert prediction.site_validation is None and not prediction.validated_at_site
    assert prediction.tumour_threshold == default
    assert prediction.suspected_tumour is (prediction.scores["TUM"] >= default)

    verified_login(client, pathologist)
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert page.count('<span class="badge not-validated"') == 3  # once per patch and once for the case
    assert "the model's default threshold applied" in page
    shown = re.findall(r"the model's default threshold (\d\.\d+)", page)
    assert len(shown) == 2 and all(abs(float(t) - default) < 0.005 for t in shown)
    worklist_page = client.get("/cases/worklist/").content.decode()
    assert "not validated at this site" in worklist_page

    api = token(institution)
    result = api.get(f"/api/v1/patches/{prediction.patch_id}/").json()["prediction"]
    assert result["validated_at_site"] is False and result["tumour_threshold"] == default

    for observation in fhir_observations(api, case):
        assert observation["extension"] == [
            {"url": "https://cloudiopsy.invalid/fhir/StructureDefinition/validated-at-site", "valueBoolean": False}
        ]
        assert any(n["text"].startswith("Not validated at this site") for n in observation["note"])
        assert component(observation, "tumour-threshold")["valueQuantity"]["value"] == round(default, 6)
    report = api.get(f"/api/v1/cases/{case.pk}/fhir/").json()["entry"][-1]["resource"]
    assert "2 of 2 results are not validated at this site" in report["conclusion"]


def test_worker_judges_a_score_just_above_and_just_below_the_site_threshold(
    clinician, pathologist, client, institution, demo_model, tum_score
):
    high = site_validation(institution, demo_model, tum_score + STEP)
    below = analysed(clinician, "BELOW")
    low = site_validation(institution, demo_model, tum_score - STEP)  # newer: supersedes `high`
    site_validation(institution, demo_model, 0.0, passed=False)  # newest, but failed: ignored
    above = analysed(clinician, "ABOVE")

    judged_below, judged_above = prediction_of(below), prediction_of(above)
    assert judged_below.scores["TUM"] == judged_above.scores["TUM"] == tum_score  # the same image, the same score
    assert (judged_below.suspected_tumour, judged_below.tumour_threshold, judged_below.site_validation) == (
        False,
        tum_score + STEP,
        high,
    )
    assert (judged_above.suspected_tumour, judged_above.tumour_threshold, judged_above.site_validation) == (
        True,
        tum_score - STEP,
        low,
    )

    verified_login(client, pathologist)
    page = client.get(f"/cases/{above.pk}/").content.decode()
    score, threshold = re.search(r"TUM (\d\.\d+), at or above this site's threshold (\d\.\d+): ", page).groups()
    assert float(score) > float(threshold)  # printed with enough decimals to tell them apart
    assert abs(float(score) - tum_score) < 1e-4 and abs(float(threshold) - (tum_score - STEP)) < 1e-4
    assert '<span class="badge suspected-tumour"' in page and "not validated at this site" not in page
    page = client.get(f"/cases/{below.pk}/").content.decode()
    score, threshold = re.search(r"TUM (\d\.\d+), below this site's threshold (\d\.\d+) <span", page).groups()
    assert float(score) < float(threshold)
    assert 'class="badge suspected-tumour"' not in page and "suspected tumour" not in page

    # Same image, same uncertainty: the suspected case comes first although it is the newer one.
    assert [c.accession for c in worklist(principal=pathologist) if c.accession != "PROBE"] == ["ABOVE", "BELOW"]
    rows = {c.accession: c for c in worklist(principal=pathologist)}
    assert (rows["ABOVE"].ai_tumour_patches, rows["ABOVE"].ai_not_validated) == (1, 0)
    assert (rows["BELOW"].ai_tumour_patches, rows["BELOW"].ai_not_validated) == (0, 0)
    assert rows["PROBE"].ai_not_validated == 1


def test_second_institution_gets_its_own_judgement_for_the_same_image(
    clinician, institution, other_institution, demo_model, tum_score
):
    site_validation(institution, demo_model, tum_score - STEP)
    site_validation(other_institution, demo_model, tum_score + STEP)
    other_clinician = make_user(other_institution, User.Role.CLINICIAN)
    mine = new_case(clinician, accession="HERE")
    theirs = new_case(other_clinician, accession="THERE")
    image = fixture_patch(IMAGE).read_bytes()
    patches = [
        patch_upload(case=case, uploaded_by=user, files=[(IMAGE, image)]).patches[0]
        for case, user in ((mine, clinician), (theirs, other_clinician))
    ]
    services.prediction_run(patch_ids=[p.pk for p in patches])  # one batch, two institutions

    for case, inst, suspected, threshold in (
        (mine, institution, True, tum_score - STEP),
        (theirs, other_institution, False, tum_score + STEP),
    ):
        api = token(inst)
        (patch,) = api.get(f"/api/v1/cases/{case.pk}/").json()["patches"]
        result = patch["prediction"]
        assert (result["suspected_tumour"], result["tumour_threshold"], result["validated_at_site"]) == (
            suspected,
            threshold,
            True,
        )
        assert api.get(f"/api/v1/patches/{patch['id']}/").json()["prediction"] == result
        (observation,) = fhir_observations(api, case)
        assert component(observation, "suspected-tumour")["valueBoolean"] is suspected
        assert component(observation, "tumour-threshold")["valueQuantity"]["value"] == round(threshold, 6)
        (interpretation,) = observation["interpretation"]
        assert interpretation["coding"][0]["code"] == ("POS" if suspected else "NEG")
        assert "this site's threshold" in interpretation["text"]
        assert observation["extension"][0]["valueBoolean"] is True
        assert not any("Not validated" in n["text"] for n in observation["note"])


def test_operating_point_needs_the_results_scope(clinician, institution, demo_model, tum_score):
    case = BiopsyCase.objects.get(accession="PROBE")
    patch = TissuePatch.objects.get(case=case)
    without = token(institution, [Scope.CASES_READ])
    assert without.get(f"/api/v1/patches/{patch.pk}/").json()["prediction"] is None
    assert without.get(f"/api/v1/cases/{case.pk}/").json()["patches"][0]["prediction"] is None
    assert without.get(f"/api/v1/cases/{case.pk}/fhir/").status_code == 403


def _stored(case, model, scores: dict[str, float], threshold: float | None, validation=None) -> Prediction:
    """A prediction written directly, judged as the worker judges (threshold None: as stored before
    operating points existed)."""
    patch = patch_upload(
        case=case, uploaded_by=case.created_by, files=[("p.png", fixture_patch(IMAGE).read_bytes())]
    ).patches[0]
    TissuePatch.objects.filter(pk=patch.pk).update(status=TissuePatch.Status.DONE)
    BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.READY_FOR_REVIEW)
    return Prediction.objects.create(
        patch=patch, model_version=model, scores=scores, label=max(scores, key=scores.get), uncertainty=0.3,
        inference_seconds=0.001, suspected_tumour=None if threshold is None else scores["TUM"] >= threshold,
        tumour_threshold=threshold, site_validation=validation,
    )  # fmt: skip


def test_worklist_orders_and_flags_by_the_stored_judgement_not_the_label(
    clinician, pathologist, client, institution, demo_model, django_assert_max_num_queries
):
    validation = site_validation(institution, demo_model, 0.12)
    # Called TUM, but below the default threshold 0.5 and not validated here: not suspected.
    tum_label = new_case(clinician, accession="TUM-LABEL", mrn="1")
    _stored(tum_label, demo_model, {"TUM": 0.45, "NORM": 0.3, "STR": 0.25}, 0.5)
    # Called STR, but its TUM probability is above this site's validated threshold: suspected.
    suspected = new_case(clinician, accession="SUSPECTED", mrn="2")
    _stored(suspected, demo_model, {"TUM": 0.31, "STR": 0.69}, 0.12, validation)
    urgent = new_case(clinician, accession="URGENT", mrn="3")
    _stored(urgent, demo_model, {"TUM": 0.01, "NORM": 0.99}, 0.12, validation)
    BiopsyCase.objects.filter(pk=urgent.pk).update(priority=BiopsyCase.Priority.URGENT)

    assert [c.accession for c in worklist(principal=pathologist)] == ["URGENT", "SUSPECTED", "TUM-LABEL"]
    verified_login(client, pathologist)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/cases/worklist/").content.decode()
    worklist_queries = len(queries)  # read now: the log is reset by the next request
    rows = {accession: page.index(f">{accession}</a>") for accession in ("URGENT", "SUSPECTED", "TUM-LABEL")}
    assert rows["URGENT"] < rows["SUSPECTED"] < rows["TUM-LABEL"]

    def row(accession: str) -> str:
        start = page.rindex("<tr", 0, rows[accession])
        return page[start : page.index("</tr>", start)]

    assert "suspected tumour: 1" in row("SUSPECTED") and "not validated" not in row("SUSPECTED")
    assert 'class="badge suspected-tumour"' not in row("TUM-LABEL") and "not validated at this site" in row("TUM-LABEL")
    assert 'class="badge suspected-tumour"' not in row("URGENT")
    case_list = client.get("/cases/").content.decode()
    assert case_list.count('<span class="badge suspected-tumour">') == 1
    assert case_list.count('<span class="badge not-validated">') == 1

    # One query for all rows, however many cases: more cases, no more queries.
    for n in range(4):
        _stored(
            new_case(clinician, accession=f"MORE-{n}", mrn=f"m{n}"),
            demo_model,
            {"TUM": 0.31, "STR": 0.69},
            0.12,
            validation,
        )
    with django_assert_max_num_queries(worklist_queries):
        client.get("/cases/worklist/")
    with CaptureQueriesContext(connection) as queries:
        client.get("/cases/")
    case_list_queries = len(queries)
    _stored(new_case(clinician, accession="LAST", mrn="last"), demo_model, {"TUM": 0.31, "STR": 0.69}, 0.12, validation)
    with django_assert_max_num_queries(case_list_queries):
        client.get("/cases/")


def test_result_stored_before_operating_points_reads_as_unjudged(
    clinician, pathologist, client, institution, demo_model
):
    case = new_case(clinician, accession="LEGACY")
    prediction = _stored(case, demo_model, {"TUM": 0.9, "NORM": 0.1}, None)
    verified_login(client, pathologist)
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert "No tumour threshold recorded" in page and "not validated at this site" in page
    assert 'class="badge suspected-tumour"' not in page and "default threshold applied" not in page
    # The worklist counts it by its class, as it did when it was stored.
    assert worklist(principal=pathologist).get(pk=case.pk).ai_tumour_patches == 1
    api = token(institution)
    result = api.get(f"/api/v1/patches/{prediction.patch_id}/").json()["prediction"]
    assert (result["suspected_tumour"], result["tumour_threshold"], result["validated_at_site"]) == (None, None, False)
    (observation,) = fhir_observations(api, case)
    assert "interpretation" not in observation
    assert not [c for c in observation["component"] if c["code"]["coding"][0]["code"] == "tumour-threshold"]
