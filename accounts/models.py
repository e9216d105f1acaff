"""Institutions, staff users with a role, and lab-system API clients."""

from __future__ import annotations

import hashlib
import secrets

from django.contrib.auth.models import AbstractUser
from django.db import models


class Institution(models.Model):
    """A hospital or laboratory. All patient data belongs to exactly one institution."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True, help_text="Short stable identifier, e.g. 'demo'.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class User(AbstractUser):
    """A staff member. Sees only the data of their own institution."""

    class Role(models.TextChoices):
        CLINICIAN = "clinician", "Clinician"
        PATHOLOGIST = "pathologist", "Pathologist"
        ADMIN = "admin", "Administrator"
        # Sees the operations dashboards of the institution; reviews nothing, administers nothing.
        LAB_MANAGER = "lab_manager", "Lab manager"

    institution = models.ForeignKey(
        Institution,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="users",
        help_text="The institution whose data this user may see. Users without one see no patient data.",
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.CLINICIAN)


def hash_token(key: str) -> str:
    """SHA-256 of a token key. Keys are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(key.encode()).hexdigest()


class Scope(models.TextChoices):
    """What a lab-system token may do. Every API view names the scope it needs."""

    CASES_READ = "cases:read", "Read cases and patches"
    CASES_WRITE = "cases:write", "Create cases"
    PATCHES_WRITE = "patches:write", "Upload patches"
    RESULTS_READ = "results:read", "Read AI results"


def all_scopes() -> list[str]:
    return list(Scope.values)


class LabSystem(models.Model):
    """A lab information system calling the REST API with a token. Only the token's hash is stored."""

    TOKEN_PREFIX = "cldy_"  # noqa: S105 - a public prefix, not a secret

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="lab_systems")
    name = models.CharField(max_length=120, help_text="Which system uses this token, e.g. 'LIS production'.")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_hint = models.CharField(max_length=16, editable=False, help_text="First characters of the key.")
    scopes = models.JSONField(default=all_scopes, help_text="What the token may do, e.g. ['cases:write'].")
    expires_at = models.DateTimeField(null=True, blank=True, help_text="The token stops working then (optional).")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["institution", "name"], name="unique_lab_system_name")]

    def __str__(self) -> str:
        return f"{self.name} ({self.institution.slug})"

    # DRF treats the authenticated principal like a user.
    is_authenticated = True
    is_anonymous = False

    @classmethod
    def new_key(cls) -> str:
        return cls.TOKEN_PREFIX + secrets.token_urlsafe(32)

    def has_scope(self, scope: str) -> bool:
        return scope in (self.scopes or [])


class IdempotencyRecord(models.Model):
    """The first response to a POST sent with an ``Idempotency-Key``, replayed for retries."""

    owner = models.CharField(max_length=40, help_text="'lab:<id>' or 'user:<id>': keys are per caller.")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="SHA-256 of method, path and request content.")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Empty while in progress.")
    response = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "key"], name="unique_idempotency_key")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]

    def __str__(self) -> str:
        return f"{self.owner} {self.key}"
