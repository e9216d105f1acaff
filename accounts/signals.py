"""Lockouts (django-axes) in the audit trail."""

from __future__ import annotations

from axes.signals import user_locked_out
from django.dispatch import receiver

from audit.models import AuditEvent
from audit.services import Actor, audit_record


@receiver(user_locked_out)
def _locked_out(sender, request, username=None, ip_address=None, **kwargs) -> None:
    from django.conf import settings

    audit_record(
        actor=Actor(AuditEvent.ActorType.ANONYMOUS, label=str(username or "")[:150]),
        action="auth.lockout",
        after={
            "username": username or "",
            "client_address": ip_address,
            "failures": settings.AXES_FAILURE_LIMIT,
            "minutes": settings.LOGIN_LOCKOUT_MINUTES,
        },
        request=request,
    )
