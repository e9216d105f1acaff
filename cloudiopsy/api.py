"""API-wide behaviour: problem-details errors, idempotent POSTs, per-token rate limits.

Every error under ``/api/`` is JSON in the style of RFC 9457 (problem details): ``type``,
``title``, ``status``, ``detail``, and ``errors`` ({field: [messages]}) for invalid input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from http import HTTPStatus

from django.db import IntegrityError, transaction
from django.http import JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import exception_handler as drf_exception_handler

from cases.services import CaseError, StorageUnavailable

PROBLEM_TYPE = "https://cloudiopsy.invalid/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem(status_code: int, detail: str, *, kind: str = "", **extra) -> dict:
    """A problem-details body."""
    title = HTTPStatus(status_code).phrase
    slug = kind or title.lower().replace(" ", "-")
    return {"type": PROBLEM_TYPE + slug, "title": title, "status": status_code, "detail": detail, **extra}


def problem_response(status_code: int, detail: str, **extra) -> Response:
    return Response(problem(status_code, detail, **extra), status=status_code, content_type=PROBLEM_CONTENT_TYPE)


def _first_message(errors) -> str:
    if isinstance(errors, dict):
        for field, value in errors.items():
            return f"{field}: {_first_message(value)}"
    if isinstance(errors, list) and errors:
        return _first_message(errors[0])
    return str(errors)


def exception_handler(exc, context):
    """DRF's handler with problem-details bodies; domain errors (CaseError) are 400s."""
    if isinstance(exc, StorageUnavailable):
        return problem_response(exc.status_code, str(exc), kind="storage-unavailable")
    if isinstance(exc, CaseError):
        return problem_response(400, str(exc), kind="invalid-request")
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real server error: Django's handler500 answers (JSON under /api/)
    extra = {}
    if isinstance(exc, exceptions.ValidationError):
        errors = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        extra["errors"] = errors
        detail = f"Invalid input: {_first_message(errors)}"
    else:
        detail = str(getattr(exc, "detail", "")) or HTTPStatus(response.status_code).phrase
    response.data = problem(response.status_code, detail, **extra)
    response.content_type = PROBLEM_CONTENT_TYPE
    return response


def _json_problem(request, status_code: int, detail: str):
    return JsonResponse(problem(status_code, detail), status=status_code, content_type=PROBLEM_CONTENT_TYPE)


def not_found(request, exception=None):
    """404 for unknown URLs: problem-details JSON under /api/, the usual page elsewhere."""
    if request.path.startswith("/api/"):
        return _json_problem(request, 404, "No such resource.")
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def bad_request(request, exception=None):
    """400 raised outside DRF (e.g. a request body over the size limit): JSON under /api/."""
    if request.path.startswith("/api/"):
        return _json_problem(request, 400, "The request could not be read (too large or malformed).")
    from django.views.defaults import bad_request as html_bad_request

    return html_bad_request(request, exception)


def permission_denied(request, exception=None):
    """403 raised outside DRF (e.g. a failed CSRF check): JSON under /api/."""
    if request.path.startswith("/api/"):
        return _json_problem(request, 403, "Permission denied.")
    from django.views.defaults import permission_denied as html_permission_denied

    return html_permission_denied(request, exception)


DATABASE_DOWN = "The database cannot be reached just now; nothing was stored. Try again in a minute."
DATABASE_RETRY_AFTER_S = 30


def database_unavailable(request):
    """503 with Retry-After for a request that met the database out of reach (a restart, a
    failover): a lab system retries a 503, and an upload's files were removed with its transaction."""
    if request.path.startswith("/api/"):
        response = _json_problem(request, 503, DATABASE_DOWN)
    else:
        from django.http import HttpResponse

        page = f"<!doctype html><title>Unavailable</title><h1>Unavailable</h1><p>{DATABASE_DOWN}</p>"
        response = HttpResponse(page, status=503)
    response["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
    return response


def server_error(request):
    """500: problem-details JSON under /api/, never an HTML page or a stack trace; a 503 when the
    error is the database being out of reach (raised before a view, e.g. loading the session)."""
    import sys

    from django.db import InterfaceError, OperationalError

    if isinstance(sys.exc_info()[1], (OperationalError, InterfaceError)):
        return database_unavailable(request)
    if request.path.startswith("/api/"):
        return _json_problem(request, 500, "The server could not complete the request; it has been logged.")
    from django.views.defaults import server_error as html_server_error

    return html_server_error(request)


# ---- idempotency ----------------------------------------------------------------------------

IDEMPOTENCY_HEADER = "Idempotency-Key"


def _owner(principal) -> str:
    from accounts.models import LabSystem

    return f"lab:{principal.pk}" if isinstance(principal, LabSystem) else f"user:{principal.pk}"


def request_fingerprint(request) -> str:
    """SHA-256 over what the request asks for: method, path, fields, and each file's name and
    content (not the multipart boundary, which clients choose afresh on every retry)."""
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    data = request.data
    if hasattr(data, "lists"):
        fields = sorted((k, v) for k, values in data.lists() for v in values if isinstance(v, str))
    else:
        fields = data
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name in sorted(request.FILES):
        for upload in request.FILES.getlist(name):
            content = hashlib.sha256()
            for chunk in upload.chunks():
                content.update(chunk)
            upload.seek(0)
            digest.update(f"\n{name}:{upload.name}:{content.hexdigest()}".encode())
    return digest.hexdigest()


def idempotent(request, handler: Callable[[], Response]) -> Response:
    """Run ``handler`` once per Idempotency-Key (per caller); a retry with the same key and the
    same request gets the first response again, with ``Idempotent-Replayed: true``."""
    from accounts.models import IdempotencyRecord

    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return handler()
    if not key.strip() or len(key) > 255:
        return problem_response(400, f"{IDEMPOTENCY_HEADER} must be 1 to 255 characters.")
    owner, fingerprint = _owner(request.user), request_fingerprint(request)
    try:
        with transaction.atomic():
            record = IdempotencyRecord.objects.create(owner=owner, key=key, fingerprint=fingerprint)
    except IntegrityError:
        record = IdempotencyRecord.objects.get(owner=owner, key=key)
        if record.fingerprint != fingerprint:
            return problem_response(
                422, f"This {IDEMPOTENCY_HEADER} was used for a different request.", kind="idempotency-key-reused"
            )
        if record.status_code is None:
            return problem_response(409, "A request with this Idempotency-Key is still in progress; retry later.")
        replay = Response(record.response, status=record.status_code)
        replay["Idempotent-Replayed"] = "true"
        return replay
    try:
        response = handler()
    except Exception:
        record.delete()  # the work did not happen: a retry must be able to do it
        raise
    if response.status_code >= 500:
        record.delete()
    else:
        IdempotencyRecord.objects.filter(pk=record.pk).update(status_code=response.status_code, response=response.data)
    return response


# ---- rate limits ------------------------------------------------------------------------------


class LabSystemRateThrottle(SimpleRateThrottle):
    """Per-token request rate (``LAB_RATE_LIMIT``, e.g. 600/min); 429 with Retry-After beyond it."""

    scope = "lab_system"

    def get_cache_key(self, request, view):
        from accounts.models import LabSystem

        if not isinstance(request.user, LabSystem):
            return None  # staff sessions are not throttled here
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}
