"""Model versions, predictions, and worker liveness."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q

from cases.models import TissuePatch


class ModelVersion(models.Model):
    """A registered classifier: a directory with model.keras and metadata.json. At most one is active."""

    name = models.CharField(max_length=100)
    version = models.CharField(max_length=40)
    path = models.CharField(
        max_length=500, help_text="Model directory; relative paths are relative to the project directory."
    )
    file_sha256 = models.CharField(max_length=64, help_text="SHA-256 of model.keras when registered.")
    classes = models.JSONField(help_text="Output class names, in the model's order.")
    input_size = models.PositiveIntegerField(help_text="Square input side in pixels.")
    preprocessing = models.CharField(max_length=40)
    metadata = models.JSONField(help_text="metadata.json as registered: training data, metrics.")
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    activated_at = models.DateTimeField(null=True, blank=True)
    activated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["name", "version"], name="unique_model_version"),
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="one_active_model"),
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def directory(self) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else Path(settings.BASE_DIR) / path


class Prediction(models.Model):
    """The AI's proposal for one patch by one model version. Never edited after it is written."""

    patch = models.ForeignKey(TissuePatch, on_delete=models.PROTECT, related_name="predictions")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="predictions")
    scores = models.JSONField(help_text="{class: probability 0..1}, summing to 1.")
    label = models.CharField(max_length=32, help_text="Most probable class.")
    uncertainty = models.FloatField(
        null=True, help_text="Normalised entropy of the calibrated scores: 0 certain .. 1 uniform."
    )
    needs_attention = models.BooleanField(
        default=False, help_text="The top calibrated probability is below the model's attention threshold."
    )
    heatmaps = models.JSONField(
        default=dict,
        blank=True,
        help_text="{class: grid of local probabilities 0..1} for the predicted class and TUM (class activation map).",
    )
    inference_seconds = models.FloatField(help_text="Model time for this patch (batch time / batch size).")
    suspected_tumour = models.BooleanField(
        null=True,
        help_text="TUM probability at or above the threshold below; empty for a model without a TUM class.",
    )
    tumour_threshold = models.FloatField(
        null=True, blank=True, help_text="The TUM-probability threshold this prediction was judged by, 0..1."
    )
    site_validation = models.ForeignKey(
        "SiteValidation",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="predictions",
        help_text="The passing site validation whose threshold applied; empty: not validated at this site "
        "(the model's default threshold applied).",
    )
    input_stats = models.JSONField(
        default=dict,
        blank=True,
        help_text="Input statistics for drift monitoring: mean optical density of haematoxylin and eosin.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["patch", "model_version"], name="unique_prediction_per_model")]

    def __str__(self) -> str:
        return f"{self.patch_id}: {self.label}"

    @property
    def validated_at_site(self) -> bool:
        return self.site_validation_id is not None


class ModelActivation(models.Model):
    """Who activated which model version when, and what it replaced. Append-only."""

    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="activations")
    previous = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    activated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    actor = models.CharField(max_length=150, help_text="Who acted, as recorded (user name or 'system: ...').")
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.model_version} by {self.actor}"


class WorkerHeartbeat(models.Model):
    """Last sign of life of each Celery worker, for /healthz. Works with any broker."""

    hostname = models.CharField(max_length=255, unique=True)
    last_seen = models.DateTimeField()
    started_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.hostname


class AnalysisClaim(models.Model):
    """Which worker claimed a batch of patches (their ``TissuePatch.claim_token``), so that the
    reconciler can hand the batch on as soon as that worker stops sending heartbeats, or restarts,
    instead of waiting for ANALYSIS_STALE_AFTER_SECONDS."""

    token = models.UUIDField(primary_key=True)
    worker = models.CharField(max_length=255, help_text="The worker's name, as in WorkerHeartbeat.")
    claimed_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.token} by {self.worker}"


class SiteValidation(models.Model):
    """A model version measured on one institution's own labelled tissue, and the operating point
    (TUM-probability threshold for "suspected tumour") chosen for that institution from it.

    Append-only: a new validation supersedes an older one; the latest passing one applies.
    """

    institution = models.ForeignKey("accounts.Institution", on_delete=models.PROTECT, related_name="site_validations")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="site_validations")
    data_source = models.CharField(
        max_length=500, help_text="What was measured: a folder path, or 'reviews' for the site's reviewed patches."
    )
    data_manifest_sha256 = models.CharField(
        max_length=64, help_text="SHA-256 of the sorted (class, file SHA-256) list of the images measured."
    )
    counts = models.JSONField(help_text="{class: number of images measured}.")
    metrics = models.JSONField(
        help_text="Accuracy, per-class sensitivity/specificity with Wilson 95% intervals, ROC AUC with a "
        "bootstrap interval, ECE and reliability bins, QC rejections, and the input baseline for drift."
    )
    target_sensitivity = models.FloatField(help_text="Tumour sensitivity the operating point must reach, 0..1.")
    threshold = models.FloatField(
        help_text="TUM probability (calibrated, 0..1) at or above which a patch is 'suspected tumour' at this site."
    )
    sensitivity = models.FloatField(help_text="Tumour sensitivity on the data at the chosen threshold.")
    specificity = models.FloatField(help_text="Specificity (NORM called not suspected) at the chosen threshold.")
    passed = models.BooleanField(
        help_text="Enough patches per class (SITE_VALIDATION_MIN_PER_CLASS) and the target sensitivity reached: "
        "results of this model are trusted at this site."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    actor = models.CharField(max_length=150, help_text="Who ran it, as recorded (user name or 'system: ...').")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["institution", "model_version", "-created_at"], name="site_validation_latest")]

    def __str__(self) -> str:
        return f"{self.model_version} at {self.institution}: threshold {self.threshold:.3f}"
