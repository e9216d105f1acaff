from __future__ import annotations

from rest_framework.permissions import BasePermission


def institution_of(principal):
    """The institution a user or lab system acts for, or None."""
    return getattr(principal, "institution", None) if principal is not None else None


# Roles that see their institution's figures (the dashboards) but no patient and no case.
ROLES_WITHOUT_PATIENT_DATA = frozenset({"lab_manager"})
NO_PATIENT_DATA = "Lab managers see the dashboards, not patients or cases."


def sees_patient_data(principal) -> bool:
    """Whether the user or lab system may read its institution's patients and cases."""
    return getattr(principal, "role", None) not in ROLES_WITHOUT_PATIENT_DATA


class IsInstitutionMember(BasePermission):
    """Authenticated, and acting for an institution (a user without one sees nothing)."""

    message = "Authentication with an account of an institution is required."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if user is not None and user.is_authenticated and not sees_patient_data(user):
            self.message = NO_PATIENT_DATA
            return False
        return bool(user is not None and user.is_authenticated and institution_of(user) is not None)


class HasScope(BasePermission):
    """A lab-system token must carry the scope the view names for the request's method
    (``required_scopes = {"GET": "cases:read", ...}``; a tuple: every one of them); HEAD needs GET's
    scope(s), and a method the
    view does not name (OPTIONS, an undeclared write) is refused to tokens. Staff users act within
    their role."""

    def has_permission(self, request, view) -> bool:
        from accounts.models import LabSystem

        scopes = getattr(view, "required_scopes", None)
        if scopes is None or not isinstance(request.user, LabSystem):
            return True
        needed = scopes.get("GET" if request.method == "HEAD" else request.method)
        if needed is None:
            self.message = f"A lab-system token cannot use {request.method} on this resource."
            return False
        missing = [
            scope for scope in ((needed,) if isinstance(needed, str) else needed) if not request.user.has_scope(scope)
        ]
        if not missing:
            return True
        self.message = f"This token lacks the {', '.join(repr(str(scope)) for scope in missing)} scope."
        return False
