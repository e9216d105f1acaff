"""Second factor (TOTP) rules shared by the login flow, the middleware and identity-provider logins."""

from __future__ import annotations

from django.conf import settings

# Set in the session when the hospital's identity provider vouched for a second factor.
IDP_VERIFIED_SESSION_KEY = "cloudiopsy_mfa_by_identity_provider"


def mfa_required(user) -> bool:
    """Whether this user must pass a second factor before seeing any page."""
    if not getattr(user, "is_authenticated", False):
        return False
    return bool(user.is_superuser or user.role in settings.MFA_REQUIRED_ROLES)
