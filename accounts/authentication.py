from __future__ import annotations

from django.core.cache import cache
from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.models import LabSystem, hash_token

# A flood of made-up tokens from one address is recorded once a minute (with how many there were),
# not once per request: the audit trail must not become the attacker's amplifier.
_UNKNOWN_TOKEN_WINDOW_SECONDS = 60


def token_failure_record(request, *, why: str, key: str = "", lab_system: LabSystem | None = None) -> None:
    """A failed token authentication in the audit trail: the token's public prefix, never the key."""
    from audit.models import AuditEvent
    from audit.services import Actor, audit_record, client_address

    address = client_address(request) or "unknown"
    unrecorded = 0
    if lab_system is None:
        window, carried = f"token-failure:{address}", f"token-failure:{address}:unrecorded"
        if not cache.add(window, 1, _UNKNOWN_TOKEN_WINDOW_SECONDS):
            cache.add(carried, 0, None)
            cache.incr(carried)
            return
        unrecorded = cache.get(carried, 0)
        cache.delete(carried)
    actor = (
        Actor(AuditEvent.ActorType.LAB_SYSTEM, str(lab_system.pk), lab_system.name, lab_system.institution_id)
        if lab_system is not None
        else Actor(AuditEvent.ActorType.ANONYMOUS, label="unknown token")
    )
    audit_record(
        actor=actor,
        action="auth.token_failed",
        target=lab_system,
        after={"why": why, "token_hint": key[:9], "path": request.path[:200], "earlier_unrecorded": unrecorded},
        request=request,
    )


class LabSystemTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Token <key>`` for lab systems. The principal is the LabSystem itself."""

    keyword = "Token"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Token <key>'.")
        try:
            key = header[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        lab_system = (
            LabSystem.objects.select_related("institution")
            .filter(token_hash=hash_token(key), revoked_at__isnull=True)
            .first()
        )
        if lab_system is None:
            revoked = LabSystem.objects.filter(token_hash=hash_token(key)).first()
            token_failure_record(request, why="revoked" if revoked else "unknown", key=key, lab_system=revoked)
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        now = timezone.now()
        if lab_system.expires_at is not None and lab_system.expires_at <= now:
            token_failure_record(request, why="expired", key=key, lab_system=lab_system)
            raise exceptions.AuthenticationFailed("The token has expired.")
        if lab_system.last_used_at is None or (now - lab_system.last_used_at).total_seconds() > 60:
            LabSystem.objects.filter(pk=lab_system.pk).update(last_used_at=now)
        return lab_system, key

    def authenticate_header(self, request):
        return self.keyword
