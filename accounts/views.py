"""Second-factor pages: enrol an authenticator app (QR code), pass the second factor, recovery codes."""

from __future__ import annotations

from base64 import b32encode

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.mfa import (
    authenticator_confirmed,
    enrolment_confirm,
    enrolment_device,
    mfa_passed,
    provisioning_uri,
    qr_svg,
    recovery_codes_create,
    second_factor_check,
)
from accounts.permissions import sees_patient_data


@login_required
@require_GET
def home(request):
    """Where "/" and a fresh sign-in lead: the dashboards for a lab manager, else the case list."""
    if not sees_patient_data(request.user):
        return redirect("dashboards:index")
    return redirect("cases:list")


def _next_url(request) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return target
    return "/"


@login_required
@require_http_methods(["GET", "POST"])
def two_factor(request):
    """Enter the code from the authenticator app (or a recovery code) after the password."""
    if mfa_passed(request):
        return redirect(_next_url(request))
    if authenticator_confirmed(request.user) is None:
        return redirect(f"{reverse('accounts:two-factor-enrol')}?{urlencode({'next': _next_url(request)})}")
    error = ""
    if request.method == "POST":
        error = second_factor_check(request=request, code=request.POST.get("code", ""))
        if not error:
            return redirect(_next_url(request))
    return render(
        request, "accounts/two_factor.html", {"error": error, "next": _next_url(request)}, status=400 if error else 200
    )


@login_required
@require_http_methods(["GET", "POST"])
def two_factor_enrol(request):
    """Set up the authenticator app: scan the QR code, confirm with the first code."""
    if authenticator_confirmed(request.user) is not None and not mfa_passed(request):
        # Replacing an enrolled authenticator needs the old one (or a recovery code) first.
        return redirect(f"{reverse('accounts:two-factor')}?{urlencode({'next': _next_url(request)})}")
    device = enrolment_device(request.user)
    error = ""
    if request.method == "POST":
        codes = enrolment_confirm(request=request, device=device, code="".join(request.POST.get("code", "").split()))
        if codes is not None:
            return _recovery_codes_page(request, codes)
        error = "That code is not right. Check the time on your phone and enter the 6-digit code shown now."
    uri = provisioning_uri(device)
    context = {
        "qr": qr_svg(uri),
        "secret": b32encode(device.bin_key).decode(),
        "error": error,
        "next": _next_url(request),
    }
    return render(request, "accounts/two_factor_enrol.html", context, status=400 if error else 200)


def _recovery_codes_page(request, codes: list[str]) -> HttpResponse:
    return render(request, "accounts/recovery_codes.html", {"codes": codes, "next": _next_url(request)})


@login_required
@require_POST
def recovery_codes_renew(request):
    """New recovery codes (the old ones stop working); only for a session that passed its second factor."""
    if not mfa_passed(request):
        return redirect(reverse("accounts:two-factor"))
    return _recovery_codes_page(request, recovery_codes_create(user=request.user, request=request))


@login_required
@require_GET
def keepalive(request):
    """Called by the page while its user is active, so that reading one page is not idleness."""
    return HttpResponse(status=204)


@require_GET
def admin_login(request):
    """The admin's login page sends to the one login page (lockout and second factor apply there);
    a signed-in user without admin access is told so instead of being sent round in a loop."""
    from django.core.exceptions import PermissionDenied

    if request.user.is_authenticated:
        raise PermissionDenied("Your account has no access to the administration pages.")
    return redirect(
        f"{reverse('login')}?{urlencode({'next': _next_url(request) if request.GET.get('next') else '/admin/'})}"
    )


def lockout_response(request, original_response=None, credentials=None):
    """django-axes' answer while an account or address is locked: a page, 429, nothing about which."""
    from django.conf import settings

    context = {"lockout_minutes": settings.LOGIN_LOCKOUT_MINUTES}
    return render(request, "registration/locked_out.html", context, status=429)
