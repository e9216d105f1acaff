from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from accounts.permissions import institution_of
from cases.models import BiopsyCase, Patient, TissuePatch


def cases_visible_to(*, principal) -> QuerySet[BiopsyCase]:
    """Cases of the principal's (user's or lab system's) institution; none without one."""
    institution = institution_of(principal)
    if institution is None:
        return BiopsyCase.objects.none()
    return BiopsyCase.objects.filter(institution=institution).select_related("patient")


def case_with_results(*, principal, case_id: int) -> BiopsyCase:
    """One visible case with its patches and their predictions; DoesNotExist (-> 404) otherwise."""
    from inference.models import Prediction

    patches = TissuePatch.objects.order_by("id").prefetch_related(
        Prefetch("predictions", queryset=Prediction.objects.select_related("model_version").order_by("-id")),
        "reviews__pathologist",
    )
    return (
        cases_visible_to(principal=principal)
        .select_related("institution", "sign_out__pathologist")
        .prefetch_related(Prefetch("patches", queryset=patches), "addenda__pathologist")
        .get(pk=case_id)
    )


def patients_visible_to(*, principal) -> QuerySet[Patient]:
    institution = institution_of(principal)
    if institution is None:
        return Patient.objects.none()
    return Patient.objects.filter(institution=institution)
