"""The resumable slide upload (slides/_upload_widget.html, slides/static/slides/upload.js) in real
headless Chromium against the live server: the committed pyramidal TIFF sent in small pieces, with
the network cut once mid-upload (Chromium's own offline mode, through DevTools) and with the page
reloaded mid-upload; each time the upload goes on from the server's offset and ends as one slide,
byte for byte the file. A file that is not a slide shows the server's reason and leaves nothing."""

from __future__ import annotations

import hashlib
import time

import pytest

from accounts.models import User
from slides import api as slides_api
from slides.models import Slide, SlideUpload
from tests.browser import login, wait_text
from tests.conftest import ROOT, fixture_patch, make_user, new_case, stored_files

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FIXTURE_SLIDE = ROOT / "tests" / "fixtures" / "slides" / "mosaic-small.tiff"
SIZE = FIXTURE_SLIDE.stat().st_size  # about 1.6 MB
PIECE_BYTES = 64 * 1024  # the server's piece cap here: about 25 pieces for the fixture
UPLOAD_BYTES_PER_S = 150 * 1024  # Chromium's emulated uplink: about 10 s for the fixture


@pytest.fixture
def slide_settings(settings):
    """Small pieces, so that the fixture takes many; the upload and cache folders are the test's own
    (tests/conftest.py)."""
    settings.SLIDE_UPLOAD_PIECE_BYTES = PIECE_BYTES
    return settings


@pytest.fixture
def pieces(monkeypatch):
    """Every piece the server is sent, as (offset sent, bytes the server held then, length), read
    by a spy around the real service (the API view calls it under this name)."""
    seen: list[tuple[int, int, int]] = []
    real = slides_api.slide_upload_append

    def spy(*, upload, offset, data, length):
        upload.refresh_from_db(fields=["received_bytes"])
        seen.append((offset, upload.received_bytes, length))
        return real(upload=upload, offset=offset, data=data, length=length)

    monkeypatch.setattr(slides_api, "slide_upload_append", spy)
    return seen


@pytest.fixture
def uploader(browser, live_server, institution, slide_settings):
    """A clinician on the slide upload page of a new case: (browser, case, page URL)."""
    clinician = make_user(institution, User.Role.CLINICIAN, username="dr-slide")
    case = new_case(clinician, accession="S26-WSI")
    login(browser, live_server.url, "dr-slide")
    url = f"{live_server.url}/cases/{case.pk}/slides/upload/"
    browser.get(url)
    wait_text(browser, "h1", "Upload a whole-slide image")
    browser.execute_cdp_cmd("Network.enable", {})
    return browser, case, url


def network(browser, *, offline: bool = False, upload_bytes_per_s: int = -1) -> None:
    """Chromium's DevTools network emulation: offline, or an uplink of this many bytes/s (-1: as is)."""
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": upload_bytes_per_s},
    )


def piece_bytes(browser, size: int) -> None:
    """A piece size of the page's own (the widget's data-piece-bytes), below the server's cap."""
    browser.execute_script(f"document.getElementById('slide-upload').dataset.pieceBytes = '{size}'")


def choose(browser, path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "slide-file").send_keys(str(path))


def click_upload(browser) -> None:
    from selenium.webdriver.common.by import By

    button = browser.find_element(By.ID, "slide-upload-start")
    deadline = time.monotonic() + 10
    while not button.is_enabled() and time.monotonic() < deadline:  # enabled once the file is looked up
        time.sleep(0.1)
    button.click()


def state(browser) -> str:
    return browser.execute_script("return document.getElementById('slide-upload').dataset.state")


def wait_state(browser, *states: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (now := state(browser)) in states:
            return now
        time.sleep(0.1)
    raise AssertionError(f"the widget never reached {states}; it is {state(browser)!r}")


def received(case) -> int:
    return SlideUpload.objects.get(case=case).received_bytes


def wait_received(case, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        upload = SlideUpload.objects.filter(case=case).first()
        if upload and upload.received_bytes >= at_least:
            return upload.received_bytes
        time.sleep(0.05)
    raise AssertionError(f"the server never had {at_least} bytes")


def assert_one_slide_as_uploaded(case) -> Slide:
    upload = SlideUpload.objects.get(case=case)  # one upload: it was never started over
    assert upload.status == SlideUpload.Status.COMPLETE
    assert upload.received_bytes == upload.size_bytes == SIZE
    slide = Slide.objects.get(case=case)
    assert upload.slide == slide
    assert slide.sha256 == hashlib.sha256(FIXTURE_SLIDE.read_bytes()).hexdigest()
    assert slide.size_bytes == SIZE
    return slide


def test_upload_interrupted_once_resumes_from_server_offset_and_is_analysed(uploader, pieces, demo_model, tmp_path):
    from slides.jobs import slide_run_inline

    browser, case, _ = uploader
    network(browser, upload_bytes_per_s=UPLOAD_BYTES_PER_S)
    choose(browser, FIXTURE_SLIDE)
    click_upload(browser)
    wait_state(browser, "uploading")
    wait_text(browser, "#slide-upload-figures", "of 1.6 MB")
    cut_at = wait_received(case, SIZE // 3)

    network(browser, offline=True)
    wait_state(browser, "retrying")
    wait_text(browser, "#slide-upload-status", "Retrying in")
    time.sleep(2)  # a retry or two meets the network still down
    pieces_while_offline = len(pieces)
    browser.save_screenshot(str(tmp_path / "offline.png"))
    network(browser, upload_bytes_per_s=UPLOAD_BYTES_PER_S)

    wait_state(browser, "analysing", "done")
    wait_text(browser, "#slide-upload-analysis", "Uploaded: analysing")
    slide = assert_one_slide_as_uploaded(case)
    # Every piece was sent from exactly where the server stood (no 409, nothing sent twice), and
    # after the cut the upload went on from the server's offset, not from 0.
    assert all(offset == held for offset, held, _ in pieces), pieces
    resumed = pieces[pieces_while_offline:]
    assert resumed and resumed[0][0] >= cut_at > 0
    assert all(length <= PIECE_BYTES for _, _, length in pieces)
    assert sum(length for _, _, length in pieces) < 2 * SIZE
    link = browser.find_element("id", "slide-upload-viewer")
    assert link.get_attribute("href").endswith(f"/slides/{slide.pk}/")
    assert link.text == "mosaic-small.tiff"
    assert browser.find_element("id", "slide-upload-figures").text.startswith("1.6 MB of 1.6 MB · 100%")

    # The analysis (the workers' functions, run here): the page follows it until it is done.
    assert slide_run_inline(slide.pk).status == Slide.Status.DONE
    wait_state(browser, "done", timeout=20)
    wait_text(browser, "#slide-upload-analysis", "Done")
    wait_text(browser, "#slide-upload-tiles", "tissue tiles analysed")
    browser.save_screenshot(str(tmp_path / "done.png"))


def test_reload_mid_upload_then_same_file_resumes_from_server_offset(uploader, pieces):
    browser, case, url = uploader
    piece_bytes(browser, 32768)
    network(browser, upload_bytes_per_s=UPLOAD_BYTES_PER_S)
    choose(browser, FIXTURE_SLIDE)
    click_upload(browser)
    wait_received(case, SIZE // 3)

    browser.get(url)  # the page is left mid-upload (a reload, a closed tab)
    wait_text(browser, "h1", "Upload a whole-slide image")
    time.sleep(1)  # the server is done with the piece the reload cut short
    assert state(browser) == "idle"
    piece_bytes(browser, 32768)
    choose(browser, FIXTURE_SLIDE)
    wait_text(browser, "#slide-upload-note", "% already on the server")
    held = received(case)
    assert 0 < held < SIZE
    note = browser.find_element("id", "slide-upload-note").text
    assert note.startswith(f"Resuming: {100 * held // SIZE}% already on the server"), note
    assert browser.find_element("id", "slide-upload-start").text == "Resume upload"

    network(browser)
    sent_before_resuming = len(pieces)
    click_upload(browser)
    wait_state(browser, "analysing", "done")
    assert_one_slide_as_uploaded(case)
    after_reload = pieces[sent_before_resuming:]
    assert after_reload[0][0] == held  # from the server's offset, not from 0
    assert all(offset == server for offset, server, _ in pieces), pieces
    assert all(length <= 32768 for _, _, length in pieces)
    assert len(after_reload) == -(-(SIZE - held) // 32768)  # only the rest was sent


def test_cancel_mid_upload_removes_it(uploader, pieces, slide_settings):
    from selenium.webdriver.common.by import By

    browser, case, _ = uploader
    network(browser, upload_bytes_per_s=UPLOAD_BYTES_PER_S)
    choose(browser, FIXTURE_SLIDE)
    click_upload(browser)
    wait_received(case, PIECE_BYTES)
    browser.find_element(By.ID, "slide-upload-cancel").click()
    wait_text(browser, "#slide-upload-status", "Upload cancelled: nothing was kept.")
    assert state(browser) == "cancelled"
    upload = SlideUpload.objects.get(case=case)
    assert upload.status == SlideUpload.Status.ABORTED
    assert not any(slide_settings.SLIDE_UPLOAD_DIR.iterdir())
    assert not Slide.objects.exists()
    # Chosen again, the file starts a new upload: nothing of the cancelled one is offered.
    choose(browser, FIXTURE_SLIDE)
    time.sleep(1)
    assert browser.find_element(By.ID, "slide-upload-note").text == ""
    assert browser.find_element(By.ID, "slide-upload-start").text == "Upload"
    assert browser.execute_script("return Object.keys(localStorage).length") == 0


def test_wrong_extension_shows_server_reason_and_stores_nothing(uploader, pieces, slide_settings, _media_root):
    browser, _, _ = uploader
    choose(browser, fixture_patch("TUM-TCGA-KECNIDCQ.png"))
    click_upload(browser)
    wait_state(browser, "error")
    wait_text(browser, "#slide-upload-error", "'.png' is not a whole-slide image format")
    assert not SlideUpload.objects.exists() and not Slide.objects.exists()
    assert not pieces
    upload_dir = slide_settings.SLIDE_UPLOAD_DIR
    assert not upload_dir.exists() or not any(upload_dir.iterdir())
    assert not stored_files(_media_root)


def test_truncated_slide_rejected_after_last_piece_shows_reason(uploader, slide_settings, _media_root, tmp_path):
    from selenium.webdriver.common.by import By

    browser, case, _ = uploader
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(FIXTURE_SLIDE.read_bytes()[: SIZE // 2])
    choose(browser, truncated)
    click_upload(browser)
    wait_state(browser, "error")
    upload = SlideUpload.objects.get(case=case)
    assert upload.status == SlideUpload.Status.REJECTED and upload.error
    assert browser.find_element(By.ID, "slide-upload-error").text == upload.error  # the server's reason
    assert not Slide.objects.exists()
    assert not any(slide_settings.SLIDE_UPLOAD_DIR.iterdir())
    assert not stored_files(_media_root)
    # Nothing is offered for resuming: the same file chosen again starts over.
    choose(browser, truncated)
    time.sleep(1)
    assert browser.find_element(By.ID, "slide-upload-note").text == ""
    assert browser.execute_script("return Object.keys(localStorage).length") == 0
