"""Automatic logoff after inactivity, and the second-factor gate in front of every page."""

from __future__ import annotations

import time
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.http import HttpResponseRedirect, JsonResponse
from django.urls import reverse

from accounts.mfa import mfa_passed, mfa_required

LAST_ACTIVITY_SESSION_KEY = "cloudiopsy_last_activity"
SIGNED_IN_AT_SESSION_KEY = "cloudiopsy_signed_in_at"
# The last-activity stamp is rewritten at most this often: not one session write per request.
_ACTIVITY_RESOLUTION_SECONDS = 30


def _api_problem(status_code: int, detail: str) -> JsonResponse:
    from cloudiopsy.api import PROBLEM_CONTENT_TYPE, problem  # imports DRF, which reads settings

    return JsonResponse(problem(status_code, detail), status=status_code, content_type=PROBLEM_CONTENT_TYPE)


def _to_login(request, view_name: str = "login") -> HttpResponseRedirect:
    return HttpResponseRedirect(f"{reverse(view_name)}?{urlencode({'next': request.get_full_path()})}")


class IdleTimeoutMiddleware:
    """Signs a session out after ``SESSION_IDLE_TIMEOUT`` seconds without a request (HIPAA
    164.312(a)(2)(iii)). Lab-system tokens are not sessions and are not affected."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            now = int(time.time())
            last = request.session.get(LAST_ACTIVITY_SESSION_KEY)
            if last is not None and now - last > settings.SESSION_IDLE_TIMEOUT:
                return self._expire(request, user, idle_seconds=now - last)
            # Activity keeps a session alive, but not past SESSION_COOKIE_AGE after sign-in (Django
            # alone would push the expiry on with every save of the session).
            started = request.session.setdefault(SIGNED_IN_AT_SESSION_KEY, now)
            if now - started > settings.SESSION_COOKIE_AGE:
                return self._expire(request, user, idle_seconds=now - (last or started), lifetime_over=True)
            # A page's own automatic refresh (?refresh=auto, while analysis runs) is not a person's activity.
            active = request.GET.get("refresh") != "auto"
            if active and (last is None or now - last >= _ACTIVITY_RESOLUTION_SECONDS):
                request.session[LAST_ACTIVITY_SESSION_KEY] = now
        return self.get_response(request)

    def _expire(self, request, user, *, idle_seconds: int, lifetime_over: bool = False):
        from audit.services import audit_record

        limit = settings.SESSION_COOKIE_AGE if lifetime_over else settings.SESSION_IDLE_TIMEOUT
        audit_record(
            actor=user,
            action="auth.session_expired",
            target=user,
            after={
                "idle_seconds": idle_seconds,
                "limit_seconds": limit,
                "why": "lifetime" if lifetime_over else "idle",
            },
            request=request,
        )
        logout(request)
        if lifetime_over:
            hours = max(1, settings.SESSION_COOKIE_AGE // 3600)
            detail = f"Your session ended {hours} hours after you signed in. Please sign in again."
        else:
            minutes = max(1, settings.SESSION_IDLE_TIMEOUT // 60)
            detail = f"You were signed out after {minutes} minutes without activity. Please sign in again."
        if request.path.startswith("/api/"):
            return _api_problem(401, detail)
        messages.info(request, detail)
        return _to_login(request)


# Pages a signed-in user who still owes a second factor may reach.
_SECOND_FACTOR_OPEN_PATHS = ("/account/two-factor/", "/logout/", "/healthz", "/static/", "/oidc/")


class SecondFactorMiddleware:
    """Pathologists, administrators and superusers (``MFA_REQUIRED_ROLES``) see nothing until
    they pass their TOTP second factor; without one they are sent to enrol first."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if (
            user is not None
            and mfa_required(user)
            and not mfa_passed(request)
            and not request.path.startswith(_SECOND_FACTOR_OPEN_PATHS)
        ):
            if request.path.startswith("/api/"):
                return _api_problem(403, "Pass your second factor (two-factor authentication) first.")
            return _to_login(request, "accounts:two-factor")
        return self.get_response(request)
