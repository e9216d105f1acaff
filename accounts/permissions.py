from __future__ import annotations

from rest_framework.permissions import BasePermission


def institution_of(principal):
    """The institution a user or lab system acts for, or None."""
    return getattr(principal, "institution", None) if principal is not None else None


class IsInstitutionMember(BasePermission):
    """Authenticated, and acting for an institution (a user without one sees nothing)."""

    message = "Authentication with an account of an institution is required."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user is not None and user.is_authenticated and institution_of(user) is not None)
