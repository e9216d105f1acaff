"""Site validation: the model measured on an institution's own labelled patches through the served
path, the operating point chosen for a target sensitivity, nothing stored for bad data, the admin
pages, the activation gate and evaluate_model's operating point."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from audit.models import AuditEvent
from cases.review import review_confirm_all
from cases.services import patch_upload
from inference import services
from inference.core import Predictor, evaluation, pipeline
from inference.models import ModelVersion, SiteValidation
from inference.sites import SiteImage, SiteValidationError, site_measure
from tests.conftest import DEMO_MODEL, FIXTURE_PATCHES, make_user, new_case, verified_login

BASELINE_KEYS = {
    "n",
    "od_h",
    "od_e",
    "sharpness",
    "qc_rejection_rate",
    "qc_rejections",
    "mean_uncertainty",
    "needs_attention_rate",
    "class_mix",
    "suspected_tumour_rate",
    "agreement",
}


# --- pure functions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    [(0, 10, 0.0, 0.277533), (10, 10, 0.722467, 1.0), (5, 10, 0.236593, 0.763407), (0, 0, 0.0, 1.0)],
)
def test_wilson_interval_known_values(successes, total, low, high):
    assert evaluation.wilson_interval(successes, total) == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError):
        evaluation.wilson_interval(11, 10)


def test_threshold_is_the_highest_that_reaches_the_target_sensitivity():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.4, 0.35])
    positives = np.array([0, 0, 0, 1, 1, 1, 1], dtype=bool)
    every = evaluation.threshold_for_sensitivity(scores, positives, 0.98)
    assert every["threshold"] == 0.35 and every["sensitivity"]["value"] == 1.0
    assert every["specificity"]["value"] == 1.0 and every["false_negatives"] == 0
    three = evaluation.threshold_for_sensitivity(scores, positives, 0.75)
    assert three["threshold"] == 0.4 and three["sensitivity"]["value"] == 0.75


def test_threshold_for_98_percent_of_100_positives_misses_exactly_two():
    scores = np.r_[np.linspace(0.01, 1.0, 100), np.full(50, 0.005)]
    positives = np.r_[np.ones(100, dtype=bool), np.zeros(50, dtype=bool)]
    point = evaluation.threshold_for_sensitivity(scores, positives, 0.98)
    assert point["true_positives"] == 98 and point["false_negatives"] == 2
    assert point["threshold"] == pytest.approx(0.03)


def test_threshold_costs_specificity_when_a_negative_outscores_a_positive():
    scores = np.array([0.2, 0.6, 0.5, 0.9])
    positives = np.array([False, False, True, True])
    point = evaluation.threshold_for_sensitivity(scores, positives, 1.0)
    assert point["threshold"] == 0.5 and point["specificity"]["value"] == 0.5 and point["false_positives"] == 1


def test_threshold_needs_a_positive():
    with pytest.raises(ValueError, match="no positive"):
        evaluation.threshold_for_sensitivity(np.array([0.1, 0.2]), np.array([False, False]), 0.98)


def test_bootstrap_auc_interval_is_seeded_and_brackets_the_auc():
    rng = np.random.default_rng(1)
    positives = np.r_[np.ones(40, dtype=bool), np.zeros(60, dtype=bool)]
    scores = np.where(positives, rng.normal(1.0, 1.0, 100), rng.normal(0.0, 1.0, 100))
    first = evaluation.roc_auc_interval(scores, positives, resamples=200, seed=3)
    assert first == evaluation.roc_auc_interval(scores, positives, resamples=200, seed=3)
    assert first["low"] < first["value"] < first["high"]
    assert first["value"] == pytest.approx(evaluation.roc_auc_binary(scores, positives), abs=1e-6)


def test_reliability_bins_reproduce_the_ece():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=50)
    labels = rng.integers(0, 3, 50)
    bins = evaluation.reliability_bins(probabilities, labels)
    assert sum(b["count"] for b in bins) == 50
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / 50
    assert ece == pytest.approx(evaluation.expected_calibration_error(probabilities, labels), abs=1e-5)


# --- validate_site -------------------------------------------------------------------------------


def _dataset(tmp_path, *, classes=("NORM", "TUM")):
    root = tmp_path / "site-data"
    for name in classes:
        shutil.copytree(FIXTURE_PATCHES / name, root / name)
    return root


def _rows():
    return SiteValidation.objects.count(), AuditEvent.objects.count()


def _tumour_scores(root):
    predictor = Predictor(DEMO_MODEL)
    files = sorted((root / "TUM").iterdir())
    return [o.prediction.scores["TUM"] for o in pipeline.analyse(predictor, [f.read_bytes() for f in files])]


@pytest.mark.django_db
def test_validate_site_stores_intervals_threshold_baseline_and_audit(institution, demo_model, tmp_path):
    root = _dataset(tmp_path)
    out = tmp_path / "report.json"
    stdout = io.StringIO()
    call_command(
        "validate_site",
        institution=institution.slug,
        data=str(root),
        min_per_class=3,
        json_path=str(out),
        stdout=stdout,
        stderr=io.StringIO(),
    )
    validation = SiteValidation.objects.get()
    assert validation.institution == institution and validation.model_version == demo_model
    assert validation.counts == {"NORM": 3, "TUM": 4}
    assert validation.target_sensitivity == 0.98
    assert validation.passed is False  # 3 and 4 images are far below SITE_VALIDATION_MIN_PER_CLASS
    assert validation.data_source == str(root.resolve()) and len(validation.data_manifest_sha256) == 64

    # Target 0.98 of 4 TUM patches: every one must be called, so the threshold is the lowest TUM score.
    scores = _tumour_scores(root)
    assert validation.threshold == min(scores)
    assert sum(s >= validation.threshold for s in scores) / len(scores) >= validation.target_sensitivity
    assert validation.sensitivity == 1.0

    m = validation.metrics
    assert m["accuracy"]["value"] == 1.0 and 0 < m["accuracy"]["low"] < 1.0 and m["accuracy"]["high"] == 1.0
    assert m["per_class"]["TUM"]["sensitivity"] == {"value": 1.0, "low": 0.510109, "high": 1.0, "successes": 4, "n": 4}
    assert m["roc_auc"]["value"] == 1.0 and m["roc_auc"]["resamples"] == 1000
    assert m["roc_auc"]["low"] <= m["roc_auc"]["value"] <= m["roc_auc"]["high"]
    assert len(m["roc_curve"]["fpr"]) == len(m["roc_curve"]["tpr"]) >= 2
    assert len(m["reliability"]) == evaluation.ECE_BINS
    assert m["calibration"]["site_temperature"] > 0 and m["calibration"]["ece_before"] == m["ece"]
    assert m["quality_check"]["rejected"] == 0 and m["checks"] == {"enough_per_class": False, "target_reached": True}

    baseline = m["baseline"]
    assert set(baseline) == BASELINE_KEYS
    assert baseline["n"] == 7 and baseline["agreement"] == 1.0 and baseline["qc_rejection_rate"] == 0.0
    assert set(baseline["od_h"]) == {"mean", "std"} and baseline["od_h"]["mean"] > 0
    assert baseline["class_mix"]["TUM"] == pytest.approx(4 / 7, abs=1e-6)
    assert baseline["suspected_tumour_rate"] == pytest.approx(4 / 7, abs=1e-6)

    event = AuditEvent.objects.get(action="site_validation.create")
    assert event.target_id == str(validation.pk) and event.institution_id == institution.pk
    assert event.after["threshold"] == validation.threshold and event.after["passed"] is False

    report = json.loads(out.read_text())
    assert report["threshold"] == validation.threshold and report["metrics"]["baseline"] == baseline
    text = stdout.getvalue()
    assert "NOT PASSED" in text and f"{validation.threshold:.4f}" in text


@pytest.mark.django_db
def test_lower_target_gives_a_higher_threshold_and_enough_data_passes(institution, demo_model, tmp_path, settings):
    settings.SITE_VALIDATION_MIN_PER_CLASS = 3
    root = _dataset(tmp_path)
    common = {"institution": institution.slug, "data": str(root), "min_per_class": 3}
    call_command("validate_site", **common, stdout=io.StringIO(), stderr=io.StringIO())
    call_command("validate_site", **common, target_sensitivity=0.75, stdout=io.StringIO(), stderr=io.StringIO())
    strict, lenient = SiteValidation.objects.order_by("id")
    assert strict.passed and lenient.passed
    scores = sorted(_tumour_scores(root), reverse=True)
    assert lenient.threshold == scores[2] > strict.threshold  # 3 of 4 called reach 0.75
    assert lenient.sensitivity == 0.75


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_folder", "dataset folder not found"),
        ("missing_tum", "no TUM images"),
        ("too_few", "too few images (NORM 3, TUM 4): at least 10 per class"),
        ("unreadable", "broken.png"),
        ("unknown_institution", "no institution with slug 'nowhere'"),
        ("unknown_model", "no single model version matches 'nothing:9'"),
    ],
)
def test_bad_input_is_a_clear_error_and_stores_nothing(setup, message, institution, demo_model, tmp_path):
    root = _dataset(tmp_path, classes=("NORM",) if setup == "missing_tum" else ("NORM", "TUM"))
    options = {"institution": institution.slug, "data": str(root), "min_per_class": 3}
    if setup == "missing_folder":
        options["data"] = str(tmp_path / "absent")
    elif setup == "too_few":
        del options["min_per_class"]
    elif setup == "unreadable":
        (root / "TUM" / "broken.png").write_bytes(b"this is not an image")
    elif setup == "unknown_institution":
        options["institution"] = "nowhere"
    elif setup == "unknown_model":
        options["model"] = "nothing:9"
    before = _rows()
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call_command("validate_site", **options, stdout=io.StringIO(), stderr=io.StringIO())
    assert _rows() == before


@pytest.mark.django_db
def test_model_without_a_tum_class_cannot_be_validated():
    version = ModelVersion(name="stroma-only", version="1", classes=["NORM", "STR"])
    images = [SiteImage(label="NORM", name=f"n{i}", data=b"") for i in range(3)]
    with pytest.raises(SiteValidationError, match="has no TUM class"):
        site_measure(model_version=version, images=images, target_sensitivity=0.98, min_per_class=1)


@pytest.mark.django_db
def test_every_tum_patch_rejected_by_quality_check_is_refused(demo_model):
    from tests.conftest import fixture_patch, png_bytes

    norm = fixture_patch("NORM-TCGA-INTLNRAV.png").read_bytes()
    images = [SiteImage(label="NORM", name="n", data=norm), SiteImage(label="TUM", name="blank", data=png_bytes())]
    with pytest.raises(SiteValidationError, match="no TUM patch passed the quality check"):
        site_measure(model_version=demo_model, images=images, target_sensitivity=0.98, min_per_class=1)


# --- admin ---------------------------------------------------------------------------------------


@pytest.fixture
def reviewed_case(institution, clinician, demo_model):
    case = new_case(clinician)
    files = [(p.name, p.read_bytes()) for p in sorted(FIXTURE_PATCHES.rglob("*")) if p.parent.name in {"NORM", "TUM"}]
    upload = patch_upload(case=case, uploaded_by=clinician, files=files)
    services.prediction_run(patch_ids=[p.pk for p in upload.patches])
    review_confirm_all(case=case, pathologist=make_user(institution, User.Role.PATHOLOGIST))
    return case


@pytest.fixture
def superuser_client(client, db):
    verified_login(client, User.objects.create_superuser("root", password="not-a-real-pass-1"))
    return client


@pytest.mark.django_db
def test_admin_validates_on_reviewed_patches_and_shows_the_result(
    superuser_client, institution, demo_model, reviewed_case
):
    url = "/admin/inference/sitevalidation/validate-reviews/"
    assert superuser_client.get(url).status_code == 200
    form = {"institution": institution.pk, "model_version": demo_model.pk, "target_sensitivity": 0.98}

    before = _rows()
    response = superuser_client.post(url, {**form, "min_per_class": 10}, follow=True)
    assert response.status_code == 200 and "too few images" in response.content.decode()
    assert _rows() == before

    response = superuser_client.post(url, {**form, "min_per_class": 3})
    validation = SiteValidation.objects.get()
    assert response.status_code == 302 and response.url.endswith(f"/{validation.pk}/change/")
    assert validation.data_source == "reviews" and validation.counts == {"NORM": 3, "TUM": 4}
    assert validation.sensitivity == 1.0 and validation.metrics["baseline"]["agreement"] == 1.0
    event = AuditEvent.objects.get(action="site_validation.create")
    assert event.actor_label == "root"

    listing = superuser_client.get("/admin/inference/sitevalidation/")
    assert listing.status_code == 200 and f"{validation.threshold:.4f}" in listing.content.decode()
    assert "Validate on reviewed patches" in listing.content.decode()
    detail = superuser_client.get(f"/admin/inference/sitevalidation/{validation.pk}/change/")
    body = detail.content.decode()
    assert detail.status_code == 200 and f"{validation.threshold:.4f}" in body and "ROC AUC" in body
    assert "not passed: fewer than 100 analysed patches in a class (NORM 3, TUM 4)" in body
    for kind in ("roc", "reliability"):
        plot = superuser_client.get(f"/admin/inference/sitevalidation/{validation.pk}/plot/{kind}.png")
        assert plot.status_code == 200 and plot["Content-Type"] == "image/png"
        assert plot.content.startswith(b"\x89PNG")


@pytest.mark.django_db
def test_staff_of_another_institution_do_not_see_the_validation(client, institution, other_institution):
    from django.contrib.auth.models import Permission

    validation = _passing_validation(institution, _demo_registered())
    staff = make_user(other_institution, User.Role.ADMIN, username="other-admin")
    staff.is_staff = True
    staff.save()
    staff.user_permissions.add(Permission.objects.get(codename="view_sitevalidation"))
    verified_login(client, staff)
    listing = client.get("/admin/inference/sitevalidation/")
    assert listing.status_code == 200 and "St Mary" not in listing.content.decode()
    assert client.get(f"/admin/inference/sitevalidation/{validation.pk}/plot/roc.png").status_code == 404


# --- activation gate ------------------------------------------------------------------------------


def _demo_registered() -> ModelVersion:
    version, _ = services.model_register(directory=DEMO_MODEL)
    return version


def _copy_of_demo(tmp_path) -> ModelVersion:
    target = tmp_path / "candidate"
    shutil.copytree(DEMO_MODEL, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta["version"] = "candidate"
    (target / "metadata.json").write_text(json.dumps(meta))
    version, _ = services.model_register(directory=target)
    return version


def _passing_validation(institution, version, threshold=0.3) -> SiteValidation:
    rate = {"value": 1.0, "low": 0.9, "high": 1.0, "successes": 100, "n": 100}
    return SiteValidation.objects.create(
        institution=institution,
        model_version=version,
        data_source="test",
        data_manifest_sha256="0" * 64,
        counts={"NORM": 100, "TUM": 100},
        metrics={
            "operating_point": {"sensitivity": rate, "specificity": rate},
            "roc_curve": {"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0], "thresholds": [None, 0.5, 0.1]},
            "roc_auc": {"value": 1.0},
            "reliability": evaluation.reliability_bins(np.array([[0.9, 0.1]]), np.array([0])),
            "ece": 0.1,
        },
        target_sensitivity=0.98,
        threshold=threshold,
        sensitivity=1.0,
        specificity=1.0,
        passed=True,
        actor="test",
    )


@pytest.mark.django_db
def test_activation_without_site_validation_is_refused_when_required(
    settings, clinician, institution, other_institution, demo_model, tmp_path
):
    settings.REQUIRE_SITE_VALIDATION = True
    candidate = _copy_of_demo(tmp_path)
    with pytest.raises(CommandError, match="no passing site validation at stmarys;") as refused:
        call_command("activate_model", f"{candidate.name}:candidate")
    assert "other" not in str(refused.value)  # no users, no cases: nothing to validate there
    with pytest.raises(CommandError, match="needs a reason"):
        call_command("activate_model", f"{candidate.name}:candidate", force=True)
    assert ModelVersion.objects.get(is_active=True) == demo_model

    call_command(
        "activate_model", f"{candidate.name}:candidate", force=True, reason="validation next week", stdout=io.StringIO()
    )
    assert ModelVersion.objects.get(is_active=True) == candidate
    event = AuditEvent.objects.filter(action="model.activate").last()
    assert event.after["forced"] is True and event.reason == "validation next week"
    assert event.after["site_validation"] == {"required": True, "validated": [], "missing": ["stmarys"]}


@pytest.mark.django_db
def test_activation_after_a_passing_site_validation_needs_no_force(
    settings, clinician, institution, demo_model, tmp_path
):
    settings.REQUIRE_SITE_VALIDATION = True
    candidate = _copy_of_demo(tmp_path)
    _passing_validation(institution, candidate)
    call_command("activate_model", f"{candidate.name}:candidate", stdout=io.StringIO())
    assert ModelVersion.objects.get(is_active=True) == candidate
    event = AuditEvent.objects.filter(action="model.activate").last()
    assert event.after["forced"] is False and event.after["site_validation"]["validated"] == ["stmarys"]


@pytest.mark.django_db
def test_activation_without_validation_is_allowed_when_not_required(settings, clinician, demo_model, tmp_path):
    settings.REQUIRE_SITE_VALIDATION = False
    candidate = _copy_of_demo(tmp_path)
    services.model_activate(version=candidate, actor="test")
    assert ModelVersion.objects.get(is_active=True) == candidate


# --- evaluate_model --institution ------------------------------------------------------------------


@pytest.mark.django_db
def test_evaluate_model_reports_the_sites_operating_point(institution, demo_model, tmp_path):
    def evaluate(name):
        out = tmp_path / name / "report.json"
        call_command(
            "evaluate_model",
            data=[str(FIXTURE_PATCHES)],
            json_path=str(out),
            institution=institution.slug,
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
        return json.loads(out.read_text())["operating_point"]

    default = evaluate("default")
    assert default["class"] == "TUM" and default["validated"] is False
    assert set(default) == {"class", "threshold", "sensitivity", "specificity", "validated"}

    _passing_validation(institution, demo_model, threshold=0.3)
    validated = evaluate("validated")
    assert validated == {"class": "TUM", "threshold": 0.3, "sensitivity": 1.0, "specificity": 1.0, "validated": True}

    with pytest.raises(CommandError, match="no institution with slug 'nowhere'"):
        call_command(
            "evaluate_model", data=[str(FIXTURE_PATCHES)], json_path=str(tmp_path / "x.json"), institution="nowhere"
        )
