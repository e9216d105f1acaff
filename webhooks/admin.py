from django import forms
from django.contrib import admin

from cloudiopsy.admin_tenancy import TenantModelAdmin, TenantReadOnlyAdmin
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.services import check_url


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(
        max_length=500, assume_scheme="https", help_text=WebhookEndpoint._meta.get_field("url").help_text
    )

    class Meta:
        model = WebhookEndpoint
        fields = ["url", "active"]

    def clean_url(self):
        # The same rule as set_lab_webhook: https, public addresses (unless the settings allow more).
        url = self.cleaned_data["url"]
        try:
            check_url(url)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        return url


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(TenantModelAdmin):
    """Pause (``active``) or re-point a lab system's callback. The signing secret is never shown
    or audited; a new one comes only from ``set_lab_webhook``."""

    form = WebhookEndpointForm
    list_display = ["lab_system", "url", "active", "created_at"]
    list_select_related = ["lab_system__institution"]  # a lab system is shown with its institution's slug
    list_filter = ["active"]
    fields = ["lab_system", "url", "active", "created_at"]
    readonly_fields = ["lab_system", "created_at"]

    def has_add_permission(self, request) -> bool:
        return False  # set_lab_webhook shows the new secret once

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # it would take the delivery log with it: set it inactive instead


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(TenantReadOnlyAdmin):
    """The delivery log: every event, its attempts and the receiver's last answer."""

    list_display = ["created_at", "event", "case", "endpoint", "status", "attempts", "last_status_code", "delivered_at"]
    list_filter = ["status", "event"]
    list_select_related = ["case", "endpoint__lab_system__institution"]
