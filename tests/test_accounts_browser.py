"""Second factor and automatic logoff in real headless Chromium."""

from __future__ import annotations

import time

import pytest
from django_otp.oath import TOTP

from accounts.models import User
from tests.browser import wait_text
from tests.conftest import make_user

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _password_step(browser, base_url: str, username: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{base_url}/login/")
    browser.find_element(By.ID, "id_username").send_keys(username)
    browser.find_element(By.ID, "id_password").send_keys("not-a-real-pass-1")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def _code_from_secret(secret: str, steps_ahead: int = 0) -> str:
    from base64 import b32decode

    totp = TOTP(b32decode(secret))
    totp.time = time.time() + 30 * steps_ahead
    return f"{totp.token():06d}"


def test_pathologist_enrols_with_the_qr_page_then_needs_the_code(browser, live_server, institution):
    from selenium.webdriver.common.by import By

    make_user(institution, User.Role.PATHOLOGIST, username="dr-mfa")
    _password_step(browser, live_server.url, "dr-mfa")
    wait_text(browser, "h1", "Set up two-factor authentication")  # no second factor yet: enrol first
    assert browser.find_element(By.CSS_SELECTOR, "#enrol-qr svg").is_displayed()
    secret = browser.find_element(By.ID, "enrol-secret").text
    browser.get(f"{live_server.url}/cases/")  # nothing else is reachable before that
    wait_text(browser, "h1", "Set up two-factor authentication")

    browser.find_element(By.ID, "id_code").send_keys(_code_from_secret(secret))
    browser.find_element(By.CSS_SELECTOR, "#enrol-form button[type=submit]").click()
    wait_text(browser, "h1", "Your recovery codes")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#recovery-codes li")) == 10
    browser.find_element(By.ID, "recovery-continue").click()
    wait_text(browser, "h1", "Cases")

    browser.find_element(By.CSS_SELECTOR, "form[action='/logout/'] button").click()
    wait_text(browser, "h1", "Log in")
    _password_step(browser, live_server.url, "dr-mfa")
    wait_text(browser, "h1", "Two-factor authentication")
    browser.find_element(By.ID, "id_code").send_keys("000000")
    browser.find_element(By.CSS_SELECTOR, "#two-factor-form button[type=submit]").click()
    wait_text(browser, "#two-factor-error", "not right")
    time.sleep(1.2)  # the throttle after a wrong code
    # The code of the current step was used at enrolment; the next step's is accepted (one step of drift).
    browser.find_element(By.ID, "id_code").send_keys(_code_from_secret(secret, steps_ahead=1))
    browser.find_element(By.CSS_SELECTOR, "#two-factor-form button[type=submit]").click()
    wait_text(browser, "h1", "Cases")


def test_idle_page_signs_itself_out(browser, live_server, institution, settings):
    from selenium.webdriver.common.by import By

    settings.SESSION_IDLE_TIMEOUT = 3
    make_user(institution, User.Role.CLINICIAN, username="dr-idle")
    _password_step(browser, live_server.url, "dr-idle")
    wait_text(browser, "h1", "Cases")
    # Left alone, the page reloads after the limit and the server shows the login page instead.
    wait_text(browser, ".messages", "without activity", timeout=20)
    assert "/login/" in browser.current_url
    assert browser.find_element(By.ID, "id_username").is_displayed()
    browser.get(f"{live_server.url}/cases/")
    assert "/login/" in browser.current_url
