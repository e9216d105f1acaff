"""Callbacks to lab systems: where to send events, and the log of every delivery."""

from __future__ import annotations

import secrets
import uuid

from django.db import models
from django.utils import timezone

from accounts.models import LabSystem
from cases.models import BiopsyCase


class WebhookEndpoint(models.Model):
    """A lab system's callback URL. Events are signed (HMAC-SHA256) with a secret that is shown once
    when set and stored only encrypted (``webhooks.crypto``, key FIELD_ENCRYPTION_KEY)."""

    class Event(models.TextChoices):
        CASE_READY = "case.ready_for_review", "Case ready for review"
        CASE_SIGNED_OUT = "case.signed_out", "Case signed out"

    lab_system = models.OneToOneField(LabSystem, on_delete=models.CASCADE, related_name="webhook")
    url = models.URLField(max_length=500, help_text="http(s) URL the platform POSTs events to.")
    secret_encrypted = models.TextField(
        editable=False,
        blank=True,
        help_text="Shared HMAC key, shown once when set; stored Fernet-encrypted with FIELD_ENCRYPTION_KEY.",
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.lab_system} -> {self.url}"

    @staticmethod
    def new_secret() -> str:
        return "whsec_" + secrets.token_hex(24)


class WebhookDelivery(models.Model):
    """One event for one endpoint, and how its delivery went. Delivered at most once on success.

    pending -> sending (claimed by one worker, attempts + 1) -> delivered, failed, or pending again
    with ``next_attempt_at`` pushed back. The beat sweep re-sends a delivery still pending well
    after it was due, or stuck in sending (its worker died).
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"

    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=40, choices=WebhookEndpoint.Event.choices)
    case = models.ForeignKey(BiopsyCase, on_delete=models.CASCADE, related_name="+")
    payload = models.JSONField()
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    next_attempt_at = models.DateTimeField(
        default=timezone.now, help_text="When the next attempt is due (backoff); the sweep re-sends it if late."
    )
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="When a worker took the latest attempt.")
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="webhook_delivery_due")]

    def __str__(self) -> str:
        return f"{self.event} #{self.case_id} -> {self.endpoint.url} ({self.status})"
