"""Pathologist review, sign-out and addenda: rules, permissions, audit events and the results
they put into the API and FHIR."""

from __future__ import annotations

import pytest

from accounts.models import User
from audit.models import AuditEvent
from cases.models import BiopsyCase, Review
from cases.review import NotAllowed, addendum_add, case_sign_out, review_confirm_all, review_submit
from cases.services import CaseError, patch_upload
from inference import services
from inference.models import Prediction
from tests.conftest import fixture_patch, make_user, new_case, verified_login
from tests.test_api_contract import token

pytestmark = pytest.mark.django_db

NAMES = ("TUM-TCGA-KECNIDCQ.png", "NORM-TCGA-INTLNRAV.png", "TUM-AACHEHDV.tif")


@pytest.fixture
def ready_case(clinician, demo_model):
    case = new_case(clinician)
    patches = patch_upload(
        case=case, uploaded_by=clinician, files=[(n, fixture_patch(n).read_bytes()) for n in NAMES]
    ).patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.READY_FOR_REVIEW
    return case, list(case.patches.order_by("id"))


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def test_confirm_records_one_review_and_one_audit_event(ready_case, pathologist):
    _case, (tum, *_) = ready_case
    review = review_submit(patch=tum, pathologist=pathologist, decision="confirm")
    assert (review.final_label, review.decision) == ("TUM", "confirm")
    (event,) = events("review.confirm")
    assert event.actor_label == pathologist.username and event.before is None
    assert event.after == {"patch": tum.pk, "ai_label": "TUM", "final_label": "TUM", "decision": "confirm", "read": 1}


def test_override_keeps_the_original_prediction(ready_case, pathologist):
    _case, (tum, *_) = ready_case
    prediction = tum.predictions.get()
    review = review_submit(
        patch=tum, pathologist=pathologist, decision="override", final_label="STR", reason_code="wrong_class",
        reason_text="desmoplastic stroma",
    )  # fmt: skip
    prediction.refresh_from_db()
    assert prediction.label == "TUM" and Prediction.objects.filter(patch=tum).count() == 1
    assert review.prediction == prediction and review.final_label == "STR"
    (event,) = events("review.override")
    assert event.reason == "wrong_class desmoplastic stroma" and event.after["ai_label"] == "TUM"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"decision": "override", "final_label": "CANCER", "reason_code": "other"}, "final class must be one of"),
        ({"decision": "override", "final_label": "STR"}, "needs a reason code"),
        ({"decision": "maybe"}, "confirm or override"),
    ],
)
def test_bad_reviews_are_refused_and_store_nothing(ready_case, pathologist, fields, message):
    _, (tum, *_) = ready_case
    with pytest.raises(CaseError, match=message):
        review_submit(patch=tum, pathologist=pathologist, **fields)
    assert not Review.objects.exists() and not events("review.override")


def test_a_failed_audit_write_rolls_the_review_back(ready_case, pathologist, monkeypatch):
    _, (tum, *_) = ready_case

    def broken(**kwargs):
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr("cases.review.audit_record", broken)
    with pytest.raises(RuntimeError):
        review_submit(patch=tum, pathologist=pathologist, decision="confirm")
    assert not Review.objects.exists()


def test_confirm_all_keeps_overrides(ready_case, pathologist):
    case, (tum, norm, tif) = ready_case
    review_submit(patch=norm, pathologist=pathologist, decision="override", final_label="MUC", reason_code="other")
    confirmed = review_confirm_all(case=case, pathologist=pathologist)
    assert sorted(r.patch_id for r in confirmed) == [tum.pk, tif.pk]
    (event,) = events("review.confirm_all")  # exactly one event for the one decision
    assert event.after["confirmed"] == {str(tum.pk): "TUM", str(tif.pk): "TUM"}
    assert event.actor_label == pathologist.username and not events("review.confirm")
    assert Review.objects.get(patch=norm).final_label == "MUC"


def test_only_pathologists_review_and_sign_out(ready_case, clinician, clinician_client):
    case, (tum, *_) = ready_case
    with pytest.raises(NotAllowed):
        review_submit(patch=tum, pathologist=clinician, decision="confirm")
    with pytest.raises(NotAllowed):
        case_sign_out(case=case, pathologist=clinician, conclusion="no_tumour")
    response = clinician_client.post(f"/cases/{case.pk}/patches/{tum.pk}/review/", {"decision": "confirm"})
    assert response.status_code == 403 and b"only a pathologist" in response.content
    assert not Review.objects.exists()


def test_pathologist_of_another_institution_gets_404(ready_case, other_institution, client):
    case, (tum, *_) = ready_case
    outsider = make_user(other_institution, User.Role.PATHOLOGIST)
    verified_login(client, outsider)
    assert client.post(f"/cases/{case.pk}/patches/{tum.pk}/review/", {"decision": "confirm"}).status_code == 404
    assert client.post(f"/cases/{case.pk}/sign-out/", {"conclusion": "no_tumour"}).status_code == 404
    assert not Review.objects.exists()


def test_sign_out_needs_every_patch_reviewed_then_locks_the_case(ready_case, pathologist, clinician, institution):
    case, (tum, norm, _tif) = ready_case
    review_submit(patch=tum, pathologist=pathologist, decision="confirm")
    with pytest.raises(CaseError, match="2 analysed patch"):
        case_sign_out(case=case, pathologist=pathologist, conclusion="adenocarcinoma")
    review_confirm_all(case=case, pathologist=pathologist)
    sign_out = case_sign_out(case=case, pathologist=pathologist, conclusion="adenocarcinoma", comment="Invasive.")
    assert sign_out.tumour_fraction == round(2 / 3, 4)
    (event,) = events("case.sign_out")
    assert event.before == {"status": "ready_for_review"} and event.after["conclusion"] == "adenocarcinoma"
    case.refresh_from_db()
    assert case.status == BiopsyCase.Status.SIGNED_OUT

    with pytest.raises(CaseError, match="signed out"):
        review_submit(patch=norm, pathologist=pathologist, decision="override", final_label="TUM", reason_code="other")
    with pytest.raises(CaseError, match="signed out"):
        patch_upload(case=case, uploaded_by=clinician, files=[("x.png", fixture_patch(NAMES[0]).read_bytes())])
    with pytest.raises(CaseError, match="already signed out"):
        case_sign_out(case=case, pathologist=pathologist, conclusion="no_tumour")

    addendum_add(case=case, pathologist=pathologist, text="KRAS pending.", reason="molecular testing ordered")
    addendum_add(case=case, pathologist=pathologist, text="KRAS G12D.", reason="molecular result")
    assert [e.after["text"] for e in events("case.addendum")] == ["KRAS pending.", "KRAS G12D."]

    body = token(institution).get(f"/api/v1/cases/{case.pk}/").json()
    assert body["sign_out"]["conclusion"] == "adenocarcinoma" and body["sign_out"]["tumour_fraction"] == 0.6667
    assert [a["text"] for a in body["addenda"]] == ["KRAS pending.", "KRAS G12D."]
    assert {p["review"]["final_label"] for p in body["patches"]} == {"TUM", "NORM"}
    bundle = token(institution).get(f"/api/v1/cases/{case.pk}/fhir/").json()
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["status"] == "amended" and "Adenocarcinoma present" in report["conclusion"]
    assert "KRAS G12D." in report["conclusion"]
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


def test_addenda_only_after_sign_out(ready_case, pathologist):
    case, _ = ready_case
    with pytest.raises(CaseError, match="addenda are for signed-out cases"):
        addendum_add(case=case, pathologist=pathologist, text="x", reason="y")


def test_case_page_review_flow_for_a_pathologist(ready_case, pathologist, client):
    case, (_tum, norm, _tif) = ready_case
    verified_login(client, pathologist)
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert "Confirm all unreviewed (3)" in page and "disabled" in page[page.index('id="sign-out-form"') :]
    response = client.post(
        f"/cases/{case.pk}/patches/{norm.pk}/review/",
        {"decision": "override", "final_label": "MUC", "reason_code": "wrong_class", "reason_text": "mucin pools"},
    )
    assert response.status_code == 302
    assert client.post(f"/cases/{case.pk}/confirm-all/").status_code == 302
    assert client.post(f"/cases/{case.pk}/sign-out/", {"conclusion": "adenocarcinoma"}).status_code == 302
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert "Signed out: Adenocarcinoma present" in page and "override: Wrong class, mucin pools" in page
    bad = client.post(f"/cases/{case.pk}/addenda/", {"text": "", "reason": ""})
    assert bad.status_code == 400 and "needs its text and a reason" in bad.content.decode()


def test_second_read_is_blind_flags_disagreements_and_needs_adjudication(ready_case, pathologist, institution, client):
    case, (tum, norm, tif) = ready_case
    from cases.review import case_request_second_read, disagreements, final_labels

    second = make_user(institution, User.Role.PATHOLOGIST, username="second-reader")
    case = case_request_second_read(case=case, by=pathologist)
    review_confirm_all(case=case, pathologist=pathologist)
    assert final_labels(case) == {}  # one read is not enough any more
    verified_login(client, second)
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert "Pathologist: <strong>" not in page and "Confirm all unreviewed (3)" in page  # blind to the first read

    review_submit(patch=norm, pathologist=second, decision="override", final_label="MUC", reason_code="wrong_class")
    review_confirm_all(case=case, pathologist=second)
    assert Review.objects.filter(pathologist=second).values_list("read", flat=True).distinct().get() == 2
    assert disagreements(case) == {norm.pk}
    assert final_labels(case) == {tum.pk: "TUM", tif.pk: "TUM"}
    with pytest.raises(CaseError, match="1 disagreement"):
        case_sign_out(case=case, pathologist=pathologist, conclusion="adenocarcinoma")
    page = client.get(f"/cases/{case.pk}/").content.decode()
    assert "Readers disagree" in page

    third = make_user(institution, User.Role.PATHOLOGIST, username="third-reader")
    with pytest.raises(NotAllowed, match="only adjudicate"):
        review_submit(patch=tum, pathologist=third, decision="confirm")
    adjudication = review_submit(patch=norm, pathologist=third, decision="confirm")
    assert adjudication.read == 3 and final_labels(case)[norm.pk] == "NORM" and not disagreements(case)
    case_sign_out(case=case, pathologist=pathologist, conclusion="adenocarcinoma")
    assert [e.after["read"] for e in events("review.override")] == [2]


def test_blind_second_read_does_not_leak_through_the_api_or_the_history(ready_case, pathologist, institution, client):
    from rest_framework.test import APIClient

    from cases.review import case_request_second_read

    case, (tum, norm, _tif) = ready_case
    second = make_user(institution, User.Role.PATHOLOGIST, username="second-reader")
    case = case_request_second_read(case=case, by=pathologist)
    review_submit(
        patch=norm,
        pathologist=pathologist,
        decision="override",
        final_label="MUC",
        reason_code="wrong_class",
        reason_text="first reader's mucin note",
    )
    review_confirm_all(case=case, pathologist=pathologist)

    def reviews_seen_by(user) -> dict[int, str | None]:
        api = APIClient()
        verified_login(api, user)
        patches = api.get(f"/api/v1/cases/{case.pk}/").json()["patches"]
        return {p["id"]: p["review"] and p["review"]["final_label"] for p in patches}

    assert set(reviews_seen_by(second).values()) == {None}  # nothing of the first read
    assert reviews_seen_by(pathologist)[norm.pk] == "MUC"  # the first reader sees their own read
    lab = token(institution).get(f"/api/v1/cases/{case.pk}/").json()["patches"]
    assert {p["review"] for p in lab} == {None}  # a lab system sees decided labels only
    verified_login(client, second)
    page = client.get(f"/cases/{case.pk}/").content.decode()
    # The history shows that the first reader reviewed, not what they decided.
    assert "mucin note" not in page and "blind second read" in page

    review_submit(patch=tum, pathologist=second, decision="confirm")
    assert reviews_seen_by(second)[tum.pk] == "TUM"
    lab = {p["id"]: p["review"] for p in token(institution).get(f"/api/v1/cases/{case.pk}/").json()["patches"]}
    assert lab[tum.pk]["final_label"] == "TUM" and lab[norm.pk] is None  # both reads agree on TUM: decided


def test_updated_since_returns_a_case_after_every_change_inside_it(ready_case, clinician, pathologist, lab_api):
    """Lab systems poll updated_since: new patches, their results, reviews, sign-out and addenda
    each make the case show up again."""
    import datetime

    from django.utils import timezone

    case, (tum, *_) = ready_case

    def changed_since(moment) -> list[int]:
        stamp = moment.isoformat().replace("+00:00", "Z")
        response = lab_api.get("/api/v1/cases/", {"updated_since": stamp})
        assert response.status_code == 200, response.content
        return [c["id"] for c in response.json()["results"]]

    def shows_up_after(change) -> None:
        moment = timezone.now() + datetime.timedelta(microseconds=1)
        assert case.pk not in changed_since(moment)
        change()
        assert case.pk in changed_since(moment)

    added = []
    shows_up_after(
        lambda: added.extend(
            patch_upload(
                case=case, uploaded_by=clinician, files=[(NAMES[0], fixture_patch(NAMES[0]).read_bytes())]
            ).patches
        )
    )
    shows_up_after(lambda: services.prediction_run(patch_ids=[p.pk for p in added]))
    shows_up_after(lambda: review_submit(patch=tum, pathologist=pathologist, decision="confirm"))
    shows_up_after(lambda: review_confirm_all(case=case, pathologist=pathologist))
    shows_up_after(lambda: case_sign_out(case=case, pathologist=pathologist, conclusion="adenocarcinoma", comment=""))
    shows_up_after(
        lambda: addendum_add(case=case, pathologist=pathologist, text="KRAS G12D.", reason="molecular result")
    )
    status_events = [
        (e.before["status"], e.after["status"])
        for e in AuditEvent.objects.filter(
            target_id=str(case.pk), action__in=["case.status", "case.sign_out"]
        ).order_by("id")
    ]
    assert status_events == [
        ("open", "analysing"),
        ("analysing", "ready_for_review"),
        ("ready_for_review", "analysing"),
        ("analysing", "ready_for_review"),
        ("ready_for_review", "signed_out"),
    ]


def test_impossible_dates_and_ids_are_clear_errors_not_server_errors(ready_case, pathologist, client, lab_api):
    case, _ = ready_case
    response = lab_api.get("/api/v1/cases/", {"updated_since": "2026-02-31T10:00:00Z"})
    assert response.status_code == 400 and "updated_since" in response.json()["errors"]
    verified_login(client, pathologist)
    page = client.get("/cases/worklist/", {"since": "2026-02-31"})
    assert page.status_code == 200 and "is not a date" in page.content.decode()
    response = client.post(f"/cases/{case.pk}/assign/", {"assignee": "abc"})
    assert response.status_code == 400 and "no such pathologist" in response.content.decode()
    case.refresh_from_db()
    assert case.assigned_to is None
