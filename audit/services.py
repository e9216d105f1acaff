"""Writing and verifying audit events.

``audit_record`` must run inside the transaction of the change it records (it opens a savepoint
if called outside one): the event and the change commit or roll back together. Appends are
serialised (a PostgreSQL advisory lock; SQLite serialises writers anyway) so that each event
chains onto the one before it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit.models import AuditEvent

GENESIS = "0" * 64
_LOCK_KEY = 0x434C4459  # "CLDY": the advisory lock that serialises appends on PostgreSQL


@dataclass(frozen=True)
class Actor:
    type: str
    id: str = ""
    label: str = ""
    institution_id: int | None = None


WORKER = Actor(AuditEvent.ActorType.WORKER, label="analysis worker")


def actor_of(principal) -> Actor:
    """The Actor for a user, a lab system, None (system) or an anonymous visitor."""
    from accounts.models import LabSystem

    if principal is None:
        return Actor(AuditEvent.ActorType.SYSTEM, label="system")
    if isinstance(principal, Actor):
        return principal
    if isinstance(principal, LabSystem):
        return Actor(AuditEvent.ActorType.LAB_SYSTEM, str(principal.pk), principal.name, principal.institution_id)
    if not getattr(principal, "is_authenticated", False):
        return Actor(AuditEvent.ActorType.ANONYMOUS)
    return Actor(
        AuditEvent.ActorType.USER,
        str(principal.pk),
        principal.get_username(),
        getattr(principal, "institution_id", None),
    )


def client_address(request) -> str | None:
    """The client's address as the server saw it (REMOTE_ADDR; set it from a trusted proxy)."""
    return request.META.get("REMOTE_ADDR") if request is not None else None


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def content_hash(event: AuditEvent) -> str:
    """SHA-256 over every recorded field of the event and the previous event's hash."""
    content = {
        "created_at": event.created_at.astimezone(datetime.UTC).isoformat(timespec="microseconds"),
        "actor": [event.actor_type, event.actor_id, event.actor_label, event.institution_id],
        "action": event.action,
        "target": [event.target_type, str(event.target_id)],
        "before": _canonical(event.before),
        "after": _canonical(event.after),
        "reason": event.reason,
        "client_address": event.client_address,
        "prev_hash": event.prev_hash,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def audit_record(
    *,
    actor,
    action: str,
    target=None,
    target_type: str = "",
    target_id: str | int = "",
    before: dict | None = None,
    after: dict | None = None,
    reason: str = "",
    request=None,
    institution_id: int | None = None,
) -> AuditEvent:
    """Append one event to the chain, in the caller's transaction.

    Args:
        actor: a User, a LabSystem, an ``Actor`` (e.g. ``WORKER``) or None (system).
        action: dotted verb, e.g. ``case.create``.
        target: the model instance acted on (or give ``target_type`` and ``target_id``).
        before / after: the values that changed (JSON-serialisable).
        request: for the client address.
        institution_id: whose data it concerns (defaults to the target's or the actor's).
    """
    who = actor_of(actor)
    if target is not None:
        target_type = target_type or target._meta.label_lower
        target_id = target.pk
        institution_id = institution_id or getattr(target, "institution_id", None)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        last = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
        event = AuditEvent(
            created_at=timezone.now(),
            actor_type=who.type,
            actor_id=who.id,
            actor_label=who.label,
            institution_id=institution_id if institution_id is not None else who.institution_id,
            action=action,
            target_type=target_type,
            target_id=str(target_id) if target_id != "" else "",
            before=_canonical(before) if before is not None else None,
            after=_canonical(after) if after is not None else None,
            reason=reason,
            client_address=client_address(request),
            prev_hash=last or GENESIS,
        )
        event.hash = content_hash(event)
        event.save()
    return event


def audit_verify() -> tuple[int, AuditEvent | None, str]:
    """Walk the chain from the start. Returns (events checked, first bad event or None, why)."""
    previous = GENESIS
    checked = 0
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        if event.prev_hash != previous:
            return (
                checked,
                event,
                "its prev_hash does not match the previous event's hash (an event was removed or changed)",
            )
        if content_hash(event) != event.hash:
            return checked, event, "its content does not match its hash (the event was altered)"
        previous = event.hash
        checked += 1
    return checked, None, ""


def patient_read(*, principal, patients, via: str, request=None, case=None) -> None:
    """Record that a person or lab system was shown patients' identifying data."""
    patients = list(patients)
    if not patients:
        return
    if len(patients) == 1:
        patient = patients[0]
        audit_record(
            actor=principal,
            action="patient.read",
            target=patient,
            after={"via": via, **({"case": case.pk} if case is not None else {})},
            request=request,
        )
    else:
        audit_record(
            actor=principal,
            action="patient.read_list",
            target_type="cases.patient",
            institution_id=patients[0].institution_id,
            after={"via": via, "patients": sorted({p.pk for p in patients})},
            request=request,
        )


def case_history(*, case, patch_ids: list[int], limit: int = 200) -> list[AuditEvent]:
    """The audit events of a case and its patches, oldest first (reads of patient data left out)."""
    from django.db.models import Q

    prediction_ids = []
    if patch_ids:
        from inference.models import Prediction

        prediction_ids = [
            str(pk) for pk in Prediction.objects.filter(patch_id__in=patch_ids).values_list("pk", flat=True)
        ]
    query = (
        Q(target_type="cases.biopsycase", target_id=str(case.pk))
        | Q(target_type="cases.tissuepatch", target_id__in=[str(pk) for pk in patch_ids])
        | Q(target_type="inference.prediction", target_id__in=prediction_ids)
    )
    return list(AuditEvent.objects.filter(query).order_by("id")[:limit])
