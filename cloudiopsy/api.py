"""API-wide error handling: every error is JSON with a `detail` message a client can show."""

from __future__ import annotations

from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from cases.services import CaseError


def exception_handler(exc, context):
    """DRF's handler, plus domain errors (CaseError) as 400 with their message."""
    if isinstance(exc, CaseError):
        return Response({"detail": str(exc)}, status=400)
    return drf_exception_handler(exc, context)
