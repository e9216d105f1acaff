"""The Django admin for institution administrators: their own institution only, in every changelist,
search, change form and foreign-key choice; institution and rights not theirs to change; every
change audited; patient reads audited. Platform operators (superusers) see every institution."""

from __future__ import annotations

import datetime
import json

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group, Permission
from django.forms import ModelChoiceField
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from accounts.models import Institution, LabSystem, User
from accounts.services import lab_system_create
from audit.models import AuditEvent
from cases.models import BiopsyCase, Patient, TissuePatch
from cloudiopsy.admin_tenancy import (
    TENANT_PATHS,
    AuditedAdminMixin,
    OperatorOnlyMixin,
    TenantAdminMixin,
    audit_snapshot,
    institution_id_of,
)
from inference.models import ModelActivation, ModelVersion, Prediction, SiteValidation, WorkerHeartbeat
from tests.conftest import DEMO_MODEL, make_user, new_case, verified_login
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.services import endpoint_set

pytestmark = pytest.mark.django_db

MODELS = sorted(admin.site._registry, key=lambda m: m._meta.label_lower)


def _label(model) -> str:
    return model._meta.label_lower


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _password_url(user_id) -> str:
    return reverse("admin:auth_user_password_change", args=[user_id])


def _rows(response) -> list:
    return list(response.context["cl"].result_list)


def _admin_events(**filters) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action__startswith="admin.", **filters).order_by("id"))


def _populate(institution: Institution, marker: str, version: ModelVersion) -> dict:
    """One row of every institution-owned model, each carrying ``marker`` where it has text."""
    clinician = make_user(institution, User.Role.CLINICIAN, username=f"{marker}-clinician")
    pathologist = make_user(institution, User.Role.PATHOLOGIST, username=f"{marker}-pathologist")
    case = new_case(clinician, accession=f"{marker}-CASE", mrn=f"{marker}-MRN")
    Patient.objects.filter(pk=case.patient_id).update(name=f"{marker} Patient")
    spare = Patient.objects.create(institution=institution, mrn=f"{marker}-SPARE", name=f"{marker} Spare")
    patch = TissuePatch.objects.create(
        case=case,
        storage_name=TissuePatch.new_storage_name(institution.pk),
        sha256="0" * 64,
        source_sha256="0" * 64,
        width=224,
        height=224,
        format="PNG",
        original_name=f"{marker}.png",
        enqueued_at=timezone.now(),
    )
    Prediction.objects.create(
        patch=patch, model_version=version, scores={"TUM": 0.9, "NORM": 0.1}, label="TUM", inference_seconds=0.1
    )
    SiteValidation.objects.create(
        institution=institution,
        model_version=version,
        data_source=f"{marker}-data",
        data_manifest_sha256="0" * 64,
        counts={"NORM": 1, "TUM": 1},
        metrics={},
        target_sensitivity=0.98,
        threshold=0.5,
        sensitivity=1.0,
        specificity=1.0,
        passed=False,
        actor=f"{marker}-validator",
    )
    from slides.models import Slide, SlideChunk

    slide = Slide.objects.create(
        case=case,
        storage_name=Slide.new_storage_name(institution.pk, ".svs"),
        original_name=f"{marker}.svs",
        sha256="0" * 64,
        size_bytes=1,
        vendor="aperio",
        width=1000,
        height=1000,
        mpp=0.25,
        mpp_source="file",
        levels=[[1000, 1000, 1.0]],
        enqueued_at=timezone.now(),
    )
    SlideChunk.objects.create(slide=slide, index=0, start=0, stop=1, enqueued_at=timezone.now())
    lab, _key = lab_system_create(institution=institution, name=f"{marker} LIS")
    endpoint, secret = endpoint_set(lab_system=lab, url=f"https://{marker}.example.org/hook")
    WebhookDelivery.objects.create(endpoint=endpoint, event="case.signed_out", case=case, payload={})
    return {
        "institution": institution,
        "clinician": clinician,
        "pathologist": pathologist,
        "case": case,
        "patient": case.patient,
        "spare": spare,
        "lab": lab,
        "endpoint": endpoint,
        "webhook_secret": secret,
    }


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def settings_for_webhooks(settings):
    from cryptography.fernet import Fernet

    settings.WEBHOOK_ALLOW_PRIVATE_HOSTS = True  # no DNS in tests
    settings.FIELD_ENCRYPTION_KEY = Fernet.generate_key().decode()
    return settings


@pytest.fixture
def world(db, settings_for_webhooks):
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog
    from django_otp.plugins.otp_static.models import StaticDevice

    version = ModelVersion.objects.create(
        name="tenancy",
        version="1",
        path="nowhere",
        file_sha256="0" * 64,
        classes=["NORM", "TUM"],
        input_size=224,
        preprocessing="scale",
        metadata=json.loads((DEMO_MODEL / "metadata.json").read_text()),
        is_active=True,
    )
    ModelActivation.objects.create(model_version=version, actor="test")
    a = _populate(Institution.objects.create(name="ALPHA Hospital", slug="alpha"), "alpha", version)
    b = _populate(Institution.objects.create(name="BETA Hospital", slug="beta"), "beta", version)
    now = timezone.now()
    WorkerHeartbeat.objects.create(hostname="beta-worker", last_seen=now, started_at=now)
    Group.objects.create(name="beta-group")
    StaticDevice.objects.create(user=b["clinician"], name="beta backup codes")
    common = {"user_agent": "test", "ip_address": "10.0.0.2", "username": "beta-clinician", "http_accept": "*/*"}
    AccessAttempt.objects.create(**common, path_info="/login/", get_data="", post_data="", failures_since_start=1)
    AccessLog.objects.create(**common, path_info="/login/")
    AccessFailureLog.objects.create(**common, path_info="/login/")

    staff = make_user(a["institution"], User.Role.ADMIN, username="alpha-admin")
    staff.is_staff = True
    staff.save()
    # Every permission there is: what keeps B's rows away is the scoping, not a missing permission.
    staff.user_permissions.set(Permission.objects.all())
    operator = User.objects.create_superuser("operator", password="not-a-real-pass-1")
    return {"a": a, "b": b, "staff": staff, "operator": operator, "version": version}


@pytest.fixture
def staff_client(client, world):
    return verified_login(client, world["staff"])


@pytest.fixture
def operator_client(client, world):
    return verified_login(client, world["operator"])


def _b_rows(model, world) -> list:
    """The rows A's administrator must not see: B's, and every row of an operators-only model."""
    label = _label(model)
    if label not in TENANT_PATHS:
        return list(model._default_manager.all())
    if TENANT_PATHS[label] is None:
        return []  # the same for every institution
    return [row for row in model._default_manager.all() if institution_id_of(row) == world["b"]["institution"].pk]


def _fk_leaks(form, world) -> list[str]:
    leaks = []
    for name, field in form.fields.items():
        if isinstance(field, ModelChoiceField):
            foreign = {row.pk for row in _b_rows(field.queryset.model, world)}
            leaked = foreign & set(field.queryset.values_list("pk", flat=True))
            if leaked:
                leaks.append(f"{name}: {sorted(leaked)}")
    return leaks


def test_every_registered_admin_is_institution_aware():
    for model, model_admin in admin.site._registry.items():
        assert isinstance(model_admin, TenantAdminMixin | OperatorOnlyMixin), _label(model)
        if isinstance(model_admin, TenantAdminMixin):
            for inline in model_admin.inlines:
                assert issubclass(inline, TenantAdminMixin), (_label(model), inline)


def test_every_admin_that_can_change_anything_audits_it(world):
    request = _request(world["operator"])
    for model, model_admin in admin.site._registry.items():
        writes = (
            model_admin.has_add_permission(request)
            or model_admin.has_change_permission(request)
            or model_admin.has_delete_permission(request)
        )
        assert not writes or isinstance(model_admin, AuditedAdminMixin), _label(model)


@pytest.mark.parametrize("model", MODELS, ids=_label)
def test_institution_admin_sees_none_of_another_institutions_rows(model, world, staff_client):
    b_rows = _b_rows(model, world)
    is_global = TENANT_PATHS.get(_label(model), "") is None
    assert b_rows or is_global, f"no rows of {_label(model)} in B: the test would prove nothing"
    model_admin = admin.site.get_model_admin(model)

    listing = staff_client.get(_url(model, "changelist"))
    if _label(model) not in TENANT_PATHS:
        assert listing.status_code == 403  # operators only
    else:
        assert listing.status_code == 200
        assert not {r.pk for r in _rows(listing)} & {r.pk for r in b_rows}
        assert "beta" not in listing.content.decode().lower()
        if model_admin.search_fields:
            # get_search_results works on get_queryset's rows: searching B's names finds nothing.
            found = staff_client.get(_url(model, "changelist"), {"q": "beta"})
            assert found.status_code == 200 and not _rows(found)

    for row in b_rows:
        before = audit_snapshot(row)
        for view in ("change", "delete", "history"):
            assert staff_client.get(_url(model, view, row.pk)).status_code in {302, 403, 404}
        assert staff_client.post(_url(model, "change", row.pk), {"name": "x"}).status_code in {302, 403, 404}
        assert staff_client.post(_url(model, "delete", row.pk), {"post": "yes"}).status_code in {302, 403, 404}
        assert model._default_manager.filter(pk=row.pk).exists()
        row.refresh_from_db()
        assert audit_snapshot(row) == before
    assert not _admin_events()


@pytest.mark.parametrize("model", MODELS, ids=_label)
def test_institution_admin_forms_offer_no_other_institutions_rows(model, world, staff_client):
    """Every foreign-key and many-to-many choice (raw-id fields and inline rows included) on the
    add form and on the change form of one of A's rows."""
    visible = admin.site.get_model_admin(model).get_queryset(_request(world["staff"]))
    urls = [_url(model, "add")]
    if visible.exists():
        urls.append(_url(model, "change", visible.first().pk))
    for url in urls:
        response = staff_client.get(url)
        if response.status_code in {302, 403}:
            continue  # no add (or no access at all) for this model
        assert response.status_code == 200, url
        forms = [response.context["adminform"].form]
        for inline in response.context["inline_admin_formsets"]:
            forms += [*inline.formset.forms, inline.formset.empty_form]
        for form in forms:
            assert not _fk_leaks(form, world), url
        assert "beta" not in response.content.decode().lower(), url


def _request(user):
    request = RequestFactory().get("/admin/")
    request.user = user
    return request


def test_operator_sees_every_institution(world, operator_client):
    for model in MODELS:
        listing = operator_client.get(_url(model, "changelist"))
        assert listing.status_code == 200, _label(model)
        shown = {r.pk for r in _rows(listing)}
        assert {r.pk for r in _b_rows(model, world)} <= shown, _label(model)
    cases = operator_client.get(_url(BiopsyCase, "changelist")).content.decode()
    assert "alpha-CASE" in cases and "beta-CASE" in cases


def test_staff_without_an_institution_sees_nothing(client, world):
    nobody = User.objects.create_user("no-institution", password="not-a-real-pass-1", is_staff=True)
    nobody.user_permissions.set(Permission.objects.all())
    verified_login(client, nobody)
    index = client.get("/admin/")
    assert index.status_code == 200 and not index.context["app_list"]
    for model in MODELS:
        assert client.get(_url(model, "changelist")).status_code == 403, _label(model)


def test_operators_accounts_are_not_institution_admins_to_see(world, staff_client):
    operator = world["operator"]
    operator.institution = world["a"]["institution"]
    operator.save()
    users = staff_client.get(_url(User, "changelist"))
    assert operator.pk not in {u.pk for u in _rows(users)}
    assert staff_client.get(_url(User, "change", operator.pk)).status_code == 302
    assert staff_client.get(_password_url(operator.pk)).status_code == 404


def test_raw_id_patient_lookup_lists_only_own_patients(world, staff_client):
    popup = staff_client.get(_url(Patient, "changelist"), {"_to_field": "id", "_popup": "1"})
    assert popup.status_code == 200
    assert {p.institution_id for p in _rows(popup)} == {world["a"]["institution"].pk}


def test_site_validation_form_offers_only_own_institution(world, staff_client):
    page = staff_client.get("/admin/inference/sitevalidation/validate-reviews/")
    assert page.status_code == 200
    assert list(page.context["form"].fields["institution"].queryset) == [world["a"]["institution"]]
    b_validation = SiteValidation.objects.get(institution=world["b"]["institution"])
    assert staff_client.get(f"/admin/inference/sitevalidation/{b_validation.pk}/plot/roc.png").status_code == 404


# --- what an institution administrator cannot change ---------------------------------------------


def _post_patient(client, url, **fields):
    data = {"mrn": "NEW-1", "name": "New Person", "birth_date": "", "sex": "unknown", **fields}
    return client.post(url, data)


def test_institution_is_set_and_cannot_be_changed_by_an_institution_admin(world, staff_client):
    a, b = world["a"]["institution"], world["b"]["institution"]
    response = _post_patient(staff_client, _url(Patient, "add"), institution=b.pk)
    assert response.status_code == 302
    assert Patient.objects.get(mrn="NEW-1").institution == a
    patient = world["a"]["patient"]
    response = _post_patient(staff_client, _url(Patient, "change", patient.pk), mrn=patient.mrn, institution=b.pk)
    assert response.status_code == 302
    patient.refresh_from_db()
    assert patient.institution == a and patient.name == "New Person"


def test_duplicate_mrn_is_a_form_error_not_a_crash(world, staff_client):
    response = _post_patient(staff_client, _url(Patient, "add"), mrn=world["a"]["patient"].mrn)
    assert response.status_code == 200 and response.context["adminform"].form.errors
    assert Patient.objects.filter(mrn=world["a"]["patient"].mrn).count() == 1
    # B's patient with the same MRN is no obstacle (nor revealed).
    response = _post_patient(staff_client, _url(Patient, "add"), mrn=world["b"]["patient"].mrn)
    assert response.status_code == 302


def _user_change_data(user, **fields):
    User.objects.filter(pk=user.pk).update(date_joined=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    return {
        "username": user.username,
        "first_name": "",
        "last_name": "",
        "email": "",
        "is_active": "on",
        "role": user.role,
        "last_login_0": "",
        "last_login_1": "",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        **fields,
    }


def test_institution_admin_cannot_grant_rights_or_move_users(world, staff_client):
    clinician = world["a"]["clinician"]
    group = Group.objects.create(name="powerful")
    group.permissions.set(Permission.objects.all())
    response = staff_client.post(
        _url(User, "change", clinician.pk),
        _user_change_data(
            clinician,
            role="pathologist",
            is_superuser="on",
            is_staff="on",
            groups=[group.pk],
            user_permissions=[p.pk for p in Permission.objects.all()[:5]],
            institution=world["b"]["institution"].pk,
        ),
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    clinician.refresh_from_db()
    assert clinician.role == "pathologist"  # what they may change, changed
    assert not clinician.is_superuser and not clinician.is_staff
    assert not clinician.groups.exists() and not clinician.user_permissions.exists()
    assert clinician.institution == world["a"]["institution"]


def test_institution_admin_adds_users_to_their_own_institution_only(world, staff_client):
    response = staff_client.post(
        _url(User, "add"),
        {
            "username": "new-nurse",
            "usable_password": "true",
            "password1": "a-long-enough-passphrase",
            "password2": "a-long-enough-passphrase",
            "role": "clinician",
            "institution": world["b"]["institution"].pk,
            "is_superuser": "on",
            "is_staff": "on",
        },
    )
    assert response.status_code == 302
    user = User.objects.get(username="new-nurse")
    assert user.institution == world["a"]["institution"] and not user.is_superuser and not user.is_staff
    (event,) = _admin_events(action="admin.user.add")
    assert event.after["password"] == "[secret]" and user.password not in json.dumps(event.after)
    assert event.institution_id == world["a"]["institution"].pk


def test_institution_admin_cannot_see_or_edit_another_institutions_user(world, staff_client):
    other = world["b"]["clinician"]
    assert staff_client.get(_url(User, "change", other.pk)).status_code == 302
    response = staff_client.post(
        _password_url(other.pk),
        {"password1": "x-new-long-passphrase", "password2": "x-new-long-passphrase", "usable_password": "true"},
    )
    assert response.status_code == 404
    other.refresh_from_db()
    assert other.check_password("not-a-real-pass-1")


def test_bulk_delete_cannot_reach_another_institution(world, client):
    staff = world["staff"]
    verified_login(client, staff)
    spare_b = world["b"]["spare"]
    response = client.post(
        _url(Patient, "changelist"), {"action": "delete_selected", "_selected_action": [spare_b.pk], "post": "yes"}
    )
    assert response.status_code in {200, 302}
    assert Patient.objects.filter(pk=spare_b.pk).exists()
    assert not _admin_events()


def test_signed_out_case_is_read_only_in_the_admin(world, operator_client):
    case = world["a"]["case"]
    BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.SIGNED_OUT)
    response = operator_client.post(
        _url(BiopsyCase, "change", case.pk),
        {"patient": case.patient_id, "accession": "CHANGED", "specimen_site": "x", "priority": "routine"},
    )
    assert response.status_code == 403
    case.refresh_from_db()
    assert case.accession == "alpha-CASE"


def test_case_cannot_point_at_another_institutions_patient_even_for_an_operator(world, operator_client):
    case = world["a"]["case"]
    response = operator_client.post(
        _url(BiopsyCase, "change", case.pk),
        {
            "patient": world["b"]["patient"].pk,
            "accession": case.accession,
            "specimen_site": "rectum",
            "priority": "routine",
            "clinical_notes": "",
            "assigned_to": "",
            "patches-TOTAL_FORMS": "1",
            "patches-INITIAL_FORMS": "1",
            "patches-MIN_NUM_FORMS": "0",
            "patches-MAX_NUM_FORMS": "1000",
            "patches-0-id": TissuePatch.objects.get(case=case).pk,
            "patches-0-case": case.pk,
        },
    )
    assert response.status_code == 200
    assert "another institution" in str(response.context["adminform"].form.errors)
    case.refresh_from_db()
    assert case.patient == world["a"]["patient"]


@pytest.mark.parametrize(
    "model", [AuditEvent, Prediction, ModelActivation, ModelVersion, SiteValidation, WebhookDelivery, WorkerHeartbeat]
)
def test_platform_records_are_read_only_for_everyone(model, world):
    model_admin = admin.site.get_model_admin(model)
    for user in (world["operator"], world["staff"]):
        request = _request(user)
        row = model._default_manager.first()
        assert not model_admin.has_add_permission(request)
        assert not model_admin.has_change_permission(request, row)
        assert not model_admin.has_delete_permission(request, row)


# --- audit -----------------------------------------------------------------------------------------


def test_admin_change_is_one_audit_event_with_before_and_after(world, staff_client):
    patient = world["a"]["patient"]
    response = _post_patient(staff_client, _url(Patient, "change", patient.pk), mrn=patient.mrn, name="Renamed")
    assert response.status_code == 302
    (event,) = _admin_events()
    assert event.action == "admin.patient.change" and event.target_id == str(patient.pk)
    assert event.before == {"name": "alpha Patient"} and event.after == {"name": "Renamed"}
    assert event.actor_label == "alpha-admin" and event.institution_id == world["a"]["institution"].pk


def test_admin_add_is_one_audit_event(world, staff_client):
    assert _post_patient(staff_client, _url(Patient, "add")).status_code == 302
    (event,) = _admin_events()
    patient = Patient.objects.get(mrn="NEW-1")
    assert event.action == "admin.patient.add" and event.target_id == str(patient.pk)
    assert event.before == {} and event.after["mrn"] == "NEW-1"
    assert event.after["institution"] == world["a"]["institution"].pk


def test_admin_delete_and_bulk_delete_are_one_event_per_row(world, operator_client):
    a_spare, b_spare = world["a"]["spare"], world["b"]["spare"]
    response = operator_client.post(_url(Patient, "delete", a_spare.pk), {"post": "yes"})
    assert response.status_code == 302 and not Patient.objects.filter(pk=a_spare.pk).exists()
    (event,) = _admin_events()
    assert event.action == "admin.patient.delete" and event.before["mrn"] == "alpha-SPARE" and event.after == {}

    extra = Patient.objects.create(institution=world["b"]["institution"], mrn="beta-EXTRA", name="Extra")
    response = operator_client.post(
        _url(Patient, "changelist"),
        {"action": "delete_selected", "_selected_action": [b_spare.pk, extra.pk], "post": "yes"},
    )
    assert response.status_code == 302
    assert not Patient.objects.filter(pk__in=[b_spare.pk, extra.pk]).exists()
    deletes = _admin_events(action="admin.patient.delete")[1:]
    assert sorted(e.target_id for e in deletes) == sorted([str(b_spare.pk), str(extra.pk)])
    assert {e.institution_id for e in deletes} == {world["b"]["institution"].pk}


def test_bulk_delete_and_its_audit_commit_together(world, operator_client, monkeypatch):
    # The events are written first; when the delete then fails they are rolled back with it.
    def failing_delete(self, request, queryset):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(admin.ModelAdmin, "delete_queryset", failing_delete)
    spares = [world["a"]["spare"].pk, world["b"]["spare"].pk]
    operator_client.raise_request_exception = False
    response = operator_client.post(
        _url(Patient, "changelist"), {"action": "delete_selected", "_selected_action": spares, "post": "yes"}
    )
    assert response.status_code == 500
    assert Patient.objects.filter(pk__in=spares).count() == 2
    assert not _admin_events()


def test_password_change_is_audited_without_the_password(world, staff_client):
    clinician = world["a"]["clinician"]
    old_hash = clinician.password
    response = staff_client.post(
        _password_url(clinician.pk),
        {"password1": "a-new-long-passphrase", "password2": "a-new-long-passphrase", "usable_password": "true"},
    )
    assert response.status_code == 302
    clinician.refresh_from_db()
    assert clinician.check_password("a-new-long-passphrase")
    (event,) = _admin_events()
    assert event.action == "admin.user.change" and event.target_id == str(clinician.pk)
    assert event.before == {"password": "[secret]"} and event.after == {"password": "[secret changed]"}
    recorded = json.dumps([event.before, event.after])
    assert old_hash not in recorded and clinician.password not in recorded


def test_operator_group_change_is_audited_with_the_groups(world, operator_client):
    clinician = world["a"]["clinician"]
    group = Group.objects.create(name="Institution administrators")
    response = operator_client.post(
        _url(User, "change", clinician.pk),
        _user_change_data(clinician, groups=[group.pk], is_staff="on", institution=world["a"]["institution"].pk),
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    (event,) = _admin_events()
    assert event.before == {"groups": [], "is_staff": False}
    assert event.after == {"groups": [group.pk], "is_staff": True}


def test_operator_change_to_a_groups_permissions_is_audited(world, operator_client):
    group = Group.objects.create(name="Institution administrators")
    permission = Permission.objects.get(codename="view_patient")
    response = operator_client.post(
        _url(Group, "change", group.pk), {"name": group.name, "permissions": [permission.pk]}
    )
    assert response.status_code == 302
    (event,) = _admin_events()
    assert event.action == "admin.group.change" and event.target_type == "auth.group"
    assert event.before == {"permissions": []} and event.after == {"permissions": [permission.pk]}


def test_secrets_never_reach_the_audit_trail(world, staff_client):
    endpoint, lab = world["a"]["endpoint"], world["a"]["lab"]
    response = staff_client.post(
        _url(WebhookEndpoint, "change", endpoint.pk), {"url": "https://lis.alpha.example.org/hook", "active": ""}
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    response = staff_client.post(
        _url(LabSystem, "change", lab.pk), {"name": "alpha LIS 2", "scopes": '["cases:read"]', "expires_at": ""}
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    events = _admin_events()
    assert [e.action for e in events] == ["admin.webhookendpoint.change", "admin.labsystem.change"]
    assert events[0].after == {"active": False, "url": "https://lis.alpha.example.org/hook"}
    assert events[1].after == {"name": "alpha LIS 2", "scopes": ["cases:read"]}
    endpoint.refresh_from_db()
    lab.refresh_from_db()
    recorded = json.dumps([[e.before, e.after] for e in events])
    assert world["a"]["webhook_secret"] not in recorded and lab.token_hash not in recorded
    assert all(getattr(endpoint, f.attname) not in recorded for f in WebhookEndpoint._meta.fields if "secret" in f.name)


def test_webhook_url_in_the_admin_follows_the_webhook_rules(world, staff_client, settings):
    settings.WEBHOOK_ALLOW_HTTP = False
    endpoint = world["a"]["endpoint"]
    response = staff_client.post(
        _url(WebhookEndpoint, "change", endpoint.pk), {"url": "http://x.example/", "active": "on"}
    )
    assert response.status_code == 200 and "https" in str(response.context["adminform"].form.errors)
    assert not _admin_events()


def test_revoke_action_is_audited_and_scoped(world, staff_client):
    a_lab, b_lab = world["a"]["lab"], world["b"]["lab"]
    response = staff_client.post(
        _url(LabSystem, "changelist"), {"action": "revoke", "_selected_action": [a_lab.pk, b_lab.pk]}
    )
    assert response.status_code == 302
    a_lab.refresh_from_db()
    b_lab.refresh_from_db()
    assert a_lab.revoked_at is not None and b_lab.revoked_at is None
    assert AuditEvent.objects.filter(action="lab_system.revoke").count() == 1


# --- patient reads -------------------------------------------------------------------------------


def _reads():
    return list(AuditEvent.objects.filter(action__startswith="patient.read").order_by("id"))


def test_patient_change_form_read_is_audited(world, staff_client):
    patient = world["a"]["patient"]
    start = len(_reads())
    assert staff_client.get(_url(Patient, "change", patient.pk)).status_code == 200
    (event,) = _reads()[start:]
    assert event.action == "patient.read" and event.target_id == str(patient.pk)
    assert event.after == {"via": "admin"} and event.actor_label == "alpha-admin"


def test_patient_changelist_is_one_read_of_the_patients_shown(world, staff_client):
    start = len(_reads())
    listing = staff_client.get(_url(Patient, "changelist"))
    (event,) = _reads()[start:]
    assert event.action == "patient.read_list"
    assert event.after == {"via": "admin list", "patients": sorted(p.pk for p in _rows(listing))}
    assert event.institution_id == world["a"]["institution"].pk


def test_case_change_form_read_is_audited(world, staff_client):
    case = world["a"]["case"]
    start = len(_reads())
    assert staff_client.get(_url(BiopsyCase, "change", case.pk)).status_code == 200
    (event,) = _reads()[start:]
    assert event.target_id == str(case.patient_id) and event.after == {"via": "admin", "case": case.pk}


def test_operator_list_read_is_recorded_per_institution(world, operator_client):
    start = len(_reads())
    operator_client.get(_url(Patient, "changelist"))
    events = _reads()[start:]
    assert sorted(e.institution_id for e in events) == sorted(
        [world["a"]["institution"].pk, world["b"]["institution"].pk]
    )


def test_another_institutions_patient_is_not_read(world, staff_client):
    start = len(_reads())
    staff_client.get(_url(Patient, "change", world["b"]["patient"].pk))
    assert _reads()[start:] == []


def test_institution_admin_resets_a_lost_second_factor_of_their_own_users_only(staff_client, world):
    from django_otp.plugins.otp_totp.models import TOTPDevice

    from tests.conftest import authenticator

    mine, theirs = world["a"]["clinician"], world["b"]["clinician"]
    authenticator(mine)
    authenticator(theirs)
    changelist = staff_client.get(_url(User, "changelist"))
    assert changelist.status_code == 200 and "second factor" in changelist.content.decode()
    response = staff_client.post(
        _url(User, "changelist"),
        {"action": "reset_second_factor", "_selected_action": [mine.pk, theirs.pk]},
    )
    assert response.status_code == 302
    assert not TOTPDevice.objects.filter(user=mine).exists()
    assert TOTPDevice.objects.filter(user=theirs).exists()  # B's user is not in A's admin's queryset
    (event,) = AuditEvent.objects.filter(action="admin.user.mfa_reset")
    assert event.target_id == str(mine.pk) and event.actor_id == str(world["staff"].pk)
