"""Pathologist review, sign-out and addenda. Each function owns its transaction and audit event.

Only a pathologist of the case's institution may act (callers resolve the case within the
institution first, so another institution's case is a 404 before we get here).
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import Prefetch

from accounts.models import User
from audit.services import audit_record
from cases.models import Addendum, BiopsyCase, Review, SignOut, TissuePatch
from cases.services import CaseError
from cases.transitions import case_transition, cases_touch
from inference.models import Prediction


class NotAllowed(PermissionError):
    """The user's role does not allow this action (a 403, with the message)."""


def _require_pathologist(user) -> None:
    if getattr(user, "role", None) != User.Role.PATHOLOGIST:
        raise NotAllowed("only a pathologist can review or sign out a case")


def _locked_case(case: BiopsyCase) -> BiopsyCase:
    return BiopsyCase.objects.select_for_update().get(pk=case.pk)


def _review(*, case, patch, pathologist, decision, final_label="", reason_code="", reason_text="", request=None):
    prediction = patch.predictions.order_by("-id").first()
    if prediction is None:
        raise CaseError(f"patch {patch.original_name} has no AI result to review")
    classes = prediction.model_version.classes
    if decision == Review.Decision.CONFIRM:
        final_label = prediction.label
    elif decision == Review.Decision.OVERRIDE:
        if final_label not in classes:
            raise CaseError(f"final class must be one of {', '.join(classes)}")
        if reason_code not in Review.Reason.values:
            raise CaseError(f"an override needs a reason code: one of {', '.join(Review.Reason.values)}")
        if final_label == prediction.label and not reason_text:
            raise CaseError("an override must change the class or explain why in the reason text")
    else:
        raise CaseError("decision must be confirm or override")
    previous = patch.reviews.filter(pathologist=pathologist).order_by("-id").first()
    read = _reads_of(case, pathologist, [patch.pk])[patch.pk]
    review = Review.objects.create(
        patch=patch,
        prediction=prediction,
        pathologist=pathologist,
        read=read,
        decision=decision,
        final_label=final_label,
        reason_code=reason_code if decision == Review.Decision.OVERRIDE else "",
        reason_text=reason_text,
    )
    audit_record(
        actor=pathologist,
        action=f"review.{decision}",
        target=review,
        institution_id=case.institution_id,
        before={"final_label": previous.final_label, "decision": previous.decision} if previous else None,
        after={
            "patch": patch.pk,
            "ai_label": prediction.label,
            "final_label": final_label,
            "decision": decision,
            "read": read,
        },
        reason=" ".join(filter(None, [reason_code, reason_text])),
        request=request,
    )
    return review


def review_submit(
    *,
    patch: TissuePatch,
    pathologist: User,
    decision: str,
    final_label: str = "",
    reason_code: str = "",
    reason_text: str = "",
    request=None,
) -> Review:
    """Confirm the AI's class of one patch, or override it with a class and a reason."""
    _require_pathologist(pathologist)
    with transaction.atomic():
        case = _locked_case(patch.case)
        if case.status == BiopsyCase.Status.SIGNED_OUT:
            raise CaseError("the case is signed out: add an addendum instead")
        review = _review(
            case=case,
            patch=patch,
            pathologist=pathologist,
            decision=decision,
            final_label=final_label,
            reason_code=reason_code,
            reason_text=reason_text,
            request=request,
        )
        cases_touch(case_ids=[case.pk])
        return review


def review_confirm_all(*, case: BiopsyCase, pathologist: User, request=None) -> list[Review]:
    """Confirm every analysed patch the pathologist has not reviewed yet (overrides stand).

    The case stays locked meanwhile: a few queries whatever the number of patches (the reviews
    written in one INSERT), and one audit event for the one decision.
    """
    _require_pathologist(pathologist)
    with transaction.atomic():
        case = _locked_case(case)
        if case.status == BiopsyCase.Status.SIGNED_OUT:
            raise CaseError("the case is signed out: add an addendum instead")
        newest_first = Prediction.objects.order_by("-id")
        pending = list(
            case.patches.filter(status=TissuePatch.Status.DONE)
            .exclude(reviews__pathologist=pathologist)
            .order_by("id")
            .prefetch_related(Prefetch("predictions", queryset=newest_first, to_attr="newest_first"))
        )
        if not pending:
            return []
        reads = _reads_of(case, pathologist, [patch.pk for patch in pending])
        reviews = []
        for patch in pending:
            prediction = next(iter(patch.newest_first), None)
            if prediction is None:
                raise CaseError(f"patch {patch.original_name} has no AI result to review")
            reviews.append(
                Review(
                    patch=patch,
                    prediction=prediction,
                    pathologist=pathologist,
                    read=reads[patch.pk],
                    decision=Review.Decision.CONFIRM,
                    final_label=prediction.label,
                )
            )
        Review.objects.bulk_create(reviews)
        cases_touch(case_ids=[case.pk])
        # One decision, one event: every patch it confirmed, with the AI's class it accepted.
        audit_record(
            actor=pathologist,
            action="review.confirm_all",
            target=case,
            after={
                "confirmed": {str(r.patch_id): r.final_label for r in reviews},
                "reviews": [r.pk for r in reviews],
            },
            request=request,
        )
        return reviews


def _case_reviews(case: BiopsyCase) -> list[Review]:
    """Every review of the case, oldest first."""
    return list(Review.objects.filter(patch__case=case).order_by("id"))


def _readers(reviews: list[Review]) -> dict[int, int]:
    """{pathologist id: their read (1 or 2)} of a case, from its reviews (adjudications left out)."""
    readers: dict[int, int] = {}
    for review in sorted(reviews, key=lambda r: r.pk):
        if review.read in (Review.Read.FIRST, Review.Read.SECOND):
            readers.setdefault(review.pathologist_id, review.read)
    return readers


def _reads_of(case: BiopsyCase, pathologist, patch_ids: list[int]) -> dict[int, int]:
    """{patch id: which read a new review of it by ``pathologist`` is}: the reader's own, the second
    one, or an adjudication. One query at most, whatever the number of patches."""
    if not case.second_read:
        return dict.fromkeys(patch_ids, Review.Read.FIRST)
    reviews = _case_reviews(case)
    disagreeing = disagreements(case, reviews=reviews)
    readers = _readers(reviews)

    def read_of(patch_id: int) -> int:
        if patch_id in disagreeing:
            return Review.Read.ADJUDICATION
        if pathologist.pk in readers:
            return readers[pathologist.pk]
        if not readers:
            return Review.Read.FIRST
        if len(readers) == 1:
            return Review.Read.SECOND
        raise NotAllowed("two pathologists are reading this case already; a third can only adjudicate disagreements")

    return {patch_id: read_of(patch_id) for patch_id in patch_ids}


def _latest_reads(reviews: list[Review]) -> dict[int, dict[int, Review]]:
    """{patch id: {read: that read's latest review}}."""
    reads: dict[int, dict[int, Review]] = {}
    for review in sorted(reviews, key=lambda r: r.pk):
        reads.setdefault(review.patch_id, {})[review.read] = review
    return reads


def disagreements(case: BiopsyCase, *, reviews: list[Review] | None = None) -> set[int]:
    """Patches whose first and second reads differ and are not adjudicated yet. ``reviews``: every
    review of the case, when the caller has them already (else they are read)."""
    if not case.second_read:
        return set()
    return {
        patch_id
        for patch_id, reads in _latest_reads(_case_reviews(case) if reviews is None else reviews).items()
        if {1, 2} <= set(reads) and reads[1].final_label != reads[2].final_label and 3 not in reads
    }


def final_labels(case: BiopsyCase, *, reviews: list[Review] | None = None) -> dict[int, str]:
    """{patch id: final class} for the patches whose review is complete: the latest review, or with
    a second read, the two reads' common class or the adjudication. ``reviews`` as for
    ``disagreements``."""
    labels: dict[int, str] = {}
    for patch_id, reads in _latest_reads(_case_reviews(case) if reviews is None else reviews).items():
        latest = max(reads.values(), key=lambda r: r.pk)
        if not case.second_read:
            labels[patch_id] = latest.final_label
        elif 3 in reads:
            labels[patch_id] = reads[3].final_label
        elif {1, 2} <= set(reads) and reads[1].final_label == reads[2].final_label:
            labels[patch_id] = reads[1].final_label
    return labels


def case_request_second_read(*, case: BiopsyCase, by: User, request=None) -> BiopsyCase:
    """Ask for a blind second read of a case not yet signed out."""
    if by.role not in {User.Role.PATHOLOGIST, User.Role.ADMIN}:
        raise NotAllowed("only a pathologist or an administrator can request a second read")
    with transaction.atomic():
        case = _locked_case(case)
        if case.status == BiopsyCase.Status.SIGNED_OUT:
            raise CaseError("the case is signed out")
        if not case.second_read:
            case.second_read = True
            case.save(update_fields=["second_read", "updated_at"])
            audit_record(
                actor=by,
                action="case.second_read",
                target=case,
                before={"second_read": False},
                after={"second_read": True},
                request=request,
            )
    return case


def case_sign_out(*, case: BiopsyCase, pathologist: User, conclusion: str, comment: str = "", request=None) -> SignOut:
    """Sign the case out with a conclusion. Every analysed patch must have been reviewed."""
    _require_pathologist(pathologist)
    if conclusion not in SignOut.Conclusion.values:
        raise CaseError(f"conclusion must be one of {', '.join(SignOut.Conclusion.values)}")
    with transaction.atomic():
        case = _locked_case(case)
        if case.status == BiopsyCase.Status.SIGNED_OUT:
            raise CaseError("the case is already signed out: add an addendum instead")
        if case.status != BiopsyCase.Status.READY_FOR_REVIEW:
            raise CaseError("the case is not ready for review yet")
        reviews = _case_reviews(case)
        labels = final_labels(case, reviews=reviews)
        unreviewed = case.patches.filter(status=TissuePatch.Status.DONE).exclude(pk__in=labels).count()
        if unreviewed and case.second_read:
            raise CaseError(
                f"{unreviewed} analysed patch(es) await a review, the second read or adjudication "
                f"({len(disagreements(case, reviews=reviews))} disagreement(s))"
            )
        if unreviewed:
            raise CaseError(f"{unreviewed} analysed patch(es) are not reviewed yet")
        fraction = (sum(label == "TUM" for label in labels.values()) / len(labels)) if labels else 0.0
        sign_out = SignOut.objects.create(
            case=case,
            pathologist=pathologist,
            conclusion=conclusion,
            tumour_fraction=round(fraction, 4),
            comment=comment,
        )
        case_transition(
            case_ids=[case.pk],
            to=BiopsyCase.Status.SIGNED_OUT,
            actor=pathologist,
            action="case.sign_out",
            after={"conclusion": conclusion, "tumour_fraction": sign_out.tumour_fraction},
            reason=comment,
            request=request,
        )
        from webhooks.models import WebhookEndpoint
        from webhooks.services import events_for_cases

        events_for_cases(case_ids=[case.pk], event=WebhookEndpoint.Event.CASE_SIGNED_OUT)
    return sign_out


def addendum_add(*, case: BiopsyCase, pathologist: User, text: str, reason: str, request=None) -> Addendum:
    """Add an addendum to a signed-out case; it never changes what was signed out."""
    _require_pathologist(pathologist)
    if not text.strip() or not reason.strip():
        raise CaseError("an addendum needs its text and a reason")
    with transaction.atomic():
        case = _locked_case(case)
        if case.status != BiopsyCase.Status.SIGNED_OUT:
            raise CaseError("addenda are for signed-out cases; review the patches instead")
        addendum = Addendum.objects.create(case=case, pathologist=pathologist, text=text.strip(), reason=reason.strip())
        cases_touch(case_ids=[case.pk])  # the report changed
        audit_record(
            actor=pathologist,
            action="case.addendum",
            target=addendum,
            institution_id=case.institution_id,
            after={"case": case.pk, "text": addendum.text},
            reason=addendum.reason,
            request=request,
        )
    return addendum


def case_assign(*, case: BiopsyCase, assignee: User, by: User, request=None) -> BiopsyCase:
    """Assign a case to a pathologist of its institution: themself, or anyone by an admin."""
    if assignee.role != User.Role.PATHOLOGIST or assignee.institution_id != case.institution_id:
        raise CaseError("cases are assigned to a pathologist of the same institution")
    if by.pk != assignee.pk and by.role != User.Role.ADMIN:
        raise NotAllowed("only an administrator can assign a case to someone else")
    with transaction.atomic():
        case = _locked_case(case)
        before = case.assigned_to_id
        case.assigned_to = assignee
        case.save(update_fields=["assigned_to", "updated_at"])
        audit_record(
            actor=by,
            action="case.assign",
            target=case,
            before={"assigned_to": before},
            after={"assigned_to": assignee.pk},
            request=request,
        )
    return case


def _blind(case: BiopsyCase) -> bool:
    return case.second_read and case.status != BiopsyCase.Status.SIGNED_OUT


def review_visible(*, case: BiopsyCase, reviews: list[Review], viewer) -> Review | None:
    """The review of one patch that ``viewer`` may see. During a blind second read only a decided
    label (both reads agree, or the adjudication) or the viewer's own read; never the other reader's."""
    if not reviews:
        return None
    reviews = sorted(reviews, key=lambda r: r.pk)
    if not _blind(case):
        return reviews[-1]
    reads = {review.read: review for review in reviews}
    if Review.Read.ADJUDICATION in reads:
        return reads[Review.Read.ADJUDICATION]
    first, second = reads.get(Review.Read.FIRST), reads.get(Review.Read.SECOND)
    if first and second and first.final_label == second.final_label:
        return max(first, second, key=lambda r: r.pk)
    own = [r for r in reviews if isinstance(viewer, User) and r.pathologist_id == viewer.pk]
    return own[-1] if own else None


def history_visible(*, case: BiopsyCase, events: list, viewer) -> list:
    """The case history as ``viewer`` may see it: during a blind second read the other reader's
    review events keep who and when but not what they decided."""
    if not _blind(case):
        return events
    for event in events:
        if event.action.startswith("review.") and event.actor_id != str(getattr(viewer, "pk", "")):
            event.before, event.after, event.reason = None, {"hidden": "blind second read"}, ""
    return events
