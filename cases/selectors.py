from __future__ import annotations

from django.db.models import Case, Count, F, Max, Prefetch, Q, QuerySet, When

from accounts.permissions import institution_of, sees_patient_data
from cases.models import Addendum, BiopsyCase, Patient, Review, TissuePatch


def cases_visible_to(*, principal) -> QuerySet[BiopsyCase]:
    """Cases of the principal's (user's or lab system's) institution; none without one, and none
    for a role that sees no patient data (lab managers)."""
    institution = institution_of(principal)
    if institution is None or not sees_patient_data(principal):
        return BiopsyCase.objects.none()
    return BiopsyCase.objects.filter(institution=institution).select_related("patient")


def case_with_results(*, principal, case_id: int) -> BiopsyCase:
    """One visible case with its patches and their predictions; DoesNotExist (-> 404) otherwise."""
    from inference.models import Prediction

    # A fixed number of queries whatever the number of patches, predictions and reviews.
    # A patch made from a slide's suspicious region comes with its region and slide (joined).
    patches = (
        TissuePatch.objects.order_by("id")
        .select_related("slide_region__slide")
        .prefetch_related(
            Prefetch(
                "predictions",
                queryset=Prediction.objects.select_related("model_version", "site_validation").order_by("-id"),
            ),
            Prefetch("reviews", queryset=Review.objects.select_related("pathologist").order_by("id")),
        )
    )
    return (
        cases_visible_to(principal=principal)
        .select_related("institution", "sign_out__pathologist")
        .prefetch_related(
            Prefetch("patches", queryset=patches),
            Prefetch("addenda", queryset=Addendum.objects.select_related("pathologist").order_by("id")),
        )
        .get(pk=case_id)
    )


def patients_visible_to(*, principal) -> QuerySet[Patient]:
    institution = institution_of(principal)
    if institution is None or not sees_patient_data(principal):
        return Patient.objects.none()
    return Patient.objects.filter(institution=institution)


def with_ai_summary(cases: QuerySet[BiopsyCase]) -> QuerySet[BiopsyCase]:
    """Annotate each case with its AI results, in the same query:

    ``ai_max_uncertainty``; ``ai_tumour_patches``: predictions judged "suspected tumour" by the
    operating point stored with them (their TUM probability at or above the site's threshold);
    ``ai_attention``: predictions flagged as needing attention; ``ai_not_validated``: predictions
    made by a model not validated at the case's institution (the model's default threshold applied).
    """
    predictions = "patches__predictions"
    # Predictions stored before operating points existed carry no threshold and no judgement:
    # for those the AI's class is all there is, as the worklist counted them then.
    suspected = Q(patches__predictions__suspected_tumour=True) | Q(
        patches__predictions__tumour_threshold__isnull=True, patches__predictions__label="TUM"
    )
    return cases.annotate(
        ai_max_uncertainty=Max("patches__predictions__uncertainty"),
        ai_tumour_patches=Count(predictions, filter=suspected),
        ai_attention=Count(predictions, filter=Q(patches__predictions__needs_attention=True)),
        ai_not_validated=Count(predictions, filter=Q(patches__predictions__site_validation__isnull=True)),
    )


def worklist(*, principal, status: str = "ready_for_review", priority: str = "", site: str = "", since=None):
    """Cases for a pathologist: urgent first, then the least certain AI results, then the most
    patches suspected of tumour at the site's operating point, then the oldest. Annotated as by
    ``with_ai_summary``."""
    cases = cases_visible_to(principal=principal)
    if status:
        cases = cases.filter(status=status)
    if priority:
        cases = cases.filter(priority=priority)
    if site:
        cases = cases.filter(specimen_site__icontains=site)
    if since is not None:
        cases = cases.filter(created_at__gte=since)
    urgent_first = Case(When(priority=BiopsyCase.Priority.URGENT, then=0), default=1)
    return (
        with_ai_summary(cases)
        .select_related("patient", "assigned_to")
        .order_by(urgent_first, F("ai_max_uncertainty").desc(nulls_last=True), "-ai_tumour_patches", "created_at", "id")
    )


def case_counts(*, principal) -> dict[str, int]:
    """{status: number of the institution's cases}, every status present."""
    counts = dict(cases_visible_to(principal=principal).values_list("status").annotate(n=Count("id")))
    return {value: counts.get(value, 0) for value in BiopsyCase.Status.values}


def agreement_stats(*, institution, model_version=None) -> dict:
    """AI vs pathologist on the latest review of each reviewed patch of an institution.

    Returns ``reviews``, ``agreement`` (share of reviews whose final class is the AI's class),
    ``confusion`` {AI class: {final class: n}}, ``classes`` (sorted), ``per_version``
    {model version: {reviews, agreement}} and ``per_week`` [(ISO week, reviews, agreement)].
    """
    reviews = Review.objects.filter(patch__case__institution=institution).select_related("prediction__model_version")
    if model_version is not None:
        reviews = reviews.filter(prediction__model_version=model_version)
    latest: dict[int, Review] = {}
    for review in reviews.order_by("patch_id", "id"):
        latest[review.patch_id] = review
    rows = list(latest.values())

    def rate(items) -> float | None:
        return round(sum(r.final_label == r.prediction.label for r in items) / len(items), 4) if items else None

    confusion: dict[str, dict[str, int]] = {}
    per_version: dict[str, list] = {}
    per_week: dict[str, list] = {}
    for review in rows:
        ai, final = review.prediction.label, review.final_label
        confusion.setdefault(ai, {}).setdefault(final, 0)
        confusion[ai][final] += 1
        per_version.setdefault(str(review.prediction.model_version), []).append(review)
        year, week, _ = review.created_at.isocalendar()
        per_week.setdefault(f"{year}-W{week:02d}", []).append(review)
    classes = sorted({c for ai, row in confusion.items() for c in (ai, *row)})
    return {
        "reviews": len(rows),
        "agreement": rate(rows),
        "confusion": confusion,
        "classes": classes,
        "per_version": {
            v: {"reviews": len(items), "agreement": rate(items)} for v, items in sorted(per_version.items())
        },
        "per_week": [(week, len(items), rate(items)) for week, items in sorted(per_week.items())],
    }
