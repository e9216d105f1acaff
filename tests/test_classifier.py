"""The classifier pipeline: datasets, augmentation, training, serving parity, heatmaps, registry."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from inference.core import pipeline
from inference.core.augment import augment, hed_jitter
from inference.core.datasets import leakage_groups, scan_folder
from inference.core.explain import render_heatmap
from inference.core.model import Predictor, file_sha256
from inference.core.preprocessing import decode_rgb, encode_for_storage, preprocess
from inference.core.training import split_by_group
from tests.conftest import DEMO_MODEL, FIXTURE_PATCHES, fixture_patch, shared_data


def _tile(path, color=(180, 90, 160), size=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    Image.fromarray(np.clip(np.array(color, dtype=np.int16) + noise - 30, 0, 255).astype(np.uint8)).save(path)


def test_medmnist_style_folders_map_to_canonical_classes(tmp_path):
    for folder in ("adipose", "Colorectal adenocarcinoma epithelium", "normal-colon-mucosa", "3"):
        _tile(tmp_path / "pathmnist" / folder / "a.png")
    labels = sorted(i.label for i in scan_folder(tmp_path / "pathmnist"))
    assert labels == ["ADI", "LYM", "NORM", "TUM"]  # "3" is PathMNIST's label index of LYM


def test_scale_comes_from_dataset_json_or_layout(tmp_path):
    _tile(tmp_path / "lab" / "TUM" / "a.png")
    assert scan_folder(tmp_path / "lab")[0].um_per_px == 0.5
    (tmp_path / "lab" / "dataset.json").write_text(json.dumps({"um_per_px": 0.25}))
    assert scan_folder(tmp_path / "lab")[0].um_per_px == 0.25
    _tile(tmp_path / "k16" / "01_TUMOR" / "a.tif", size=150)
    assert scan_folder(tmp_path / "k16")[0].um_per_px == 0.495  # Kather 2016: 150 px tiles of 74 µm
    _tile(tmp_path / "k16-resampled" / "01_TUMOR" / "a.tif", size=64)
    assert scan_folder(tmp_path / "k16-resampled")[0].um_per_px == round(0.495 * 150 / 64, 4)


def test_near_identical_tiles_share_a_leakage_group(tmp_path):
    (tmp_path / "a" / "TUM").mkdir(parents=True)
    shutil.copy(fixture_patch("TUM-TCGA-KECNIDCQ.png"), tmp_path / "a" / "TUM" / "one.png")
    shutil.copy(fixture_patch("TUM-TCGA-NHQGDFVF.png"), tmp_path / "a" / "TUM" / "other.png")
    # The same tile re-compressed as JPEG: a near-identical copy under another name.
    Image.open(tmp_path / "a" / "TUM" / "one.png").save(tmp_path / "a" / "TUM" / "one-copy.jpg", quality=85)
    images = scan_folder(tmp_path / "a")
    groups = dict(zip((i.path.name for i in images), leakage_groups(images), strict=True))
    assert groups["one.png"] == groups["one-copy.jpg"] != groups["other.png"]


def test_split_never_puts_a_group_on_two_sides(tmp_path):
    for slide in range(8):
        for tile in range(3):
            for folder in ("01_TUMOR", "06_MUCOSA"):
                _tile(tmp_path / "k" / folder / f"{tile}_CRC-Prim-HE-0{slide}.tif_Row_{tile}_Col_{folder[:2]}.png")
    images = scan_folder(tmp_path / "k")
    train, val, test = split_by_group(images, 0.25, 0.25, seed=3)
    assert len(train) + len(val) + len(test) == len(images)
    sides = [{i.group for i in part} for part in (train, val, test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert val and test and {i.label for i in test} == {"TUM", "NORM"}
    assert split_by_group(images, 0.25, 0.25, seed=3) == (train, val, test)


def test_augmentation_keeps_size_and_is_reproducible():
    image = decode_rgb(fixture_patch("TUM-AACHEHDV.tif").read_bytes())
    first = augment(image, np.random.default_rng(5))
    again = augment(image, np.random.default_rng(5))
    assert first.size == image.size and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(augment(image, np.random.default_rng(6))))


def test_hed_jitter_without_strength_keeps_the_colours():
    pixels = np.asarray(decode_rgb(fixture_patch("NORM-AAAWMSFI.tif").read_bytes()))
    same = hed_jitter(pixels, np.random.default_rng(0), sigma=0.0)
    assert np.abs(same.astype(int) - pixels.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def served():
    return Predictor(DEMO_MODEL)


@pytest.fixture(scope="module")
def keras_model():
    return Predictor(DEMO_MODEL, backend="keras")


def _fixture_batch(size=224):
    return preprocess([decode_rgb(i.path.read_bytes()) for i in scan_folder(FIXTURE_PATCHES)], size)


def test_serving_copy_matches_keras_on_real_patches(served, keras_model):
    batch = _fixture_batch()
    for tiles in (batch, batch[:1]):  # a batch and a single patch
        litert, keras = served.predict(tiles), keras_model.predict(tiles)
        for a, b in zip(litert, keras, strict=True):
            assert a.label == b.label
            assert max(abs(a.scores[c] - b.scores[c]) for c in a.scores) < 1e-4
            for name, grid in a.heatmaps.items():
                assert np.abs(np.array(grid) - np.array(b.heatmaps[name])).max() < 1e-3
    assert served.backend == "litert" and keras_model.backend == "keras"


def test_predictions_carry_calibrated_scores_uncertainty_and_heatmaps(served):
    results = served.predict(_fixture_batch())
    for result in results:
        assert abs(sum(result.scores.values()) - 1) < 1e-6
        assert 0.0 <= result.uncertainty <= 1.0
        assert result.needs_attention == (max(result.scores.values()) < served.attention_threshold)
        assert set(result.heatmaps) == {result.label, "TUM"}
        for grid in result.heatmaps.values():
            values = np.array(grid)
            assert values.shape == (7, 7) and values.min() >= 0.0 and values.max() <= 1.0
    assert served.temperature > 0


def test_heatmap_overlay_is_transparent_where_there_is_no_evidence():
    grid = np.zeros((7, 7))
    grid[3, 3] = 1.0
    overlay = render_heatmap(grid, 224)
    alpha = np.asarray(overlay)[..., 3]
    assert overlay.size == (224, 224) and overlay.mode == "RGBA"
    assert alpha[0, 0] == 0 and alpha[112, 112] > 150


def test_pipeline_reports_each_patch_in_order(served):
    blank = io.BytesIO()
    Image.new("RGB", (224, 224), (245, 245, 245)).save(blank, format="PNG")
    payloads = [
        encode_for_storage(decode_rgb(fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes())),
        b"not an image",
        blank.getvalue(),
        fixture_patch("NORM-AAAWMSFI.tif").read_bytes(),
    ]
    outcomes = pipeline.analyse(served, payloads)
    assert [o.status for o in outcomes] == ["done", "failed", "unassessable", "done"]
    assert outcomes[1].reason.startswith("stored image cannot be read")
    assert outcomes[2].reason and outcomes[2].prediction is None
    assert outcomes[0].prediction.label == "TUM" and outcomes[3].prediction.label == "NORM"


@pytest.mark.slow
def test_short_training_on_real_patches_writes_a_loadable_version(tmp_path):
    weights = shared_data() / "mobilenetv2-0.35-imagenet" / "mobilenet_v2_0.35_224_no_top.h5"
    out = tmp_path / "model"
    call_command(
        "train_model",
        data=[str(FIXTURE_PATCHES)],
        classes="NORM,TUM",
        weights=str(weights),
        epochs=1,
        fine_tune_epochs=1,
        batch_size=4,
        test_fraction=0.3,
        val_fraction=0.3,
        seed=7,
        out=str(out),
        stdout=io.StringIO(),
    )
    assert {p.name for p in out.iterdir()} >= {"model.keras", "model.tflite", "metadata.json", "MODEL_CARD.md"}
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["classes"] == ["NORM", "TUM"] and meta["training"]["config"]["seed"] == 7
    # One head epoch: one augmented view of each image through the backbone, cached.
    assert meta["training"]["head_features"]["views"] == 1 and meta["training"]["config"]["head_views"] == 8
    assert "loaders" not in meta["training"]["config"]  # a property of the machine, not of the model
    assert meta["training"]["sources"]["patches"] == {"um_per_px": 0.5, "images": {"NORM": 3, "TUM": 4}}
    assert meta["files"]["model.tflite"] == file_sha256(out / "model.tflite")
    assert meta["calibration"]["temperature"] > 0
    assert "Model card" in (out / "MODEL_CARD.md").read_text()
    predictor = Predictor(out)
    assert predictor.classes == ("NORM", "TUM") and predictor.backend == "litert"
    assert len(predictor.predict(_fixture_batch())) == 7


def test_train_model_rejects_bad_arguments(tmp_path):
    with pytest.raises(CommandError, match="at least two distinct"):
        call_command("train_model", classes="NORM,CANCER", out=str(tmp_path / "m"))
    with pytest.raises(CommandError, match="weights file not found"):
        call_command("train_model", weights=str(tmp_path / "none.h5"), out=str(tmp_path / "m"))
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"x")
    with pytest.raises(CommandError, match="dataset folder not found"):
        call_command("train_model", data=[str(tmp_path / "nope")], weights=str(weights), out=str(tmp_path / "m"))
    with pytest.raises(CommandError, match="at least 0"):
        call_command("train_model", weights=str(weights), head_views=-1, out=str(tmp_path / "m"))
    with pytest.raises(CommandError, match="--threads and --loaders must be at least 1"):
        call_command("train_model", weights=str(weights), threads=0, out=str(tmp_path / "m"))
    with pytest.raises(CommandError, match="needs at least two --data"):
        call_command(
            "train_model", data=[str(FIXTURE_PATCHES)], weights=str(weights), leave_one_dataset_out=True, out="x"
        )
    assert not (tmp_path / "m").exists()


@pytest.mark.django_db
def test_evaluate_model_restricts_a_nine_class_model_to_the_classes_present(tmp_path):
    call_command("seed_demo", stdout=io.StringIO())
    out = io.StringIO()
    call_command("evaluate_model", data=[str(FIXTURE_PATCHES)], json_path=str(tmp_path / "r.json"), stdout=out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["restricted_to"] == ["NORM", "TUM"] and "restricted" in report["note"]
    assert report["n"] == 7 and report["classes"] == ["NORM", "TUM"]
    assert sum(map(sum, report["confusion_matrix"])) == 7
    assert set(report["plots"]) == {"confusion_matrix.png", "roc.png", "reliability.png"}
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in report["plots"])
    assert "restricted" in out.getvalue()


def _copy_model(tmp_path, name="candidate", version="9", **changes):
    target = tmp_path / name
    shutil.copytree(DEMO_MODEL, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta.update(version=version, **changes)
    (target / "metadata.json").write_text(json.dumps(meta))
    return target


@pytest.mark.django_db
def test_register_verifies_file_hashes(tmp_path):
    from inference.services import ModelRejected, model_register

    tampered = _copy_model(tmp_path)
    with open(tampered / "model.tflite", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelRejected, match="SHA-256"):
        model_register(directory=tampered)
    with pytest.raises(CommandError, match="SHA-256"):
        call_command("register_model", str(tampered))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": ["NORM", "CANCER"]}, "input"),  # the output check or the class check refuses it
        ({"preprocessing": "caffe"}, "unsupported preprocessing"),
        ({"input_size": 4096}, "unsupported input size"),
    ],
)
def test_models_the_platform_cannot_serve_are_refused(tmp_path, change, message):
    from inference.services import ModelRejected, model_check

    with pytest.raises(ModelRejected) as refused:
        model_check(_copy_model(tmp_path, **change))
    assert message in str(refused.value) or "classes" in str(refused.value)


@pytest.mark.django_db
def test_activation_is_recorded_with_who_and_what_it_replaced(tmp_path):
    from accounts.models import Institution, User
    from inference.models import ModelActivation, ModelVersion

    call_command("seed_demo", stdout=io.StringIO())
    demo = ModelVersion.objects.get(is_active=True)
    candidate = _copy_model(tmp_path)
    out = io.StringIO()
    call_command("register_model", str(candidate), stdout=out)
    assert "Registered" in out.getvalue()
    assert ModelVersion.objects.get(is_active=True) == demo  # registering does not activate
    User.objects.create_user(username="qa-lead", password="x" * 12, institution=Institution.objects.get())
    call_command("activate_model", f"{demo.name}:9", by="qa-lead", reason="validated", stdout=io.StringIO())
    active = ModelVersion.objects.get(is_active=True)
    assert active.version == "9" and active.activated_by.username == "qa-lead"
    record = ModelActivation.objects.first()
    assert (record.model_version, record.previous, record.actor, record.reason) == (
        active,
        demo,
        "qa-lead",
        "validated",
    )
    listing = io.StringIO()
    call_command("list_models", stdout=listing)
    assert f"* {active.pk:>4}  {active.name}:9" in listing.getvalue()
    with pytest.raises(CommandError, match="no single model version"):
        call_command("activate_model", "nothing-like-this")


def test_calibration_fits_a_temperature_on_overconfident_logits():
    from inference.core.training import calibrate

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 1.5  # right about 70% of the time...
    info = calibrate(logits * 6, labels)  # ...but six times too sure of itself
    assert 3 < info["temperature"] < 10 and info["ece_after"] < info["ece_before"]


def test_calibration_leaves_temperature_alone_without_validation_errors():
    from inference.core.training import calibrate

    labels = np.array([0, 1, 0, 1])
    logits = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 2.0]])
    info = calibrate(logits, labels)
    assert info["temperature"] == 1.0 and "too few" in info["note"]
