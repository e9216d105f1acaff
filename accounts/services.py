from __future__ import annotations

import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import IdempotencyRecord, Institution, LabSystem, Scope, hash_token
from audit.services import audit_record


@transaction.atomic
def lab_system_create(
    *,
    institution: Institution,
    name: str,
    scopes: list[str] | None = None,
    expires_at: datetime.datetime | None = None,
    actor=None,
) -> tuple[LabSystem, str]:
    """Create a lab-system API client. Returns it and its key, which is never stored or shown again."""
    scopes = list(Scope.values) if scopes is None else scopes
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown or not scopes:
        raise ValueError(f"unknown scope(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(Scope.values)}")
    key = LabSystem.new_key()
    lab_system = LabSystem.objects.create(
        institution=institution,
        name=name,
        token_hash=hash_token(key),
        token_hint=key[:12],
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
    )
    audit_record(
        actor=actor,
        action="lab_system.create",
        target=lab_system,
        after={"name": name, "scopes": lab_system.scopes, "expires_at": expires_at, "hint": lab_system.token_hint},
    )
    return lab_system, key


@transaction.atomic
def lab_system_revoke(*, lab_system: LabSystem, actor=None) -> bool:
    """Revoke a token for good. False when it was already revoked."""
    revoked = bool(
        LabSystem.objects.filter(pk=lab_system.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    )
    if revoked:
        audit_record(actor=actor, action="lab_system.revoke", target=lab_system, after={"revoked": True})
    return revoked


def idempotency_purge(*, now=None) -> int:
    """Delete the stored first responses of Idempotency-Keys older than IDEMPOTENCY_TTL_HOURS.

    A retry is expected within minutes or hours; keeping every response for ever would keep
    copies of API responses (patient data) with no use. Returns how many were deleted.
    """
    cutoff = (now or timezone.now()) - datetime.timedelta(hours=settings.IDEMPOTENCY_TTL_HOURS)
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted
