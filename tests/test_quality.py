"""Input quality control (inference.core.quality): real H&E tiles pass; blank, background, blurred and
non-H&E inputs end unassessable with the right code. No database. Thresholds: docs/quality-thresholds.md."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib
import pytest
from PIL import Image, ImageFilter

from inference.core.quality import MAX_BACKGROUND_FRACTION, QualityResult, assess
from tests.conftest import FIXTURE_PATCHES, fixture_patch, shared_data

REAL_FOLDERS = ("crc-val-he-7k-png", "nct-crc-he-100k-samples", "kather2016-tfds-224", "kather2016-tiles-150")
BACKGROUND_CLASSES = {"BACK", "08_EMPTY"}
IMAGE_SUFFIXES = {".png", ".tif"}
FIXTURES = sorted(p for p in FIXTURE_PATCHES.rglob("*") if p.suffix in IMAGE_SUFFIXES)
CODES = {"blank", "background", "out_of_focus", "not_he"}
MEASURES = {"grey_std", "background_fraction", "sharpness", "he_fraction"}

# What scripts/measure_quality.py measured on the 13 real background tiles (docs/quality-thresholds.md).
# The five dull 08_EMPTY tiles are grey glass with JPEG colour blotches, too dark to count as bright
# glass: they get past the background check but their colours are not H&E, so they still end unassessable.
BACKGROUND_TILE_CODES = {
    "BACK-AAQSHYMA.tif": "blank",
    "image_15_label_7.png": "background",
    "image_64_label_7.png": "background",
    "image_80_label_7.png": "background",
    "image_94_label_7.png": "background",
    "10A47_CRC-Prim-HE-06_005.tif_Row_1051_Col_1801.tif": "background",
    "10A7_CRC-Prim-HE-06_005.tif_Row_2251_Col_6451.tif": "background",
    "10AA1_CRC-Prim-HE-06_005.tif_Row_2551_Col_1201.tif": "background",
    "image_22_label_7.png": "not_he",
    "image_35_label_7.png": "not_he",
    "image_54_label_7.png": "not_he",
    "image_63_label_7.png": "not_he",
    "image_89_label_7.png": "not_he",
}


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def at_224(image: Image.Image) -> Image.Image:
    return image if image.size == (224, 224) else image.resize((224, 224), Image.Resampling.BILINEAR)


def shared_tiles(*, background: bool) -> list[Path]:
    data = shared_data()
    return sorted(
        path
        for folder in REAL_FOLDERS
        for path in (data / folder).rglob("*")
        if path.suffix in IMAGE_SUFFIXES and (path.parent.name in BACKGROUND_CLASSES) == background
    )


def describe(path: Path, result: QualityResult) -> str:
    numbers = ", ".join(f"{k}={v:.3f}" for k, v in result.measures.items())
    return f"{path.parent.name}/{path.name}: {result.code or 'ok'} ({numbers})"


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_committed_fixture_patch_passes(path):
    result = assess(rgb(path))
    assert result.ok, describe(path, result)
    assert result.code == "" and result.reason == ""


@pytest.mark.parametrize("size", [(224, 224), (150, 150), (512, 384)])
@pytest.mark.parametrize(
    "color", [(255, 255, 255), (244, 244, 244), (0, 0, 0), (128, 128, 128), (200, 120, 160), (120, 60, 160)]
)
def test_flat_fills_fail_as_blank(color, size):
    result = assess(Image.new("RGB", size, color))
    assert not result.ok
    assert result.code == "blank"
    assert result.reason


def test_real_background_tiles_fail_as_background_or_blank_as_measured():
    tiles = shared_tiles(background=True)
    assert len(tiles) == 13
    results = {path.name: assess(rgb(path)) for path in tiles}
    assert all(not r.ok for r in results.values()), [describe(Path(n), r) for n, r in results.items() if r.ok]
    assert {name: r.code for name, r in results.items()} == BACKGROUND_TILE_CODES
    assert sum(r.code in {"background", "blank"} for r in results.values()) == 8


def test_tissue_fragment_on_empty_glass_fails_as_background():
    tissue = rgb(fixture_patch("TUM-AACHEHDV.tif"))
    small = Image.new("RGB", (224, 224), (244, 244, 244))
    small.paste(tissue.crop((80, 80, 100, 100)), (80, 80))  # 0.8% of the patch is tissue
    result = assess(small)
    assert result.code == "background", result.measures
    assert result.measures["background_fraction"] > MAX_BACKGROUND_FRACTION

    large = Image.new("RGB", (224, 224), (244, 244, 244))
    large.paste(tissue.crop((64, 64, 128, 128)), (64, 64))  # 8% tissue: enough to assess
    assert assess(large).ok, assess(large).measures


@pytest.mark.parametrize("radius", [3, 5])
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_gaussian_blurred_fixture_patches_fail_as_out_of_focus(path, radius):
    result = assess(at_224(rgb(path)).filter(ImageFilter.GaussianBlur(radius)))
    assert result.code == "out_of_focus", describe(path, result)
    assert not result.ok


def test_gaussian_blurred_real_tissue_tiles_fail_as_out_of_focus():
    tiles = shared_tiles(background=False)
    results = {path: assess(at_224(rgb(path)).filter(ImageFilter.GaussianBlur(5))) for path in tiles}
    assert all(not r.ok for r in results.values()), [describe(p, r) for p, r in results.items() if r.ok]
    codes = Counter(r.code for r in results.values())
    # Blurring the palest tiles (NCT MUC-AAQTMGMA, DEB-ACHGAMCT) also makes them look like empty glass
    # or a flat image; every other one is caught by the focus check.
    assert codes["out_of_focus"] >= len(tiles) - 2, codes
    assert set(codes) <= {"out_of_focus", "background", "blank"}, codes


def test_grace_hopper_photograph_fails_as_not_he():
    result = assess(rgb(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    assert not result.ok
    assert result.code == "not_he", result.measures
    assert "H&E" in result.reason


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_greyscale_copy_of_fixture_patch_fails_as_not_he(path):
    result = assess(rgb(path).convert("L").convert("RGB"))
    assert result.code == "not_he", describe(path, result)
    assert result.measures["he_fraction"] == 0.0


def test_greyscale_copies_of_real_tissue_tiles_fail_as_not_he():
    results = {path: assess(rgb(path).convert("L").convert("RGB")) for path in shared_tiles(background=False)}
    wrong = [describe(p, r) for p, r in results.items() if r.code != "not_he"]
    assert not wrong, wrong


def test_greyscale_mode_image_is_accepted_and_fails_as_not_he():
    assert assess(rgb(fixture_patch("TUM-AACHEHDV.tif")).convert("L")).code == "not_he"


def test_all_152_real_non_background_tiles_in_shared_data_pass():
    tiles = shared_tiles(background=False)
    assert len(tiles) == 152
    failures = [describe(path, result) for path in tiles if not (result := assess(rgb(path))).ok]
    assert not failures, failures


def test_150px_fixture_tile_and_its_224px_upsample_get_the_same_verdict():
    tile = rgb(fixture_patch("1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif"))
    assert tile.size == (150, 150)
    for method in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.NEAREST):
        big = tile.resize((224, 224), method)
        assert (assess(tile).ok, assess(tile).code) == (assess(big).ok, assess(big).code)
    assert assess(tile).ok


def test_every_150px_shared_tile_and_its_224px_upsample_get_the_same_verdict():
    tiles = sorted((shared_data() / "kather2016-tiles-150").rglob("*.tif"))
    assert len(tiles) == 24
    for path in tiles:
        tile = rgb(path)
        for method in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
            small, big = assess(tile), assess(tile.resize((224, 224), method))
            assert small.code == big.code, (describe(path, small), describe(path, big))


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (224, 224), (255, 255, 255)),
        Image.new("RGB", (224, 224), (244, 244, 244)),
        None,  # a real fixture patch (passes)
    ],
    ids=["white", "glass", "tissue"],
)
def test_measures_are_plain_floats(image):
    result = assess(image if image is not None else rgb(fixture_patch("NORM-AAAWMSFI.tif")))
    # Mean stain densities need tissue pixels: a blank image has none.
    stains = {"od_h", "od_e"} if image is None else set()
    assert set(result.measures) == MEASURES | stains
    assert all(type(value) is float for value in result.measures.values()), result.measures


def test_failed_results_carry_a_known_code_and_a_reason_and_passing_ones_neither():
    fixture = rgb(fixture_patch("NORM-TCGA-CWFDHWAH.png"))
    failing = [
        Image.new("RGB", (224, 224), (250, 250, 250)),
        fixture.filter(ImageFilter.GaussianBlur(4)),
        fixture.convert("L").convert("RGB"),
    ]
    for image in failing:
        result = assess(image)
        assert not result.ok and result.code in CODES and result.reason
    passing = assess(fixture)
    assert passing.ok and passing.code == "" and passing.reason == ""
