from __future__ import annotations

from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.models import LabSystem, hash_token


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
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        now = timezone.now()
        if lab_system.expires_at is not None and lab_system.expires_at <= now:
            raise exceptions.AuthenticationFailed("The token has expired.")
        if lab_system.last_used_at is None or (now - lab_system.last_used_at).total_seconds() > 60:
            LabSystem.objects.filter(pk=lab_system.pk).update(last_used_at=now)
        return lab_system, key

    def authenticate_header(self, request):
        return self.keyword
