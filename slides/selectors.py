"""Reads of slides for the web pages: what a user may see, and a slide with what its page shows."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import QuerySet

from accounts.permissions import institution_of, sees_patient_data
from cases.models import BiopsyCase
from inference.models import SiteValidation
from slides.models import Slide, SlideRegion


def slides_visible_to(*, user) -> QuerySet[Slide]:
    """Slides of the user's (or lab system's) institution; none without one, and none for a role
    that sees no patient data (lab managers)."""
    institution = institution_of(user)
    if institution is None or not sees_patient_data(user):
        return Slide.objects.none()
    return Slide.objects.filter(case__institution=institution).select_related("case")


def slide_for_viewer(*, user, slide_id: int) -> Slide:
    """One visible slide with its model version and its regions (``slide.region_list``, rank
    order, each with its patch); DoesNotExist (-> 404) otherwise."""
    slide = slides_visible_to(user=user).select_related("model_version", "site_validation").get(pk=slide_id)
    slide.region_list = list(SlideRegion.objects.filter(slide=slide).select_related("patch").order_by("rank"))
    return slide


def slides_of_case(*, case: BiopsyCase) -> list[Slide]:
    """A case's slides for its page, oldest first (the caller has checked the case is visible)."""
    return list(Slide.objects.filter(case=case).order_by("id"))


@dataclass(frozen=True)
class SlideJudgement:
    """How a finished slide was judged: the TUM threshold it was judged by and whether a passing
    validation of its model at its institution had set it (else the model's default applied)."""

    threshold: float
    validated: bool
    validation: SiteValidation | None


def slide_judgement(*, slide: Slide) -> SlideJudgement | None:
    """None until the slide has a slide-level result; else the threshold and the site validation
    it was judged by, as the finish recorded them."""
    if slide.tumour_threshold is None or slide.suspected_tumour is None:
        return None
    validation = slide.site_validation
    return SlideJudgement(threshold=slide.tumour_threshold, validated=validation is not None, validation=validation)
