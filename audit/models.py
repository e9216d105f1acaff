"""The append-only, hash-chained audit trail."""

from __future__ import annotations

from django.db import models


class AuditEvent(models.Model):
    """One recorded action. Insert-only: database triggers reject UPDATE and DELETE (and TRUNCATE
    on PostgreSQL).

    ``hash`` is the HMAC-SHA256, keyed with ``settings.AUDIT_HMAC_KEY``, of the event's content and
    ``prev_hash`` (the hash of the event before it in its ``chain``), so changing or removing any
    event breaks every hash after it in its chain, and whoever can write the table but lacks the key
    cannot make a chain that verifies (``manage.py verify_audit``; docs/audit.md). Each institution
    has its own chain, and the platform one (0), so that appends for different institutions never
    wait for each other. Events recorded before the per-institution chains form one global chain
    (``chain`` empty); events recorded before the chain was keyed keep their plain SHA-256 and say
    so in ``hash_scheme``.
    No foreign keys: nothing that happens to the rows an event names can change or cascade to it.
    """

    class HashScheme(models.TextChoices):
        SHA256 = "sha256", "SHA-256, unkeyed (before keyed chaining)"
        HMAC_SHA256 = "hmac-sha256", "HMAC-SHA256 with the audit key"

    class ActorType(models.TextChoices):
        USER = "user", "User"
        LAB_SYSTEM = "lab_system", "Lab system"
        WORKER = "worker", "Worker"
        SYSTEM = "system", "System"
        ANONYMOUS = "anonymous", "Anonymous"

    created_at = models.DateTimeField(db_index=True, help_text="UTC.")
    actor_type = models.CharField(max_length=12, choices=ActorType.choices)
    actor_id = models.CharField(max_length=64, blank=True)
    actor_label = models.CharField(max_length=150, blank=True, help_text="User name or lab-system name at the time.")
    institution_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    action = models.CharField(max_length=60, db_index=True, help_text="e.g. case.create, patch.status, auth.login")
    target_type = models.CharField(max_length=40, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    reason = models.TextField(blank=True)
    client_address = models.GenericIPAddressField(null=True, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)
    hash_scheme = models.CharField(
        max_length=12,
        choices=HashScheme.choices,
        help_text="How ``hash`` was made; unkeyed only before keyed chaining.",
    )
    key_id = models.CharField(
        max_length=8,
        blank=True,
        help_text="Fingerprint of the key that made ``hash`` (first 8 hex digits of HMAC(key, "
        "'cloudiopsy-audit-key-id')); empty when unkeyed. Tells a rotated or wrong key from tampering.",
    )

    chain = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="The hash chain the event was appended to: an institution's id, or 0 for the platform "
        "(normally that of ``institution_id``; docs/audit.md). Empty for the global chain of the events "
        "recorded before per-institution chains.",
    )

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["target_type", "target_id"], name="audit_target"),
            # A chain's last event (every append) and a chain's events in order (verify_audit).
            models.Index(fields=["chain", "id"], name="audit_chain"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} {self.target_type}:{self.target_id} by {self.actor_label or self.actor_type}"
