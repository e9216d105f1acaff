"""Headless Chromium for the browser tests (Debian's chromium and chromium-driver), and helpers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import unavailable

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        unavailable("Chromium is not installed (Debian packages chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def texts(driver, css: str) -> list[str]:
    """Texts of the matching elements, read again if the page refreshed under us."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        try:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]
        except StaleElementReferenceException:
            time.sleep(0.2)
        except WebDriverException as error:
            # Chromium 156 reports a node replaced by a navigation this way instead of as stale.
            if "does not belong to the document" not in str(error):
                raise
            time.sleep(0.2)
    raise AssertionError(f"{css} kept going stale")


def wait_text(driver, css: str, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in t for t in texts(driver, css)):
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared in {css}; page: {driver.page_source[-3000:]}")


def login(driver, base_url: str, username: str, password: str = "not-a-real-pass-1") -> None:
    """Sign in through the login page, and through the second-factor page with the code of the
    user's authenticator when their role needs one (``tests.conftest.authenticator`` made it)."""
    from django_otp.plugins.otp_totp.models import TOTPDevice
    from selenium.webdriver.common.by import By

    from tests.conftest import totp_code

    driver.get(f"{base_url}/login/")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    deadline = time.monotonic() + 10
    while "/login/" in driver.current_url and time.monotonic() < deadline:
        time.sleep(0.1)
    if "/account/two-factor/" in driver.current_url:
        device = TOTPDevice.objects.get(user__username=username, confirmed=True)
        driver.find_element(By.ID, "id_code").send_keys(totp_code(device))
        driver.find_element(By.CSS_SELECTOR, "#two-factor-form button[type=submit]").click()
        while "/account/two-factor/" in driver.current_url and time.monotonic() < deadline:
            time.sleep(0.1)
