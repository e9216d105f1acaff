"""inference.core: Django-free, reads the public dataset layouts, predicts with the demo model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from inference.core import CANONICAL_CLASSES, decode_rgb, load_model, predict, preprocess, scan_folder
from inference.core.datasets import manifest_sha256
from tests.conftest import DEMO_MODEL, FIXTURE_PATCHES, ROOT, fixture_patch, png_bytes, shared_data


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("inference.core", ("django", "tensorflow", "keras")),
        ("inference.core.evaluation", ("django", "tensorflow", "matplotlib")),
        ("inference.core.quality", ("django", "tensorflow", "keras")),
    ],
)
def test_core_imports_without_django_or_heavy_libraries(module, forbidden):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        f"import sys, {module}; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r}]; "
        "assert not bad, bad; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _tile(path, color=(180, 90, 160)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


def test_scan_reads_kather2016_numbered_folders(tmp_path):
    for folder in ("01_TUMOR", "03_COMPLEX", "06_MUCOSA", "08_EMPTY"):
        _tile(
            tmp_path / "Kather_texture_2016_image_tiles_5000" / folder / "1A11_CRC-Prim-HE-07_022.tif_Row_1_Col_1.tif"
        )
    images = scan_folder(tmp_path / "Kather_texture_2016_image_tiles_5000")
    assert sorted(i.label for i in images) == ["BACK", "NORM", "TUM"]  # 03_COMPLEX has no canonical class
    assert {i.group for i in images} == {"CRC-Prim-HE-07"}


def test_scan_reads_nct_layout_and_filters_classes(tmp_path):
    for cls in ("NORM", "TUM", "ADI"):
        _tile(tmp_path / "NCT-CRC-HE-100K" / cls / f"{cls}-AAAA.tif")
    (tmp_path / "NCT-CRC-HE-100K" / "TUM" / "notes.txt").write_text("not an image")
    images = scan_folder(tmp_path / "NCT-CRC-HE-100K", classes=("NORM", "TUM"))
    assert [(i.label, i.path.name) for i in images] == [("NORM", "NORM-AAAA.tif"), ("TUM", "TUM-AAAA.tif")]


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "random").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(tmp_path)


def test_scan_reads_every_shared_dataset():
    data = shared_data()
    counts = {name: len(scan_folder(data / name)) for name in ("crc-val-he-7k-png", "nct-crc-he-100k-samples")}
    assert counts == {"crc-val-he-7k-png": 32, "nct-crc-he-100k-samples": 9}
    kather = scan_folder(data / "kather2016-tfds-224")
    assert len(kather) == 100 - 13  # 03_COMPLEX (13 files) skipped
    assert {i.label for i in kather} == set(CANONICAL_CLASSES) - {"MUC", "MUS"}


def test_manifest_hash_changes_with_content(tmp_path):
    _tile(tmp_path / "d" / "TUM" / "a.png")
    first = manifest_sha256(scan_folder(tmp_path / "d"))
    _tile(tmp_path / "d" / "TUM" / "a.png", color=(1, 2, 3))
    assert manifest_sha256(scan_folder(tmp_path / "d")) != first


def test_preprocess_resizes_and_scales_to_minus_one_one():
    small = decode_rgb(fixture_patch("1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif").read_bytes())
    assert small.size == (150, 150)
    batch = preprocess([small, decode_rgb(png_bytes(color=(0, 255, 0)))], 224)
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert np.allclose(batch[1, 0, 0], [-1.0, 1.0, -1.0])


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(b"not an image")


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL)


def test_demo_model_metadata_says_what_it_was_trained_on(demo):
    meta = demo.metadata
    assert tuple(meta["classes"]) == CANONICAL_CLASSES and meta["input_size"] == 224
    assert set(meta["training"]["sources"]) == {
        "nct-crc-he-100k-samples",
        "crc-val-he-7k-png",
        "kather2016-tfds-224",
        "kather2016-tiles-150",
    }
    assert meta["training"]["weights"] == "mobilenet_v2_0.35_224_no_top.h5"
    test = meta["metrics"]["test"]
    assert test["n"] > 0 and 0 < test["accuracy"] <= 1 and set(test["per_class"]) <= set(CANONICAL_CLASSES)
    assert set(meta["training"]["leave_one_dataset_out"]) == set(meta["training"]["sources"])
    assert meta["calibration"]["temperature"] > 0
    assert (DEMO_MODEL / "model.keras").stat().st_size < 5_000_000


def test_demo_model_classifies_all_fixture_patches(demo):
    images = scan_folder(FIXTURE_PATCHES)
    assert len(images) == 7
    batch = preprocess([decode_rgb(i.path.read_bytes()) for i in images], demo.input_size)
    results = predict(demo, batch)
    assert [r.label for r in results] == [i.label for i in images], [r.scores for r in results]
    for result in results:
        assert abs(sum(result.scores.values()) - 1) < 1e-4 and result.seconds > 0


def test_predict_same_scores_in_a_batch_and_alone(demo):
    image = decode_rgb(fixture_patch("TUM-AACHEHDV.tif").read_bytes())
    other = decode_rgb(fixture_patch("NORM-AAAWMSFI.tif").read_bytes())
    alone = predict(demo, preprocess([image], 224))[0].scores
    batched = predict(demo, preprocess([other, image], 224))[1].scores
    assert max(abs(alone[c] - batched[c]) for c in alone) < 1e-5


def test_load_model_refuses_incomplete_or_inconsistent_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.keras"):
        load_model(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(DEMO_MODEL, broken)
    meta = json.loads((broken / "metadata.json").read_text())
    meta["classes"] = ["NORM", "TUM"]
    (broken / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the 2 classes"):
        load_model(broken)
    del meta["input_size"]
    (broken / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks input_size"):
        load_model(broken)
    shutil.copy(DEMO_MODEL / "metadata.json", broken / "metadata.json")
    (broken / "model.keras").write_bytes(b"changed")
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(broken)
