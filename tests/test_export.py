"""Export of reviewed patches for retraining: layout, manifest, no identifying text, lineage."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pytest
from django.core.management import call_command

from accounts.models import User
from cases.models import Review
from cases.review import review_confirm_all, review_submit
from cases.services import PatientData, case_create, patch_upload
from inference import services
from tests.conftest import fixture_patch, make_user, shared_data

pytestmark = pytest.mark.django_db

IDENTIFYING = ("Ada Lovelace-Byron", "MRN-77001", "ACC-SECRET-9", "MRN-77002", "ACC-SECRET-10")


@pytest.fixture
def reviewed(institution, clinician, demo_model):
    pathologist = make_user(institution, User.Role.PATHOLOGIST, username="dr-pathologist-smith")
    cases = []
    for mrn, accession, names in (
        ("MRN-77001", "ACC-SECRET-9", ["TUM-TCGA-KECNIDCQ.png", "NORM-TCGA-INTLNRAV.png"]),
        ("MRN-77002", "ACC-SECRET-10", ["TUM-AACHEHDV.tif", "NORM-AAAWMSFI.tif", "TUM-TCGA-NHQGDFVF.png"]),
    ):
        case = case_create(
            institution=institution,
            created_by=clinician,
            patient=PatientData(mrn=mrn, name="Ada Lovelace-Byron"),
            accession=accession,
            specimen_site="colon",
        )
        files = [(f"Ada Lovelace-Byron {n}", fixture_patch(n).read_bytes()) for n in names]
        patches = patch_upload(case=case, uploaded_by=clinician, files=files).patches
        services.prediction_run(patch_ids=[p.pk for p in patches])
        cases.append((case, patches))
    (_, (_tum, norm)), _ = cases
    review_submit(
        patch=norm, pathologist=pathologist, decision="override", final_label="MUC", reason_code="wrong_class",
        reason_text="Ada Lovelace-Byron's mucin",
    )  # fmt: skip
    for case, _ in cases:
        review_confirm_all(case=case, pathologist=pathologist)
    return cases


def _manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_export_matches_the_reviews_and_names_no_one(reviewed, tmp_path):
    out = tmp_path / "export"
    text = io.StringIO()
    call_command("export_reviews", out=str(out), stdout=text)
    rows = _manifest(out)
    latest = {}
    for review in Review.objects.order_by("id"):
        latest[review.patch_id] = review
    assert sorted(r["final_label"] for r in rows) == sorted(r.final_label for r in latest.values())
    assert {r["final_label"] for r in rows} == {"TUM", "NORM", "MUC"}
    for row in rows:
        path = out / row["file"]
        assert path.parent.name == row["final_label"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
    muc = next(r for r in rows if r["final_label"] == "MUC")
    assert (muc["ai_label"], muc["decision"], muc["reason_code"]) == ("NORM", "override", "wrong_class")
    assert len({r["group"] for r in rows}) == 2  # one pseudonymous group per patient
    info = json.loads((out / "dataset.json").read_text())
    assert (
        info["images"] == 5
        and info["dataset_version"] == hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()
    )
    assert info["dataset_version"] in text.getvalue()
    everything = [str(p.relative_to(out)) for p in out.rglob("*")]
    everything += [(out / name).read_text() for name in ("manifest.csv", "dataset.json")]
    for secret in (*IDENTIFYING, "dr-pathologist-smith", "Lovelace"):
        assert not any(secret in blob for blob in everything), secret


@pytest.mark.slow
def test_training_on_the_export_records_its_dataset_version(reviewed, tmp_path):
    out = tmp_path / "export"
    call_command("export_reviews", out=str(out), stdout=io.StringIO())
    version = json.loads((out / "dataset.json").read_text())["dataset_version"]
    weights = shared_data() / "mobilenetv2-0.35-imagenet" / "mobilenet_v2_0.35_224_no_top.h5"
    call_command(
        "train_model", data=[str(out)], classes="NORM,TUM", weights=str(weights), epochs=1, fine_tune_epochs=0,
        batch_size=4, test_fraction=0.0, val_fraction=0.3, out=str(tmp_path / "model"), stdout=io.StringIO(),
    )  # fmt: skip
    meta = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert meta["training"]["dataset_versions"] == {"export": version}
    assert meta["training"]["sources"]["export"]["images"] == {"NORM": 1, "TUM": 3}
