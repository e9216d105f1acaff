from django.contrib import admin

from inference.admin import ReadOnlyAdmin
from webhooks.models import WebhookDelivery, WebhookEndpoint


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ["lab_system", "url", "active", "created_at"]
    list_filter = ["active"]
    fields = ["lab_system", "url", "active", "created_at"]
    readonly_fields = ["lab_system", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False  # set_lab_webhook shows the new secret once


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """The delivery log: every event, its attempts and the receiver's last answer."""

    list_display = ["created_at", "event", "case", "endpoint", "status", "attempts", "last_status_code", "delivered_at"]
    list_filter = ["status", "event"]
