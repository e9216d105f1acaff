"""Export of pathologist-reviewed patches as a training dataset, without identifying data.

Layout (readable by ``inference.core.datasets.scan_folder`` and so by ``train_model``)::

    DIR/<FINAL CLASS>/<first 24 hex of the image's SHA-256>.png
    DIR/manifest.csv     file, sha256, final_label, ai_label, ai_scores, model_version, decision,
                         reason_code, reviewed_at, group
    DIR/dataset.json     {"dataset_version": SHA-256 of manifest.csv, "images": N, "um_per_px": null, ...}

``group`` is a keyed hash of the patient (HMAC with the server's SECRET_KEY): patches of one
patient share it, so splits stay leakage-free, but it cannot be turned back into an MRN.
No names, MRNs, accession numbers, user names, original file names or free-text reasons are
written.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import hmac
import io
import json
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage

from cases.models import Review
from cases.review import final_labels
from inference.core.preprocessing import decode_rgb

MANIFEST = "manifest.csv"
COLUMNS = [
    "file",
    "sha256",
    "final_label",
    "ai_label",
    "ai_scores",
    "model_version",
    "decision",
    "reason_code",
    "reviewed_at",
    "group",
]


def patient_group(institution_id: int, patient_id: int) -> str:
    key = settings.SECRET_KEY.encode()
    return hmac.new(key, f"patient:{institution_id}:{patient_id}".encode(), hashlib.sha256).hexdigest()[:16]


def export_bytes(stored: bytes) -> bytes:
    """A stored patch as the export writes it (PNG of the decoded pixels)."""
    buffer = io.BytesIO()
    decode_rgb(stored).save(buffer, format="PNG")
    return buffer.getvalue()


def export_digest(stored: bytes) -> str:
    """SHA-256 of ``export_bytes``: how a model's lineage names the reviewed patches it was trained on."""
    return hashlib.sha256(export_bytes(stored)).hexdigest()


def reviews_export(
    *, out: str | Path, since: datetime.datetime | None = None, institution=None, model_version=None
) -> dict:
    """Write the latest review of every reviewed patch (filtered) into ``out``. Returns dataset.json."""
    out = Path(out)
    reviews = Review.objects.select_related("patch__case", "prediction__model_version").order_by("patch_id", "id")
    if since is not None:
        reviews = reviews.filter(created_at__gte=since)
    if institution is not None:
        reviews = reviews.filter(patch__case__institution=institution)
    if model_version is not None:
        reviews = reviews.filter(prediction__model_version=model_version)
    latest: dict[int, Review] = {}
    for review in reviews:
        latest[review.patch_id] = review  # ordered by id: the last one wins
    finals: dict[int, dict[int, str]] = {}
    rows = []
    for review in latest.values():
        patch = review.patch
        if patch.case_id not in finals:
            finals[patch.case_id] = final_labels(patch.case)
        final = finals[patch.case_id].get(patch.pk)
        if final is None:
            continue  # a second read or an adjudication is still missing: not ground truth yet
        with default_storage.open(patch.storage_name, "rb") as handle:
            data = export_bytes(handle.read())
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{final}/{digest[:24]}.png"
        (out / final).mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
        rows.append(
            {
                "file": relative,
                "sha256": digest,
                "final_label": final,
                "ai_label": review.prediction.label,
                "ai_scores": json.dumps(review.prediction.scores, sort_keys=True),
                "model_version": str(review.prediction.model_version),
                "decision": review.decision,
                "reason_code": review.reason_code,
                "reviewed_at": review.created_at.isoformat(),
                "group": patient_group(patch.case.institution_id, patch.case.patient_id),
            }
        )
    rows.sort(key=lambda row: row["file"])
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest = buffer.getvalue().encode()
    (out / MANIFEST).write_bytes(manifest)
    info = {
        "name": "cloudiopsy-reviewed-patches",
        "dataset_version": hashlib.sha256(manifest).hexdigest(),
        "images": len(rows),
        "classes": dict(
            sorted({r["final_label"]: sum(x["final_label"] == r["final_label"] for x in rows) for r in rows}.items())
        ),
        "um_per_px": None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
