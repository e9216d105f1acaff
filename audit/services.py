"""Writing and verifying audit events.

``audit_record`` must run inside the transaction of the change it records (it opens a savepoint
if called outside one): the event and the change commit or roll back together. Appends are
serialised (a PostgreSQL advisory lock; SQLite serialises writers anyway) so that each event
chains onto the one before it.

Each event's hash is an HMAC-SHA256 keyed with ``settings.AUDIT_HMAC_KEY``, a key kept outside the
database: whoever can write the audit table but lacks the key cannot make a chain that verifies.
Events recorded before the chain was keyed keep their plain SHA-256 (``hash_scheme``); they are
accepted only as the first events of the trail and only when a keyed event follows them, whose
HMAC covers the last of them and through it every one before (docs/audit.md).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from audit.models import AuditEvent

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
APPEND_LOCK_KEY = 0x434C4459  # "CLDY": the advisory lock that serialises appends on PostgreSQL
_KEY_ID_MESSAGE = b"cloudiopsy-audit-key-id"
ANCHOR_FORMAT = "cloudiopsy-audit-anchor/1"
# The triggers that make the table append-only, by database (migrations 0002 and 0005).
PROTECTION_TRIGGERS = {
    "postgresql": ["audit_event_append_only", "audit_event_no_truncate"],
    "sqlite": ["audit_event_no_update", "audit_event_no_delete"],
}


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


def _ip_address(value: str | None) -> str | None:
    """``value`` as a normalised IP address, or None when it is not one (or names an IPv6 zone)."""
    try:
        address = ipaddress.ip_address((value or "").strip())
    except ValueError:
        return None
    if getattr(address, "scope_id", None):
        return None
    return str(address)


def client_address(request) -> str | None:
    """The client's address: REMOTE_ADDR, or behind trusted proxies the address the outermost one saw.

    With ``settings.TRUSTED_PROXY_HEADER`` set (e.g. ``X-Forwarded-For``) it is the entry
    ``TRUSTED_PROXY_COUNT`` places from the right of that header's comma-separated list: each proxy
    appends the address it saw, so entries further left were written by the client and prove nothing.
    A missing or too short header, or an entry that is not an IP address, falls back to REMOTE_ADDR.
    django-axes calls this too (AXES_CLIENT_IP_CALLABLE).
    """
    if request is None:
        return None
    header = settings.TRUSTED_PROXY_HEADER
    hops = settings.TRUSTED_PROXY_COUNT
    if header and hops >= 1:
        entries = request.META.get("HTTP_" + header.upper().replace("-", "_"), "").split(",")
        if len(entries) >= hops:
            address = _ip_address(entries[-hops])
            if address is not None:
                return address
    return _ip_address(request.META.get("REMOTE_ADDR"))


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def key_fingerprint(key: str) -> str:
    """Names a key without revealing it: the first 8 hex digits of HMAC-SHA256(key, "cloudiopsy-audit-key-id")."""
    return hmac.new(key.encode(), _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:8]


def _content(event: AuditEvent) -> bytes:
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
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def content_hash(event: AuditEvent, *, key: str | None) -> str:
    """HMAC-SHA256 with ``key`` over every recorded field of the event and the previous event's hash;
    with ``key=None``, the plain SHA-256 of the same bytes (events from before keyed chaining)."""
    if key is None:
        return hashlib.sha256(_content(event)).hexdigest()
    return hmac.new(key.encode(), _content(event), hashlib.sha256).hexdigest()


def event_sign(event: AuditEvent, *, key: str) -> None:
    """Set the event's keyed hash, its hash scheme and its key's fingerprint (``prev_hash`` must be set)."""
    event.hash_scheme = AuditEvent.HashScheme.HMAC_SHA256
    event.key_id = key_fingerprint(key)
    event.hash = content_hash(event, key=key)


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
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
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
        event_sign(event, key=settings.AUDIT_HMAC_KEY)
        event.save()
    return event


class ChainCheck(NamedTuple):
    checked: int  # events that verified before the bad one (all of them when bad is None)
    bad: AuditEvent | None
    why: str


def audit_record_many(records: list[dict[str, Any]]) -> list[AuditEvent]:
    """Append several events at once, in order, in the caller's transaction: one per fact, as
    ``audit_record`` would, each dict holding ``audit_record``'s keyword arguments.

    Writers of many facts at a time (the analysis worker's batches) call this instead of a loop.
    """
    with transaction.atomic():
        return [audit_record(**record) for record in records]


def audit_verify(*, previous_keys: tuple[str, ...] = ()) -> ChainCheck:
    """Walk the chain from the start and stop at the first event that does not verify.

    Args:
        previous_keys: keys retired by a rotation, for the events they made (the current key is
            ``settings.AUDIT_HMAC_KEY``).
    """
    current = key_fingerprint(settings.AUDIT_HMAC_KEY)
    keys = {key_fingerprint(key): key for key in previous_keys} | {current: settings.AUDIT_HMAC_KEY}
    previous = GENESIS
    checked = 0
    first = None
    keyed = False
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        first = first or event
        if event.prev_hash != previous:
            return ChainCheck(
                checked,
                event,
                "its prev_hash does not match the previous event's hash (an event was removed or changed)",
            )
        if event.hash_scheme == AuditEvent.HashScheme.SHA256:
            if keyed:
                return ChainCheck(
                    checked,
                    event,
                    "it has an unkeyed (plain SHA-256) hash after keyed events: it was written or rewritten "
                    "without the audit key",
                )
            key = None
        elif event.hash_scheme == AuditEvent.HashScheme.HMAC_SHA256:
            key = keys.get(event.key_id)
            if key is None:
                return ChainCheck(
                    checked,
                    event,
                    f"it was made with another key (key id {event.key_id!r}, this server's is {current!r}): "
                    "if that key was rotated out, give it with --previous-key-file; if not, the event was forged",
                )
            keyed = True
        else:
            return ChainCheck(checked, event, f"its hash scheme {event.hash_scheme!r} is unknown")
        if content_hash(event, key=key) != event.hash:
            if key is not None and content_hash(event, key=None) == event.hash:
                why = "its hash is a plain SHA-256 where a keyed HMAC belongs: it was rewritten without the audit key"
            else:
                why = "its content does not match its hash (the event was altered)"
            return ChainCheck(checked, event, why)
        previous = event.hash
        checked += 1
    if first is not None and not keyed:
        # Only a keyed event after them vouches for unkeyed events (its HMAC covers the last unkeyed
        # hash); migration 0004 appended one when the chain became keyed.
        return ChainCheck(
            0,
            first,
            "no event has a keyed hash, so nothing vouches for the unkeyed ones: the chain was rewritten "
            "without the audit key, or its keyed events were cut from the end",
        )
    return ChainCheck(checked, None, "")


def audit_protection_missing() -> list[str]:
    """The append-only triggers that are missing or disabled (none, normally).

    On SQLite a migration that rebuilds the audit table drops its triggers; the owner of the
    PostgreSQL table can disable them. Either way the database would no longer refuse changes.
    """
    expected = PROTECTION_TRIGGERS.get(connection.vendor, [])
    if not expected:
        return []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit_auditevent'::regclass AND tgenabled <> 'D'"
            )
        else:
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_auditevent'")
        present = {row[0] for row in cursor.fetchall()}
    return [name for name in expected if name not in present]


def audit_anchor() -> dict[str, Any] | None:
    """The latest event as an anchor to keep outside the database, or None while the trail is empty.

    A later ``verify_audit --anchor`` proves that this event still exists with this hash and that no
    event up to it went: what a chain cannot show by itself is that its end was cut off.
    """
    last = AuditEvent.objects.order_by("-id").first()
    if last is None:
        return None
    return {
        "format": ANCHOR_FORMAT,
        "id": last.pk,
        "hash": last.hash,
        # Appends are serialised until commit, so ids commit in order: no lower id can appear later.
        "count": AuditEvent.objects.filter(id__lte=last.pk).count(),
        "created_at": last.created_at.astimezone(datetime.UTC).isoformat(timespec="microseconds"),
        "hash_scheme": last.hash_scheme,
        "key_id": last.key_id,
        "anchored_at": timezone.now().astimezone(datetime.UTC).isoformat(timespec="seconds"),
    }


def anchor_parse(text: str) -> dict[str, Any]:
    """The anchor in ``text``, as ``audit_anchor`` makes it; a ValueError says what is wrong with it."""
    try:
        anchor = json.loads(text)
    except ValueError as error:
        raise ValueError(f"it is not JSON ({error})") from None
    if not isinstance(anchor, dict) or anchor.get("format") != ANCHOR_FORMAT:
        raise ValueError(f'it is not an audit anchor (no "format": "{ANCHOR_FORMAT}")')
    for name in ("id", "count"):
        if type(anchor.get(name)) is not int or anchor[name] < 1:
            raise ValueError(f"its {name!r} is not a positive whole number")
    if not isinstance(anchor.get("hash"), str) or not re.fullmatch(r"[0-9a-f]{64}", anchor["hash"]):
        raise ValueError("its 'hash' is not 64 lowercase hexadecimal digits")
    return anchor


def anchor_check(anchor: dict[str, Any]) -> str:
    """Why the trail no longer matches ``anchor``, or "" when it does. Meant after ``audit_verify``."""
    anchored_id, count = anchor["id"], anchor["count"]
    event = AuditEvent.objects.filter(pk=anchored_id).first()
    now_count = AuditEvent.objects.filter(id__lte=anchored_id).count()
    if event is None:
        last = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first()
        if last is None or last < anchored_id:
            now = f"ends at event #{last}" if last is not None else "is empty"
            return (
                f"the anchored event #{anchored_id} is gone and the trail now {now}, with {now_count} events where "
                f"the anchor counted {count}: events were cut from the end of the trail"
            )
        return (
            f"the anchored event #{anchored_id} is gone though later events exist: the chain was rewritten, "
            "or the anchor is from another database"
        )
    if event.hash != anchor["hash"]:
        return (
            f"event #{anchored_id} no longer has the anchored hash: the chain was rewritten since the anchor "
            "was taken, or the anchor is from another database"
        )
    if now_count != count:
        return (
            f"{now_count} events up to #{anchored_id} where the anchor counted {count}: events before it were "
            "removed or inserted"
        )
    return ""


def audit_anchor_write(*, directory: str | Path | None) -> dict[str, Any] | None:
    """Log the current anchor (logger ``audit.services``, for shipping off the server) and, given a
    directory, write it there too as ``audit-anchor-<id>.json`` unless that file exists already."""
    anchor = audit_anchor()
    if anchor is None:
        return None
    line = json.dumps(anchor, sort_keys=True)
    logger.info("AUDIT_ANCHOR %s", line)
    if directory:
        path = Path(directory) / f"audit-anchor-{anchor['id']:012d}.json"
        try:
            with path.open("x") as file:
                file.write(line + "\n")
        except FileExistsError:
            pass  # No event since that anchor was written: the file already says the same.
    return anchor


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
