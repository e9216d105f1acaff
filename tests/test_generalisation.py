"""The lab-robust recipe (v3): its augmentation, the simulated-other-lab protocol, scales, lineage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from django.core.management import call_command
from PIL import Image

from inference.core import otherlab
from inference.core.augment import augment_lab, stain_matrix_jitter, zoom_view
from inference.core.datasets import kather2016_um_per_px, scan_folder
from inference.core.training import binary_figures, pooled_generalisation
from tests.conftest import FIXTURE_PATCHES, fixture_patch, shared_data


def _tile(colour, size=224) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _real(name="TUM-TCGA-KECNIDCQ.png") -> Image.Image:
    with Image.open(fixture_patch(name)) as image:
        return image.convert("RGB")


def test_zooming_out_fills_the_field_with_same_class_tiles_not_padding():
    rng = np.random.default_rng(0)
    view = zoom_view(_tile((255, 0, 0)), 0.5, 1.0, 224, rng, same_class=lambda: (_tile((0, 0, 255)), 0.5))
    pixels = np.asarray(view).reshape(-1, 3).astype(int)
    red = ((pixels[:, 0] > 200) & (pixels[:, 2] < 50)).mean()
    blue = ((pixels[:, 2] > 200) & (pixels[:, 0] < 50)).mean()
    # A 2x zoom-out shows four tiles' worth of tissue: about a quarter from the tile itself.
    assert view.size == (224, 224)
    assert 0.1 < red < 0.45 and blue > 0.5


def test_zooming_in_crops_the_tile_and_keeps_the_size():
    rng = np.random.default_rng(0)
    view = zoom_view(_real(), 0.5, 0.25, 224, rng)
    assert view.size == (224, 224)


def test_views_of_a_coarser_source_cover_the_same_field_of_view():
    # A 150 px Kather tile (74 µm) cannot fill a 224 px view at 0.5 µm/px (112 µm): about
    # (74/112)^2 = 44% of the view is the tile, the rest other tiles of its class.
    rng = np.random.default_rng(0)
    tile = _tile((0, 255, 0), 150)
    view = zoom_view(tile, 0.495, 0.5, 224, rng, same_class=lambda: (_tile((0, 0, 255), 150), 0.495))
    pixels = np.asarray(view).reshape(-1, 3).astype(int)
    green = ((pixels[:, 1] > 200) & (pixels[:, 2] < 50)).mean()
    assert 0.2 < green < 0.5 and ((pixels[:, 2] > 200) & (pixels[:, 1] < 50)).mean() > 0.45


def test_stain_matrix_jitter_without_change_keeps_the_image():
    pixels = np.asarray(_real())
    same = stain_matrix_jitter(pixels, np.random.default_rng(0), intensity=0.0, rotation=0.0, shift=0.0)
    assert np.abs(same.astype(int) - pixels.astype(int)).max() <= 2


def test_stain_matrix_jitter_changes_stain_amounts():
    pixels = np.asarray(_real())
    outs = [stain_matrix_jitter(pixels, np.random.default_rng(s)) for s in range(4)]
    means = [o.mean() for o in outs]
    assert max(means) - min(means) > 3  # different labs, different stain strengths
    assert all(o.shape == pixels.shape and o.dtype == np.uint8 for o in outs)


def test_augment_lab_is_seeded_and_keeps_the_model_input_size():
    image = _real()

    def mate():
        return _real("TUM-AACHEHDV.tif"), 0.5

    first = augment_lab(image, np.random.default_rng(7), um_per_px=0.5, same_class=mate)
    again = augment_lab(image, np.random.default_rng(7), um_per_px=0.5, same_class=mate)
    other = augment_lab(image, np.random.default_rng(8), um_per_px=0.5, same_class=mate)
    assert first.size == (224, 224) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_simulated_other_labs_are_fixed_and_differ_from_the_original():
    image = _real()
    for profile in otherlab.PROFILES:
        first = otherlab.as_lab(image, profile, um_per_px=0.5, seed=3, same_class=lambda: (_real(), 0.5))
        again = otherlab.as_lab(image, profile, um_per_px=0.5, seed=3, same_class=lambda: (_real(), 0.5))
        assert first.size == (224, 224)
        assert np.array_equal(np.asarray(first), np.asarray(again)), profile.name
        assert np.abs(np.asarray(first).astype(int) - np.asarray(image).astype(int)).mean() > 5, profile.name


def test_kather_2016_scale_follows_the_tile_width(tmp_path):
    for width, expected in ((150, 0.495), (224, 0.3315)):
        root = tmp_path / f"k{width}"
        (root / "01_TUMOR").mkdir(parents=True)
        (root / "06_MUCOSA").mkdir()
        _real().resize((width, width)).save(root / "01_TUMOR" / "a.png")
        _real("NORM-TCGA-INTLNRAV.png").resize((width, width)).save(root / "06_MUCOSA" / "b.png")
        assert kather2016_um_per_px(root / "01_TUMOR" / "a.png") == expected
        assert {i.um_per_px for i in scan_folder(root)} == {expected}
    assert {i.um_per_px for i in scan_folder(FIXTURE_PATCHES)} == {0.5}


def test_the_shared_tfds_copy_is_read_at_its_true_scale():
    images = scan_folder(shared_data() / "kather2016-tfds-224")
    assert {i.um_per_px for i in images} == {0.3315}


def test_binary_figures_and_pooling_count_what_they_say():
    tum = np.array([0.9, 0.6, 0.4, 0.2, 0.1])
    truth = np.array([True, True, True, False, False])
    f = binary_figures(tum, truth)
    assert (f["accuracy"], f["sensitivity"], f["specificity"], f["roc_auc"]) == (0.8, 0.6667, 1.0, 1.0)
    lodo = {
        "a": {"norm_vs_tum_scores": [[0.9, True], [0.1, False]], "simulated_other_lab_scores": [[0.4, True]]},
        "b": {"norm_vs_tum_scores": [[0.7, False]], "simulated_other_lab_scores": [[0.6, False], [0.2, False]]},
    }
    pooled = pooled_generalisation(lodo)
    assert pooled["held_out_sources"]["images"] == 3 and pooled["held_out_sources"]["specificity"] == 0.5
    assert pooled["simulated_other_labs"]["sensitivity"] == 0.0


@pytest.fixture
def reviewed_export(institution, clinician, demo_model, tmp_path):
    """An export_reviews folder of the real fixture patches, confirmed by a pathologist."""
    from accounts.models import User
    from cases.review import review_confirm_all
    from cases.services import patch_upload
    from inference import services
    from tests.conftest import make_user, new_case

    pathologist = make_user(institution, User.Role.PATHOLOGIST)
    case = new_case(clinician)
    files = [(p.name, p.read_bytes()) for p in sorted(FIXTURE_PATCHES.rglob("*")) if p.suffix in {".png", ".tif"}]
    patches = patch_upload(case=case, uploaded_by=clinician, files=files).patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    review_confirm_all(case=case, pathologist=pathologist)
    out = tmp_path / "export"
    call_command("export_reviews", out=str(out), stdout=io.StringIO())
    return out, json.loads((out / "dataset.json").read_text())["dataset_version"]


@pytest.mark.slow
@pytest.mark.django_db
def test_fine_tuning_from_a_version_records_both_parents(reviewed_export, demo_model, institution, tmp_path):
    out, version = reviewed_export
    text = io.StringIO()
    call_command(
        "train_model", init_from=f"{demo_model.name}:{demo_model.version}", data=[str(out)], epochs=1,
        fine_tune_epochs=1, batch_size=4, test_fraction=0.0, val_fraction=0.0, name="site-tuned",
        model_version="1", out=str(tmp_path / "tuned"), stdout=text,
    )  # fmt: skip
    meta = json.loads((tmp_path / "tuned" / "metadata.json").read_text())
    lineage = meta["training"]["lineage"]
    assert lineage["parent"] == f"{demo_model.name}:{demo_model.version}"
    assert lineage["parent_sha256"] == demo_model.file_sha256
    assert lineage["dataset_versions"] == {"export": version}
    with open(out / "manifest.csv") as handle:
        assert sorted(lineage["trained_on_sha256"]) == sorted(row.split(",")[1] for row in handle.readlines()[1:])
    assert meta["classes"] == demo_model.classes  # the parent's class map is kept
    assert meta["training"]["config"]["head_learning_rate"] == 2e-4
    assert "site-tuned" in (tmp_path / "tuned" / "MODEL_CARD.md").read_text()
    assert "Fine-tuned from" in (tmp_path / "tuned" / "MODEL_CARD.md").read_text()

    # Shadow evaluation and site validation judge it only on reviews it was not trained on.
    from inference.services import model_register, shadow_evaluate
    from inference.sites import site_images_from_reviews

    tuned, _ = model_register(directory=tmp_path / "tuned")
    shadow = shadow_evaluate(candidate=tuned, baseline=demo_model)
    assert shadow["left_out_trained_on"] == 7 and shadow["patches"] == 0
    assert site_images_from_reviews(institution=institution, model_version=tuned) == []
    assert len(site_images_from_reviews(institution=institution, model_version=demo_model)) == 7


@pytest.mark.django_db
def test_fine_tuning_from_an_unknown_version_is_a_clear_error(tmp_path):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="neither a model directory nor a registered"):
        call_command("train_model", init_from="nothing:9", data=[str(FIXTURE_PATCHES)], out=str(tmp_path / "x"))


def test_default_operating_point_reaches_the_target_on_unseen_labs():
    from inference.core.training import default_operating_point

    lodo = {
        "a": {"tum_probabilities": [[0.9, True], [0.2, True], [0.1, False], [0.05, False]]},
        "b": {"tum_probabilities": [[0.6, True], [0.4, False]]},
    }
    point = default_operating_point(lodo, target=0.95)
    assert point["threshold"] == 0.2 and point["sensitivity"] == 1.0
    assert point["specificity"] == pytest.approx(2 / 3, abs=1e-5)
    assert default_operating_point({"a": {"tum_probabilities": [[0.3, False]]}}) is None


@pytest.mark.django_db
def test_unvalidated_sites_get_the_models_own_default_threshold(institution, demo_model):
    from inference.selectors import operating_point

    point = operating_point(institution_id=institution.pk, model_version=demo_model)
    expected = (demo_model.metadata.get("operating_point") or {}).get("threshold", 0.5)
    assert point.threshold == expected and not point.validated
    demo_model.metadata = {**demo_model.metadata, "operating_point": {"class": "TUM", "threshold": 0.21}}
    demo_model.save()
    point = operating_point(institution_id=institution.pk, model_version=demo_model)
    assert point.threshold == 0.21 and point.suspected({"TUM": 0.21, "NORM": 0.79}) is True
    assert point.suspected({"TUM": 0.2099, "NORM": 0.7901}) is False


@pytest.mark.django_db
def test_validate_site_reads_an_export_of_reviews(reviewed_export, institution):
    from inference.models import SiteValidation

    out, _ = reviewed_export
    call_command(
        "validate_site", institution=institution.slug, data=str(out), min_per_class=3,
        stdout=io.StringIO(), stderr=io.StringIO(),
    )  # fmt: skip
    validation = SiteValidation.objects.get()
    assert validation.data_source == str(out)
    assert validation.counts == {"NORM": 3, "TUM": 4}
    assert 0.0 <= validation.threshold <= 1.0 and validation.sensitivity >= 0.98
