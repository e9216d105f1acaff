"""The model registry: which model versions exist, which one is served, and loading it.

A version is registered only after its files' SHA-256, classes and serving copy check out, and
activated with a record of who, when, why and what it replaced (shadow figures on reviewed
patches, site validations). The active version is loaded once per process and its files are
checked again on load.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor, audit_record
from inference import core
from inference.core import pipeline
from inference.core.datasets import CANONICAL_CLASSES
from inference.core.model import MODEL_FILE, SERVING_FILE, Predictor, file_sha256, read_metadata, verify_files
from inference.models import ModelActivation, ModelVersion

logger = logging.getLogger(__name__)

_models: dict[int, Predictor] = {}
_models_lock = threading.Lock()


class ModelUnavailable(RuntimeError):
    """No usable active model: patches stay queued until one is activated."""


class ModelRejected(ValueError):
    """A model directory the platform cannot register or serve; the message says why."""


def model_load_active() -> tuple[ModelVersion, Predictor]:
    """The active model version, loaded once per process and kept in memory."""
    version = ModelVersion.objects.filter(is_active=True).first()
    if version is None:
        raise ModelUnavailable("no active model version")
    with _models_lock:
        loaded = _models.get(version.pk)
        if loaded is None:
            loaded = core.Predictor(version.directory, num_threads=settings.INFERENCE_THREADS or None)
            if loaded.file_sha256 != version.file_sha256:
                raise ModelUnavailable(
                    f"{version}: model file hash {loaded.file_sha256} differs from the registered "
                    f"{version.file_sha256}; refusing to serve a changed model"
                )
            _models.clear()  # one model in memory: the previous active one is no longer needed
            _models[version.pk] = loaded
            logger.info("loaded model %s (%s) from %s", version, loaded.backend, version.directory)
    return version, loaded


def model_check(directory: str | Path) -> dict:
    """The metadata of a model directory the platform can serve, or ModelRejected saying why.

    Checks: required files and metadata, every recorded file hash, classes known to the
    platform, a supported input spec, and that the serving copy loads with matching outputs.
    """
    directory = Path(directory)
    try:
        metadata = read_metadata(directory)
        verify_files(directory, metadata)
    except (OSError, ValueError) as exc:
        raise ModelRejected(str(exc)) from None
    unknown = [c for c in metadata["classes"] if c not in CANONICAL_CLASSES]
    if unknown:
        raise ModelRejected(f"classes the platform does not know: {', '.join(unknown)}")
    if not (directory / SERVING_FILE).is_file():
        raise ModelRejected(f"{directory / SERVING_FILE} (the LiteRT serving copy) is missing")
    try:
        core.Predictor(directory)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelRejected(f"the serving copy cannot be loaded: {exc}") from None
    return metadata


def model_register(*, directory: str | Path) -> tuple[ModelVersion, bool]:
    """Register a model directory after ``model_check``. Returns (version, created).

    Registering the same name, version and files again is a no-op; the same name and version
    with different files is refused (bump the version).
    """
    directory = Path(directory).resolve()
    metadata = model_check(directory)
    sha = file_sha256(directory / MODEL_FILE)
    base = Path(settings.BASE_DIR).resolve()
    stored_path = str(directory.relative_to(base)) if directory.is_relative_to(base) else str(directory)
    with transaction.atomic():
        version, created = ModelVersion.objects.get_or_create(
            name=metadata["name"],
            version=str(metadata["version"]),
            defaults={
                "path": stored_path,
                "file_sha256": sha,
                "classes": metadata["classes"],
                "input_size": metadata["input_size"],
                "preprocessing": metadata["preprocessing"],
                "metadata": metadata,
            },
        )
        if created:
            audit_record(
                actor=None,
                action="model.register",
                target=version,
                after={"name": version.name, "version": version.version, "path": stored_path, "sha256": sha},
            )
    if not created and version.file_sha256 != sha:
        raise ModelRejected(f"{version} is already registered with a different model file; bump the version")
    return version, created


def shadow_evaluate(*, candidate: ModelVersion, baseline: ModelVersion) -> dict:
    """Both models on every reviewed patch, the pathologists' final classes as truth.

    Scores are restricted to the classes both models know and the reviews use; accuracy is over
    the reviewed patches whose final class is among them.
    """
    import numpy as np

    from cases.export import export_digest
    from cases.models import Review
    from inference.core import evaluation

    latest: dict[int, Review] = {}
    for review in Review.objects.select_related("patch").order_by("patch_id", "id"):
        latest[review.patch_id] = review
    shared = set(candidate.classes) & set(baseline.classes)
    reviews = [r for r in latest.values() if r.final_label in shared]
    result: dict = {"patches": len(reviews)}
    if not reviews:
        return result
    payloads = []
    for review in reviews:
        with default_storage.open(review.patch.storage_name, "rb") as handle:
            payloads.append(handle.read())
    # A version fine-tuned on reviewed patches is judged only on the reviews it did not see.
    seen = trained_on(candidate) | trained_on(baseline)
    if seen:
        kept = [(r, p) for r, p in zip(reviews, payloads, strict=True) if export_digest(p) not in seen]
        result["left_out_trained_on"] = len(reviews) - len(kept)
        result["patches"] = len(kept)
        reviews, payloads = [r for r, _ in kept], [p for _, p in kept]
        if not reviews:
            return result
    truth = [r.final_label for r in reviews]
    keep = sorted(set(truth))
    for name, version in (("candidate", candidate), ("active", baseline)):
        predictor = Predictor(version.directory)
        outcomes = pipeline.analyse(predictor, payloads)
        scores = np.array(
            [[o.prediction.scores[c] if o.prediction else 0.0 for c in predictor.classes] for o in outcomes]
        )
        restricted = evaluation.restrict_to_classes(scores, list(predictor.classes), keep)
        columns = [c for c in predictor.classes if c in keep]  # restrict_to_classes keeps the model's order
        predicted = [columns[i] for i in restricted.argmax(axis=1)]
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        result[name] = {"version": str(version), "accuracy": round(correct / len(truth), 6), "correct": correct}
    return result


def trained_on(version: ModelVersion) -> set[str]:
    """Export digests (``cases.export.export_digest``) of the reviewed patches a version was trained on."""
    lineage = ((version.metadata or {}).get("training") or {}).get("lineage") or {}
    return set(lineage.get("trained_on_sha256") or [])


def model_activate(
    *, version: ModelVersion, actor: str, user=None, reason: str = "", force: bool = False
) -> ModelActivation | None:
    """Make ``version`` the one the workers serve, after re-checking its files. Records who and when.

    When a model is active and patches have been reviewed, both are first evaluated on every
    reviewed patch (``shadow_evaluate``); a candidate that does worse is refused unless
    ``force`` is given with a ``reason`` (both audited).

    With REQUIRE_SITE_VALIDATION, every institution that has users or cases needs a passing
    SiteValidation of ``version`` (``validate_site``); without one, activation is refused unless
    ``force`` is given with a ``reason`` (both audited).

    Returns the activation record, or None when the version was already active.
    """
    from django.db.models import Q

    from accounts.models import Institution
    from inference.models import SiteValidation
    from inference.selectors import site_validation_required

    model_check(version.directory)
    if ModelVersion.objects.filter(pk=version.pk, is_active=True).exists():
        return None
    # Institutions in use (with users or cases) and whether each has a passing validation of it.
    in_use = Institution.objects.filter(Q(users__isnull=False) | Q(cases__isnull=False)).distinct().order_by("slug")
    validated = set(
        SiteValidation.objects.filter(model_version=version, passed=True).values_list("institution_id", flat=True)
    )
    sites = {
        "required": site_validation_required(),
        "validated": [i.slug for i in in_use if i.pk in validated],
        "missing": [i.slug for i in in_use if i.pk not in validated],
    }
    if sites["required"] and sites["missing"]:
        if not force:
            raise ModelRejected(
                f"{version} has no passing site validation at {', '.join(sites['missing'])}; run validate_site "
                "there first (REQUIRE_SITE_VALIDATION is on), or activate it only with force and a reason"
            )
        if not reason.strip():
            raise ModelRejected("forcing the activation of a model not validated at every site needs a reason")
    current_active = ModelVersion.objects.filter(is_active=True).first()
    shadow = None
    if current_active is not None and current_active.pk != version.pk:
        shadow = shadow_evaluate(candidate=version, baseline=current_active)
        worse = shadow["patches"] and shadow["candidate"]["accuracy"] < shadow["active"]["accuracy"]
        if worse and not force:
            raise ModelRejected(
                f"{version} is worse than the active {current_active} on the {shadow['patches']} reviewed patches "
                f"(accuracy {shadow['candidate']['accuracy']:.3f} against {shadow['active']['accuracy']:.3f}); "
                "activate it anyway only with force and a reason"
            )
        if worse and not reason.strip():
            raise ModelRejected("forcing the activation of a worse model needs a reason")
    if file_sha256(version.directory / MODEL_FILE) != version.file_sha256:
        raise ModelRejected(f"{version}: the model file changed since it was registered")
    with transaction.atomic():
        current = ModelVersion.objects.select_for_update().filter(is_active=True).first()
        if current is not None and current.pk == version.pk:
            return None
        ModelVersion.objects.filter(is_active=True).update(is_active=False)
        ModelVersion.objects.filter(pk=version.pk).update(
            is_active=True, activated_at=timezone.now(), activated_by=user
        )
        activation = ModelActivation.objects.create(
            model_version=version, previous=current, activated_by=user, actor=actor, reason=reason
        )
        audit_record(
            actor=user or Actor(AuditEvent.ActorType.SYSTEM, label=actor),
            action="model.activate",
            target=version,
            before={"active": str(current) if current else None},
            after={
                "active": str(version),
                "shadow_evaluation": shadow,
                "site_validation": sites,
                "forced": bool(force),
            },
            reason=reason,
        )
    logger.warning("model %s activated by %s (was %s)", version, actor, current)
    return activation
