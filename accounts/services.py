from __future__ import annotations

import datetime

from django.db import transaction
from django.utils import timezone

from accounts.models import Institution, LabSystem, Scope, hash_token


@transaction.atomic
def lab_system_create(
    *,
    institution: Institution,
    name: str,
    scopes: list[str] | None = None,
    expires_at: datetime.datetime | None = None,
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
    return lab_system, key


def lab_system_revoke(*, lab_system: LabSystem) -> bool:
    """Revoke a token for good. False when it was already revoked."""
    return bool(LabSystem.objects.filter(pk=lab_system.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()))
