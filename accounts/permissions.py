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


class HasScope(BasePermission):
    """A lab-system token must carry the scope the view names for the request's method
    (``required_scopes = {"GET": "cases:read", ...}``). Staff users act within their role."""

    def has_permission(self, request, view) -> bool:
        from accounts.models import LabSystem

        needed = getattr(view, "required_scopes", {}).get(request.method)
        if needed is None or not isinstance(request.user, LabSystem):
            return True
        if request.user.has_scope(needed):
            return True
        self.message = f"This token lacks the '{needed}' scope."
        return False


class InstitutionScopedAdmin:
    """Django-admin mixin: staff who are not superusers see only their own institution's rows.

    ``institution_lookup`` names the path from the model to its institution id. Superusers
    (platform operators) see everything.
    """

    institution_lookup = "institution_id"

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        institution = getattr(request.user, "institution_id", None)
        if institution is None:
            return queryset.none()
        return queryset.filter(**{self.institution_lookup: institution})
