"""The site's operating point in real headless Chromium: a pathologist sees "suspected tumour" with
this site's threshold on a case above it, no such flag on a case below it, and the "not validated
at this site" mark on a result judged by the model's default threshold."""

from __future__ import annotations

import re

import pytest

from accounts.models import User
from inference.models import Prediction
from tests.browser import login, texts, wait_text
from tests.conftest import authenticator, make_user
from tests.test_operating_point import IMAGE, STEP, analysed, site_validation

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SCREENSHOT = "/tmp/operating_point.png"


def test_pathologist_sees_the_site_threshold_and_the_not_validated_mark(
    browser,
    live_server,
    institution,
    demo_model,
    clinician,
    tmp_path,
):
    from selenium.webdriver.common.by import By

    # Analysed before any validation here, then under a threshold just above, then just below its TUM probability.
    analysed(clinician, "S26-NOTVAL")
    score = Prediction.objects.get(patch__case__accession="S26-NOTVAL").scores["TUM"]
    site_validation(institution, demo_model, score + STEP)
    analysed(clinician, "S26-BELOW")
    site_validation(institution, demo_model, score - STEP)
    analysed(clinician, "S26-ABOVE", names=(IMAGE, "NORM-TCGA-INTLNRAV.png"))
    authenticator(make_user(institution, User.Role.PATHOLOGIST, username="dr-op"))

    login(browser, live_server.url, "dr-op")
    wait_text(browser, "h1", "Cases")

    browser.get(f"{live_server.url}/cases/worklist/")
    wait_text(browser, "#worklist", "S26-ABOVE")
    flags = {
        row.find_element(By.CSS_SELECTOR, "a").text: row.find_element(By.CSS_SELECTOR, "td.ai-tumour").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    }
    assert flags["S26-ABOVE"] == "suspected tumour: 1"
    assert flags["S26-BELOW"] == "0"
    assert "not validated at this site" in flags["S26-NOTVAL"]
    order = texts(browser, "#worklist tbody tr td:first-child a")
    assert order.index("S26-ABOVE") < order.index("S26-BELOW")  # same image: above the threshold ranks first
    browser.save_screenshot(str(tmp_path / "worklist.png"))

    browser.find_element(By.LINK_TEXT, "S26-ABOVE").click()
    wait_text(browser, "h1", "Case S26-ABOVE")
    tumour, normal = browser.find_elements(By.CSS_SELECTOR, ".patch")
    assert tumour.find_element(By.CSS_SELECTOR, ".badge.suspected-tumour").is_displayed()
    text = tumour.find_element(By.CSS_SELECTOR, ".operating-point.suspected").text
    shown = re.fullmatch(r"TUM (\d\.\d+), at or above this site's threshold (\d\.\d+): suspected tumour .*", text)
    assert shown, text
    assert abs(float(shown[2]) - (score - STEP)) < 1e-4
    assert not normal.find_elements(By.CSS_SELECTOR, ".badge.suspected-tumour")
    assert "below this site's threshold" in normal.find_element(By.CSS_SELECTOR, ".operating-point").text
    assert not browser.find_elements(By.CSS_SELECTOR, ".not-validated")
    browser.execute_script("arguments[0].scrollIntoView()", tumour)
    browser.save_screenshot(SCREENSHOT)

    browser.get(f"{live_server.url}/cases/worklist/")
    browser.find_element(By.LINK_TEXT, "S26-BELOW").click()
    wait_text(browser, "h1", "Case S26-BELOW")
    assert not browser.find_elements(By.CSS_SELECTOR, ".badge.suspected-tumour")
    assert "below this site's threshold" in browser.find_element(By.CSS_SELECTOR, ".patch .operating-point").text
    assert "suspected tumour" not in browser.find_element(By.CSS_SELECTOR, ".patch").text

    browser.get(f"{live_server.url}/cases/worklist/")
    browser.find_element(By.LINK_TEXT, "S26-NOTVAL").click()
    wait_text(browser, "h1", "Case S26-NOTVAL")
    mark = browser.find_element(By.CSS_SELECTOR, ".patch .badge.not-validated")
    assert mark.is_displayed() and mark.text == "not validated at this site"
    assert "the model's default threshold" in browser.find_element(By.CSS_SELECTOR, ".patch").text
    assert browser.find_element(By.ID, "not-validated").is_displayed()
    browser.execute_script("document.getElementById('not-validated').scrollIntoView()")
    browser.save_screenshot(str(tmp_path / "not-validated.png"))
