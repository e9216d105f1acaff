"""Sign-in security: lockout after wrong passwords, the TOTP second factor, automatic logoff."""

from __future__ import annotations

import re
import time

import pytest
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.middleware import LAST_ACTIVITY_SESSION_KEY
from accounts.models import User
from audit.models import AuditEvent
from audit.services import audit_verify
from tests.conftest import authenticator, make_user, totp_code, verified_login

PASSWORD = "not-a-real-pass-1"


def _login(client, username, password=PASSWORD, **extra):
    return client.post("/login/", {"username": username, "password": password}, **extra)


def _session_stamp(client, key: str, seconds_ago: int) -> None:
    session = client.session
    session[key] = int(time.time()) - seconds_ago
    session.save()


@pytest.mark.django_db
def test_eleventh_wrong_password_locks_the_account_and_a_right_one_is_then_refused(client, clinician, settings):
    for attempt in range(settings.LOGIN_FAILURE_LIMIT):
        response = _login(client, clinician.username, "wrong password")
        assert response.status_code == 200, attempt  # the form again, with its error
        assert b"did not match" in response.content
    assert not AuditEvent.objects.filter(action="auth.lockout").exists()

    locked = _login(client, clinician.username, "wrong password")
    assert locked.status_code == 429
    assert b"Sign-in locked" in locked.content
    refused = _login(client, clinician.username)
    assert refused.status_code == 429
    assert "_auth_user_id" not in client.session

    # The lock and every attempt refused during it are in the trail.
    events = list(AuditEvent.objects.filter(action="auth.lockout").order_by("id"))
    assert len(events) == 2
    event = events[0]
    assert event.after["username"] == clinician.username
    assert event.after["minutes"] == settings.LOGIN_LOCKOUT_MINUTES
    assert AuditEvent.objects.filter(action="auth.login_failed").count() >= settings.LOGIN_FAILURE_LIMIT
    assert audit_verify()[1] is None


@pytest.mark.django_db
def test_lockout_is_also_per_address_whatever_the_user_name(client, clinician, settings):
    for n in range(settings.LOGIN_FAILURE_LIMIT + 1):
        _login(client, f"guess-{n}", "wrong password")
    assert _login(client, clinician.username).status_code == 429  # a right password from that address
    other_address = _login(client, clinician.username, REMOTE_ADDR="192.0.2.7")
    assert other_address.status_code == 302  # the account itself is not locked


@pytest.mark.django_db
def test_lockout_ends_after_the_cool_off(client, clinician, settings):
    import datetime

    from axes.models import AccessAttempt

    for _ in range(settings.LOGIN_FAILURE_LIMIT + 1):
        _login(client, clinician.username, "wrong password")
    assert _login(client, clinician.username).status_code == 429
    past = datetime.timedelta(minutes=settings.LOGIN_LOCKOUT_MINUTES + 1)
    for attempt in AccessAttempt.objects.all():
        attempt.attempt_time -= past
        attempt.save()
    assert _login(client, clinician.username).status_code == 302


@pytest.mark.django_db
def test_a_right_password_resets_the_count(client, clinician, settings):
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        _login(client, clinician.username, "wrong password")
    assert _login(client, clinician.username).status_code == 302
    client.post("/logout/")
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        assert _login(client, clinician.username, "wrong password").status_code == 200


@pytest.mark.django_db
def test_admin_login_goes_through_the_same_page(client, clinician):
    response = client.get("/admin/login/?next=/admin/cases/")
    assert response.status_code == 302 and response["Location"].startswith("/login/?next=")
    client.force_login(clinician)
    assert client.get("/admin/login/?next=/admin/").status_code == 403  # no loop for non-staff


@pytest.mark.django_db
def test_pathologist_without_second_factor_is_sent_to_enrol_and_gets_recovery_codes(client, pathologist):
    response = _login(client, pathologist.username)
    assert response.status_code == 302
    page = client.get("/cases/")
    assert page.status_code == 302 and page["Location"].startswith("/account/two-factor/")
    assert client.get("/api/v1/cases/").status_code == 403  # the API through the session too
    step = client.get(page["Location"])
    assert step.status_code == 302 and step["Location"].startswith("/account/two-factor/enrol/")

    enrol = client.get(step["Location"])
    assert enrol.status_code == 200
    assert b"<svg" in enrol.content  # the QR code, inline
    device = TOTPDevice.objects.get(user=pathologist, confirmed=False)
    assert client.get(step["Location"]).status_code == 200
    assert TOTPDevice.objects.filter(user=pathologist).count() == 1  # a reload keeps the same key

    wrong = client.post("/account/two-factor/enrol/", {"code": "000000", "next": "/cases/"})
    assert wrong.status_code == 400
    time.sleep(1.1)  # django-otp throttles guesses: 1 s after the first wrong code, doubling
    done = client.post("/account/two-factor/enrol/", {"code": totp_code(device), "next": "/cases/"})
    assert done.status_code == 200
    codes = re.findall(r"<li>([0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4})</li>", done.content.decode())
    assert len(codes) == 10 and len(set(codes)) == 10
    device.refresh_from_db()
    assert device.confirmed
    assert client.get("/cases/").status_code == 200
    actions = list(AuditEvent.objects.filter(actor_id=str(pathologist.pk)).values_list("action", flat=True))
    assert "auth.mfa_enrol_failed" in actions and "auth.mfa_enrolled" in actions
    assert "auth.mfa_recovery_codes_created" in actions


@pytest.mark.django_db
def test_login_needs_the_code_once_enrolled_and_a_recovery_code_works_once(client, pathologist):
    device = authenticator(pathologist)
    _login(client, pathologist.username)
    assert client.get("/cases/worklist/")["Location"].startswith("/account/two-factor/")
    assert client.get("/account/two-factor/enrol/").status_code == 302  # no new authenticator without the old one

    wrong = client.post("/account/two-factor/", {"code": "123456", "next": "/cases/worklist/"})
    assert wrong.status_code == 400 and b"not right" in wrong.content
    assert client.get("/cases/worklist/").status_code == 302
    assert AuditEvent.objects.filter(action="auth.mfa_failed").count() == 1

    throttled = client.post("/account/two-factor/", {"code": totp_code(device), "next": "/cases/worklist/"})
    assert throttled.status_code == 400 and b"Too many wrong codes" in throttled.content
    time.sleep(1.1)  # django-otp throttles guesses: 1 s after the first wrong code, doubling
    passed = client.post("/account/two-factor/", {"code": totp_code(device), "next": "/cases/worklist/"})
    assert passed.status_code == 302 and passed["Location"] == "/cases/worklist/"
    assert client.get("/cases/worklist/").status_code == 200
    assert AuditEvent.objects.filter(action="auth.mfa_verified").count() == 1

    renewed = client.post("/account/two-factor/recovery-codes/")
    code = re.findall(r"<li>([0-9a-f-]{14})</li>", renewed.content.decode())[0]
    client.post("/logout/")
    _login(client, pathologist.username)
    assert client.post("/account/two-factor/", {"code": code.upper(), "next": "/"}).status_code == 302
    assert client.get("/cases/").status_code == 200
    assert AuditEvent.objects.get(action="auth.mfa_recovery_code_used").after == {"recovery_codes_left": 9}
    client.post("/logout/")
    _login(client, pathologist.username)
    assert client.post("/account/two-factor/", {"code": code, "next": "/"}).status_code == 400  # used up
    assert StaticDevice.objects.get(user=pathologist).token_set.count() == 9


@pytest.mark.django_db
def test_second_factor_is_not_asked_of_clinicians_by_default_but_can_be(client, clinician, settings):
    _login(client, clinician.username)
    assert client.get("/cases/").status_code == 200
    settings.MFA_REQUIRED_ROLES = ["clinician", "pathologist", "admin"]
    assert client.get("/cases/").status_code == 302


@pytest.mark.django_db
def test_superusers_always_need_the_second_factor(client, settings):
    settings.MFA_REQUIRED_ROLES = []
    root = User.objects.create_superuser("root", password=PASSWORD)
    client.force_login(root)
    assert client.get("/admin/").status_code == 302
    verified_login(client, root)
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_next_is_not_an_open_redirect(client, pathologist):
    device = authenticator(pathologist)
    _login(client, pathologist.username)
    response = client.post("/account/two-factor/", {"code": totp_code(device), "next": "https://evil.example/"})
    assert response.status_code == 302 and response["Location"] == "/"


@pytest.mark.django_db
def test_idle_session_is_signed_out_with_a_message_and_audited(client, clinician, settings):
    _login(client, clinician.username)
    assert client.get("/cases/").status_code == 200
    _session_stamp(client, LAST_ACTIVITY_SESSION_KEY, settings.SESSION_IDLE_TIMEOUT + 5)

    response = client.get("/cases/", follow=True)
    assert response.redirect_chain[0][0].startswith("/login/?next=")
    assert b"signed out after 15 minutes without activity" in response.content
    assert "_auth_user_id" not in client.session
    event = AuditEvent.objects.get(action="auth.session_expired")
    assert event.actor_id == str(clinician.pk) and event.after["idle_seconds"] > settings.SESSION_IDLE_TIMEOUT


@pytest.mark.django_db
def test_activity_keeps_the_session_and_api_sessions_expire_as_problems(client, clinician, settings):
    _login(client, clinician.username)
    client.get("/cases/")
    _session_stamp(client, LAST_ACTIVITY_SESSION_KEY, settings.SESSION_IDLE_TIMEOUT - 60)
    assert client.get("/account/keepalive/").status_code == 204  # activity within the limit
    assert client.session[LAST_ACTIVITY_SESSION_KEY] >= int(time.time()) - 2

    _session_stamp(client, LAST_ACTIVITY_SESSION_KEY, settings.SESSION_IDLE_TIMEOUT + 1)
    response = client.get("/api/v1/cases/")
    assert response.status_code == 401 and "without activity" in response.json()["detail"]


def test_sessions_end_when_the_browser_closes(settings):
    assert settings.SESSION_EXPIRE_AT_BROWSER_CLOSE is True
    assert settings.SESSION_IDLE_TIMEOUT == 15 * 60


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("password", "accepted"),
    [("short1!", False), ("password123", False), ("1234567890123", False), ("pathologist-st", False), (PASSWORD, True)],
)
def test_password_validators(pathologist, password, accepted):
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    try:
        validate_password(password, user=make_user(pathologist.institution, User.Role.CLINICIAN, "pathologist-stm"))
    except ValidationError:
        assert not accepted
    else:
        assert accepted


@pytest.mark.django_db
def test_failed_token_authentications_are_audited_without_the_key(institution):
    from django.core.cache import cache
    from django.utils import timezone
    from rest_framework.test import APIClient

    from accounts.models import LabSystem
    from accounts.services import lab_system_create

    cache.clear()
    api = APIClient()
    for n in range(3):
        api.credentials(HTTP_AUTHORIZATION=f"Token cldy_made-up-{n}")
        assert api.get("/api/v1/cases/").status_code == 401
    unknown = AuditEvent.objects.filter(action="auth.token_failed")
    assert unknown.count() == 1  # one per address per minute, not one per guess
    assert unknown.get().after["why"] == "unknown" and "made-up" not in str(unknown.get().after)

    lab, key = lab_system_create(institution=institution, name="Old LIS")
    LabSystem.objects.filter(pk=lab.pk).update(revoked_at=timezone.now())
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert api.get("/api/v1/cases/").status_code == 401
    revoked = AuditEvent.objects.filter(action="auth.token_failed").order_by("-id").first()
    assert revoked.after["why"] == "revoked" and revoked.actor_id == str(lab.pk)
    assert revoked.institution_id == institution.pk and key not in str(revoked.after)

    cache.delete(f"token-failure:{revoked.client_address}")  # the minute is over
    api.credentials(HTTP_AUTHORIZATION="Token cldy_made-up-again")
    api.get("/api/v1/cases/")
    latest = AuditEvent.objects.filter(action="auth.token_failed").order_by("-id").first()
    assert latest.after["why"] == "unknown" and latest.after["earlier_unrecorded"] == 2


@pytest.mark.django_db
def test_activity_does_not_keep_a_session_past_its_lifetime(client, clinician, settings):
    from accounts.middleware import SIGNED_IN_AT_SESSION_KEY

    _login(client, clinician.username)
    assert client.get("/cases/").status_code == 200
    _session_stamp(client, SIGNED_IN_AT_SESSION_KEY, settings.SESSION_COOKIE_AGE + 1)
    response = client.get("/cases/", follow=True)  # active a second ago, but signed in 8 hours ago
    assert b"8 hours after you signed in" in response.content
    assert AuditEvent.objects.get(action="auth.session_expired").after["why"] == "lifetime"
