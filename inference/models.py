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
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["patch", "model_version"], name="unique_prediction_per_model")]

    def __str__(self) -> str:
        return f"{self.patch_id}: {self.label}"


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
