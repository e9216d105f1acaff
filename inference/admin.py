import json

from django.contrib import admin
from django.utils.html import format_html

from inference.models import ModelVersion, Prediction, WorkerHeartbeat


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "is_active", "input_size", "created_at", "activated_at"]
    list_filter = ["is_active"]
    readonly_fields = [
        "name",
        "version",
        "path",
        "file_sha256",
        "classes",
        "input_size",
        "preprocessing",
        "metadata_pretty",
        "is_active",
        "created_at",
        "activated_at",
        "activated_by",
    ]
    exclude = ["metadata"]

    @admin.display(description="metadata")
    def metadata_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.metadata, indent=2))

    def has_add_permission(self, request) -> bool:
        return False  # register with `manage.py seed_demo` / the registry commands (files are verified)


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    """Read-only: a prediction is the AI's record and is never edited."""

    list_display = ["patch", "label", "model_version", "created_at"]
    list_filter = ["model_version", "label"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(admin.ModelAdmin):
    list_display = ["hostname", "last_seen", "started_at"]
