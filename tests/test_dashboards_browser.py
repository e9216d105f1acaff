"""The operations dashboards in real headless Chromium: a lab manager and an administrator sign in
(second factor included), reach the dashboards from the nav, choose the period with the form, open
every page, see its figures and its chart drawn, and download a table as CSV."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from accounts.models import User
from audit.models import AuditEvent
from tests.browser import login, texts, wait_text
from tests.conftest import authenticator, make_user
from tests.test_dashboards import build

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Hand-computed for tests.test_dashboards.build over 2 to 15 March 2026 (see the tests there).
FIGURES = {
    "Turnaround": ("#figure-within-target", "1 of 2 (50.0%)"),
    "Queue now": ("#figure-waiting", "4"),
    "Workload": ("#figure-reviews", "10"),
    "AI performance": ("#figure-reviewed", "9"),
    "Throughput": ("#figure-uploaded", "15"),
}
LOADED = "return arguments[0].complete && arguments[0].naturalWidth"


def _wait_for_chart(browser) -> None:
    from selenium.webdriver.common.by import By

    chart = browser.find_element(By.CSS_SELECTOR, "img#chart")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not browser.execute_script(LOADED, chart):
        time.sleep(0.2)
    assert browser.execute_script(LOADED, chart) > 0, "the chart did not load"


def _downloaded(folder: Path, name: str) -> list[list[str]]:
    path = folder / name
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (path.exists() and not list(folder.glob("*.crdownload"))):
        time.sleep(0.2)
    assert path.exists(), f"{name} was not downloaded; folder holds {sorted(p.name for p in folder.iterdir())}"
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _choose_period(browser) -> None:
    from selenium.webdriver.common.by import By

    # A date input's typing order follows the browser's locale: set the ISO value as a script would.
    for name, value in (("from", "2026-03-02"), ("to", "2026-03-15")):
        field = browser.find_element(By.ID, f"id_{name}")
        browser.execute_script("arguments[0].value = arguments[1]", field, value)
    browser.find_element(By.CSS_SELECTOR, "#period-form button[type=submit]").click()
    wait_text(browser, "#period", "2026-03-02 to 2026-03-15")


def test_lab_manager_and_admin_open_every_dashboard_and_download_csv(
    browser, live_server, institution, other_institution, tmp_path
):
    from selenium.webdriver.common.by import By

    build(institution)
    build(other_institution, prefix="ELSEWHERE-")  # never shown to them
    authenticator(make_user(institution, User.Role.LAB_MANAGER, username="lab-manager"))
    authenticator(make_user(institution, User.Role.ADMIN, username="site-admin"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})

    for username, table, expected in (
        ("lab-manager", ("Turnaround", "weekly"), ["2026-W10", "Routine", "3", "2.00", "5.20"]),
        ("site-admin", ("AI performance", "tumour"), ["demo v1", "3", "2", "0.6667", "0.2077", "0.9385"]),
    ):
        login(browser, live_server.url, username)
        # A lab manager lands on the dashboards (no patient pages); an admin on the cases.
        if username == "lab-manager":
            wait_text(browser, "h1", "Turnaround")
            assert not browser.find_elements(By.LINK_TEXT, "Cases")
        else:
            wait_text(browser, "h1", "Cases")
        browser.find_element(By.LINK_TEXT, "Dashboards").click()
        wait_text(browser, "h1", "Turnaround")
        _choose_period(browser)
        for title, (css, value) in FIGURES.items():
            browser.find_element(By.CSS_SELECTOR, "#dashboard-nav").find_element(By.LINK_TEXT, title).click()
            wait_text(browser, "h1", title)
            assert browser.title == f"{title} · Cloudiopsy"
            wait_text(browser, "#period", "2026-03-02 to 2026-03-15")  # the period follows from page to page
            assert texts(browser, css) == [value], (title, css)
            assert not texts(browser, "#chart-empty")
            _wait_for_chart(browser)
            # The other institution's cases and pathologists (a marker no random token contains).
            assert "ELSEWHERE-" not in browser.page_source
            if title == table[0]:
                browser.find_element(By.ID, f"csv-{table[1]}").click()
                page_key = {"Turnaround": "turnaround", "AI performance": "ai-performance"}[title]
                rows = _downloaded(downloads, f"{page_key}-{table[1]}-2026-03-02-2026-03-15.csv")
                assert rows[1][: len(expected)] == expected
        browser.find_element(By.CSS_SELECTOR, "header form button[type=submit]").click()  # log out
        deadline = time.monotonic() + 10
        while "/login/" not in browser.current_url and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "/login/" in browser.current_url

    exports = AuditEvent.objects.filter(action="dashboard.export").order_by("id")
    assert [(e.actor_label, e.target_id) for e in exports] == [
        ("lab-manager", "turnaround/weekly"),
        ("site-admin", "ai-performance/tumour"),
    ]
