from django.contrib import admin

from accounts.permissions import InstitutionScopedAdmin
from inference.admin import ReadOnlyAdmin
from webhooks.models import WebhookDelivery, WebhookEndpoint


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(InstitutionScopedAdmin, admin.ModelAdmin):
    institution_lookup = "lab_system__institution_id"
    list_display = ["lab_system", "url", "active", "created_at"]
    list_filter = ["active"]
    fields = ["lab_system", "url", "active", "created_at"]
    readonly_fields = ["lab_system", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False  # set_lab_webhook shows the new secret once


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(InstitutionScopedAdmin, ReadOnlyAdmin):
    institution_lookup = "case__institution_id"
    """The delivery log: every event, its attempts and the receiver's last answer."""

    list_display = ["created_at", "event", "case", "endpoint", "status", "attempts", "last_status_code", "delivered_at"]
    list_filter = ["status", "event"]
