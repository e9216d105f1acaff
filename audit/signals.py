"""Authentication events in the audit trail: logins, failed logins, logouts."""

from __future__ import annotations

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from audit.models import AuditEvent
from audit.services import Actor, audit_record


@receiver(user_logged_in)
def _logged_in(sender, request, user, **kwargs) -> None:
    audit_record(actor=user, action="auth.login", target=user, request=request)


@receiver(user_logged_out)
def _logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:
        audit_record(actor=user, action="auth.logout", target=user, request=request)


@receiver(user_login_failed)
def _login_failed(sender, credentials, request=None, **kwargs) -> None:
    # The attempted user name is recorded (never the password): repeated failures are visible.
    audit_record(
        actor=Actor(AuditEvent.ActorType.ANONYMOUS, label=str(credentials.get("username", ""))[:150]),
        action="auth.login_failed",
        request=request,
    )
