"""Server-rendered charts: a matplotlib Figure (never pyplot's global state) as a PNG response."""

from __future__ import annotations

import io

from django.http import HttpResponse


def figure_response(figure) -> HttpResponse:
    """The figure as a PNG that no shared cache keeps (charts show patient-derived figures)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    response = HttpResponse(buffer.getvalue(), content_type="image/png")
    response["Cache-Control"] = "private, no-store"
    return response
