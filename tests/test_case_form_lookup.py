"""The new-case page finds an existing patient by exact MRN only: no list of patients, no partial
match, nothing of another institution, and every patient shown is an audited read."""

from __future__ import annotations

import re

import pytest

from audit.models import AuditEvent
from cases.models import BiopsyCase, Patient
from tests.conftest import make_user, new_case

pytestmark = pytest.mark.django_db

FORM = {
    "patient_mrn": "",
    "patient_name": "",
    "patient_birth_date": "",
    "patient_sex": "unknown",
    "accession": "S26-0100",
    "specimen_site": "rectum",
    "priority": "routine",
    "clinical_notes": "",
}


@pytest.fixture
def known(clinician):
    case = new_case(clinician, accession="S26-0001", mrn="MRN-42")
    Patient.objects.filter(pk=case.patient_id).update(name="Known Person")
    return Patient.objects.get(pk=case.patient_id)


def _lookup(client, mrn, **fields):
    return client.post("/cases/new/", {**FORM, **fields, "patient_mrn": mrn, "lookup": "Look up MRN"})


def _reads():
    return list(AuditEvent.objects.filter(action__startswith="patient.read").order_by("id"))


def test_new_case_form_lists_no_patients_and_has_no_inline_script(clinician_client, known):
    page = clinician_client.get("/cases/new/")
    body = page.content.decode()
    assert page.status_code == 200
    assert "Known Person" not in body and "MRN-42" not in body and "<datalist" not in body
    # Every script on the page carries the CSP nonce (the form itself has none).
    for tag in re.findall(r"<script[^>]*>", body):
        assert "nonce=" in tag or "src=" in tag, tag
    assert not _reads()


def test_lookup_by_exact_mrn_shows_the_patient_and_audits_the_read(clinician_client, clinician, known):
    response = _lookup(clinician_client, "MRN-42", accession="S26-0100")
    body = response.content.decode()
    assert response.status_code == 200
    assert "Known Person" in body and 'id="patient-found"' in body
    assert 'value="S26-0100"' in body  # what was typed is kept
    assert not BiopsyCase.objects.filter(accession="S26-0100").exists()  # a lookup creates nothing
    (event,) = _reads()
    assert event.action == "patient.read" and event.target_id == str(known.pk)
    assert event.after == {"via": "case_form_lookup"} and event.actor_label == clinician.username


@pytest.mark.parametrize("mrn", ["MRN-4", "MRN", "mrn-42", "RN-42", "MRN-42%", "MRN-4_"])
def test_lookup_matches_the_whole_mrn_only(clinician_client, known, mrn):
    response = _lookup(clinician_client, mrn)
    body = response.content.decode()
    assert response.status_code == 200 and 'id="patient-not-found"' in body
    assert "Known Person" not in body
    assert not _reads()


def test_another_institutions_mrn_is_not_found(client, known, other_institution):
    outsider = make_user(other_institution, "clinician", username="outsider")
    client.force_login(outsider)
    response = _lookup(client, "MRN-42")
    body = response.content.decode()
    assert 'id="patient-not-found"' in body and "Known Person" not in body
    assert not _reads()
    # Creating with that MRN makes a new patient of their own institution, not a link to ours.
    response = client.post("/cases/new/", {**FORM, "patient_mrn": "MRN-42", "patient_name": "Someone Else"})
    assert response.status_code == 302
    case = BiopsyCase.objects.get(accession="S26-0100")
    assert case.patient != known and case.patient.institution == other_institution


def test_case_after_lookup_is_added_to_the_found_patient(clinician_client, known):
    assert 'id="patient-found"' in _lookup(clinician_client, "MRN-42").content.decode()
    # The page no longer asks for the patient's details: the form sends the MRN and the case fields.
    case_fields = {k: v for k, v in FORM.items() if not k.startswith("patient_")}
    response = clinician_client.post("/cases/new/", {**case_fields, "patient_mrn": "MRN-42"})
    assert response.status_code == 302
    assert BiopsyCase.objects.get(accession="S26-0100").patient == known
    assert Patient.objects.count() == 1


def test_new_patient_after_a_lookup_that_found_none(clinician_client, institution):
    page = _lookup(clinician_client, "NEW-7").content.decode()
    assert 'id="patient-not-found"' in page and 'name="patient_name"' in page
    response = clinician_client.post(
        "/cases/new/",
        {**FORM, "patient_mrn": "NEW-7", "patient_name": "New Person", "patient_birth_date": "1960-02-03"},
    )
    assert response.status_code == 302
    patient = Patient.objects.get(mrn="NEW-7")
    assert patient.institution == institution and patient.name == "New Person"


def test_lookup_without_an_mrn_is_an_error(clinician_client):
    response = _lookup(clinician_client, "  ")
    assert response.status_code == 400 and "This field is required" in response.content.decode()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_clinician_looks_up_an_mrn_in_the_browser(browser, live_server, institution):
    from selenium.webdriver.common.by import By

    from tests.browser import wait_text

    clinician = make_user(institution, "clinician", username="dr-lookup")
    known = new_case(clinician, accession="S26-0001", mrn="MRN-42").patient
    browser.get(f"{live_server.url}/login/")
    browser.find_element(By.ID, "id_username").send_keys("dr-lookup")
    browser.find_element(By.ID, "id_password").send_keys("not-a-real-pass-1")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_text(browser, "h1", "Cases")
    browser.get(f"{live_server.url}/cases/new/")
    browser.find_element(By.ID, "id_patient_mrn").send_keys("MRN-42")
    browser.find_element(By.ID, "lookup-mrn").click()  # the case fields are still empty: no browser validation
    wait_text(browser, "#patient-found", known.name)
    assert not browser.find_elements(By.ID, "id_patient_name")
    for field, value in {"id_accession": "S26-0200", "id_specimen_site": "caecum"}.items():
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()  # as test_browser.py does
    wait_text(browser, "h1", "Case S26-0200")
    assert BiopsyCase.objects.get(accession="S26-0200").patient == known
