"""Writes of the dashboards app: only the audit event of a CSV download."""

from __future__ import annotations

from django.db import transaction

from audit.services import audit_record
from dashboards.periods import Period


def dashboard_export_record(
    *, user, institution_id: int, dashboard: str, table: str, period: Period, rows: int, request=None
) -> None:
    """Record that ``user`` downloaded one dashboard table (what, for which period, how many rows)
    as ``dashboard.export``; the file is sent only once the event is committed."""
    with transaction.atomic():
        audit_record(
            actor=user,
            action="dashboard.export",
            target_type="dashboard",
            target_id=f"{dashboard}/{table}",
            institution_id=institution_id,
            after={
                "dashboard": dashboard,
                "table": table,
                "from": period.start.isoformat(),
                "to": period.end.isoformat(),
                "rows": rows,
            },
            request=request,
        )
