"""The staff web UI in real headless Chromium: log in, create a case, upload, see results appear."""

from __future__ import annotations

import time

import pytest

from accounts.models import User
from cases.models import TissuePatch
from inference import services
from tests.browser import login, texts, wait_text
from tests.conftest import authenticator, fixture_patch, make_user

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_clinician_creates_case_uploads_and_sees_results(browser, live_server, institution, demo_model, tmp_path):
    from selenium.webdriver.common.by import By

    make_user(institution, User.Role.CLINICIAN, username="dr-web")
    browser.get(f"{live_server.url}/cases/")
    assert "/login/" in browser.current_url  # pages need a login
    browser.find_element(By.ID, "id_username").send_keys("dr-web")
    browser.find_element(By.ID, "id_password").send_keys("wrong password")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_text(browser, ".errors", "did not match")
    browser.find_element(By.ID, "id_password").send_keys("not-a-real-pass-1")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_text(browser, "h1", "Cases")

    browser.find_element(By.LINK_TEXT, "New case").click()
    for field, value in {
        "id_patient_mrn": "WEB-1",
        "id_patient_name": "Browser Patient",
        "id_accession": "S26-WEB",
        "id_specimen_site": "descending colon",
    }.items():
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
    wait_text(browser, "h1", "Case S26-WEB")

    files = [fixture_patch("TUM-TCGA-KECNIDCQ.png"), fixture_patch("NORM-TCGA-INTLNRAV.png")]
    browser.find_element(By.ID, "id_image").send_keys("\n".join(str(f) for f in files))
    browser.find_element(By.CSS_SELECTOR, "form[enctype] button[type=submit]").click()
    wait_text(browser, ".messages", "2 patch(es) uploaded")
    wait_text(browser, ".patch .badge", "Queued")
    browser.save_screenshot(str(tmp_path / "queued.png"))

    # The worker's service, run here; the page refreshes itself until the results are in.
    ids = list(TissuePatch.objects.values_list("id", flat=True))
    services.prediction_run(patch_ids=ids)
    wait_text(browser, "#case-status", "Ready for review", timeout=30)
    assert texts(browser, ".patch strong.label") == ["TUM", "NORM"]
    images = browser.find_elements(By.CSS_SELECTOR, ".patch img:not(.overlay)")
    assert len(images) == 2
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) == 224 for img in images)
    assert browser.title == "Case S26-WEB · Cloudiopsy"
    # Heatmaps: hidden until asked for, then the TUM overlay of every patch shows.
    overlays = browser.find_elements(By.CSS_SELECTOR, "img.overlay[data-overlay=TUM]")
    assert len(overlays) == 2 and not any(o.is_displayed() for o in overlays)
    browser.find_element(By.CSS_SELECTOR, "input[name=overlay][value=TUM]").click()
    assert all(o.is_displayed() for o in overlays)
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    deadline = time.monotonic() + 10  # overlays load lazily, once shown
    while time.monotonic() < deadline and not all(browser.execute_script(loaded, o) == 224 for o in overlays):
        time.sleep(0.2)
    assert all(browser.execute_script(loaded, o) == 224 for o in overlays)
    browser.find_element(By.CSS_SELECTOR, "input[name=overlay][value=none]").click()
    assert not any(o.is_displayed() for o in overlays)
    browser.save_screenshot(str(tmp_path / "done.png"))


def test_pathologist_reviews_with_shortcuts_and_signs_out(browser, live_server, institution, demo_model, clinician):
    from selenium.webdriver.common.by import By

    from cases.services import patch_upload
    from tests.conftest import new_case

    case = new_case(clinician, accession="S26-PATH")
    files = [(n, fixture_patch(n).read_bytes()) for n in ("TUM-TCGA-KECNIDCQ.png", "NORM-TCGA-INTLNRAV.png")]
    patches = patch_upload(case=case, uploaded_by=clinician, files=files).patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    authenticator(make_user(institution, User.Role.PATHOLOGIST, username="dr-path"))

    login(browser, live_server.url, "dr-path")
    wait_text(browser, "h1", "Cases")
    browser.get(f"{live_server.url}/cases/worklist/")
    wait_text(browser, "#worklist", "S26-PATH")
    browser.find_element(By.LINK_TEXT, "S26-PATH").click()
    wait_text(browser, "h1", "Case S26-PATH")
    sign_out = browser.find_element(By.CSS_SELECTOR, "#sign-out-form button[type=submit]")
    assert not sign_out.is_enabled()  # every patch must be reviewed first

    browser.find_element(By.TAG_NAME, "body").send_keys("c")  # confirm the next unreviewed patch
    wait_text(browser, ".messages", "confirmed as TUM")
    browser.find_element(By.TAG_NAME, "body").send_keys("a")  # confirm all the rest
    wait_text(browser, ".messages", "Confirmed 1 patch(es)")
    assert texts(browser, ".patch .final strong") == ["TUM", "NORM"]
    browser.find_element(By.ID, "id_comment").send_keys("Invasive adenocarcinoma.")
    browser.find_element(By.CSS_SELECTOR, "#sign-out-form button[type=submit]").click()
    wait_text(browser, "#sign-out h2", "Signed out: Adenocarcinoma present")
    assert not browser.find_elements(By.CSS_SELECTOR, "form.review")  # read-only now
    assert "Invasive adenocarcinoma." in browser.find_element(By.ID, "sign-out").text
