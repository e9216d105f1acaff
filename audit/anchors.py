"""Anchors: each chain's last event (id, hash, and how many events lead up to it), kept outside the
database, so that ``verify_audit --anchor`` can tell that events were cut from the end of a chain,
which a chain cannot show by itself (docs/audit.md)."""

from __future__ import annotations

import datetime
import json
import logging
import re
from pathlib import Path
from typing import Any

from django.db.models import Count, Max
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import chain_name

logger = logging.getLogger("audit.services")  # the name that log shipping and docs/audit.md know it by

ANCHOR_FORMAT = "cloudiopsy-audit-anchor/2"  # one entry per chain
ANCHOR_FORMAT_GLOBAL = "cloudiopsy-audit-anchor/1"  # from before per-institution chains: the global chain's


def audit_anchor() -> dict[str, Any] | None:
    """Each chain's latest event, as an anchor to keep outside the database; None while the trail is empty.

    A later ``verify_audit --anchor`` proves that each of these events still exists with its hash and
    that no event of its chain up to it went: what a chain cannot show by itself is that its end was
    cut off. ``id`` and ``count`` sum up: the latest anchored event and the events anchored.
    """
    # One statement, one snapshot. Appends to a chain are serialised until commit, so its ids commit
    # in order: no lower id can join a chain later, and each count stays what it is here.
    lasts = {
        row["chain"]: row
        for row in AuditEvent.objects.order_by().values("chain").annotate(last=Max("id"), count=Count("id"))
    }
    if not lasts:
        return None
    events = AuditEvent.objects.in_bulk([row["last"] for row in lasts.values()])
    chains = []
    for chain in sorted(lasts, key=lambda chain: (chain is not None, chain or 0)):
        last = events[lasts[chain]["last"]]
        chains.append(
            {
                "chain": chain,
                "id": last.pk,
                "hash": last.hash,
                "count": lasts[chain]["count"],
                "created_at": last.created_at.astimezone(datetime.UTC).isoformat(timespec="microseconds"),
                "hash_scheme": last.hash_scheme,
                "key_id": last.key_id,
            }
        )
    return {
        "format": ANCHOR_FORMAT,
        "id": max(entry["id"] for entry in chains),
        "count": sum(entry["count"] for entry in chains),
        "chains": chains,
        "anchored_at": timezone.now().astimezone(datetime.UTC).isoformat(timespec="seconds"),
    }


def _positive(value: Any) -> bool:
    return type(value) is int and value >= 1


def _anchor_entry_check(entry: dict[str, Any], whose: str) -> None:
    for name in ("id", "count"):
        if not _positive(entry.get(name)):
            raise ValueError(f"{whose} {name!r} is not a positive whole number")
    if not isinstance(entry.get("hash"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["hash"]):
        raise ValueError(f"{whose} 'hash' is not 64 lowercase hexadecimal digits")


def anchor_parse(text: str) -> dict[str, Any]:
    """The anchor in ``text``, as ``audit_anchor`` makes it; a ValueError says what is wrong with it.

    An anchor from before per-institution chains (format 1: one event, id/hash/count) is read as an
    anchor of the global chain: every event up to its id is in that chain.
    """
    try:
        anchor = json.loads(text)
    except ValueError as error:
        raise ValueError(f"it is not JSON ({error})") from None
    if not isinstance(anchor, dict) or anchor.get("format") not in (ANCHOR_FORMAT, ANCHOR_FORMAT_GLOBAL):
        raise ValueError(f'it is not an audit anchor (no "format": "{ANCHOR_FORMAT}")')
    if anchor["format"] == ANCHOR_FORMAT_GLOBAL:
        _anchor_entry_check(anchor, "its")
        entry = {"chain": None, "id": anchor["id"], "hash": anchor["hash"], "count": anchor["count"]}
        return {**anchor, "chains": [entry]}
    for name in ("id", "count"):
        if not _positive(anchor.get(name)):
            raise ValueError(f"its {name!r} is not a positive whole number")
    chains = anchor.get("chains")
    if not isinstance(chains, list) or not chains:
        raise ValueError("its 'chains' is not a list of chains")
    seen = set()
    for number, entry in enumerate(chains, start=1):
        if not isinstance(entry, dict):
            raise ValueError(f"chain entry {number} is not an object")
        _anchor_entry_check(entry, f"chain entry {number}'s")
        chain = entry.get("chain", "")
        if chain is not None and not (type(chain) is int and chain >= 0):
            raise ValueError(f"chain entry {number}'s 'chain' is neither null nor a whole number")
        if chain in seen:
            raise ValueError(f"it names chain {chain} twice")
        seen.add(chain)
    if (anchor["id"], anchor["count"]) != (max(e["id"] for e in chains), sum(e["count"] for e in chains)):
        raise ValueError("its 'id' and 'count' are not its chains' latest event and their events' sum")
    return anchor


def anchor_check(anchor: dict[str, Any]) -> str:
    """Why the trail no longer matches ``anchor``, or "" when it does. Meant after ``audit_verify``."""
    for entry in anchor["chains"]:
        why = _anchor_chain_check(entry["chain"], entry["id"], entry["hash"], entry["count"])
        if why:
            return why
    return ""


def _anchor_chain_check(chain: int | None, anchored_id: int, anchored_hash: str, count: int) -> str:
    name = chain_name(chain)
    events = AuditEvent.objects.filter(chain__isnull=True) if chain is None else AuditEvent.objects.filter(chain=chain)
    event = events.filter(pk=anchored_id).first()
    now_count = events.filter(id__lte=anchored_id).count()
    if event is None:
        last = events.order_by("-id").values_list("id", flat=True).first()
        if last is None or last < anchored_id:
            now = f"ends at event #{last}" if last is not None else "is empty"
            return (
                f"the anchored event #{anchored_id} of {name} is gone and that chain now {now}, with {now_count} "
                f"events where the anchor counted {count}: events were cut from the end of the trail"
            )
        return (
            f"the anchored event #{anchored_id} of {name} is gone though later events of that chain exist: the "
            "chain was rewritten, or the anchor is from another database"
        )
    if event.hash != anchored_hash:
        return (
            f"event #{anchored_id} of {name} no longer has the anchored hash: the chain was rewritten since the "
            "anchor was taken, or the anchor is from another database"
        )
    if now_count != count:
        return (
            f"{now_count} events of {name} up to #{anchored_id} where the anchor counted {count}: events before "
            "it were removed or inserted"
        )
    return ""


def audit_anchor_write(*, directory: str | Path | None) -> dict[str, Any] | None:
    """Log the current anchor (logger ``audit.services``, for shipping off the server) and, given a
    directory, write it there too as ``audit-anchor-<id>-<count>.json`` unless that file exists already."""
    anchor = audit_anchor()
    if anchor is None:
        return None
    line = json.dumps(anchor, sort_keys=True)
    logger.info("AUDIT_ANCHOR %s", line)
    if directory:
        # The count too: an event committed late in one chain can have a lower id than another chain's last.
        path = Path(directory) / f"audit-anchor-{anchor['id']:012d}-{anchor['count']:012d}.json"
        try:
            with path.open("x") as file:
                file.write(line + "\n")
        except FileExistsError:
            pass  # No event since that anchor was written: the file already says the same.
    return anchor
