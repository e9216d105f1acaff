"""The slide viewer in real headless Chromium: a pathologist opens an analysed slide (the committed
real pyramidal TIFF), OpenSeadragon draws its Deep Zoom tiles from the server, the AI heatmap
shows and hides and follows its opacity slider, the suspicious regions are listed and outlined,
clicking one or pressing n/p goes there, and Enter opens its patch on the case page. Nothing the
page loads breaks the Content-Security-Policy."""

from __future__ import annotations

import time

import pytest

from accounts.models import User
from slides.models import Slide
from tests.browser import login, texts, wait_text
from tests.conftest import authenticator, make_user
from tests.test_slides_viewer import TRUTH, analyse, register_fixture_slide

TILES = TRUTH["counts"]["tissue"]  # tissue tiles of the committed slide

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.test_slides_viewer")]

# Collects what the Content-Security-Policy blocks, from the first script of every page on.
CSP_WATCH = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""
# Share of the viewer's canvas that OpenSeadragon has drawn on, and how varied it is (tissue, not
# a flat colour).
CANVAS_DRAWN = """
var canvas = document.querySelector("#viewer .openseadragon-canvas canvas");
if (!canvas || !canvas.width) return [0, 0];
var data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
var drawn = 0, sum = 0, squares = 0;
for (var i = 0; i < data.length; i += 4) {
  if (data[i + 3] === 0) continue;
  drawn += 1;
  var grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
  sum += grey; squares += grey * grey;
}
if (!drawn) return [0, 0];
var mean = sum / drawn;
return [drawn / (data.length / 4), Math.sqrt(squares / drawn - mean * mean)];
"""


def wait_for(browser, script: str, *args, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"never true: {script}")


def view(browser, moved_from: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """The part of the slide on screen, level-0 px (x, y, width, height), recorded by the page when
    the viewer stops moving; with ``moved_from``, once it differs from that."""
    script = "return document.getElementById('viewer').dataset.view"
    deadline = time.monotonic() + 10
    current = browser.execute_script(script)
    while moved_from is not None and time.monotonic() < deadline:
        if current and tuple(int(v) for v in current.split(",")) != moved_from:
            break
        time.sleep(0.1)
        current = browser.execute_script(script)
    return tuple(int(v) for v in current.split(","))


def shows(box: tuple[int, int, int, int], region) -> bool:
    x, y, width, height = box
    return (
        x <= region.x
        and y <= region.y
        and region.x + region.width <= x + width
        and region.y + region.height <= y + height
    )


def test_pathologist_views_slide_with_heatmap_and_goes_through_regions(
    browser, live_server, institution, clinician, case, demo_model, tmp_path
):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    slide = analyse(register_fixture_slide(case, clinician))
    assert slide.status == Slide.Status.DONE, slide.failure_reason
    regions = list(slide.regions.order_by("rank"))
    assert len(regions) >= 3
    authenticator(make_user(institution, User.Role.PATHOLOGIST, username="dr-slide"))
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})

    login(browser, live_server.url, "dr-slide")
    browser.get(f"{live_server.url}/slides/{slide.pk}/")
    wait_text(browser, "h1", "mosaic-small.tiff")
    assert browser.title == "Slide mosaic-small.tiff · Cloudiopsy"
    wait_text(browser, "#slide-status", "Done")
    wait_for(browser, "return document.getElementById('viewer').dataset.ready === 'true'")

    # OpenSeadragon asked the server for Deep Zoom tiles and drew them: most of the canvas is
    # painted, and with tissue (not one flat colour).
    tiles = wait_for(
        browser,
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/slide_files/')).length",
    )
    assert tiles > 0
    drawn, spread = wait_for(browser, "var r = (function () {" + CANVAS_DRAWN + "})(); return r[0] > 0.3 && r;")
    assert drawn > 0.3 and spread > 5, (drawn, spread)
    whole = wait_for(browser, "return document.getElementById('viewer').dataset.view")
    whole = tuple(int(v) for v in whole.split(","))
    assert whole[2] >= slide.width * 0.9  # the whole slide at first

    # The heatmap: loaded (one pixel per grid tile), shown at half opacity, then off, on again
    # with the key, and following the slider.
    heatmap = browser.find_element(By.ID, "heatmap-overlay")
    wait_for(browser, "return arguments[0].complete && arguments[0].naturalWidth", heatmap)
    assert browser.execute_script("return arguments[0].naturalWidth", heatmap) == slide.grid["cols"]
    opacity = "return getComputedStyle(arguments[0]).opacity"
    assert heatmap.is_displayed() and browser.execute_script(opacity, heatmap) == "0.5"
    browser.find_element(By.ID, "heatmap-toggle").click()
    assert not heatmap.is_displayed() and browser.execute_script(opacity, heatmap) == "0"
    ActionChains(browser).send_keys("h").perform()
    assert heatmap.is_displayed() and browser.execute_script(opacity, heatmap) == "0.5"
    slider = browser.find_element(By.ID, "heatmap-opacity")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert browser.execute_script(opacity, heatmap) == "0.7"
    # The overlay lies on the slide's grid: it spans cols x step level-0 px from the top left.
    overlay_box = browser.execute_script(
        "var r = arguments[0].getBoundingClientRect(), v = document.querySelector('#viewer .openseadragon-canvas')"
        ".getBoundingClientRect(); return [r.width, v.width]",
        heatmap,
    )
    expected = slide.grid["cols"] * slide.grid["step"] / whole[2] * overlay_box[1]
    assert abs(overlay_box[0] - expected) < 3, (overlay_box, expected)

    browser.save_screenshot(str(tmp_path / "slide-heatmap.png"))

    # The regions: listed in rank order, outlined on the slide.
    items = browser.find_elements(By.CSS_SELECTOR, "#regions li.region")
    assert len(items) == len(regions)
    assert items[0].text.startswith("#1") and f"{regions[0].score:.3f}" in items[0].text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#viewer .region-box")) == len(regions)

    # Clicking the second one zooms to it; n goes to the third, p back to the second.
    items[1].find_element(By.CSS_SELECTOR, "button.region-go").click()
    second = view(browser, moved_from=whole)
    assert shows(second, regions[1]) and second[2] < whole[2] / 2, second
    assert "current" in items[1].get_attribute("class")
    ActionChains(browser).send_keys("n").perform()
    third = view(browser, moved_from=second)
    assert shows(third, regions[2]) and third != second, third
    assert "current" in items[2].get_attribute("class")
    browser.save_screenshot(str(tmp_path / "slide-region.png"))
    ActionChains(browser).send_keys("p").perform()
    assert view(browser, moved_from=third) == second

    # Enter opens the current region's patch on the case page.
    browser.execute_script("document.activeElement.blur()")
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait_text(browser, "h1", f"Case {case.accession}")
    assert browser.current_url.endswith(f"/cases/{case.pk}/#patch-{regions[1].patch_id}")
    assert browser.find_elements(By.CSS_SELECTOR, f'.patch[data-patch="{regions[1].patch_id}"]')

    browser.back()
    wait_text(browser, "h1", "mosaic-small.tiff")
    assert browser.execute_script("return window.cspViolations") == []


def test_case_page_and_viewer_follow_the_analysis_then_show_the_results(
    browser, live_server, institution, clinician, case, demo_model, settings
):
    """While the slide is analysed the case page and the viewer read its progress from the API;
    when it is done the viewer comes back with the result, the heatmap and the regions."""
    from selenium.webdriver.common.by import By

    from slides import jobs

    settings.SLIDE_CHUNK_TILES = 32  # 98 tissue tiles: 4 chunks, so that progress shows in steps
    slide = register_fixture_slide(case, clinician)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
    login(browser, live_server.url, clinician.username)
    browser.get(f"{live_server.url}/cases/{case.pk}/")
    wait_text(browser, "#case-slides", "mosaic-small.tiff")
    wait_text(browser, "#case-slides .slide-status", "Queued")

    # Tiled: the case page's row follows without reloading.
    jobs.slide_tile(slide_id=slide.pk)
    wait_text(browser, "#case-slides .slide-status", "Analysing tiles")
    wait_text(browser, "#case-slides .slide-tiles", f"0 / {TILES}")

    browser.find_element(By.LINK_TEXT, "mosaic-small.tiff").click()
    wait_text(browser, "h1", "mosaic-small.tiff")
    wait_text(browser, "#slide-status", "Analysing tiles")
    assert browser.find_element(By.ID, "progress-bar").is_displayed()
    assert texts(browser, "#tiles-total") == [str(TILES)]
    assert not browser.find_elements(By.ID, "heatmap-toggle")
    # The slide itself shows before its analysis is done.
    wait_for(
        browser,
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/slide_files/')).length",
    )
    browser.execute_script("document.getElementById('viewer').dataset.sameLoad = 'yes'")

    # One chunk in: the viewer shows the count, the bar and an estimate of the time left.
    jobs.slide_chunk_run(slide_id=slide.pk, index=0)
    wait_text(browser, "#tiles-finished", "32")
    assert browser.execute_script("return document.getElementById('progress-bar').value") == 32
    wait_text(browser, "#eta", "left")
    assert browser.execute_script("return document.getElementById('viewer').dataset.sameLoad") == "yes"

    jobs.slide_run_inline(slide.pk)
    wait_text(browser, "#slide-status", "Done", timeout=30)
    wait_text(browser, "#slide-result", "Tumour fraction")
    assert browser.execute_script("return document.getElementById('viewer').dataset.sameLoad") is None  # reloaded
    assert "refresh=auto" in browser.current_url  # not counted as the person's activity
    assert not browser.find_element(By.ID, "slide-progress").is_displayed()
    assert browser.find_element(By.ID, "heatmap-toggle").is_selected()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#regions li.region")) == slide.regions.count()

    # Back on the case page the row has the result.
    browser.find_element(By.LINK_TEXT, f"Case {case.accession}").click()
    wait_text(browser, "#case-slides .slide-status", "Done")
    slide.refresh_from_db()
    wait_text(browser, "#case-slides", f"{round(slide.tumour_fraction * 100)}%")
    assert browser.execute_script("return window.cspViolations") == []
