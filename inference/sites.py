"""Site validation: a model version measured on one institution's own labelled tissue, and the
operating point (the TUM-probability threshold for "suspected tumour") chosen there from it.

Every image goes through the served path (decode, quality check, preprocessing, batched
inference, calibrated scores), outside any database transaction; only the result is written,
with its audit event, in one short transaction. Bad data raise ``SiteValidationError`` before
anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction

from audit.models import AuditEvent
from audit.services import Actor, audit_record
from inference.core import evaluation, pipeline
from inference.core.datasets import scan_folder
from inference.core.model import Predictor
from inference.models import ModelVersion, SiteValidation
from inference.selectors import POSITIVE_CLASS, model_default_threshold

logger = logging.getLogger(__name__)

NEGATIVE_CLASS = "NORM"
DEFAULT_MIN_PER_CLASS = 10
REVIEWS_SOURCE = "reviews"
BOOTSTRAP_SEED = 0
_NAMES_SHOWN = 10


class SiteValidationError(ValueError):
    """Data or a model that cannot validate a site; the message names the problem. Nothing is stored."""


@dataclass(frozen=True)
class SiteImage:
    """One labelled image: its bytes, or the file (a path, or a stored patch's name in the
    platform's storage) to read them from when its batch comes."""

    label: str
    name: str
    data: bytes | None = None
    path: Path | None = None
    storage_name: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is not None:
            return self.path.read_bytes()
        if self.storage_name is not None:
            with default_storage.open(self.storage_name, "rb") as handle:
                return handle.read()
        raise OSError("no data and no file")


@dataclass(frozen=True)
class SiteMeasurement:
    """What ``site_measure`` found; ``site_validation_create`` stores it as it is."""

    counts: dict[str, int]
    manifest_sha256: str
    metrics: dict[str, Any]
    target_sensitivity: float
    threshold: float
    sensitivity: float
    specificity: float
    passed: bool


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_NAMES_SHOWN])
    return shown + (f" and {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN else "")


def site_images_from_folder(*, directory: str | Path, classes: list[str]) -> list[SiteImage]:
    """The images of a folder-per-class dataset (NCT/Kather layouts, ``export_reviews`` output) of
    the given classes; files are read later, batch by batch."""
    root = Path(directory)
    try:
        found = scan_folder(root, tuple(classes))
    except (FileNotFoundError, ValueError) as exc:
        raise SiteValidationError(str(exc)) from None
    return [SiteImage(label=image.label, name=str(image.path.relative_to(root)), path=image.path) for image in found]


def site_images_from_reviews(*, institution, model_version: ModelVersion | None = None) -> list[SiteImage]:
    """The institution's reviewed NORM and TUM patches, the final reviewed class as truth.

    Final classes are chosen as ``export_reviews`` chooses them (``cases.review.final_labels``):
    a patch whose second read or adjudication is still missing is not ground truth yet. Only NORM
    and TUM are taken, the two classes the operating point is about, so rarer classes cannot make
    the per-class minimum fail. Patches ``model_version`` was fine-tuned on (its lineage) are left
    out: a model is validated on reviews it has not seen.
    """
    from cases.export import export_digest
    from cases.models import BiopsyCase, TissuePatch
    from cases.review import final_labels
    from inference.services import trained_on

    truth: dict[int, str] = {}
    for case in BiopsyCase.objects.filter(institution=institution, patches__reviews__isnull=False).distinct():
        truth.update(final_labels(case))
    wanted = {pk: label for pk, label in truth.items() if label in (NEGATIVE_CLASS, POSITIVE_CLASS)}
    seen = trained_on(model_version) if model_version is not None else set()
    images, unreadable = [], []
    for patch in TissuePatch.objects.filter(pk__in=wanted).order_by("pk"):
        image = SiteImage(label=wanted[patch.pk], name=f"patch {patch.pk}", storage_name=patch.storage_name)
        try:
            # Read now only to leave out what the model was trained on; otherwise batch by batch.
            if seen and export_digest(image.read()) in seen:
                continue
            if not seen and not default_storage.exists(patch.storage_name):
                raise OSError("the stored file is missing")
        except OSError as exc:
            unreadable.append(f"{image.name} ({exc})")
            continue
        images.append(image)
    if unreadable:
        raise SiteValidationError(f"{len(unreadable)} stored patch file(s) cannot be read: {_names(unreadable)}")
    return images


def site_measure(
    *,
    model_version: ModelVersion,
    images: list[SiteImage],
    target_sensitivity: float,
    min_per_class: int = DEFAULT_MIN_PER_CLASS,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SiteMeasurement:
    """Run every image through the served path and measure the model on them. Writes nothing.

    ``progress`` is called with the number of images done after each batch.
    """
    classes = list(model_version.classes)
    lacking = [c for c in (NEGATIVE_CLASS, POSITIVE_CLASS) if c not in classes]
    if lacking:
        raise SiteValidationError(
            f"{model_version} has no {' or '.join(lacking)} class: the tumour operating point cannot be validated"
        )
    if not 0.0 < target_sensitivity <= 1.0:
        raise SiteValidationError(f"the target sensitivity must be in (0, 1], got {target_sensitivity}")
    unknown = sorted({image.label for image in images} - set(classes))
    if unknown:
        raise SiteValidationError(f"classes {model_version} does not know: {', '.join(unknown)}")
    provided = Counter(image.label for image in images)
    missing = [c for c in (NEGATIVE_CLASS, POSITIVE_CLASS) if not provided[c]]
    if missing:
        raise SiteValidationError(f"no {' and no '.join(missing)} images: both NORM and TUM are needed")
    few = [f"{c} {n}" for c, n in sorted(provided.items()) if n < min_per_class]
    if few:
        raise SiteValidationError(f"too few images ({', '.join(few)}): at least {min_per_class} per class are needed")

    try:
        predictor = Predictor(model_version.directory)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SiteValidationError(f"cannot load {model_version}: {exc}") from None
    if predictor.file_sha256 != model_version.file_sha256:
        raise SiteValidationError(f"{model_version}: the model file changed since it was registered")

    outcomes: list[pipeline.PatchOutcome] = []
    failures: list[str] = []
    digests: list[tuple[str, str]] = []
    size = max(1, batch_size or settings.INFERENCE_BATCH_SIZE)
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        payloads, read_errors = [], {}
        for image in chunk:
            try:
                data = image.read()
            except OSError as exc:
                read_errors[image.name] = f"cannot read the file: {exc.strerror or exc}"
                data = b""
            payloads.append(data)
            digests.append((image.label, hashlib.sha256(data).hexdigest()))
        for image, outcome in zip(chunk, pipeline.analyse(predictor, payloads), strict=True):
            if outcome.status == pipeline.FAILED:
                failures.append(f"{image.name} ({read_errors.get(image.name) or outcome.reason})")
            outcomes.append(outcome)
        if progress is not None:
            progress(len(chunk))
    if failures:
        raise SiteValidationError(f"{len(failures)} file(s) cannot be read or decoded: {_names(failures)}")

    manifest = hashlib.sha256(json.dumps(sorted(digests)).encode()).hexdigest()
    return _measurement(
        images=images,
        outcomes=outcomes,
        classes=classes,
        model_temperature=predictor.temperature,
        default_threshold=model_default_threshold(model_version),
        target=target_sensitivity,
        manifest=manifest,
    )


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    if not len(array):
        return {"mean": 0.0, "std": 0.0}
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": round(float(array.mean()), 6), "std": round(std, 6)}


def _measurement(
    *,
    images: list[SiteImage],
    outcomes: list[pipeline.PatchOutcome],
    classes: list[str],
    model_temperature: float,
    default_threshold: float,
    target: float,
    manifest: str,
) -> SiteMeasurement:
    provided = Counter(image.label for image in images)
    analysed = [(image.label, o) for image, o in zip(images, outcomes, strict=True) if o.prediction is not None]
    # Failed decodes were refused before; what is left without a prediction the quality check rejected.
    rejected = [
        (image.label, o.reason_code or o.status)
        for image, o in zip(images, outcomes, strict=True)
        if o.prediction is None
    ]
    for needed in (POSITIVE_CLASS, NEGATIVE_CLASS):
        if not any(label == needed for label, _ in analysed):
            raise SiteValidationError(
                f"no {needed} patch passed the quality check ({provided[needed]} rejected): "
                f"the operating point needs at least one analysed {needed} patch"
            )
    labels = [label for label, _ in analysed]
    predictions = [o.prediction for _, o in analysed]
    probabilities = np.array([[p.scores[c] for c in classes] for p in predictions])
    report = evaluation.evaluate(probabilities, labels, classes)
    scored = report["classes"]
    restricted = evaluation.restrict_to_classes(probabilities, classes, scored)
    truth = np.array([scored.index(label) for label in labels])

    # Per class, one against the rest, on the readout restricted to the classes present.
    matrix = np.asarray(report["confusion_matrix"])
    n = len(labels)
    per_class = {}
    for i, name in enumerate(scored):
        support, called = int(matrix[i].sum()), int(matrix[:, i].sum())
        true_pos = int(matrix[i, i])
        per_class[name] = {
            "sensitivity": evaluation.proportion(true_pos, support),
            "specificity": evaluation.proportion(n - support - (called - true_pos), n - support),
            "precision": report["per_class"][name]["precision"],
            "support": support,
        }

    # The operating point: TUM against NORM on the calibrated TUM probability the UI shows.
    binary = [i for i, label in enumerate(labels) if label in (NEGATIVE_CLASS, POSITIVE_CLASS)]
    tumour = np.array([predictions[i].scores[POSITIVE_CLASS] for i in binary])
    is_tumour = np.array([labels[i] == POSITIVE_CLASS for i in binary])
    point = evaluation.threshold_for_sensitivity(tumour, is_tumour, target)
    at_default = evaluation.rates_at_threshold(tumour, is_tumour, default_threshold)
    auc = evaluation.roc_auc_interval(tumour, is_tumour, seed=BOOTSTRAP_SEED)
    threshold = point["threshold"]

    # Temperature refitted on the site's data (informational: the served calibration is the model's).
    # T * log(p) recovers the logits up to a per-row constant, which softmax ignores.
    logits = model_temperature * np.log(np.clip(restricted, 1e-12, 1.0))
    site_temperature = evaluation.fit_temperature(logits, truth)
    ece_after = evaluation.expected_calibration_error(evaluation.softmax(logits, site_temperature), truth)

    total = len(images)
    codes = Counter(code for _, code in rejected)
    all_tumour = np.array([p.scores[POSITIVE_CLASS] for p in predictions])
    predicted = Counter(p.label for p in predictions)
    baseline = {
        "n": n,
        "od_h": _mean_std([o.measures["od_h"] for _, o in analysed if "od_h" in o.measures]),
        "od_e": _mean_std([o.measures["od_e"] for _, o in analysed if "od_e" in o.measures]),
        "sharpness": _mean_std([o.measures["sharpness"] for _, o in analysed if "sharpness" in o.measures]),
        "qc_rejection_rate": round(len(rejected) / total, 6),
        "qc_rejections": {code: round(count / total, 6) for code, count in sorted(codes.items())},
        "mean_uncertainty": round(float(np.mean([p.uncertainty for p in predictions])), 6),
        "needs_attention_rate": round(sum(p.needs_attention for p in predictions) / n, 6),
        "class_mix": {c: round(predicted[c] / n, 6) for c in classes},
        "suspected_tumour_rate": round(float((all_tumour >= threshold).mean()), 6),
        "agreement": round(sum(p.label == label for p, label in zip(predictions, labels, strict=True)) / n, 6),
    }
    counts = {c: int(labels.count(c)) for c in sorted(set(labels))}
    enough = all(counts.get(c, 0) >= settings.SITE_VALIDATION_MIN_PER_CLASS for c in provided)
    reached = point["sensitivity"]["value"] >= target
    metrics = {
        "images": dict(sorted(provided.items())),
        "analysed": counts,
        "classes": scored,
        "note": report["note"],
        "accuracy": evaluation.proportion(int(np.trace(matrix)), n),
        "balanced_accuracy": report["balanced_accuracy"],
        "confusion_matrix": report["confusion_matrix"],
        "per_class": per_class,
        "roc_auc": {"positive": POSITIVE_CLASS, "negative": NEGATIVE_CLASS, **auc},
        "roc_curve": evaluation.roc_curve(tumour, is_tumour),
        "ece": report["ece"],
        "reliability": evaluation.reliability_bins(restricted, truth),
        "calibration": {
            "model_temperature": round(model_temperature, 6),
            "site_temperature": round(site_temperature, 6),
            "ece_before": report["ece"],
            "ece_after": round(ece_after, 6),
        },
        "quality_check": {
            "rejected": len(rejected),
            "rate": baseline["qc_rejection_rate"],
            "by_reason": {code: {"count": count, "rate": round(count / total, 6)} for code, count in codes.items()},
            "by_class": dict(sorted(Counter(label for label, _ in rejected).items())),
        },
        "operating_point": {
            "class": POSITIVE_CLASS,
            "negative": NEGATIVE_CLASS,
            "target_sensitivity": target,
            **point,
            "default_threshold": default_threshold,
            "at_default_threshold": at_default,
        },
        "min_per_class": settings.SITE_VALIDATION_MIN_PER_CLASS,
        "checks": {"enough_per_class": enough, "target_reached": reached},
        "baseline": baseline,
    }
    return SiteMeasurement(
        counts=counts,
        manifest_sha256=manifest,
        metrics=metrics,
        target_sensitivity=target,
        threshold=threshold,
        sensitivity=point["sensitivity"]["value"],
        specificity=point["specificity"]["value"],
        passed=enough and reached,
    )


def site_validation_create(
    *,
    institution,
    model_version: ModelVersion,
    measurement: SiteMeasurement,
    data_source: str,
    user=None,
    actor: str = "",
    request=None,
) -> SiteValidation:
    """Store a measurement as the institution's SiteValidation, with its audit event."""
    with transaction.atomic():
        validation = SiteValidation.objects.create(
            institution=institution,
            model_version=model_version,
            data_source=data_source[:500],
            data_manifest_sha256=measurement.manifest_sha256,
            counts=measurement.counts,
            metrics=measurement.metrics,
            target_sensitivity=measurement.target_sensitivity,
            threshold=measurement.threshold,
            sensitivity=measurement.sensitivity,
            specificity=measurement.specificity,
            passed=measurement.passed,
            created_by=user,
            actor=actor or (user.get_username() if user is not None else "system"),
        )
        metrics = measurement.metrics
        audit_record(
            actor=user or Actor(AuditEvent.ActorType.SYSTEM, label=validation.actor),
            action="site_validation.create",
            target=validation,
            after={
                "model_version": str(model_version),
                "data_source": validation.data_source,
                "data_manifest_sha256": validation.data_manifest_sha256,
                "counts": validation.counts,
                "target_sensitivity": validation.target_sensitivity,
                "threshold": validation.threshold,
                "sensitivity": validation.sensitivity,
                "specificity": validation.specificity,
                "roc_auc": metrics["roc_auc"]["value"],
                "accuracy": metrics["accuracy"]["value"],
                "passed": validation.passed,
            },
            request=request,
        )
    logger.warning(
        "site validation %s: %s at %s, threshold %.4f, passed %s",
        validation.pk,
        model_version,
        institution,
        validation.threshold,
        validation.passed,
    )
    return validation


def site_validate(
    *,
    institution,
    model_version: ModelVersion,
    images: list[SiteImage],
    data_source: str,
    target_sensitivity: float | None = None,
    min_per_class: int = DEFAULT_MIN_PER_CLASS,
    user=None,
    actor: str = "",
    request=None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> SiteValidation:
    """Measure ``model_version`` on an institution's labelled images and store the result.

    The images are read and analysed first, outside any transaction (``site_measure``); the
    SiteValidation and its audit event are then written together. ``target_sensitivity``
    defaults to SITE_TARGET_SENSITIVITY. Raises SiteValidationError, storing nothing, for data
    that cannot validate the site.
    """
    target = settings.SITE_TARGET_SENSITIVITY if target_sensitivity is None else float(target_sensitivity)
    measurement = site_measure(
        model_version=model_version,
        images=images,
        target_sensitivity=target,
        min_per_class=min_per_class,
        batch_size=batch_size,
        progress=progress,
    )
    return site_validation_create(
        institution=institution,
        model_version=model_version,
        measurement=measurement,
        data_source=data_source,
        user=user,
        actor=actor,
        request=request,
    )


def site_validation_report(validation: SiteValidation) -> dict[str, Any]:
    """A stored validation as a JSON-serialisable report (``validate_site --json``)."""
    return {
        "id": validation.pk,
        "institution": validation.institution.slug,
        "model": {
            "name": validation.model_version.name,
            "version": validation.model_version.version,
            "file_sha256": validation.model_version.file_sha256,
        },
        "data_source": validation.data_source,
        "data_manifest_sha256": validation.data_manifest_sha256,
        "created_at": validation.created_at.isoformat(),
        "actor": validation.actor,
        "counts": validation.counts,
        "target_sensitivity": validation.target_sensitivity,
        "threshold": validation.threshold,
        "sensitivity": validation.sensitivity,
        "specificity": validation.specificity,
        "passed": validation.passed,
        "metrics": validation.metrics,
    }
