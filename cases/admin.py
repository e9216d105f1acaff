from django.contrib import admin

from accounts.permissions import InstitutionScopedAdmin
from cases.models import BiopsyCase, Patient, TissuePatch


@admin.register(Patient)
class PatientAdmin(InstitutionScopedAdmin, admin.ModelAdmin):
    list_display = ["mrn", "name", "institution", "birth_date", "sex"]
    list_filter = ["institution"]
    search_fields = ["mrn", "name"]


class TissuePatchInline(admin.TabularInline):
    model = TissuePatch
    fields = ["original_name", "status", "failure_reason", "width", "height", "format", "sha256"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(BiopsyCase)
class BiopsyCaseAdmin(InstitutionScopedAdmin, admin.ModelAdmin):
    list_display = ["accession", "institution", "patient", "status", "priority", "created_at"]
    list_filter = ["institution", "status", "priority"]
    search_fields = ["accession", "patient__mrn"]
    readonly_fields = ["status", "created_by", "created_by_lab", "created_at", "updated_at"]
    inlines = [TissuePatchInline]
