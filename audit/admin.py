from django.contrib import admin

from audit.models import AuditEvent
from cloudiopsy.admin_tenancy import TenantReadOnlyAdmin


@admin.register(AuditEvent)
class AuditEventAdmin(TenantReadOnlyAdmin):
    """Browse and filter the trail. Nothing here can change it (and the database refuses to)."""

    list_display = [
        "id",
        "created_at",
        "action",
        "actor_type",
        "actor_label",
        "target_type",
        "target_id",
        "client_address",
    ]
    list_filter = ["action", "actor_type", "target_type", "institution_id"]
    search_fields = ["actor_label", "target_id", "reason", "hash"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in AuditEvent._meta.fields]
