from __future__ import annotations

from django.db import transaction

from accounts.models import Institution, LabSystem, hash_token


@transaction.atomic
def lab_system_create(*, institution: Institution, name: str) -> tuple[LabSystem, str]:
    """Create a lab-system API client. Returns it and its key, which is never stored or shown again."""
    key = LabSystem.new_key()
    lab_system = LabSystem.objects.create(
        institution=institution, name=name, token_hash=hash_token(key), token_hint=key[:12]
    )
    return lab_system, key
