"""Sign-in through the hospital's identity provider (OpenID Connect, mozilla-django-oidc).

Who someone is comes from the provider's ``sub`` claim: the account is ``oidc-<sub>``, created on
the first sign-in and brought up to date on every later one. What they may do comes from two
claims, ``OIDC_ROLE_CLAIM`` (clinician, pathologist or admin) and ``OIDC_INSTITUTION_CLAIM`` (the
slug of an institution that already exists here). Without both the sign-in is refused: nothing is
created, the refusal is audited and the login page says why. See docs/oidc.md.
"""

from __future__ import annotations

import hashlib
import logging
from urllib.parse import urlencode

import jwt
import requests
from django.conf import settings
from django.contrib import auth, messages
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import SuspiciousOperation
from django.db import transaction
from django.http import HttpResponseRedirect
from django.shortcuts import resolve_url
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCLogoutView

from accounts.mfa import IDP_VERIFIED_SESSION_KEY
from accounts.models import Institution, User
from audit.models import AuditEvent
from audit.services import Actor, audit_record

logger = logging.getLogger(__name__)

BACKEND_PATH = "accounts.oidc.HospitalOIDCBackend"
USERNAME_PREFIX = "oidc-"

# `amr` values (RFC 8176) that mean the provider checked a second factor: "mfa" (it says so),
# "otp" (a one-time code), "hwk" (a hardware key: FIDO2 / security key), "sc" (a smart card).
# Not trusted on their own: "pwd", "pin", "kba" (knowledge only), "swk" (a key kept in software, e.g.
# in the browser), "sms" and "tel" (weaker than the TOTP asked for here).
MFA_AMR_VALUES = frozenset({"mfa", "otp", "hwk", "sc"})

# What the login page says; the audit trail keeps the exact reason.
MESSAGE_FAILED = (
    "Sign-in with the hospital account did not work. Please try again; if it keeps failing, "
    "contact your IT service desk."
)
MESSAGE_NO_ROLE = (
    "Your hospital account has no Cloudiopsy role (clinician, pathologist, lab manager or administrator). "
    "Ask your IT service desk to give you one."
)
MESSAGE_NO_INSTITUTION = (
    "Your hospital account's institution is not set up in Cloudiopsy. Ask your IT service desk or "
    "the Cloudiopsy administrator."
)
MESSAGE_DISABLED = "Your Cloudiopsy account is disabled. Ask the Cloudiopsy administrator."
MESSAGE_LOCAL_ACCOUNT = (
    "Your hospital account matches an account that signs in with a password here. Ask the Cloudiopsy administrator."
)
MESSAGE_EXPIRED = "The sign-in took too long or was started in another window. Please try again."


class LoginRefused(Exception):
    """The provider vouched for someone we will not sign in; ``message`` is shown to them."""

    def __init__(self, reason: str, message: str = MESSAGE_FAILED, *, username: str = "", details=None):
        super().__init__(reason)
        self.reason = reason
        self.message = message
        self.username = username
        self.details = details or {}


def username_for(sub: str) -> str:
    """The local user name for the provider's subject: ``oidc-<sub>``, or a hash of ``sub`` when
    that would not fit in the 150 characters a user name may have (never truncated: two long
    subjects sharing a prefix would become one account)."""
    username = f"{USERNAME_PREFIX}{sub}"
    if len(username) > 150:
        username = f"{USERNAME_PREFIX}sha256-{hashlib.sha256(sub.encode()).hexdigest()}"
    return username


def idp_vouched_for_mfa(id_token_claims: dict) -> bool:
    """Whether the ID token's ``amr`` says the provider checked a second factor (and we trust it)."""
    if not settings.OIDC_TRUST_IDP_MFA:
        return False
    amr = id_token_claims.get("amr")
    if isinstance(amr, str):  # not as the standard says (a list), but unambiguous
        amr = [amr]
    if not isinstance(amr, list):
        return False
    return any(isinstance(value, str) and value.lower() in MFA_AMR_VALUES for value in amr)


def refusal_record(*, request, refusal: LoginRefused) -> None:
    """Audit a refused sign-in and keep its message for the login page."""
    logger.warning("OIDC sign-in refused: %s", refusal.reason)
    audit_record(
        actor=Actor(AuditEvent.ActorType.ANONYMOUS, label=refusal.username[:150]),
        action="user.oidc_refused",
        reason=refusal.reason,
        after=refusal.details or None,
        request=request,
    )
    request.oidc_refusal = refusal


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _role_from(value, *, username: str, details: dict) -> str:
    """A string, or a list in which exactly one value is a Cloudiopsy role (others are ignored)."""
    named = {item.strip().lower() for item in _as_list(value) if isinstance(item, str)}
    roles = named & set(User.Role.values)
    if len(roles) == 1:
        return roles.pop()
    claim = settings.OIDC_ROLE_CLAIM
    if value in (None, "", []):
        reason = f"no {claim!r} claim"
    elif roles:
        reason = f"the {claim!r} claim names more than one role: {sorted(roles)}"
    else:
        reason = f"the {claim!r} claim names no Cloudiopsy role: {value!r}"
    raise LoginRefused(reason, MESSAGE_NO_ROLE, username=username, details=details)


def _institution_from(value, *, username: str, details: dict) -> Institution:
    claim = settings.OIDC_INSTITUTION_CLAIM
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise LoginRefused(
            f"no usable {claim!r} claim: {value!r}", MESSAGE_NO_INSTITUTION, username=username, details=details
        )
    # Institutions are set up here, never created from a claim.
    institution = Institution.objects.filter(slug=value).first()
    if institution is None:
        raise LoginRefused(
            f"the {claim!r} claim names no institution here: {value!r}",
            MESSAGE_NO_INSTITUTION,
            username=username,
            details=details,
        )
    return institution


def _authorisation(user: User) -> dict:
    return {
        "role": user.role,
        "institution": user.institution.slug if user.institution_id else None,
        "is_staff": user.is_staff,
    }


class HospitalOIDCBackend(OIDCAuthenticationBackend):
    """mozilla-django-oidc's code flow with our rules: the account is found by ``sub`` (not by
    email), role and institution come from claims, and every refusal is audited, not raised."""

    def authenticate(self, request, **kwargs):
        # Only the callback view passes a nonce; a password sign-in (username, password) is not ours.
        if request is None or "nonce" not in kwargs or "username" in kwargs or "password" in kwargs:
            return None
        if not settings.OIDC_ENABLED:
            return None
        try:
            return super().authenticate(request, **kwargs)
        except LoginRefused as refusal:
            refusal_record(request=request, refusal=refusal)
        except (SuspiciousOperation, jwt.PyJWTError, requests.RequestException, KeyError, ValueError) as exc:
            # A forged or expired token, a replayed code, a provider that does not answer: the
            # person can only start again.
            refusal_record(request=request, refusal=LoginRefused(f"{type(exc).__name__}: {exc}"[:2000]))
        return None

    def get_user(self, user_id):
        # ModelBackend's: a deactivated user's sessions end at once (mozilla's would keep them).
        return ModelBackend.get_user(self, user_id)

    def get_or_create_user(self, access_token, id_token, payload):
        """``payload`` is the verified ID token; the user info endpoint adds what it lacks."""
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise LoginRefused("the ID token has no 'sub'")
        username = username_for(sub)
        self._check_id_token(payload, username=username)
        userinfo = self.get_userinfo(access_token, id_token, payload)
        if not isinstance(userinfo, dict) or userinfo.get("sub") != sub:
            # OpenID Connect Core 5.3.2: otherwise the answer may be about someone else.
            raise LoginRefused("the user info's 'sub' differs from the ID token's", username=username)

        def claim(name: str):
            return userinfo[name] if name in userinfo else payload.get(name)

        role_claim, institution_claim = claim(settings.OIDC_ROLE_CLAIM), claim(settings.OIDC_INSTITUTION_CLAIM)
        details = {"sub": sub, "role": role_claim, "institution": institution_claim}
        role = _role_from(role_claim, username=username, details=details)
        institution = _institution_from(institution_claim, username=username, details=details)
        profile = {
            "email": str(claim("email") or "")[:254],
            "first_name": str(claim("given_name") or "")[:150],
            "last_name": str(claim("family_name") or "")[:150],
        }

        with transaction.atomic():
            user = User.objects.select_for_update().filter(username=username).first()
            if user is None:
                user = self._create(username=username, role=role, institution=institution, profile=profile)
            else:
                self._update(user, role=role, institution=institution, profile=profile, details=details)
        # Read by the callback view once the session exists.
        user.oidc_idp_mfa = idp_vouched_for_mfa(payload)
        user.oidc_amr = [value for value in _as_list(payload.get("amr")) if isinstance(value, str)]
        return user

    def _check_id_token(self, payload: dict, *, username: str) -> None:
        """What mozilla-django-oidc leaves out (OpenID Connect Core 3.1.3.7): the token is for us."""
        client_id = self.OIDC_RP_CLIENT_ID
        audience = _as_list(payload.get("aud"))
        if client_id not in audience:
            raise LoginRefused(f"the ID token is for {audience!r}, not for this client", username=username)
        if len(audience) > 1 and payload.get("azp") != client_id:
            raise LoginRefused("the ID token has several audiences and another 'azp'", username=username)
        # PyJWT checked "exp" when present; an ID token must have it.
        if "exp" not in payload:
            raise LoginRefused("the ID token has no 'exp'", username=username)

    def _create(self, *, username: str, role: str, institution: Institution, profile: dict) -> User:
        user = User(
            username=username,
            role=role,
            institution=institution,
            # Superuser never, staff (the admin site) only with the admin role.
            is_staff=role == User.Role.ADMIN,
            is_superuser=False,
            **profile,
        )
        user.set_unusable_password()  # signs in through the provider only
        user.save()
        audit_record(
            actor=user,
            action="user.oidc_create",
            target=user,
            after=_authorisation(user),
            request=self.request,
        )
        return user

    def _update(self, user: User, *, role: str, institution: Institution, profile: dict, details: dict) -> None:
        if user.has_usable_password():
            # Someone made a password account with this name: the provider does not take it over.
            raise LoginRefused(
                "a password account has this provider user's name", MESSAGE_LOCAL_ACCOUNT, username=user.username
            )
        if not user.is_active:
            raise LoginRefused("the account is disabled", MESSAGE_DISABLED, username=user.username, details=details)
        before = _authorisation(user)
        user.role = role
        user.institution = institution
        user.is_staff = role == User.Role.ADMIN
        for field, value in profile.items():
            setattr(user, field, value)
        user.save()
        after = _authorisation(user)
        if after != before:
            changed = sorted(key for key in after if after[key] != before[key])
            audit_record(
                actor=user,
                action="user.oidc_update",
                target=user,
                before={key: before[key] for key in changed},
                after={key: after[key] for key in changed},
                reason="changed at the hospital's identity provider",
                request=self.request,
            )


class HospitalOIDCCallbackView(OIDCAuthenticationCallbackView):
    """The provider sends the browser back here. Refusals go to the login page with a message."""

    @property
    def failure_url(self):
        return resolve_url(settings.LOGIN_URL)

    def get(self, request):
        try:
            return super().get(request)
        except SuspiciousOperation:
            # The state is not one this session started: forged, replayed, or another browser's.
            refusal_record(request=request, refusal=LoginRefused("the callback's state is not this session's"))
            return self.login_failure()

    def login_failure(self):
        request = self.request
        refusal = getattr(request, "oidc_refusal", None)
        if refusal is None:
            if request.GET.get("error"):
                refusal = LoginRefused(f"the provider answered {request.GET['error'][:200]!r}")
            elif "code" in request.GET and "oidc_states" not in request.session:
                refusal = LoginRefused("no sign-in was started in this session", MESSAGE_EXPIRED)
            else:
                refusal = LoginRefused("the sign-in was not completed")
            refusal_record(request=request, refusal=refusal)
        messages.error(request, refusal.message)
        return HttpResponseRedirect(self.failure_url)

    def login_success(self):
        response = super().login_success()
        session = self.request.session
        # What the provider said at this sign-in; a TOTP verified earlier in this session stays.
        if getattr(self.user, "oidc_idp_mfa", False):
            session[IDP_VERIFIED_SESSION_KEY] = True
        else:
            session.pop(IDP_VERIFIED_SESSION_KEY, None)
        audit_record(
            actor=self.user,
            action="user.oidc_login",
            target=self.user,
            after={
                "amr": getattr(self.user, "oidc_amr", []),
                "mfa_by_identity_provider": bool(session.get(IDP_VERIFIED_SESSION_KEY)),
            },
            request=self.request,
        )
        return response


def provider_logout_url(request) -> str:
    """The provider's end-session address (OpenID Connect RP-Initiated Logout), back to our login page after."""
    params = {
        "client_id": settings.OIDC_RP_CLIENT_ID,
        "post_logout_redirect_uri": request.build_absolute_uri(resolve_url(settings.LOGOUT_REDIRECT_URL)),
    }
    id_token = request.session.get("oidc_id_token")  # only when OIDC_STORE_ID_TOKEN is set
    if id_token:
        params["id_token_hint"] = id_token
    endpoint = settings.OIDC_OP_LOGOUT_ENDPOINT
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"


class HospitalOIDCLogoutView(OIDCLogoutView):
    """Signs out here and, for a session that came from the provider, there too (when
    ``OIDC_OP_LOGOUT_ENDPOINT`` is set): otherwise the next click on "Sign in with the hospital
    account" would sign the same person straight back in."""

    def post(self, request):
        logout_url = self.redirect_url
        if request.user.is_authenticated:
            from_provider = request.session.get(auth.BACKEND_SESSION_KEY) == BACKEND_PATH
            if from_provider and settings.OIDC_OP_LOGOUT_ENDPOINT:
                logout_url = provider_logout_url(request)
            auth.logout(request)
        return HttpResponseRedirect(logout_url)
