"""The slide viewer's endpoints through Django's test client: its page, the Deep Zoom descriptor
and tiles of the committed real pyramidal TIFF (tests/fixtures/slides/mosaic-small.tiff), their
caching, the AI heatmap, and who may see what (another institution: 404 everywhere, tiles
included; a lab manager: 403)."""

from __future__ import annotations

import io
import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import openslide
import pytest
from django.template.loader import render_to_string
from django.test import RequestFactory
from django.urls import include, path
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from accounts.models import User
from cloudiopsy import urls as project_urls
from slides import viewer
from slides.models import Slide
from slides.selectors import slides_of_case
from tests.conftest import ROOT, make_user, new_case, verified_login

FIXTURE_SLIDE = ROOT / "tests" / "fixtures" / "slides" / "mosaic-small.tiff"
TRUTH = json.loads(FIXTURE_SLIDE.with_suffix(".json").read_text())
WIDTH, HEIGHT = TRUTH["width"], TRUTH["height"]  # 3584 x 2464 px at 0.5 µm/px

# The project's URLs, with the viewer's mounted where cloudiopsy/urls.py mounts them
# (path("slides/", include("slides.urls"))) until it does; the browser test uses these too.
urlpatterns = list(project_urls.urlpatterns)
if not any(getattr(pattern, "app_name", None) == "slides" for pattern in urlpatterns):
    urlpatterns.insert(0, path("slides/", include("slides.urls")))
handler400, handler403 = project_urls.handler400, project_urls.handler403
handler404, handler500 = project_urls.handler404, project_urls.handler500

pytestmark = pytest.mark.urls(__name__)


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Tiles are cached by the slide's checksum, the same file in every test: start empty."""
    viewer._cache().clear()
    viewer.generators.clear()
    yield
    viewer.generators.clear()


def register_fixture_slide(case, actor) -> Slide:
    from slides.services import slide_register

    return slide_register(case=case, actor=actor, path=FIXTURE_SLIDE, name="mosaic-small.tiff")


def analyse(slide: Slide) -> Slide:
    from slides.jobs import slide_run_inline

    return slide_run_inline(slide.pk)


@pytest.fixture
def slide(case, clinician):
    return register_fixture_slide(case, clinician)


@pytest.fixture
def analysed(slide, demo_model):
    done = analyse(slide)
    assert done.status == Slide.Status.DONE, done.failure_reason
    return done


def urls(slide: Slide) -> dict[str, str]:
    return {
        "page": f"/slides/{slide.pk}/",
        "dzi": f"/slides/{slide.pk}/slide.dzi",
        "tile": f"/slides/{slide.pk}/slide_files/0/0_0.jpeg",
        "heatmap": f"/slides/{slide.pk}/heatmap.png",
    }


def viewer_config(html: str) -> dict:
    """The page's configuration of the viewer (a JSON data block, not a script)."""
    return json.loads(re.search(r'<script id="viewer-config" type="application/json">(.*?)</script>', html, re.S)[1])


def top_level(slide: Slide) -> int:
    return math.ceil(math.log2(max(slide.width, slide.height)))


def test_dzi_describes_the_slide_at_full_size(clinician_client, slide):
    response = clinician_client.get(urls(slide)["dzi"])
    assert response.status_code == 200
    assert response["Content-Type"] == "application/xml"
    image = ET.fromstring(response.content)
    assert image.tag.endswith("Image")
    assert (image.get("TileSize"), image.get("Overlap"), image.get("Format")) == ("254", "1", "jpeg")
    size = next(iter(image))
    assert (int(size.get("Width")), int(size.get("Height"))) == (WIDTH, HEIGHT)


def test_deep_zoom_geometry_matches_openslide_without_opening_the_file():
    with openslide.OpenSlide(str(FIXTURE_SLIDE)) as handle:
        assert viewer.deep_zoom_tiles(WIDTH, HEIGHT) == list(DeepZoomGenerator(handle, 254, 1).level_tiles)
    for size in [(1, 1), (254, 254), (255, 1), (1017, 3), (3, 2049)]:
        with openslide.ImageSlide(Image.new("RGB", size)) as small:
            assert viewer.deep_zoom_tiles(*size) == list(DeepZoomGenerator(small, 254, 1).level_tiles), size


def test_tiles_are_jpegs_of_deep_zoom_size_with_the_slide_in_them(clinician_client, slide):
    level = top_level(slide)  # full resolution
    cols, rows = math.ceil(WIDTH / 254), math.ceil(HEIGHT / 254)  # 15 x 10
    for col, row in [(0, 0), (7, 4), (cols - 1, rows - 1)]:
        response = clinician_client.get(f"/slides/{slide.pk}/slide_files/{level}/{col}_{row}.jpeg")
        assert response.status_code == 200
        assert response["Content-Type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG"
        # 254 px, plus 1 px of overlap on each side that has a neighbour.
        width = min(254 * (col + 1), WIDTH) - 254 * col + (col > 0) + (col < cols - 1)
        height = min(254 * (row + 1), HEIGHT) - 254 * row + (row > 0) + (row < rows - 1)
        assert image.size == (width, height)
        if (col, row) == (7, 4):  # the middle of the slide is tissue, not blank glass
            assert np.asarray(image.convert("L")).std() > 10
    # The whole slide in one tile at the level where it fits.
    fits = top_level(slide) - math.ceil(math.log2(max(WIDTH, HEIGHT) / 254))
    image = Image.open(io.BytesIO(clinician_client.get(f"/slides/{slide.pk}/slide_files/{fits}/0_0.jpeg").content))
    assert max(image.size) <= 254 and image.size[0] == math.ceil(WIDTH / 2 ** (top_level(slide) - fits))


def test_tiles_are_cached_by_the_server_and_revalidated_by_etag(clinician_client, slide):
    level = top_level(slide)
    tile = f"/slides/{slide.pk}/slide_files/{level}/3_2.jpeg"
    first = clinician_client.get(tile)
    assert first.status_code == 200
    assert first["Cache-Control"] == "no-store, private"  # patient data: never kept by the browser
    assert "Cookie" in first["Vary"]  # kept per session: the next person signed in finds nothing stored
    etag = first["ETag"]
    assert etag.startswith('"') and slide.sha256[:32] in etag

    # The browser asks again with its copy's ETag: 304, no body.
    again = clinician_client.get(tile, HTTP_IF_NONE_MATCH=etag)
    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == etag

    # Without the ETag (another browser, another web thread): from Django's cache, the same bytes,
    # and no slide file opened for it.
    viewer.generators.clear()
    cached = clinician_client.get(tile)
    assert cached.status_code == 200 and cached.content == first.content
    assert len(viewer.generators._items) == 0
    # Another tile of another address has another ETag.
    other = clinician_client.get(f"/slides/{slide.pk}/slide_files/{level}/3_3.jpeg")
    assert other["ETag"] != etag
    assert clinician_client.get(tile, HTTP_IF_NONE_MATCH=other["ETag"]).status_code == 200


def test_bad_tile_addresses_are_404_not_500(clinician_client, slide):
    level = top_level(slide)
    cols, rows = math.ceil(WIDTH / 254), math.ceil(HEIGHT / 254)
    for address in [
        f"{level + 1}/0_0",  # no such level
        f"{level}/{cols}_0",  # one column past the edge
        f"{level}/0_{rows}",  # one row past the edge
        "0/1_0",  # level 0 is one 1 x 1 px tile
        f"{level}/99999999999999999999_0",
        f"{level}/-1_0",
        f"{level}/a_b",
        f"{level}/0_0.png",
    ]:
        response = clinician_client.get(f"/slides/{slide.pk}/slide_files/{address}.jpeg")
        assert response.status_code == 404, address
    assert clinician_client.get(f"/slides/{slide.pk + 1000}/slide.dzi").status_code == 404


def test_other_institution_gets_404_on_page_dzi_tiles_and_heatmap(client, analysed, other_institution):
    client.force_login(make_user(other_institution, User.Role.CLINICIAN))
    for name, url in urls(analysed).items():
        response = client.get(url)
        assert response.status_code == 404, name
        assert b"mosaic-small" not in response.content
    # Even a browser that somehow holds a tile's ETag learns nothing.
    level = top_level(analysed)
    tile = f"/slides/{analysed.pk}/slide_files/{level}/0_0.jpeg"
    etag = f'"{analysed.sha256[:32]}-254-1-{level}-0-0"'
    assert client.get(tile, HTTP_IF_NONE_MATCH=etag).status_code == 404


def test_lab_manager_gets_the_403_page_and_anonymous_the_login(client, slide, institution):
    manager = make_user(institution, User.Role.LAB_MANAGER)
    verified_login(client, manager)
    for name, url in urls(slide).items():
        response = client.get(url)
        assert response.status_code == 403, name
        assert b"Lab managers see the dashboards" in response.content
    client.logout()
    for name, url in urls(slide).items():
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"], name


def test_heatmap_is_404_until_results_then_a_png_of_the_grid(clinician_client, slide, demo_model):
    heatmap = urls(slide)["heatmap"]
    response = clinician_client.get(heatmap)
    assert response.status_code == 404
    assert b"no results yet" in response.content  # says why

    slide = analyse(slide)
    assert slide.status == Slide.Status.DONE, slide.failure_reason
    response = clinician_client.get(heatmap)
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["Cache-Control"] == "no-store, private"
    assert clinician_client.get(heatmap, HTTP_IF_NONE_MATCH=response["ETag"]).status_code == 304
    image = Image.open(io.BytesIO(response.content))
    grid = slide.grid
    assert image.size == (grid["cols"], grid["rows"])
    # The known tumour region is red (TUM probability high), the normal mucosa blue, glass clear.
    assert (grid["cols"], grid["rows"]) == (len(TRUTH["layout"][0]), len(TRUTH["layout"]))
    pixels = np.asarray(image.convert("RGBA")).astype(int)
    truth = np.array(TRUTH["layout"], dtype=object)
    tumour, normal, glass = (truth == "TUM"), (truth == "NORM"), np.equal(truth, None)
    assert (pixels[glass][:, 3] == 0).all()
    redness = pixels[..., 0] - pixels[..., 2]
    assert redness[tumour].mean() > 50 > redness[normal].mean()


def test_slide_page_shows_facts_result_regions_and_the_viewer(clinician_client, analysed):
    response = clinician_client.get(urls(analysed)["page"])
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("mosaic-small.tiff", f"{WIDTH} \u00d7 {HEIGHT} px", "0.500 µm/px", analysed.vendor, "Levels", "3:"):
        assert text in html, text
    assert 'id="suspected-tumour"' in html and "Tumour fraction" in html
    # The demo model has no validation at this institution: its default threshold, said so.
    assert "not validated at this site" in html
    # OpenSeadragon from our static files, the config as JSON data, scripts with the nonce only.
    assert "/static/slides/openseadragon/openseadragon.min.js" in html
    assert "cdn" not in html.lower()
    config = viewer_config(html)
    grid = analysed.grid
    assert config["heatmap"] == {
        "url": f"/slides/{analysed.pk}/heatmap.png",
        "width": grid["cols"] * grid["step"],
        "height": grid["rows"] * grid["step"],
    }
    assert config["dzi"] == f"/slides/{analysed.pk}/slide.dzi"
    regions = list(analysed.regions.order_by("rank"))
    assert regions and [r["rank"] for r in config["regions"]] == [r.rank for r in regions]
    first = config["regions"][0]
    assert first["patch"] == f"/cases/{analysed.case_id}/#patch-{regions[0].patch_id}"
    assert f'href="/cases/{analysed.case_id}/#patch-{regions[0].patch_id}"' in html
    assert "Content-Security-Policy" in response.headers
    policy = response.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]
    # The most suspicious region lies in the known tumour region.
    truth = TRUTH["layout"]
    assert truth[regions[0].row][regions[0].col] == "TUM"


def test_pending_slide_page_shows_progress_and_no_overlay(clinician_client, slide):
    response = clinician_client.get(urls(slide)["page"])
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="progress-bar"' in html and "Queued" in html
    assert 'id="heatmap-toggle"' not in html and 'id="slide-result"' not in html
    config = viewer_config(html)
    assert config["pending"] is True and config["heatmap"] is None and config["regions"] == []
    assert config["api"] == f"/api/v1/slides/{slide.pk}/"


def test_case_slides_partial_lists_the_case_slides_with_links(slide, clinician, institution):
    other_case = new_case(clinician, accession="S2", mrn="M2")
    request = RequestFactory().get("/")
    request.user = clinician
    html = render_to_string("slides/_case_slides.html", {"slides": slides_of_case(case=slide.case)}, request=request)
    assert f'href="/slides/{slide.pk}/"' in html
    assert "mosaic-small.tiff" in html and "Queued" in html and "slide-progress" in html
    empty = render_to_string("slides/_case_slides.html", {"slides": slides_of_case(case=other_case)}, request=request)
    assert "No slides uploaded yet." in empty and "<script" not in empty


def test_case_page_names_the_slide_region_each_patch_came_from(client, pathologist, case, demo_model):
    from slides.jobs import slide_run_inline
    from slides.services import slide_register
    from tests.conftest import verified_login

    slide = slide_run_inline(slide_register(case=case, actor=case.created_by, path=FIXTURE_SLIDE, name="m.tiff").pk)
    verified_login(client, pathologist)
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert page.count('class="muted slide-region"') == 12
    assert f'href="/slides/{slide.pk}/"' in page and "Region 1 of slide" in page
