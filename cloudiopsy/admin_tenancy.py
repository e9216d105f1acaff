"""The Django admin for two kinds of staff: institution administrators and platform operators.

An institution administrator (``is_staff``, not a superuser) works on their own institution only:
every changelist, change form, search, autocomplete and foreign-key choice is filtered to it, and a
staff user without an institution sees nothing. A platform operator (a superuser) sees every
institution. Each model's path to its institution is listed once, in ``TENANT_PATHS``; a model not
listed there is for operators only, so a newly registered admin is closed until someone decides.

Every add, change and delete made in the admin is written to the audit chain, with the changed
fields' values before and after (secrets as a marker, never their value), inside the transaction
of the change. Records nobody may edit by hand are read-only here instead.
"""

from __future__ import annotations

from django.contrib import admin
from django.db import models, router, transaction
from django.db.models import QuerySet

from audit.services import audit_record

# The path from a model to its institution, for ``QuerySet.filter``; None: a platform-wide record
# (the same for every institution, e.g. a model version), visible to any staff user allowed to see it.
TENANT_PATHS: dict[str, str | None] = {
    "accounts.institution": "pk",
    "accounts.user": "institution",
    "accounts.labsystem": "institution",
    "cases.patient": "institution",
    "cases.biopsycase": "institution",
    "cases.tissuepatch": "case__institution",
    "cases.review": "patch__case__institution",
    "cases.signout": "case__institution",
    "cases.addendum": "case__institution",
    "inference.prediction": "patch__case__institution",
    "inference.sitevalidation": "institution",
    "inference.modelversion": None,
    "inference.modelactivation": None,
    "webhooks.webhookendpoint": "lab_system__institution",
    "webhooks.webhookdelivery": "case__institution",
    "audit.auditevent": "institution_id",
    "slides.slide": "case__institution",
    "slides.slidechunk": "slide__case__institution",
}

# Never written to the audit trail (nor any "*_hash" or "*_encrypted" field); a change to one is
# recorded as a marker.
SECRET_FIELDS = frozenset({"password", "secret", "key", "token"})
SECRET = "[secret]"  # noqa: S105 - a marker, not a secret
SECRET_CHANGED = "[secret changed]"  # noqa: S105 - a marker, not a secret


def is_operator(user) -> bool:
    """A platform operator: a superuser, who works across institutions."""
    return bool(getattr(user, "is_active", False) and getattr(user, "is_superuser", False))


def is_tenant_model(model) -> bool:
    return model._meta.label_lower in TENANT_PATHS


def scope(queryset: QuerySet, *, user) -> QuerySet:
    """The rows of ``queryset`` this staff user may see: all for an operator; for anyone else those
    of their institution (platform-wide records included), and none without an institution or for
    a model not in TENANT_PATHS."""
    if is_operator(user):
        return queryset
    institution_id = getattr(user, "institution_id", None)
    label = queryset.model._meta.label_lower
    if institution_id is None or label not in TENANT_PATHS:
        return queryset.none()
    path = TENANT_PATHS[label]
    return queryset if path is None else queryset.filter(**{path: institution_id})


def institution_id_of(obj) -> int | None:
    """The id of the institution a row belongs to (None for a platform-wide or unknown one)."""
    path = TENANT_PATHS.get(obj._meta.label_lower)
    if not path:
        return None
    if path == "pk":
        return obj.pk
    *hops, last = path.split("__")
    current = obj
    for hop in hops:
        current = getattr(current, hop, None)
        if current is None:
            return None
    return getattr(current, current._meta.get_field(last).attname)


# --- audit ---------------------------------------------------------------------------------------


def audit_snapshot(obj) -> dict:
    """Field values of a row as stored (foreign keys and many-to-many as ids); ``auto_now``
    timestamps are left out, they change on every save."""
    values = {}
    for field in obj._meta.concrete_fields:
        if getattr(field, "auto_now", False):
            continue
        values[field.name] = field.value_from_object(obj)
    if obj.pk is not None:
        for field in obj._meta.many_to_many:
            values[field.name] = sorted(getattr(obj, field.name).values_list("pk", flat=True))
    return values


def is_secret(name: str) -> bool:
    return name in SECRET_FIELDS or name.endswith(("_hash", "_encrypted"))


def _shown(name: str, value, marker: str):
    if is_secret(name):
        return marker if value else ""
    return value


def _stored_snapshot(obj) -> dict:
    stored = type(obj)._base_manager.filter(pk=obj.pk).first() if obj.pk is not None else None
    return audit_snapshot(stored) if stored is not None else {}


def _action(obj, verb: str) -> str:
    return f"admin.{obj._meta.model_name}.{verb}"


def audit_admin_add(request, obj) -> None:
    after = {k: _shown(k, v, SECRET) for k, v in audit_snapshot(obj).items() if k != "id"}
    audit_record(
        actor=request.user,
        action=_action(obj, "add"),
        target=obj,
        before={},
        after=after,
        request=request,
        institution_id=institution_id_of(obj),
    )


def audit_admin_change(request, obj, before: dict) -> None:
    after_values = audit_snapshot(obj)
    changed = sorted(k for k in after_values.keys() | before.keys() if before.get(k) != after_values.get(k))
    audit_record(
        actor=request.user,
        action=_action(obj, "change"),
        target=obj,
        before={k: _shown(k, before.get(k), SECRET) for k in changed},
        after={k: _shown(k, after_values.get(k), SECRET_CHANGED) for k in changed},
        request=request,
        institution_id=institution_id_of(obj),
    )


def audit_admin_delete(request, obj) -> None:
    audit_record(
        actor=request.user,
        action=_action(obj, "delete"),
        target=obj,
        before={k: _shown(k, v, SECRET) for k, v in _stored_snapshot(obj).items()},
        after={},
        request=request,
        institution_id=institution_id_of(obj),
    )


class AuditedAdminMixin:
    """Each add, change and delete through this admin (inline rows and the bulk delete action
    included) appends one audit event per row, in the transaction of the change."""

    def save_model(self, request, obj, form, change):
        obj._admin_audit_before = _stored_snapshot(obj) if change else None
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        # Many-to-many values are saved here, after save_model: the event is written once they are.
        super().save_related(request, form, formsets, change)
        obj = form.instance
        before = obj.__dict__.pop("_admin_audit_before", None)
        if change:
            audit_admin_change(request, obj, before or {})
        else:
            audit_admin_add(request, obj)

    def save_formset(self, request, form, formset, change):
        for deleted in formset.deleted_forms:
            if deleted.instance.pk is not None:
                audit_admin_delete(request, deleted.instance)
        before = {
            f.instance.pk: _stored_snapshot(f.instance)
            for f in formset.initial_forms
            if f.instance.pk is not None and f.has_changed() and f not in formset.deleted_forms
        }
        super().save_formset(request, form, formset, change)
        for obj in formset.new_objects:
            audit_admin_add(request, obj)
        for obj, _fields in formset.changed_objects:
            audit_admin_change(request, obj, before.get(obj.pk, {}))

    def delete_model(self, request, obj):
        with transaction.atomic(using=router.db_for_write(self.model)):  # delete_view is atomic already
            audit_admin_delete(request, obj)
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        # The "delete selected" action is not run in a transaction by Django: open one here.
        with transaction.atomic(using=router.db_for_write(self.model)):
            for obj in queryset:
                audit_admin_delete(request, obj)
            super().delete_queryset(request, queryset)


# --- institution scoping -------------------------------------------------------------------------


def _tenant_form(form_class, *, request, model, institution_field: str | None):
    """The admin's ModelForm, made to (1) put a new row in the administrator's institution,
    (2) still check unique constraints that involve the (read-only) institution, and (3) refuse a
    reference to another institution's row, for operators too (a case of A must not point at a
    patient of B)."""
    operator = is_operator(request.user)
    own_institution = getattr(request.user, "institution_id", None)
    has_field = institution_field is not None and any(f.name == institution_field for f in model._meta.concrete_fields)

    class TenantForm(form_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if has_field and not operator and self.instance._state.adding:
                setattr(self.instance, model._meta.get_field(institution_field).attname, own_institution)

        def _get_validation_exclusions(self):
            exclusions = super()._get_validation_exclusions()
            if has_field and institution_field not in self.fields:
                exclusions.discard(institution_field)  # read-only here, yet part of e.g. (institution, mrn)
            return exclusions

        def _institution_id(self):
            if has_field and institution_field in self.cleaned_data:
                chosen = self.cleaned_data[institution_field]
                return chosen.pk if chosen is not None else None
            return institution_id_of(self.instance)

        def clean(self):
            cleaned = super().clean()
            own = self._institution_id()
            if own is None:
                return cleaned
            for name, value in list(cleaned.items()):
                if name == institution_field:
                    continue
                items = list(value) if isinstance(value, QuerySet) else [value]
                for item in items:
                    if isinstance(item, models.Model) and institution_id_of(item) not in (None, own):
                        self.add_error(name, "This belongs to another institution.")
                        break
            return cleaned

    TenantForm.__name__ = form_class.__name__
    return TenantForm


class TenantAdminMixin:
    """Scopes a ModelAdmin to the institution administrator's own institution (see the module
    docstring). ``institution_field``: the model's own foreign key to its institution, read-only for
    institution administrators and set to theirs on add; ``institution_fixed``: read-only on change
    for operators too (moving a patient or case would leave its other rows behind);
    ``staff_read_only``: institution administrators may look but not change."""

    institution_field: str | None = "institution"
    institution_fixed = True
    staff_read_only = False

    def _may_use(self, request) -> bool:
        if is_operator(request.user):
            return True
        return getattr(request.user, "institution_id", None) is not None and is_tenant_model(self.model)

    def _may_write(self, request) -> bool:
        return is_operator(request.user) or (self._may_use(request) and not self.staff_read_only)

    def get_queryset(self, request):
        return scope(super().get_queryset(request), user=request.user)

    def has_module_permission(self, request):
        return self._may_use(request) and super().has_module_permission(request)

    def has_view_permission(self, request, obj=None):
        return self._may_use(request) and super().has_view_permission(request, obj)

    def has_add_permission(self, request, *args, **kwargs):
        return self._may_write(request) and super().has_add_permission(request, *args, **kwargs)

    def has_change_permission(self, request, obj=None):
        return self._may_write(request) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self._may_write(request) and super().has_delete_permission(request, obj)

    def _has_institution_field(self) -> bool:
        return self.institution_field is not None and any(
            f.name == self.institution_field for f in self.model._meta.concrete_fields
        )

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        locked = not is_operator(request.user) or (obj is not None and self.institution_fixed)
        if self._has_institution_field() and locked and self.institution_field not in fields:
            fields.append(self.institution_field)
        return fields

    def get_list_filter(self, request):
        filters = list(super().get_list_filter(request))
        if is_operator(request.user):
            return filters
        # One institution: a filter by institution would only list the others' names.
        return [f for f in filters if f not in {self.institution_field, "institution", "institution_id"}]

    def _scoped_choices(self, db_field, request, kwargs):
        queryset = kwargs.get("queryset")
        if queryset is None:
            queryset = self.get_field_queryset(kwargs.get("using"), db_field, request)
        if queryset is None:
            queryset = db_field.remote_field.model._default_manager.using(kwargs.get("using")).all()
        return scope(queryset, user=request.user)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        # Passed in, not set afterwards: a widget keeps the queryset it was built with.
        kwargs["queryset"] = self._scoped_choices(db_field, request, kwargs)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        kwargs["queryset"] = self._scoped_choices(db_field, request, kwargs)
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        return _tenant_form(form, request=request, model=self.model, institution_field=self.institution_field)


class TenantInlineMixin(TenantAdminMixin):
    """The same for an inline: its rows and its foreign-key choices."""

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        formset.form = _tenant_form(
            formset.form, request=request, model=self.model, institution_field=self.institution_field
        )
        user = request.user

        class TenantFormSet(formset):
            def add_fields(self, form, index):
                super().add_fields(form, index)
                # The hidden row id is a choice among all rows of the model too: only the user's.
                row_id = form.fields.get(self.model._meta.pk.name)
                if row_id is not None and hasattr(row_id, "queryset"):
                    row_id.queryset = scope(row_id.queryset, user=user)

        TenantFormSet.__name__ = formset.__name__
        return TenantFormSet


class TenantModelAdmin(AuditedAdminMixin, TenantAdminMixin, admin.ModelAdmin):
    """Scoped to the institution administrator's institution; every change audited."""


class TenantReadOnlyAdmin(TenantAdminMixin, admin.ModelAdmin):
    """Records nobody edits by hand: written by the platform and kept as they are (audit events,
    predictions, model activations, site validations, delivery logs). Scoped like the others."""

    def has_add_permission(self, request, *args, **kwargs) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class TenantReadOnlyTabularInline(TenantInlineMixin, admin.TabularInline):
    extra = 0
    can_delete = False

    def get_readonly_fields(self, request, obj=None):
        return [*self.fields] if self.fields else super().get_readonly_fields(request, obj)

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class OperatorOnlyMixin:
    """For platform operators only: permission groups, second-factor devices, login lockouts."""

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if is_operator(request.user) else queryset.none()

    def has_module_permission(self, request):
        return is_operator(request.user) and super().has_module_permission(request)

    def has_view_permission(self, request, obj=None):
        return is_operator(request.user) and super().has_view_permission(request, obj)

    def has_add_permission(self, request, *args, **kwargs):
        return is_operator(request.user) and super().has_add_permission(request, *args, **kwargs)

    def has_change_permission(self, request, obj=None):
        return is_operator(request.user) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return is_operator(request.user) and super().has_delete_permission(request, obj)


def operator_only(site: admin.AdminSite, model) -> None:
    """Re-register a third-party model's admin for operators only, with its changes audited."""
    if not site.is_registered(model):
        return
    original = type(site.get_model_admin(model))
    site.unregister(model)
    site.register(
        model,
        type(f"OperatorOnly{original.__name__}", (AuditedAdminMixin, OperatorOnlyMixin, original), {}),
    )


# --- the institution administrators' group -------------------------------------------------------

INSTITUTION_ADMIN_GROUP = "Institution administrators"
# What an institution administrator may do in the admin (within their institution; the admins above
# refuse the rest whatever a group grants). Not: delete anything, add cases (case_create does),
# add lab tokens (create_lab_token shows the key once), edit model versions, predictions, site
# validations or the audit trail (read-only for everyone), groups, devices or lockouts (operators).
INSTITUTION_ADMIN_PERMISSIONS = (
    "accounts.view_institution",
    "accounts.view_user",
    "accounts.add_user",
    "accounts.change_user",
    "accounts.view_labsystem",
    "accounts.change_labsystem",
    "cases.view_patient",
    "cases.add_patient",
    "cases.change_patient",
    "cases.view_biopsycase",
    "cases.change_biopsycase",
    "inference.view_modelversion",
    "inference.view_modelactivation",
    "inference.view_prediction",
    "inference.view_sitevalidation",
    "inference.add_sitevalidation",  # "Validate on reviewed patches", for their own institution
    "webhooks.view_webhookendpoint",
    "webhooks.change_webhookendpoint",
    "webhooks.view_webhookdelivery",
    "audit.view_auditevent",
)
