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


class LabSystem(models.Model):
    """A lab information system calling the REST API with a token. Only the token's hash is stored."""

    TOKEN_PREFIX = "cldy_"  # noqa: S105 - a public prefix, not a secret

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="lab_systems")
    name = models.CharField(max_length=120, help_text="Which system uses this token, e.g. 'LIS production'.")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_hint = models.CharField(max_length=16, editable=False, help_text="First characters of the key.")
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
