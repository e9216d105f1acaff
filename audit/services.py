"""Writing and verifying audit events.

``audit_record`` must run inside the transaction of the change it records (it opens a savepoint
if called outside one): the event and the change commit or roll back together.

Each institution's events form their own hash chain, and events of no institution the platform's
chain, so that appends for different institutions never wait for each other. Appends to one chain
are serialised until commit (on PostgreSQL an advisory lock per chain; SQLite serialises writers
anyway) so that each event chains onto the one before it in its chain. Events recorded before the
per-institution chains stay in the global chain they were written in (``chain`` empty), which the
first event of every chain continues (migration 0006).

Each event's hash is an HMAC-SHA256 keyed with ``settings.AUDIT_HMAC_KEY``, a key kept outside the
database: whoever can write the audit table but lacks the key cannot make a chain that verifies.
Events recorded before the chain was keyed keep their plain SHA-256 (``hash_scheme``); they are
accepted only as the first events of the global chain and only when a keyed event follows them,
whose HMAC covers the last of them and through it every one before (docs/audit.md).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from audit.models import AuditEvent
from cloudiopsy.metrics import AUDIT_APPEND_SECONDS

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
# "CLDY". On PostgreSQL, pg_advisory_xact_lock(APPEND_LOCK_KEY, <chain's lock key>) serialises one
# chain's appends; the one-argument lock on APPEND_LOCK_KEY alone (another lock: PostgreSQL keeps the
# two forms apart) was the global chain's, taken by the migrations that append to it (0004, 0006).
APPEND_LOCK_KEY = 0x434C4459
PLATFORM_CHAIN = 0
# "<lock key> <chain>" of the greatest chain lock key this transaction holds. Transaction-local:
# PostgreSQL forgets it when the transaction ends or a savepoint is rolled back, as it does the lock.
_HELD_SETTING = "cloudiopsy.audit_chain"
_KEY_ID_MESSAGE = b"cloudiopsy-audit-key-id"
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
    chain = getattr(event, "chain", None)  # migrations' models before 0006 have no chain
    if chain is not None:
        # Binds the event to its chain: moving it to another one needs the key.
        content["chain"] = chain
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


def chain_of(institution_id: int | None) -> int:
    """The chain an institution's events are appended to: its own, or the platform's for none."""
    return PLATFORM_CHAIN if institution_id is None else institution_id


def chain_name(chain: int | None) -> str:
    if chain is None:
        return "the global chain (from before per-institution chains)"
    return "the platform chain" if chain == PLATFORM_CHAIN else f"the chain of institution {chain}"


def _lock_key(chain: int) -> int:
    # pg_advisory_xact_lock takes two 32-bit keys: ids below 2**31 are their own key, larger ones wrap
    # (two chains that share a key only wait for each other).
    return (chain + 2**31) % 2**32 - 2**31


# Try the chain's lock and read which chain lock this transaction held before; when the lock is taken
# and its key is the greatest held, record that. OFFSET 0: the attempt runs before the outer CASE.
_TRY_LOCK = """
SELECT got, CASE WHEN got AND (held = '' OR split_part(held, ' ', 1)::integer < %(key)s)
                 THEN set_config(%(setting)s, %(held)s, true) ELSE held END
FROM (SELECT pg_try_advisory_xact_lock(%(space)s, %(key)s) AS got,
             COALESCE(current_setting(%(setting)s, true), '') AS held
      OFFSET 0) AS attempt
"""
_LOCK = "SELECT pg_advisory_xact_lock(%(space)s, %(key)s), set_config(%(setting)s, %(held)s, true)"


def _chain_lock(chain: int) -> int:
    """Hold ``chain``'s append lock until this transaction ends and return ``chain``; or, where waiting
    for that lock could deadlock, return a chain whose lock this transaction holds already, for the
    event to join instead.

    A transaction waits only for a lock key greater than every key it holds, so no cycle of waits
    can form: one transaction recording events of several institutions in any order (a worker's
    batch) never deadlocks with another. Where a key below one held is taken by someone else, the
    event joins the held chain: it verifies there like any other (its chain is in its hash).
    """
    if connection.vendor != "postgresql":
        return chain  # SQLite runs one writing transaction at a time.
    key = _lock_key(chain)
    params = {"space": APPEND_LOCK_KEY, "key": key, "setting": _HELD_SETTING, "held": f"{key} {chain}"}
    with connection.cursor() as cursor:
        cursor.execute(_TRY_LOCK, params)
        got, held = cursor.fetchone()
        if got:
            return chain
        if held:
            held_key, held_chain = (int(part) for part in held.split())
            if held_key > key:
                # Waiting here could close a cycle of waits. The held chain's lock is still held: the
                # setting that names it is rolled back with it.
                return held_chain
        cursor.execute(_LOCK, params)
    return chain


def _chain_head(chain: int) -> str:
    """The hash the next event of ``chain`` links to: its last event's; for a chain's first event the
    global chain's last (so cutting the global chain's end breaks every chain), else GENESIS."""
    last = AuditEvent.objects.filter(chain=chain).order_by("-id").values_list("hash", flat=True).first()
    if last is None:
        last = AuditEvent.objects.filter(chain__isnull=True).order_by("-id").values_list("hash", flat=True).first()
    return last or GENESIS


@AUDIT_APPEND_SECONDS.time()
def _events_append(events: list[AuditEvent]) -> list[AuditEvent]:
    """Lock the events' chains, link and sign the events in order and insert them, in one statement."""
    key = settings.AUDIT_HMAC_KEY
    with transaction.atomic():
        # In ascending key order, so that the batch never waits holding a greater key (_chain_lock).
        joined = {chain: _chain_lock(chain) for chain in sorted({e.chain for e in events}, key=_lock_key)}
        heads: dict[int, str] = {}
        for event in events:
            event.chain = joined[event.chain]
            if event.chain not in heads:
                heads[event.chain] = _chain_head(event.chain)
            event.prev_hash = heads[event.chain]
            event_sign(event, key=key)
            heads[event.chain] = event.hash
        # Ids follow the list's order, so each chain's events are in id order, as verify walks them.
        AuditEvent.objects.bulk_create(events)
    return events


def _event(
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
    who = actor_of(actor)
    if target is not None:
        target_type = target_type or target._meta.label_lower
        target_id = target.pk
        institution_id = institution_id or getattr(target, "institution_id", None)
    if institution_id is None:
        institution_id = who.institution_id
    return AuditEvent(
        created_at=timezone.now(),
        actor_type=who.type,
        actor_id=who.id,
        actor_label=who.label,
        institution_id=institution_id,
        action=action,
        target_type=target_type,
        target_id=str(target_id) if target_id != "" else "",
        before=_canonical(before) if before is not None else None,
        after=_canonical(after) if after is not None else None,
        reason=reason,
        client_address=client_address(request),
        chain=chain_of(institution_id),
    )


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
    """Append one event to its institution's chain, in the caller's transaction.

    Args:
        actor: a User, a LabSystem, an ``Actor`` (e.g. ``WORKER``) or None (system).
        action: dotted verb, e.g. ``case.create``.
        target: the model instance acted on (or give ``target_type`` and ``target_id``).
        before / after: the values that changed (JSON-serialisable).
        request: for the client address.
        institution_id: whose data it concerns (defaults to the target's or the actor's).
    """
    event = _event(
        actor=actor,
        action=action,
        target=target,
        target_type=target_type,
        target_id=target_id,
        before=before,
        after=after,
        reason=reason,
        request=request,
        institution_id=institution_id,
    )
    return _events_append([event])[0]


def audit_record_many(records: list[dict[str, Any]]) -> list[AuditEvent]:
    """Append several events at once, in order, in the caller's transaction: one per fact, as
    ``audit_record`` would, each dict holding ``audit_record``'s keyword arguments.

    Writers of many facts at a time (the analysis worker's batches) call this instead of a loop: each
    chain is locked and its last hash read once, and the events are inserted in one statement.
    """
    if not records:
        return []
    return _events_append([_event(**record) for record in records])


class ChainCheck(NamedTuple):
    checked: int  # events that verified before the bad one (all of them when bad is None)
    bad: AuditEvent | None
    why: str


def audit_verify(*, previous_keys: tuple[str, ...] = ()) -> ChainCheck:
    """Walk every chain from its start, in id order, and stop at the first event that does not verify.

    The global chain (events from before per-institution chains) starts at GENESIS; every other
    chain starts where the global chain ends.

    Args:
        previous_keys: keys retired by a rotation, for the events they made (the current key is
            ``settings.AUDIT_HMAC_KEY``).
    """
    current = key_fingerprint(settings.AUDIT_HMAC_KEY)
    keys = {key_fingerprint(key): key for key in previous_keys} | {current: settings.AUDIT_HMAC_KEY}
    heads: dict[int | None, str] = {}  # each chain's last verified hash
    checked = 0
    first = None
    chains_began: AuditEvent | None = None  # the first event of a per-institution chain
    keyed = False
    global_keyed = False
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        first = first or event
        if event.chain is None:
            if chains_began is not None:
                return ChainCheck(
                    checked,
                    event,
                    f"it is in the global chain, which ended when per-institution chains began (event "
                    f"#{chains_began.pk}): it was added afterwards, not by this application",
                )
            previous = heads.get(None, GENESIS)
        else:
            chains_began = chains_began or event
            previous = heads.get(event.chain, heads.get(None, GENESIS))
        if event.prev_hash != previous:
            return ChainCheck(
                checked,
                event,
                "its prev_hash does not match the previous event's hash (an event was removed or changed)",
            )
        if event.hash_scheme == AuditEvent.HashScheme.SHA256:
            if event.chain is not None:
                return ChainCheck(
                    checked,
                    event,
                    "it has an unkeyed (plain SHA-256) hash in a per-institution chain, where every hash is "
                    "keyed: it was written or rewritten without the audit key",
                )
            if global_keyed:
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
            global_keyed = global_keyed or event.chain is None
        else:
            return ChainCheck(checked, event, f"its hash scheme {event.hash_scheme!r} is unknown")
        if content_hash(event, key=key) != event.hash:
            if key is not None and content_hash(event, key=None) == event.hash:
                why = "its hash is a plain SHA-256 where a keyed HMAC belongs: it was rewritten without the audit key"
            else:
                why = "its content does not match its hash (the event was altered)"
            return ChainCheck(checked, event, why)
        heads[event.chain] = event.hash
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
