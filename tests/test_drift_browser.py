"""Drift monitoring in real headless Chromium: an administrator sees the banner, opens the drift
page, and finds the charts drawn and the out-of-band figure named."""

from __future__ import annotations

import time

import pytest
from django.core.cache import cache

from accounts.models import User
from tests.browser import login, texts, wait_text
from tests.conftest import authenticator, make_user
from tests.test_drift import SAME_TISSUE, analyse, restain, tiles, validate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SCREENSHOT = "/tmp/drift.png"


def test_admin_sees_drift_banner_page_and_charts(
    browser, live_server, institution, demo_model, clinician, settings, monkeypatch
):
    from selenium.webdriver.common.by import By

    monkeypatch.setattr("inference.tasks.prediction_run.delay", lambda ids: None)  # analysed here, below
    settings.SITE_VALIDATION_MIN_PER_CLASS = 1
    settings.DRIFT_MIN_PATCHES = 5
    cache.clear()
    validate(institution, demo_model, tiles(lambda im: im, lambda im: im.rotate(90)))
    analyse(clinician, tiles(*(lambda im, t=t: restain(t(im)) for t in SAME_TISSUE)), "S-DRIFT")
    authenticator(make_user(institution, User.Role.ADMIN, username="site-admin"))

    login(browser, live_server.url, "site-admin")
    wait_text(browser, "h1", "Cases")
    wait_text(browser, "#drift-banner", "Haematoxylin OD (mean)")

    browser.find_element(By.CSS_SELECTOR, "#drift-banner a").click()
    wait_text(browser, "h1", "Drift")
    assert browser.title == "Drift · Cloudiopsy"
    wait_text(browser, "#out-of-band", "Haematoxylin OD (mean)")
    assert browser.find_elements(By.CSS_SELECTOR, "#out-of-band li[data-figure=od_h]")
    assert any("out of band" in t for t in texts(browser, "#drift-table tr[data-figure=od_h] td"))

    charts = browser.find_elements(By.CSS_SELECTOR, "img.drift-chart")
    assert len(charts) == 4
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    deadline = time.monotonic() + 20  # each chart is drawn by its own request
    while time.monotonic() < deadline and not all(browser.execute_script(loaded, c) for c in charts):
        time.sleep(0.2)
    assert all(browser.execute_script(loaded, c) > 0 for c in charts)
    browser.save_screenshot(SCREENSHOT)

    # The nav links the page for administrators.
    assert browser.find_element(By.LINK_TEXT, "Drift").get_attribute("href").endswith("/monitoring/drift/")
