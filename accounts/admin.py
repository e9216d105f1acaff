from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from accounts.models import Institution, LabSystem, User
from accounts.permissions import InstitutionScopedAdmin
from accounts.services import lab_system_revoke


@admin.register(Institution)
class InstitutionAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]


@admin.register(User)
class CloudiopsyUserAdmin(InstitutionScopedAdmin, UserAdmin):
    list_display = ["username", "email", "institution", "role", "is_active", "is_staff"]
    list_filter = ["institution", "role", "is_active", "is_staff"]
    fieldsets = (*UserAdmin.fieldsets, ("Institution", {"fields": ["institution", "role"]}))
    add_fieldsets = (*UserAdmin.add_fieldsets, ("Institution", {"fields": ["institution", "role"]}))


@admin.register(LabSystem)
class LabSystemAdmin(InstitutionScopedAdmin, admin.ModelAdmin):
    list_display = ["name", "institution", "token_hint", "scopes", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["institution"]
    readonly_fields = ["token_hint", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        revoked = sum(lab_system_revoke(lab_system=lab, actor=request.user) for lab in queryset)
        self.message_user(request, f"Revoked {revoked} token(s).")

    def has_add_permission(self, request) -> bool:
        # A key must be shown exactly once: create tokens with `manage.py create_lab_token`.
        return False
