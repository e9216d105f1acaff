"""Responses that may carry patient data are never stored by a browser or a shared cache."""

from __future__ import annotations

from django.utils.cache import add_never_cache_headers


class NoStoreMiddleware:
    """``Cache-Control: no-store`` (and ``private``) on every response to a signed-in user or an
    API client, unless the view set its own: a shared workstation's back button or disk cache
    must not show another user a patient's case."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if response.has_header("Cache-Control"):
            return response
        user = getattr(request, "user", None)
        if (user is not None and user.is_authenticated) or request.path.startswith("/api/"):
            add_never_cache_headers(response)
            response["Cache-Control"] += ", private"
        return response
