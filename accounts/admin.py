from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import Group
from django.db import router, transaction
from django.db.models import Exists, OuterRef
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import Institution, LabSystem, User
from accounts.services import lab_system_revoke
from audit.services import audit_record
from cloudiopsy.admin_tenancy import (
    SECRET,
    SECRET_CHANGED,
    TenantModelAdmin,
    institution_id_of,
    is_operator,
    operator_only,
)


@admin.register(Institution)
class InstitutionAdmin(TenantModelAdmin):
    """Operators manage institutions; an institution administrator sees their own, read-only
    (its slug names it to lab tokens and the identity provider)."""

    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    staff_read_only = True


@admin.register(User)
class CloudiopsyUserAdmin(TenantModelAdmin, UserAdmin):
    """An institution administrator manages the accounts of their institution: names, roles,
    activation, passwords. Rights to the admin itself (staff status, groups, permissions,
    superuser) and the institution are the operator's."""

    list_display = ["username", "email", "institution", "role", "is_active", "is_staff"]
    list_filter = ["institution", "role", "is_active", "is_staff"]
    list_select_related = ["institution"]  # nullable: Django's automatic join leaves it out
    fieldsets = (*UserAdmin.fieldsets, ("Institution", {"fields": ["institution", "role"]}))
    add_fieldsets = (*UserAdmin.add_fieldsets, ("Institution", {"fields": ["institution", "role"]}))
    institution_fixed = False  # an operator may move a member of staff to another institution
    OPERATOR_FIELDS = ("is_staff", "is_superuser", "groups", "user_permissions")

    actions = ["reset_second_factor"]

    def get_queryset(self, request):
        queryset = (
            super()
            .get_queryset(request)
            .annotate(authenticator_enrolled=Exists(TOTPDevice.objects.filter(user=OuterRef("pk"), confirmed=True)))
        )
        # Operators' accounts are not an institution's to see or change.
        return queryset if is_operator(request.user) else queryset.filter(is_superuser=False)

    def get_list_display(self, request):
        return [*super().get_list_display(request), "second_factor"]

    @admin.display(boolean=True, description="second factor", ordering="authenticator_enrolled")
    def second_factor(self, user) -> bool:
        return user.authenticator_enrolled

    @admin.action(
        description="Reset the second factor (lost phone): they enrol again at next sign-in", permissions=["change"]
    )
    def reset_second_factor(self, request, queryset):
        # The queryset is this administrator's institution only (get_queryset).
        with transaction.atomic(using=router.db_for_write(self.model)):
            reset = 0
            for user in queryset.select_for_update():
                devices = TOTPDevice.objects.filter(user=user).count() + StaticDevice.objects.filter(user=user).count()
                if not devices:
                    continue
                TOTPDevice.objects.filter(user=user).delete()
                StaticDevice.objects.filter(user=user).delete()
                audit_record(
                    actor=request.user,
                    action="admin.user.mfa_reset",
                    target=user,
                    before={"second_factor": "enrolled"},
                    after={"second_factor": "removed"},
                    request=request,
                    institution_id=institution_id_of(user),
                )
                reset += 1
        self.message_user(request, f"Second factor reset for {reset} user(s); they enrol again at their next sign-in.")

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if not is_operator(request.user):
            fields += [f for f in self.OPERATOR_FIELDS if f not in fields]
        return fields

    def user_change_password(self, request, id, form_url=""):
        # Django saves the new password outside save_model and outside a transaction.
        with transaction.atomic(using=router.db_for_write(self.model)):
            user = self.get_object(request, unquote(id))
            before = user.password if user is not None else None
            response = super().user_change_password(request, id, form_url)
            if user is not None and request.method == "POST":
                user.refresh_from_db(fields=["password"])
                if user.password != before:
                    audit_record(
                        actor=request.user,
                        action="admin.user.change",
                        target=user,
                        before={"password": SECRET},
                        after={"password": SECRET_CHANGED},
                        request=request,
                        institution_id=institution_id_of(user),
                    )
        return response


@admin.register(LabSystem)
class LabSystemAdmin(TenantModelAdmin):
    list_display = ["name", "institution", "token_hint", "scopes", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["institution"]
    list_select_related = ["institution"]
    readonly_fields = ["token_hint", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        with transaction.atomic(using=router.db_for_write(self.model)):  # each revocation with its audit event
            revoked = sum(lab_system_revoke(lab_system=lab, actor=request.user) for lab in queryset)
        self.message_user(request, f"Revoked {revoked} token(s).")

    def has_add_permission(self, request) -> bool:
        # A key must be shown exactly once: create tokens with `manage.py create_lab_token`.
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # Revoke instead: deleting would take its webhook and delivery log with it.
        return False


# Third-party admins: permission groups, second-factor devices and login lockouts are platform
# matters (a group's permissions hold in every institution; a device's key is a second factor).
for _model in (Group, TOTPDevice, StaticDevice, AccessAttempt, AccessLog, AccessFailureLog):
    operator_only(admin.site, _model)
