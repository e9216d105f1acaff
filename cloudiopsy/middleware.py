"""Responses that may carry patient data are never stored by a browser or a shared cache."""

from __future__ import annotations

from django.http import HttpResponse, JsonResponse
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


class RequestSizeLimitMiddleware:
    """Refuses a request body larger than ``UPLOAD_MAX_REQUEST_BYTES`` from its declared length,
    before Django reads it: what one request can make the server hold or write has a bound."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.conf import settings

        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.UPLOAD_MAX_REQUEST_BYTES
        if length > limit:
            detail = f"The request is {length:,} bytes; the limit is {limit:,} bytes. Send fewer files at a time."
            if request.path.startswith("/api/"):
                from cloudiopsy.api import PROBLEM_CONTENT_TYPE, problem

                return JsonResponse(problem(413, detail), status=413, content_type=PROBLEM_CONTENT_TYPE)
            return HttpResponse(detail, status=413, content_type="text/plain; charset=utf-8")
        return self.get_response(request)


class DatabaseUnavailableMiddleware:
    """A view that meets the database out of reach (a restart, a failover) answers 503 with
    Retry-After, in every mode, instead of a 500 (or, under DEBUG, the debug page)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        from django.db import InterfaceError, OperationalError

        if isinstance(exception, (OperationalError, InterfaceError)):
            import logging

            from cloudiopsy.api import database_unavailable

            logger = logging.getLogger(__name__)
            logger.error("database unavailable during %s %s: %s", request.method, request.path, exception)
            return database_unavailable(request)
        return None
