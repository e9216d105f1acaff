"""Query budgets: each page, API call and service below costs the same number of queries with N
and with 3N patches (or cases, or admin rows), and that number is pinned, so that an N+1 (or any
new query) shows up here as a failing test that lists the queries.

A budget counts the queries of the view or service itself plus one audit append per event it
records (patient reads included); an append costs ``APPEND[connection.vendor]`` queries (a
savepoint around it in a test's transaction; on PostgreSQL the advisory lock that serialises
appends too). Each request is measured after an unmeasured one by the same client, which writes
what a first request writes once (the session's activity stamp, a token's last use).
"""

from __future__ import annotations

import itertools

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import Institution, User
from accounts.services import lab_system_create
from cases.models import Addendum, BiopsyCase, Patient, Review, SignOut, TissuePatch
from cases.review import review_confirm_all
from inference.models import ModelActivation, ModelVersion, Prediction, SiteValidation, WorkerHeartbeat
from tests.conftest import lab_client, make_user, new_case, verified_login
from webhooks.models import WebhookDelivery, WebhookEndpoint

pytestmark = pytest.mark.django_db
_names = itertools.count()

# Queries of one audit append, by database.
APPEND = {"sqlite": 4, "postgresql": 5}

# What each request or call may cost: (queries besides audit appends, audit appends).
BUDGETS: dict[str, tuple[int, int]] = {
    # session, user, second factor, institution; the case (patient, institution, sign-out and its
    # pathologist), patches, predictions (model version, site validation), reviews (pathologist),
    # addenda (pathologist); the case's slides; the case history (prediction ids, events); the
    # patient read.
    "case page": (12, 1),
    # session, user, second factor, institution; the cases annotated with their AI summary;
    # counts per status; the patient read (the admin: and the pathologists to assign to).
    "worklist pathologist": (6, 1),
    "worklist admin": (7, 1),
    # session, user, institution; the cases annotated; the patient read.
    "case list": (4, 1),
    # token; count; page; the patient read.
    "api case list": (3, 1),
    # token; the case and its results as for the case page; the patient read.
    "api case detail lab system": (6, 1),
    "api fhir detail lab system": (7, 1),  # and the case's slides
    # session, user, second factor, institution instead of the token.
    "api case detail pathologist": (9, 1),
    "api fhir detail pathologist": (10, 1),
    # token; patch and case; predictions (model version); reviews.
    "api patch detail": (4, 0),
    # savepoint; the case locked; unreviewed patches; their predictions; (second read: the case's
    # reviews); one INSERT of the reviews; the case touched; release; the one event.
    "confirm all first_read": (7, 1),
    "confirm all second_read": (8, 1),
    # session, user, second factor, institution, the case; then the service.
    "confirm all page": (12, 1),
}

# Admin changelists. Every one: session, user, second factor; an institution administrator's
# permissions (2); the row count (2: filtered and full) and the page; the list filters' choices.
# The patient and case lists record one patient read per institution on the page.
ADMIN_BUDGETS: dict[str, dict[str, tuple[int, int]]] = {
    "operator": {
        "accounts.institution": (6, 0),
        "accounts.labsystem": (7, 0),
        "accounts.user": (7, 0),
        "audit.auditevent": (11, 0),
        "auth.group": (6, 0),
        "axes.accessattempt": (9, 0),
        "axes.accessfailurelog": (9, 0),
        "axes.accesslog": (9, 0),
        "cases.biopsycase": (7, 2),
        "cases.patient": (7, 2),
        "inference.modelactivation": (6, 0),
        "inference.modelversion": (6, 0),
        "inference.prediction": (8, 0),
        "inference.sitevalidation": (7, 0),
        "inference.workerheartbeat": (6, 0),
        "otp_static.staticdevice": (6, 0),
        "otp_totp.totpdevice": (6, 0),
        "slides.slide": (7, 0),
        "webhooks.webhookdelivery": (6, 0),
        "webhooks.webhookendpoint": (6, 0),
    },
    "staff": {
        "accounts.institution": (8, 0),
        "accounts.labsystem": (8, 0),
        "accounts.user": (8, 0),
        "audit.auditevent": (12, 0),
        "auth.group": (3, 0),  # operators only: refused
        "axes.accessattempt": (3, 0),
        "axes.accessfailurelog": (3, 0),
        "axes.accesslog": (3, 0),
        "cases.biopsycase": (8, 1),
        "cases.patient": (8, 1),
        "inference.modelactivation": (8, 0),
        "inference.modelversion": (8, 0),
        "inference.prediction": (10, 0),
        "inference.sitevalidation": (10, 0),
        "inference.workerheartbeat": (3, 0),
        "otp_static.staticdevice": (3, 0),
        "otp_totp.totpdevice": (3, 0),
        "slides.slide": (9, 0),
        "webhooks.webhookdelivery": (8, 0),
        "webhooks.webhookendpoint": (8, 0),
    },
}


def budget(spent: tuple[int, int]) -> int:
    queries, appends = spent
    return queries + appends * APPEND[connection.vendor]


# --- data ----------------------------------------------------------------------------------------


@pytest.fixture
def validation(institution, demo_model):
    return SiteValidation.objects.create(
        institution=institution,
        model_version=demo_model,
        data_source="budget",
        data_manifest_sha256="0" * 64,
        counts={"NORM": 50, "TUM": 50},
        metrics={},
        target_sensitivity=0.95,
        threshold=0.4,
        sensitivity=0.97,
        specificity=0.9,
        passed=True,
        actor="test",
    )


def analysed_patches(case, version, count, *, validation=None, reviewers=()):
    """``count`` more analysed patches of ``case``, each with a prediction (every other one judged
    by ``validation``). The reviewers read every other patch in turn, the second one disagreeing
    with the first."""
    patches = []
    for index in range(count):
        patch = TissuePatch.objects.create(
            case=case,
            storage_name=TissuePatch.new_storage_name(case.institution_id),
            sha256="0" * 64,
            source_sha256="0" * 64,
            width=224,
            height=224,
            format="PNG",
            original_name=f"patch-{next(_names)}.png",
            status=TissuePatch.Status.DONE,
            enqueued_at=timezone.now(),
        )
        judged = validation is not None and index % 2 == 1
        prediction = Prediction.objects.create(
            patch=patch,
            model_version=version,
            scores={"TUM": 0.7, "NORM": 0.2, "STR": 0.1},
            label="TUM",
            uncertainty=0.3,
            needs_attention=index % 3 == 0,
            heatmaps={"TUM": [[0.5, 0.6], [0.7, 0.8]]},
            inference_seconds=0.01,
            suspected_tumour=True,
            tumour_threshold=validation.threshold if judged else 0.5,
            site_validation=validation if judged else None,
        )
        if index % 2 == 0:
            for read, reviewer in enumerate(reviewers, start=1):
                Review.objects.create(
                    patch=patch,
                    prediction=prediction,
                    pathologist=reviewer,
                    read=read,
                    decision="confirm" if read == 1 else "override",
                    final_label="TUM" if read == 1 else "STR",
                    reason_code="" if read == 1 else "wrong_class",
                )
        patches.append(patch)
    BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.READY_FOR_REVIEW)
    return patches


def ready_cases(clinician, version, count, *, patches=2, validation=None, reviewers=(), **fields):
    cases = []
    for _ in range(count):
        number = next(_names)
        case = new_case(clinician, accession=f"S{number}", mrn=f"M{number}")
        analysed_patches(case, version, patches, validation=validation, reviewers=reviewers)
        if fields:
            BiopsyCase.objects.filter(pk=case.pk).update(**fields)
        cases.append(case)
    return cases


def warm_get(client, url, **extra):
    """A GET whose one-off writes (session stamp, token use) are done: the next one is measured."""
    response = client.get(url, **extra)
    assert response.status_code == 200, (url, response.status_code)
    return response


# --- staff pages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["first_read", "second_read", "signed_out"])
def test_case_page_costs_the_same_with_three_times_the_patches(
    variant, client, clinician, pathologist, institution, demo_model, validation, django_assert_num_queries
):
    second = make_user(institution, User.Role.PATHOLOGIST, username="second-reader")
    case = new_case(clinician)
    readers = [pathologist, second] if variant == "second_read" else [pathologist]
    if variant == "second_read":
        BiopsyCase.objects.filter(pk=case.pk).update(second_read=True)
    url = f"/cases/{case.pk}/"
    verified_login(client, pathologist)

    def grow(count):
        analysed_patches(case, demo_model, count, validation=validation, reviewers=readers)
        if variant == "signed_out":
            BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.SIGNED_OUT)
            SignOut.objects.get_or_create(
                case=case, defaults={"pathologist": pathologist, "conclusion": "adenocarcinoma", "tumour_fraction": 1}
            )
            for _ in range(count):
                Addendum.objects.create(case=case, pathologist=second, text="KRAS pending.", reason="molecular")

    for count, total in ((2, 2), (4, 6)):
        grow(count)
        warm_get(client, url)
        with django_assert_num_queries(budget(BUDGETS["case page"]), info=f"case page, {variant}, {total} patches"):
            response = client.get(url)
        assert response.status_code == 200 and len(response.context["patches"]) == total
        if variant == "second_read":
            assert response.context["disagreements"] == total // 2
        if variant == "signed_out":
            assert len(response.context["addenda"]) == total


@pytest.mark.parametrize("viewer", ["pathologist", "admin"])
def test_worklist_costs_the_same_with_three_times_the_cases(
    viewer, client, clinician, pathologist, institution, demo_model, validation, django_assert_num_queries
):
    user = pathologist if viewer == "pathologist" else make_user(institution, User.Role.ADMIN)
    make_user(institution, User.Role.PATHOLOGIST, username="another-pathologist")  # a choice for the admin
    verified_login(client, user)
    for count, total in ((2, 2), (4, 6)):
        # Half of them assigned, half offered to take (or assign).
        ready_cases(clinician, demo_model, count // 2, validation=validation, reviewers=[pathologist])
        ready_cases(clinician, demo_model, count // 2, validation=validation, assigned_to=pathologist)
        warm_get(client, "/cases/worklist/")
        with django_assert_num_queries(budget(BUDGETS[f"worklist {viewer}"]), info=f"{total} cases"):
            response = client.get("/cases/worklist/")
        assert response.status_code == 200 and len(response.context["cases"]) == total


def test_case_list_costs_the_same_with_three_times_the_cases(
    client, clinician, demo_model, validation, django_assert_num_queries
):
    client.force_login(clinician)
    for count, total in ((2, 2), (4, 6)):
        ready_cases(clinician, demo_model, count, validation=validation)
        warm_get(client, "/cases/")
        with django_assert_num_queries(budget(BUDGETS["case list"]), info=f"{total} cases"):
            response = client.get("/cases/")
        assert response.status_code == 200 and len(response.context["cases"]) == total


# --- API -----------------------------------------------------------------------------------------


def test_api_case_list_costs_the_same_with_three_times_the_cases(
    clinician, institution, demo_model, validation, django_assert_num_queries
):
    api = lab_client(institution)
    for count, total in ((2, 2), (4, 6)):
        ready_cases(clinician, demo_model, count, validation=validation)
        warm_get(api, "/api/v1/cases/")
        with django_assert_num_queries(budget(BUDGETS["api case list"]), info=f"{total} cases"):
            response = api.get("/api/v1/cases/")
        assert response.status_code == 200 and response.json()["count"] == total


@pytest.mark.parametrize("principal", ["lab system", "pathologist"])
@pytest.mark.parametrize("resource", ["case", "fhir"])
def test_api_case_detail_costs_the_same_with_three_times_the_patches(
    resource, principal, clinician, pathologist, institution, demo_model, validation, django_assert_num_queries
):
    if principal == "lab system":
        api = lab_client(institution)
    else:
        api = verified_login(APIClient(), pathologist)
    case = new_case(clinician)
    url = f"/api/v1/cases/{case.pk}/" + ("fhir/" if resource == "fhir" else "")
    name = f"api {resource} detail {principal}"
    for count, total in ((2, 2), (4, 6)):
        analysed_patches(case, demo_model, count, validation=validation, reviewers=[pathologist])
        warm_get(api, url)
        with django_assert_num_queries(budget(BUDGETS[name]), info=f"{name}, {total} patches"):
            response = api.get(url)
        assert response.status_code == 200
        if resource == "case":
            patches = response.json()["patches"]
            assert len(patches) == total and sum(p["review"] is not None for p in patches) == total // 2
        else:
            observations = [e for e in response.json()["entry"] if e["resource"]["resourceType"] == "Observation"]
            assert len(observations) == total


def test_api_patch_detail_costs_the_same_with_three_times_the_results(
    clinician, pathologist, institution, demo_model, validation, django_assert_num_queries
):
    """More patches in its case, more model versions' predictions of it, more reviews of it."""
    api = lab_client(institution)
    case = new_case(clinician)
    (patch,) = analysed_patches(case, demo_model, 1, validation=validation)
    url = f"/api/v1/patches/{patch.pk}/"
    for count in (2, 4):
        analysed_patches(case, demo_model, count, validation=validation, reviewers=[pathologist])
        for _ in range(count):
            number = next(_names)
            version = ModelVersion.objects.create(
                name="shadow", version=str(number), path="nowhere", file_sha256="0" * 64, classes=["NORM", "TUM"],
                input_size=224, preprocessing="scale", metadata={},
            )  # fmt: skip
            prediction = Prediction.objects.create(
                patch=patch, model_version=version, scores={"TUM": 0.9, "NORM": 0.1}, label="TUM",
                inference_seconds=0.01,
            )  # fmt: skip
            Review.objects.create(
                patch=patch, prediction=prediction, pathologist=pathologist, decision="confirm", final_label="TUM"
            )
        warm_get(api, url)
        with django_assert_num_queries(budget(BUDGETS["api patch detail"]), info=f"{count} more results"):
            response = api.get(url)
        assert response.status_code == 200
        assert response.json()["prediction"]["model_version"] == str(version)  # the newest
        assert response.json()["review"]["final_label"] == "TUM"


# --- confirm all ---------------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["first_read", "second_read"])
def test_confirm_all_costs_the_same_with_three_times_the_patches(
    read, clinician, pathologist, institution, demo_model, validation, django_assert_num_queries
):
    """A fixed number of queries under the case's lock, whatever the number of patches (one
    audit event for the one decision)."""
    first = make_user(institution, User.Role.PATHOLOGIST, username="first-reader")
    name = f"confirm all {read}"
    for count in (2, 6):
        (case,) = ready_cases(clinician, demo_model, 1, patches=count, validation=validation)
        if read == "second_read":
            BiopsyCase.objects.filter(pk=case.pk).update(second_read=True)
            case.refresh_from_db()
            review_confirm_all(case=case, pathologist=first)
        with django_assert_num_queries(budget(BUDGETS[name]), info=f"{count} patches"):
            reviews = review_confirm_all(case=case, pathologist=pathologist)
        assert len(reviews) == count and all(r.pk for r in reviews)
        expected = Review.Read.SECOND if read == "second_read" else Review.Read.FIRST
        assert set(Review.objects.filter(pathologist=pathologist, patch__case=case).values_list("read", flat=True)) == {
            expected
        }


def test_confirm_all_page_costs_the_same_with_three_times_the_patches(
    client, clinician, pathologist, demo_model, validation, django_assert_num_queries
):
    verified_login(client, pathologist)
    for count in (2, 6):
        (case,) = ready_cases(clinician, demo_model, 1, patches=count, validation=validation)
        warm_get(client, f"/cases/{case.pk}/")
        with django_assert_num_queries(budget(BUDGETS["confirm all page"]), info=f"{count} patches"):
            response = client.post(f"/cases/{case.pk}/confirm-all/")
        assert response.status_code == 302
        assert Review.objects.filter(patch__case=case, pathologist=pathologist).count() == count


# --- admin changelists ---------------------------------------------------------------------------


def admin_rows(institution, marker: str, version) -> None:
    """A row of every institution-owned model the admin lists, in ``institution``."""
    from django_otp.plugins.otp_static.models import StaticDevice
    from django_otp.plugins.otp_totp.models import TOTPDevice

    clinician = make_user(institution, User.Role.CLINICIAN, username=f"{marker}-clinician")
    pathologist = make_user(institution, User.Role.PATHOLOGIST, username=f"{marker}-pathologist")
    TOTPDevice.objects.create(user=pathologist, name="authenticator", confirmed=True)
    StaticDevice.objects.create(user=pathologist, name="recovery codes")
    case = new_case(clinician, accession=f"{marker}-CASE", mrn=f"{marker}-MRN")
    Patient.objects.create(institution=institution, mrn=f"{marker}-SPARE", name=f"{marker} Spare")
    analysed_patches(case, version, 1, reviewers=[pathologist])
    SiteValidation.objects.create(
        institution=institution, model_version=version, data_source=f"{marker}-data", data_manifest_sha256="0" * 64,
        counts={}, metrics={}, target_sensitivity=0.98, threshold=0.5, sensitivity=1.0, specificity=1.0,
        passed=False, actor=f"{marker}-validator",
    )  # fmt: skip
    from slides.models import Slide

    Slide.objects.create(
        case=case, storage_name=Slide.new_storage_name(institution.pk, ".svs"), original_name=f"{marker}.svs",
        sha256="0" * 64, size_bytes=1, vendor="aperio", width=1000, height=1000, mpp=0.25, mpp_source="file",
        levels=[[1000, 1000, 1.0]], enqueued_at=timezone.now(),
    )  # fmt: skip
    lab, _key = lab_system_create(institution=institution, name=f"{marker} LIS")
    endpoint = WebhookEndpoint.objects.create(lab_system=lab, url=f"https://{marker}.example.org/hook")
    WebhookDelivery.objects.create(endpoint=endpoint, event="case.signed_out", case=case, payload={})


def platform_rows(marker: str, previous) -> None:
    """A row of every platform-wide model the admin lists."""
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog

    version = ModelVersion.objects.create(
        name=f"{marker}-model", version="1", path="nowhere", file_sha256="0" * 64, classes=["NORM", "TUM"],
        input_size=224, preprocessing="scale", metadata={},
    )  # fmt: skip
    ModelActivation.objects.create(model_version=version, previous=previous, actor="test")
    now = timezone.now()
    WorkerHeartbeat.objects.create(hostname=f"{marker}-worker", last_seen=now, started_at=now)
    Group.objects.create(name=f"{marker}-group")
    common = {"user_agent": "test", "ip_address": "10.0.0.2", "username": marker, "http_accept": "*/*"}
    AccessAttempt.objects.create(**common, path_info="/login/", get_data="", post_data="", failures_since_start=1)
    AccessLog.objects.create(**common, path_info="/login/")
    AccessFailureLog.objects.create(**common, path_info="/login/")


@pytest.mark.parametrize("role", ["operator", "staff"])
def test_every_admin_changelist_costs_the_same_with_three_times_the_rows(
    role, demo_model, settings, django_assert_num_queries
):
    """Every registered ModelAdmin, as a platform operator and as an institution administrator
    (operators-only ones refuse the latter, at a fixed cost too)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    alpha = Institution.objects.create(name="ALPHA Hospital", slug="alpha")
    beta = Institution.objects.create(name="BETA Hospital", slug="beta")
    if role == "operator":
        user = User.objects.create_superuser("operator", password="not-a-real-pass-1")
    else:
        user = make_user(alpha, User.Role.ADMIN, username="alpha-admin")
        user.is_staff = True
        user.save()
        user.user_permissions.set(Permission.objects.all())
    client = verified_login(Client(), user)
    urls = {
        model._meta.label_lower: reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for model in sorted(admin.site._registry, key=lambda m: m._meta.label_lower)
    }
    budgets = ADMIN_BUDGETS[role]

    def measure(rows: int) -> None:
        warm_get(client, "/admin/")
        for label, url in urls.items():
            with django_assert_num_queries(budget(budgets[label]), info=f"{label} changelist, {rows} row(s) each"):
                response = client.get(url)
            if response.status_code == 200:
                own_only = role == "staff" and label == "accounts.institution"
                assert response.context["cl"].result_count >= (1 if own_only else rows), label
            else:
                assert response.status_code == 403 and role == "staff", label

    for institution in (alpha, beta):
        admin_rows(institution, f"{institution.slug}1", demo_model)
    platform_rows("platform1", demo_model)
    measure(1)
    for institution in (alpha, beta):
        for number in (2, 3):
            admin_rows(institution, f"{institution.slug}{number}", demo_model)
    for number in (2, 3):
        platform_rows(f"platform{number}", demo_model)
    for number in range(4):
        Institution.objects.create(name=f"Hospital {number}", slug=f"hospital{number}")
    measure(3)
