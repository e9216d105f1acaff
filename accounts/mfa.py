"""Second factor (TOTP with recovery codes, django-otp): who needs it, enrolment and checking."""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import transaction
from django_otp import login as otp_login
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from audit.services import audit_record

# Set in the session when the hospital's identity provider vouched for a second factor.
IDP_VERIFIED_SESSION_KEY = "cloudiopsy_mfa_by_identity_provider"
AUTHENTICATOR_NAME = "authenticator app"
RECOVERY_NAME = "recovery codes"


def mfa_required(user) -> bool:
    """Whether this user must pass a second factor before seeing any page."""
    if not getattr(user, "is_authenticated", False):
        return False
    return bool(user.is_superuser or user.role in settings.MFA_REQUIRED_ROLES)


def mfa_passed(request) -> bool:
    """This session passed a second factor: a TOTP or recovery code here, or at the hospital's provider."""
    user = request.user
    return bool((hasattr(user, "is_verified") and user.is_verified()) or request.session.get(IDP_VERIFIED_SESSION_KEY))


def authenticator_confirmed(user) -> TOTPDevice | None:
    return TOTPDevice.objects.filter(user=user, confirmed=True).first()


def enrolment_device(user) -> TOTPDevice:
    """The authenticator being enrolled: one unconfirmed TOTP device per user, kept across reloads
    so that the QR code scanned a minute ago still matches."""
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("-id").first()
    return device or TOTPDevice.objects.create(user=user, name=AUTHENTICATOR_NAME, confirmed=False)


def provisioning_uri(device: TOTPDevice) -> str:
    """otpauth:// URI for the QR code: the issuer and the user name label the entry in the app."""
    return device.config_url


def qr_svg(uri: str) -> str:
    import segno

    return segno.make(uri, error="m").svg_inline(scale=5, dark="#1d2330", title="QR code for your authenticator app")


def recovery_codes_create(*, user, request=None) -> list[str]:
    """New single-use recovery codes, replacing any earlier ones. Shown once; stored as django-otp keeps them."""
    codes = [
        f"{secrets.token_hex(2)}-{secrets.token_hex(2)}-{secrets.token_hex(2)}"
        for _ in range(settings.MFA_RECOVERY_CODES)
    ]
    with transaction.atomic():
        StaticDevice.objects.filter(user=user).delete()
        device = StaticDevice.objects.create(user=user, name=RECOVERY_NAME, confirmed=True)
        StaticToken.objects.bulk_create([StaticToken(device=device, token=code) for code in codes])
        audit_record(
            actor=user,
            action="auth.mfa_recovery_codes_created",
            target=user,
            after={"count": len(codes)},
            request=request,
        )
    return codes


def enrolment_confirm(*, request, device: TOTPDevice, code: str) -> list[str] | None:
    """Confirm the authenticator with its first code; the session counts as verified and the user
    gets recovery codes. None if the code is wrong."""
    if not device.verify_is_allowed()[0] or not device.verify_token(code):
        audit_record(actor=request.user, action="auth.mfa_enrol_failed", target=request.user, request=request)
        return None
    with transaction.atomic():
        TOTPDevice.objects.filter(user=device.user).exclude(pk=device.pk).delete()
        device.confirmed = True
        device.save(update_fields=["confirmed"])
        audit_record(actor=request.user, action="auth.mfa_enrolled", target=request.user, request=request)
    otp_login(request, device)
    return recovery_codes_create(user=device.user, request=request)


def second_factor_check(*, request, code: str) -> str | None:
    """Check a TOTP or recovery code for the signed-in user. Returns None when it passed, else why not."""
    user = request.user
    code = "".join(code.split()).lower()
    devices = [*TOTPDevice.objects.filter(user=user, confirmed=True), *StaticDevice.objects.filter(user=user)]
    for device in devices:
        allowed, _ = device.verify_is_allowed()
        if not allowed:
            audit_record(actor=user, action="auth.mfa_throttled", target=user, request=request)
            return "Too many wrong codes: wait a little and try again."
    for device in devices:
        if device.verify_token(code):
            otp_login(request, device)
            used_recovery = isinstance(device, StaticDevice)
            audit_record(
                actor=user,
                action="auth.mfa_recovery_code_used" if used_recovery else "auth.mfa_verified",
                target=user,
                after={"recovery_codes_left": device.token_set.count()} if used_recovery else None,
                request=request,
            )
            return None
    audit_record(actor=user, action="auth.mfa_failed", target=user, request=request)
    return "That code is not right. Enter the 6-digit code your authenticator app shows now, or a recovery code."
