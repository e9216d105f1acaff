from django.contrib import admin
from django.contrib.admin.utils import unquote

from accounts.models import User
from audit.services import patient_read
from cases.models import BiopsyCase, Patient, TissuePatch
from cloudiopsy.admin_tenancy import TenantModelAdmin, TenantReadOnlyTabularInline


class PatientReadsAudited:
    """Pages of this admin that show patients' identifying data record who saw which patients:
    a change form (or delete or history page) one read, a changelist page one read of the patients
    on it."""

    def patients_shown(self, obj) -> list[Patient]:
        raise NotImplementedError

    def _record_read(self, request, object_id) -> None:
        if request.method != "GET":
            return  # a save is audited as a change; a form shown again after an error was read already
        obj = self.get_object(request, unquote(object_id))
        if obj is not None and self.has_view_or_change_permission(request, obj):
            patient_read(
                principal=request.user,
                patients=self.patients_shown(obj),
                via="admin",
                request=request,
                case=obj if isinstance(obj, BiopsyCase) else None,
            )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        self._record_read(request, object_id)
        return super().change_view(request, object_id, form_url, extra_context)

    def delete_view(self, request, object_id, extra_context=None):
        self._record_read(request, object_id)
        return super().delete_view(request, object_id, extra_context)

    def history_view(self, request, object_id, extra_context=None):
        self._record_read(request, object_id)
        return super().history_view(request, object_id, extra_context)

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", None) and response.context_data.get("cl")
        if changelist is not None:
            rows = list(changelist.result_list)  # evaluated once, here and for the page
            by_institution: dict[int, dict[int, Patient]] = {}
            for row in rows:
                for patient in self.patients_shown(row):
                    by_institution.setdefault(patient.institution_id, {})[patient.pk] = patient
            # One event per page (per institution on it, for an operator): each institution's trail
            # shows the reads of its own patients.
            for patients in by_institution.values():
                patient_read(principal=request.user, patients=patients.values(), via="admin list", request=request)
        return response


@admin.register(Patient)
class PatientAdmin(PatientReadsAudited, TenantModelAdmin):
    list_display = ["mrn", "name", "institution", "birth_date", "sex"]
    list_filter = ["institution"]
    list_select_related = ["institution"]
    search_fields = ["mrn", "name"]

    def patients_shown(self, obj) -> list[Patient]:
        return [obj]


class TissuePatchInline(TenantReadOnlyTabularInline):
    model = TissuePatch
    fields = ["original_name", "status", "failure_reason", "width", "height", "format", "sha256"]


@admin.register(BiopsyCase)
class BiopsyCaseAdmin(PatientReadsAudited, TenantModelAdmin):
    list_display = ["accession", "institution", "patient", "status", "priority", "created_at"]
    list_filter = ["institution", "status", "priority"]
    list_select_related = ["institution", "patient"]
    search_fields = ["accession", "patient__mrn"]
    readonly_fields = ["status", "created_by", "created_by_lab", "created_at", "updated_at"]
    # The patient by id (its MRN and name shown beside it), not a list of every patient.
    raw_id_fields = ["patient"]
    inlines = [TissuePatchInline]

    def patients_shown(self, obj) -> list[Patient]:
        return [obj.patient]

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "assigned_to":
            kwargs["queryset"] = User.objects.filter(role=User.Role.PATHOLOGIST, is_active=True)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def has_add_permission(self, request) -> bool:
        # Cases come from the new-case page or the API: case_create checks and audits them.
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        # After sign-out a case is read-only but for addenda, in the admin too.
        if obj is not None and obj.status == BiopsyCase.Status.SIGNED_OUT:
            return False
        return super().has_change_permission(request, obj)
