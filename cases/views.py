"""Server-rendered staff pages. Thin: reads via selectors, writes via services."""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.files.storage import default_storage
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.dateparse import parse_date
from django.views.decorators.http import require_POST
from PIL import Image

from accounts.models import User
from accounts.permissions import NO_PATIENT_DATA, institution_of, sees_patient_data
from audit.services import case_history, patient_read
from cases.forms import CaseForm, PatientLookupForm
from cases.models import BiopsyCase, Patient, Review, SignOut, TissuePatch
from cases.review import (
    NotAllowed,
    addendum_add,
    case_assign,
    case_request_second_read,
    case_sign_out,
    disagreements,
    final_labels,
    history_visible,
    review_confirm_all,
    review_submit,
)
from cases.selectors import (
    agreement_stats,
    case_counts,
    case_with_results,
    cases_visible_to,
    patients_visible_to,
    with_ai_summary,
    worklist,
)
from cases.services import CaseError, NoValidImage, PatientData, StorageUnavailable, case_create, patch_upload
from cases.uploads import read_uploads
from cloudiopsy.charts import figure_response
from inference.core.explain import render_heatmap
from inference.core.preprocessing import decode_rgb
from slides.selectors import slides_of_case

THUMBNAIL_SIDE = 224


def patient_data_required(view):
    """For the pages of patients and cases: a lab manager gets a 403 that says where to go."""

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not sees_patient_data(request.user):
            raise PermissionDenied(NO_PATIENT_DATA)
        return view(request, *args, **kwargs)

    return wrapped


def _visible_case(request, pk: int, *, with_results: bool = True) -> BiopsyCase:
    """The case for its page (``with_results``: its patches, their predictions and reviews
    prefetched), or for an action that reads nothing more of it."""
    try:
        if not with_results:
            return cases_visible_to(principal=request.user).get(pk=pk)
        return case_with_results(principal=request.user, case_id=pk)
    except BiopsyCase.DoesNotExist:
        # Another institution's case is "not found", never "forbidden": no hint that it exists.
        raise Http404("No such case.") from None


@login_required
@patient_data_required
def case_list(request):
    cases = with_ai_summary(cases_visible_to(principal=request.user)).order_by("-created_at", "-id")
    status = request.GET.get("status", "")
    if status in BiopsyCase.Status.values:
        cases = cases.filter(status=status)
    shown = list(cases[:200])
    patient_read(principal=request.user, patients=[c.patient for c in shown], via="web case list", request=request)
    return render(
        request, "cases/case_list.html", {"cases": shown, "status": status, "statuses": BiopsyCase.Status.choices}
    )


def _patient_lookup(request):
    """The "Look up" step of the new-case form: the patient with exactly this MRN in the user's
    institution, shown (and its reading audited), or word that there is none. Nothing is created;
    what was typed in the other fields is kept."""
    lookup = PatientLookupForm(request.POST)
    typed = {name: request.POST[name] for name in CaseForm.base_fields if name in request.POST}
    context = {"form": CaseForm(initial=typed), "lookup": lookup, "found": None, "looked_up": False}
    if lookup.is_valid():
        found = patients_visible_to(principal=request.user).filter(mrn=lookup.cleaned_data["patient_mrn"]).first()
        if found is not None:
            patient_read(principal=request.user, patients=[found], via="case_form_lookup", request=request)
        context.update(found=found, looked_up=True)
    return render(request, "cases/case_form.html", context, status=200 if lookup.is_valid() else 400)


@login_required
@patient_data_required
def case_create_view(request):
    institution = institution_of(request.user)
    if institution is None:
        messages.error(request, "Your account belongs to no institution; ask an administrator.")
        return redirect("cases:list")
    if request.method == "POST" and "lookup" in request.POST:
        return _patient_lookup(request)
    form = CaseForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            case = case_create(
                institution=institution,
                created_by=request.user,
                patient=PatientData(
                    mrn=data["patient_mrn"].strip(),
                    name=data["patient_name"].strip(),
                    birth_date=data["patient_birth_date"],
                    sex=data["patient_sex"] or Patient.Sex.UNKNOWN,
                ),
                accession=data["accession"],
                specimen_site=data["specimen_site"],
                priority=data["priority"],
                clinical_notes=data["clinical_notes"],
            )
        except CaseError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Case {case.accession} created. Upload its tissue patches below.")
            return redirect("cases:detail", pk=case.pk)
    # No list of the institution's patients: an existing patient is found by exact MRN only.
    return render(request, "cases/case_form.html", {"form": form}, status=400 if form.errors else 200)


@login_required
@patient_data_required
def case_detail(request, pk: int):
    case = _visible_case(request, pk)
    patient_read(principal=request.user, patients=[case.patient], via="web case page", request=request, case=case)
    return _render_case(request, case)


@dataclass(frozen=True)
class TumourJudgement:
    """How a prediction reads against the operating point stored with it, for the case page."""

    score: str  # TUM probability, with as many decimals as it takes to tell it from the threshold
    threshold: str
    suspected: bool
    validated: bool
    validation_date: datetime.datetime | None  # when the site validation that set the threshold was made


def _decimals(a: float, b: float) -> int:
    """The fewest decimals (2 to 6) at which ``a`` and ``b`` print differently, if they differ."""
    for digits in range(2, 7):
        if round(a, digits) != round(b, digits):
            return digits
    return 6


def tumour_judgement(prediction) -> TumourJudgement | None:
    """None for a model without a TUM class, or a prediction stored before operating points."""
    score = (prediction.scores or {}).get("TUM")
    if score is None or prediction.tumour_threshold is None or prediction.suspected_tumour is None:
        return None
    digits = _decimals(score, prediction.tumour_threshold)
    validation = prediction.site_validation
    return TumourJudgement(
        score=f"{score:.{digits}f}",
        threshold=f"{prediction.tumour_threshold:.{digits}f}",
        suspected=prediction.suspected_tumour,
        validated=validation is not None,
        validation_date=validation.created_at if validation is not None else None,
    )


def _render_case(
    request, case: BiopsyCase, upload_errors: list[str] | None = None, action_errors=None, status: int | None = None
):
    patches = list(case.patches.all())
    # Every review of the case, from the prefetch (with its pathologist): read once for all below.
    reviews = sorted((r for p in patches for r in p.reviews.all()), key=lambda r: r.pk)
    labels_by_patch = final_labels(case, reviews=reviews)
    if case.second_read:
        # Blind: each reader sees only their own reviews until the reads are compared.
        mine = {r.patch_id: r for r in reviews if r.pathologist_id == request.user.pk}
    else:
        mine = {r.patch_id: r for r in reviews}
    disagreeing = disagreements(case, reviews=reviews)
    reads_by_patch: dict[int, list] = {}
    for review in reviews:
        reads_by_patch.setdefault(review.patch_id, []).append(review)
    history = history_visible(
        case=case, events=case_history(case=case, patch_ids=[p.pk for p in patches]), viewer=request.user
    )
    for patch in patches:
        patch.latest_prediction = next(iter(patch.predictions.all()), None)
        patch.review = mine.get(patch.pk)
        patch.final_label = labels_by_patch.get(patch.pk)
        patch.disagreement = patch.pk in disagreeing
        patch.reads = reads_by_patch.get(patch.pk, []) if patch.disagreement else []
        if patch.latest_prediction:
            patch.sorted_scores = sorted(patch.latest_prediction.scores.items(), key=lambda kv: -kv[1])
            patch.tumour = tumour_judgement(patch.latest_prediction)
    pending = any(p.status in TissuePatch.PENDING for p in patches)
    any_heatmap = any(p.latest_prediction and p.latest_prediction.heatmaps for p in patches)
    not_validated = sum(1 for p in patches if p.latest_prediction and not p.latest_prediction.validated_at_site)
    return render(
        request,
        "cases/case_detail.html",
        {
            "case": case,
            "patches": patches,
            "slides": slides_of_case(case=case),
            "pending": pending and not upload_errors,
            "upload_errors": upload_errors,
            "any_heatmap": any_heatmap,
            "not_validated": not_validated,
            "history": history,
            "action_errors": action_errors,
            "can_review": getattr(request.user, "role", None) == "pathologist",
            "sign_out": getattr(case, "sign_out", None),
            "addenda": list(case.addenda.all()),
            "conclusions": SignOut.Conclusion.choices,
            "reasons": Review.Reason.choices,
            "unreviewed": sum(1 for p in patches if p.latest_prediction and p.pk not in labels_by_patch),
            "my_unreviewed": sum(1 for p in patches if p.latest_prediction and p.pk not in mine),
            "disagreements": len(disagreeing),
        },
        status=status or (400 if upload_errors else 200),
    )


@login_required
@patient_data_required
@require_POST
def case_upload(request, pk: int):
    case = _visible_case(request, pk)
    files, refused = read_uploads(request.FILES.getlist("image"))
    try:
        result = patch_upload(case=case, uploaded_by=request.user, files=files, rejected=refused)
    except NoValidImage as exc:
        errors = [f"{name}: {reason}" for name, reason in exc.rejected] or [str(exc)]
        return _render_case(request, case, upload_errors=["Nothing was uploaded.", *errors])
    except StorageUnavailable as exc:
        return _render_case(request, case, upload_errors=[str(exc)], status=exc.status_code)
    except CaseError as exc:
        return _render_case(request, case, upload_errors=[str(exc)])
    messages.success(request, f"{len(result.patches)} patch(es) uploaded and queued for analysis.")
    for name, reason in result.rejected:
        messages.error(request, f"{name}: {reason}")
    return redirect("cases:detail", pk=case.pk)


def _visible_patch(request, pk: int, patch_id: int) -> TissuePatch:
    case = cases_visible_to(principal=request.user).filter(pk=pk).first()
    patch = TissuePatch.objects.filter(case=case, pk=patch_id).first() if case else None
    if patch is None:
        raise Http404("No such patch.")
    return patch


def _png_response(image: Image.Image) -> HttpResponse:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    response = HttpResponse(buffer.getvalue(), content_type="image/png")
    response["Cache-Control"] = "private, no-store"  # patient data: kept by no cache
    return response


@login_required
@patient_data_required
def patch_image(request, pk: int, patch_id: int):
    """The patch as a PNG of at most THUMBNAIL_SIDE px, to users of the case's institution only
    (never a public media URL)."""
    patch = _visible_patch(request, pk, patch_id)
    with default_storage.open(patch.storage_name, "rb") as handle:
        image = decode_rgb(handle.read())
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return _png_response(image)


@login_required
@patient_data_required
def patch_heatmap(request, pk: int, patch_id: int, label: str):
    """The heatmap overlay of the patch's latest prediction for one class (the predicted one or TUM)."""
    patch = _visible_patch(request, pk, patch_id)
    prediction = patch.predictions.order_by("-id").first()
    grid = (prediction.heatmaps or {}).get(label) if prediction else None
    if grid is None:
        raise Http404("No heatmap for this class.")
    return _png_response(render_heatmap(grid, THUMBNAIL_SIDE))


def _act(request, pk: int, action) -> HttpResponse:
    """Run a review action for the case page; errors come back on the page with a 4xx. The action
    reads what it needs itself: the page's patches and results are read only to show an error."""
    case = _visible_case(request, pk, with_results=False)
    try:
        message = action(case)
    except NotAllowed as exc:
        return _render_case(request, _visible_case(request, pk), action_errors=[str(exc)], status=403)
    except CaseError as exc:
        return _render_case(request, _visible_case(request, pk), action_errors=[str(exc)], status=400)
    messages.success(request, message)
    return redirect("cases:detail", pk=case.pk)


@login_required
@patient_data_required
@require_POST
def patch_review(request, pk: int, patch_id: int):
    def action(case):
        patch = get_object_or_404(TissuePatch, case=case, pk=patch_id)
        review = review_submit(
            patch=patch,
            pathologist=request.user,
            decision=request.POST.get("decision", ""),
            final_label=request.POST.get("final_label", ""),
            reason_code=request.POST.get("reason_code", ""),
            reason_text=request.POST.get("reason_text", "").strip(),
            request=request,
        )
        return f"{patch.original_name}: {review.get_decision_display().lower()}ed as {review.final_label}."

    return _act(request, pk, action)


@login_required
@patient_data_required
@require_POST
def case_confirm_all(request, pk: int):
    def action(case):
        reviews = review_confirm_all(case=case, pathologist=request.user, request=request)
        return f"Confirmed {len(reviews)} patch(es); your overrides stand."

    return _act(request, pk, action)


@login_required
@patient_data_required
@require_POST
def case_sign_out_view(request, pk: int):
    def action(case):
        sign_out = case_sign_out(
            case=case,
            pathologist=request.user,
            conclusion=request.POST.get("conclusion", ""),
            comment=request.POST.get("comment", "").strip(),
            request=request,
        )
        return f"Case signed out: {sign_out.get_conclusion_display()}."

    return _act(request, pk, action)


@login_required
@patient_data_required
@require_POST
def case_addendum(request, pk: int):
    def action(case):
        addendum_add(
            case=case,
            pathologist=request.user,
            text=request.POST.get("text", ""),
            reason=request.POST.get("reason", ""),
            request=request,
        )
        return "Addendum added."

    return _act(request, pk, action)


@login_required
@patient_data_required
def case_worklist(request):
    """The review worklist: urgent first, then the least certain AI results, then suspected tumour
    (as judged by the operating point stored with each prediction)."""
    params = request.GET
    status = params.get("status", BiopsyCase.Status.READY_FOR_REVIEW)
    status = status if status in BiopsyCase.Status.values or status == "" else BiopsyCase.Status.READY_FOR_REVIEW
    try:
        since = parse_date(params.get("since", "")) if params.get("since") else None
    except ValueError:  # well-formed but impossible, e.g. 2026-02-31
        since = None
    if params.get("since") and since is None:
        messages.error(request, f"'{params['since']}' is not a date (YYYY-MM-DD): the date filter is not applied.")
    cases = worklist(
        principal=request.user,
        status=status,
        priority=params.get("priority", "") if params.get("priority") in BiopsyCase.Priority.values else "",
        site=params.get("site", "").strip(),
        since=since,
    )[:200]
    shown = list(cases)
    patient_read(principal=request.user, patients=[c.patient for c in shown], via="web worklist", request=request)
    return render(
        request,
        "cases/worklist.html",
        {
            "cases": shown,
            "counts": case_counts(principal=request.user),
            "statuses": BiopsyCase.Status.choices,
            "priorities": BiopsyCase.Priority.choices,
            "status": status,
            "params": params,
            "pathologists": User.objects.filter(institution=institution_of(request.user), role=User.Role.PATHOLOGIST),
        },
    )


@login_required
@patient_data_required
@require_POST
def case_assign_view(request, pk: int):
    def action(case):
        assignee_id = str(request.POST.get("assignee") or request.user.pk)
        assignee = (
            User.objects.filter(pk=int(assignee_id), institution_id=case.institution_id).first()
            if assignee_id.isdigit()
            else None
        )
        if assignee is None:
            raise CaseError("no such pathologist in this institution")
        case_assign(case=case, assignee=assignee, by=request.user, request=request)
        return f"Case {case.accession} assigned to {assignee.get_username()}."

    response = _act(request, pk, action)
    if response.status_code == 302 and request.POST.get("next") == "worklist":
        return redirect("cases:worklist")
    return response


def _require_admin(request) -> None:
    if getattr(request.user, "role", None) != User.Role.ADMIN and not request.user.is_superuser:
        raise PermissionDenied("Only administrators see the agreement dashboard.")


@login_required
def agreement(request):
    """Admin dashboard: how often pathologists agree with the AI, by class, model and week."""
    _require_admin(request)
    stats = agreement_stats(institution=institution_of(request.user))
    rows = [
        (ai, [stats["confusion"].get(ai, {}).get(final, 0) for final in stats["classes"]]) for ai in stats["classes"]
    ]
    return render(request, "cases/agreement.html", {"stats": stats, "rows": rows})


@login_required
def agreement_chart(request):
    """Weekly agreement as a server-rendered PNG chart (matplotlib; no CDN, no script)."""
    _require_admin(request)
    from matplotlib.figure import Figure  # drawn off-screen: no pyplot, no global backend

    weeks = agreement_stats(institution=institution_of(request.user))["per_week"]
    if not weeks:
        # The page says "No reviews yet" instead of an empty chart (whose axis ran from -0.04 to 0.04).
        raise Http404("No reviews to chart.")
    figure = Figure(figsize=(7, 3), dpi=100)
    axes = figure.subplots()
    axes.bar([w for w, _, _ in weeks], [100 * (a or 0) for _, _, a in weeks], color="#7a1f5c")
    axes.set_ylim(0, 100)
    axes.set_ylabel("agreement (%)")
    axes.set_title("AI vs pathologist, per week (latest review per patch)")
    for index, (_, n, a) in enumerate(weeks):
        axes.annotate(f"n={n}", (index, 100 * (a or 0)), ha="center", va="bottom", fontsize=8)
    return figure_response(figure)


@login_required
@patient_data_required
@require_POST
def case_second_read(request, pk: int):
    def action(case):
        case_request_second_read(case=case, by=request.user, request=request)
        return "Second read requested: another pathologist reviews blind; disagreements are adjudicated."

    return _act(request, pk, action)
