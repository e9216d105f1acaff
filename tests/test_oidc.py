"""Sign-in through the hospital's identity provider, against a real local OpenID Connect provider.

The browser's part is played by hand: Django's test client for our pages, ``requests`` for the
provider's /authorize, which redirects back to /oidc/callback/ with a code and the state.
"""

from __future__ import annotations

import base64
import copy
import json
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
import requests
from django.contrib import auth
from django.http import HttpRequest
from django.test import Client

from accounts.mfa import IDP_VERIFIED_SESSION_KEY
from accounts.models import Institution, User
from accounts.oidc import (
    MESSAGE_DISABLED,
    MESSAGE_EXPIRED,
    MESSAGE_FAILED,
    MESSAGE_LOCAL_ACCOUNT,
    MESSAGE_NO_INSTITUTION,
    MESSAGE_NO_ROLE,
    username_for,
)
from audit.models import AuditEvent
from tests.oidc_provider import LocalOIDCProvider, new_rsa_key

SUB = "a1b2c3-pathologist"


@pytest.fixture
def provider():
    provider = LocalOIDCProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def oidc(settings, provider, institution):
    """OIDC switched on and pointed at the local provider, which signs in a pathologist of St Mary's."""
    settings.OIDC_ENABLED = True
    settings.AUTHENTICATION_BACKENDS = [
        "axes.backends.AxesStandaloneBackend",
        "django.contrib.auth.backends.ModelBackend",
        "accounts.oidc.HospitalOIDCBackend",
    ]
    for name, value in provider.django_settings().items():
        setattr(settings, name, value)
    settings.OIDC_TIMEOUT = 10
    templates = copy.deepcopy(settings.TEMPLATES)
    templates[0]["OPTIONS"]["context_processors"].append("accounts.context_processors.oidc")
    settings.TEMPLATES = templates
    provider.claims = {
        "sub": SUB,
        "email": "ada.lovelace@stmarys.example",
        "given_name": "Ada",
        "family_name": "Lovelace",
        "cloudiopsy_role": "pathologist",
        "cloudiopsy_institution": institution.slug,
    }
    provider.id_token_claims = {"amr": ["pwd", "mfa"]}
    return provider


def to_provider(client, next_url: str = "") -> str:
    """Start the sign-in here; returns the provider's /authorize address we were sent to."""
    start = client.get("/oidc/authenticate/" + (f"?{urlencode({'next': next_url})}" if next_url else ""))
    assert start.status_code == 302
    return start["Location"]


def at_provider(authorize_url: str) -> str:
    """The provider approves; returns our callback's path and query it sends the browser to."""
    answer = requests.get(authorize_url, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    back = urlsplit(answer.headers["Location"])
    assert back.path == "/oidc/callback/"
    return f"{back.path}?{back.query}"


def sign_in(client, next_url: str = ""):
    """The whole round trip; returns our callback's response."""
    return client.get(at_provider(to_provider(client, next_url)))


def signed_in_user(client):
    """Who Django takes this client's session for (through the backend that signed it in)."""
    request = HttpRequest()
    request.session = client.session
    user = auth.get_user(request)
    return user if user.is_authenticated else None


def login_page_text(client) -> str:
    return client.get("/login/").content.decode()


def actions() -> list[str]:
    return list(AuditEvent.objects.values_list("action", flat=True))


def assert_refused(client, response, message: str, reason_part: str, users_before: int) -> AuditEvent:
    assert response.status_code == 302
    assert response["Location"] == "/login/"
    assert signed_in_user(client) is None
    assert User.objects.count() == users_before
    assert message.replace("'", "&#x27;") in login_page_text(client)
    refusal = AuditEvent.objects.filter(action="user.oidc_refused").last()
    assert refusal is not None
    assert reason_part in refusal.reason
    last_login = AuditEvent.objects.filter(action="user.oidc_login").last()
    assert last_login is None or last_login.pk < refusal.pk
    return refusal


def test_pathologist_signs_in_with_role_institution_and_mfa_from_the_provider(client, oidc, institution):
    authorize_url = to_provider(client, next_url="/cases/worklist/")
    sent = parse_qs(urlsplit(authorize_url).query)
    assert authorize_url.startswith(oidc.url("/authorize"))
    assert sent["client_id"] == [oidc.client_id]
    assert sent["redirect_uri"] == ["http://testserver/oidc/callback/"]
    assert sent["scope"] == ["openid email profile"]
    assert sent["nonce"] and sent["state"]

    response = client.get(at_provider(authorize_url))

    assert response.status_code == 302
    assert response["Location"] == "/cases/worklist/"
    user = signed_in_user(client)
    assert user.username == f"oidc-{SUB}"
    assert (user.role, user.institution) == (User.Role.PATHOLOGIST, institution)
    assert (user.email, user.first_name, user.last_name) == ("ada.lovelace@stmarys.example", "Ada", "Lovelace")
    assert not user.has_usable_password()
    assert not user.is_staff and not user.is_superuser
    assert client.session[IDP_VERIFIED_SESSION_KEY] is True
    # The provider's second factor counts: no TOTP page in between.
    assert client.get("/cases/").status_code == 200
    assert oidc.token_requests[0]["client_secret"] == oidc.client_secret
    created = AuditEvent.objects.get(action="user.oidc_create")
    assert created.after == {"role": "pathologist", "institution": "stmarys", "is_staff": False}
    login = AuditEvent.objects.get(action="user.oidc_login")
    assert login.after == {"amr": ["pwd", "mfa"], "mfa_by_identity_provider": True}
    assert login.actor_label == user.username


@pytest.mark.parametrize("amr", [["pwd"], None, ["pwd", "swk"], ["sms"]])
def test_session_not_marked_when_the_provider_checked_no_second_factor(client, oidc, amr):
    oidc.id_token_claims = {"amr": amr} if amr is not None else {}

    response = sign_in(client)

    assert response.status_code == 302
    assert signed_in_user(client).role == User.Role.PATHOLOGIST
    assert IDP_VERIFIED_SESSION_KEY not in client.session
    # So the pathologist passes the local second factor like after a password.
    assert client.get("/cases/")["Location"].startswith("/account/two-factor/")


@pytest.mark.parametrize("amr", [["otp"], ["hwk"], ["sc"], "mfa", ["pwd", "MFA"]])
def test_trusted_amr_values_mark_the_session(client, oidc, amr):
    oidc.id_token_claims = {"amr": amr}

    sign_in(client)

    assert client.session[IDP_VERIFIED_SESSION_KEY] is True


def test_provider_mfa_not_trusted_when_switched_off(client, oidc, settings):
    settings.OIDC_TRUST_IDP_MFA = False

    sign_in(client)

    assert signed_in_user(client) is not None
    assert IDP_VERIFIED_SESSION_KEY not in client.session


def test_clinician_signs_in_without_second_factor_questions(client, oidc):
    oidc.claims["cloudiopsy_role"] = "clinician"
    oidc.id_token_claims = {}

    sign_in(client)

    assert signed_in_user(client).role == User.Role.CLINICIAN
    assert client.get("/cases/").status_code == 200


def test_unknown_institution_refused_nothing_created(client, oidc):
    oidc.claims["cloudiopsy_institution"] = "nowhere-general"
    users, institutions = User.objects.count(), Institution.objects.count()

    response = sign_in(client)

    refusal = assert_refused(client, response, MESSAGE_NO_INSTITUTION, "nowhere-general", users)
    assert Institution.objects.count() == institutions
    assert refusal.actor_label == f"oidc-{SUB}"
    assert refusal.after == {"sub": SUB, "role": "pathologist", "institution": "nowhere-general"}


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        (None, "no 'cloudiopsy_role' claim"),
        ("", "no 'cloudiopsy_role' claim"),
        ("surgeon", "names no Cloudiopsy role"),
        (["pathologist", "admin"], "more than one role"),
    ],
)
def test_missing_or_unknown_role_refused(client, oidc, role, reason):
    if role is None:
        del oidc.claims["cloudiopsy_role"]
    else:
        oidc.claims["cloudiopsy_role"] = role
    users = User.objects.count()

    response = sign_in(client)

    assert_refused(client, response, MESSAGE_NO_ROLE, reason, users)
    assert "auth.login_failed" in actions()


def test_role_in_a_list_with_other_groups_and_only_in_the_id_token(client, oidc):
    del oidc.claims["cloudiopsy_role"]
    oidc.id_token_claims["cloudiopsy_role"] = ["staff", "Pathologist", "all-users"]

    sign_in(client)

    assert signed_in_user(client).role == User.Role.PATHOLOGIST


def test_role_and_institution_change_at_the_provider_updates_the_user_and_is_audited(
    client, oidc, institution, other_institution
):
    oidc.claims["cloudiopsy_role"] = "clinician"
    sign_in(client)
    user = signed_in_user(client)
    client.logout()

    oidc.claims.update({"cloudiopsy_role": "admin", "cloudiopsy_institution": other_institution.slug})
    oidc.claims["family_name"] = "King"
    sign_in(client)

    assert signed_in_user(client) == user
    user.refresh_from_db()
    assert (user.role, user.institution, user.last_name) == (User.Role.ADMIN, other_institution, "King")
    assert user.is_staff and not user.is_superuser
    assert User.objects.count() == 1
    update = AuditEvent.objects.get(action="user.oidc_update")
    assert update.before == {"role": "clinician", "institution": "stmarys", "is_staff": False}
    assert update.after == {"role": "admin", "institution": "other", "is_staff": True}
    assert update.target_id == str(user.pk)


def test_unchanged_claims_write_no_update_event(client, oidc):
    sign_in(client)
    client.logout()
    sign_in(client)

    assert actions().count("user.oidc_login") == 2
    assert "user.oidc_update" not in actions()


def test_claims_never_grant_superuser_and_demotion_removes_staff(client, oidc):
    oidc.claims.update({"cloudiopsy_role": "admin", "is_superuser": True, "is_staff": True})
    sign_in(client)
    user = signed_in_user(client)
    assert user.is_staff and not user.is_superuser
    client.logout()

    oidc.claims["cloudiopsy_role"] = "clinician"
    sign_in(client)

    user.refresh_from_db()
    assert user.role == User.Role.CLINICIAN
    assert not user.is_staff and not user.is_superuser


def test_disabled_account_signed_out_refused_and_stays_disabled(client, oidc):
    sign_in(client)
    user = signed_in_user(client)
    User.objects.filter(pk=user.pk).update(is_active=False)
    # The open session ends at once.
    assert client.get("/cases/")["Location"].startswith("/login/")

    response = sign_in(client)

    assert_refused(client, response, MESSAGE_DISABLED, "disabled", 1)
    user.refresh_from_db()
    assert not user.is_active


def test_password_account_with_the_same_name_is_not_taken_over(client, oidc, institution):
    User.objects.create_user(username=f"oidc-{SUB}", password="a-local-password-1", institution=institution)

    response = sign_in(client)

    assert_refused(client, response, MESSAGE_LOCAL_ACCOUNT, "password account", 1)


def test_forged_state_refused(client, oidc):
    back = urlsplit(at_provider(to_provider(client)))
    query = parse_qs(back.query)
    query["state"] = ["forged-state"]

    response = client.get(f"{back.path}?{urlencode(query, doseq=True)}")

    assert_refused(client, response, MESSAGE_FAILED, "state", 0)


def test_callback_in_another_browser_refused(client, oidc):
    callback = at_provider(to_provider(client))

    other_browser = Client()
    response = other_browser.get(callback)

    assert response.status_code == 302
    assert response["Location"] == "/login/"
    assert MESSAGE_EXPIRED.replace("'", "&#x27;") in login_page_text(other_browser)
    assert User.objects.count() == 0


def test_replayed_callback_refused(client, oidc):
    callback = at_provider(to_provider(client))
    client.get(callback)
    client.logout()

    response = client.get(callback)

    assert response["Location"] == "/login/"
    assert signed_in_user(client) is None


def _tamper_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def _unsigned(token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none", headers={"kid": jwt.get_unverified_header(token)["kid"]})


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("payload", "SuspiciousOperation: JWS token verification failed"),
        ("other_key", "verification failed"),
        ("alg_none", "SuspiciousOperation"),
        ("audience", "not for this client"),
        ("expired", "ExpiredSignatureError"),
        ("nonce", "Nonce"),
    ],
)
def test_tampered_or_misdirected_id_token_refused(client, oidc, tamper, reason):
    if tamper == "payload":
        oidc.id_token_mutator = _tamper_payload
    elif tamper == "other_key":
        oidc.signing_key = new_rsa_key()
    elif tamper == "alg_none":
        oidc.id_token_mutator = _unsigned
    elif tamper == "audience":
        oidc.id_token_claims["aud"] = "another-application"
    elif tamper == "expired":
        oidc.id_token_claims["exp"] = 1_000_000_000
    elif tamper == "nonce":
        oidc.id_token_claims["nonce"] = "not-the-one-we-sent"

    response = sign_in(client)

    assert_refused(client, response, MESSAGE_FAILED, reason, 0)


def test_userinfo_about_someone_else_refused(client, oidc):
    oidc.id_token_claims["sub"] = "the-id-token-subject"

    response = sign_in(client)

    assert_refused(client, response, MESSAGE_FAILED, "'sub' differs", 0)


def test_wrong_client_secret_refused(client, oidc, settings):
    settings.OIDC_RP_CLIENT_SECRET = "not-the-secret"

    response = sign_in(client)

    assert_refused(client, response, MESSAGE_FAILED, "HTTPError", 0)


def test_provider_error_answer_refused(client, oidc):
    to_provider(client)

    response = client.get("/oidc/callback/?error=access_denied&state=whatever")

    assert_refused(client, response, MESSAGE_FAILED, "access_denied", 0)


def test_locked_out_address_cannot_sign_in_through_the_provider_either(client, oidc, settings):
    settings.AXES_FAILURE_LIMIT = 1
    client.post("/login/", {"username": "nobody", "password": "wrong-password-1"})

    response = sign_in(client)

    assert response.status_code == 429
    assert signed_in_user(client) is None
    assert User.objects.count() == 0


def test_password_login_not_handled_by_the_oidc_backend(client, oidc, clinician):
    response = client.post("/login/?code=x&state=y", {"username": clinician.username, "password": "not-a-real-pass-1"})

    assert response.status_code == 302
    assert signed_in_user(client) == clinician
    assert oidc.token_requests == []


def test_logout_ends_the_session_at_the_provider_too(client, oidc):
    sign_in(client)

    response = client.post("/oidc/logout/")

    assert signed_in_user(client) is None
    location = urlsplit(response["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == oidc.url("/logout")
    assert parse_qs(location.query) == {
        "client_id": [oidc.client_id],
        "post_logout_redirect_uri": ["http://testserver/login/"],
    }


def test_logout_of_a_password_session_stays_here(client, oidc, clinician):
    client.force_login(clinician)

    response = client.post("/oidc/logout/")

    assert response["Location"] == "/login/"
    assert signed_in_user(client) is None


def test_login_page_offers_the_hospital_account_when_enabled(client, oidc):
    page = login_page_text(client)

    assert "Sign in with the hospital account" in page
    assert 'href="/oidc/authenticate/"' in page


def test_oidc_off_hides_the_button_and_answers_404(client, oidc, settings):
    settings.OIDC_ENABLED = False

    assert client.get("/oidc/authenticate/").status_code == 404
    assert client.get("/oidc/callback/?code=x&state=y").status_code == 404
    assert client.post("/oidc/logout/").status_code == 404
    assert "Sign in with the hospital account" not in login_page_text(client)
    assert oidc.token_requests == []


def test_oidc_off_by_default(client, db):
    from django.conf import settings

    assert settings.OIDC_ENABLED is False
    assert client.get("/oidc/authenticate/").status_code == 404
    assert "Sign in with the hospital account" not in login_page_text(client)


def test_long_subject_gets_a_hashed_user_name():
    name = username_for("x" * 300)

    assert name.startswith("oidc-sha256-")
    assert len(name) <= 150
    assert username_for("x" * 300) == name != username_for("x" * 299 + "y")
