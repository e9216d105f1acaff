"""The one way a case changes status, and the one way a change inside a case marks it updated.

Every status change goes through ``case_transition``: it checks the move is allowed, sets
``updated_at`` (lab systems poll ``updated_since``), ``status_changed_at`` and, on the way to
ready for review, ``ready_for_review_at`` (the dashboards' turnaround and queue), and appends one
audit event per case moved, in the caller's transaction. Changes inside a case that keep its status
(a patch's result, a review, an addendum) go through ``cases_touch`` so that ``updated_at`` tells a
poller to read it again.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from cases.models import BiopsyCase

Status = BiopsyCase.Status

# Where a case may go from each status. New patches send a case back to analysis until sign-out;
# a signed-out case changes only by addenda.
ALLOWED: dict[str, frozenset[str]] = {
    Status.OPEN: frozenset({Status.ANALYSING}),
    Status.ANALYSING: frozenset({Status.READY_FOR_REVIEW}),
    Status.READY_FOR_REVIEW: frozenset({Status.ANALYSING, Status.SIGNED_OUT}),
    Status.SIGNED_OUT: frozenset(),
}


def case_transition(
    *,
    case_ids: Iterable[int],
    to: str,
    actor,
    action: str = "case.status",
    after: dict | None = None,
    reason: str = "",
    request=None,
    only_from: Iterable[str] | None = None,
) -> list[int]:
    """Move the given cases to status ``to``; cases whose status does not allow it stay as they are.

    Args:
        only_from: restrict further to cases now in one of these statuses.
        after: extra values recorded in each case's audit event beside the new status.
    Returns:
        The ids of the cases moved (one UPDATE for all of them, one audit event each).
    """
    sources = [status for status, targets in ALLOWED.items() if to in targets]
    if only_from is not None:
        sources = [status for status in sources if status in set(only_from)]
    with transaction.atomic():
        rows = list(
            BiopsyCase.objects.select_for_update()
            .filter(pk__in=list(case_ids), status__in=sources)
            .order_by("pk")
            .values_list("pk", "status", "institution_id")
        )
        if not rows:
            return []
        moved = [pk for pk, _, _ in rows]
        now = timezone.now()
        # When each stage was reached, for turnaround and queue figures (the dashboards).
        stage_times = {"ready_for_review_at": now} if to == Status.READY_FOR_REVIEW else {}
        BiopsyCase.objects.filter(pk__in=moved).update(status=to, updated_at=now, status_changed_at=now, **stage_times)
        for pk, before, institution_id in rows:
            audit_record(
                actor=actor,
                action=action,
                target_type="cases.biopsycase",
                target_id=pk,
                institution_id=institution_id,
                before={"status": before},
                after={"status": to, **(after or {})},
                reason=reason,
                request=request,
            )
    return moved


def cases_touch(*, case_ids: Iterable[int]) -> None:
    """Mark the cases updated now: something inside them changed (a result, a review, an addendum)."""
    ids = sorted(set(case_ids))
    if ids:
        BiopsyCase.objects.filter(pk__in=ids).update(updated_at=timezone.now())
