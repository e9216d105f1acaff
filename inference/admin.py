import json

from django.contrib import admin
from django.utils.html import format_html

from accounts.permissions import InstitutionScopedAdmin
from inference.core.card import model_card
from inference.models import ModelActivation, ModelVersion, Prediction, WorkerHeartbeat


class ModelActivationInline(admin.TabularInline):
    model = ModelActivation
    fk_name = "model_version"
    fields = ["created_at", "actor", "previous", "reason"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


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
        "model_card",
        "metadata_pretty",
        "is_active",
        "created_at",
        "activated_at",
        "activated_by",
    ]
    exclude = ["metadata"]
    inlines = [ModelActivationInline]

    @admin.display(description="model card")
    def model_card(self, obj):
        return format_html('<pre style="white-space:pre-wrap">{}</pre>', model_card(obj.metadata))

    @admin.display(description="metadata")
    def metadata_pretty(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.metadata, indent=2))

    def has_add_permission(self, request) -> bool:
        return False  # register_model / activate_model verify the files and record who activated

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # predictions point at it


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records nobody edits by hand: they are written by the platform and kept as they are."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Prediction)
class PredictionAdmin(InstitutionScopedAdmin, ReadOnlyAdmin):
    """A prediction is the AI's record and is never edited."""

    institution_lookup = "patch__case__institution_id"

    list_display = ["patch", "label", "needs_attention", "model_version", "created_at"]
    list_filter = ["model_version", "label", "needs_attention"]


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(admin.ModelAdmin):
    list_display = ["hostname", "last_seen", "started_at"]


@admin.register(ModelActivation)
class ModelActivationAdmin(ReadOnlyAdmin):
    """History of which model was active when, and who switched it."""

    list_display = ["created_at", "model_version", "previous", "actor", "reason"]
