"""Template context for every page: the drift alarm for administrators."""

from __future__ import annotations

from django.utils.functional import SimpleLazyObject


def drift_alert(request) -> dict:
    """``drift_alert``: {"week", "figures"} when the user's institution drifts, else falsy.

    Lazy: nothing is read unless a template asks, and base.html asks only for administrators;
    the answer is cached per institution (inference.drift.drift_banner), so a page costs them at
    most one cache read.
    """

    def alert():
        from inference.drift import drift_banner
        from inference.views import is_admin

        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated or not is_admin(user) or user.institution_id is None:
            return None
        return drift_banner(institution_id=user.institution_id)

    return {"drift_alert": SimpleLazyObject(alert)}
