"""The page to upload a slide to a case. It is a page of its own, not part of the case page, which
reloads itself while patches are analysed and would cut an upload short."""

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from audit.services import patient_read
from cases.models import BiopsyCase
from cases.selectors import cases_visible_to
from cases.views import patient_data_required
from slides.services import SLIDE_EXTENSIONS


@login_required
@patient_data_required
def case_slide_upload(request, pk: int):
    case = cases_visible_to(principal=request.user).filter(pk=pk).first()
    if case is None:
        raise Http404("No such case.")
    patient_read(
        principal=request.user, patients=[case.patient], via="web slide upload page", request=request, case=case
    )
    return render(
        request,
        "slides/upload_page.html",
        {
            "case": case,
            "signed_out": case.status == BiopsyCase.Status.SIGNED_OUT,
            "extensions": ",".join(SLIDE_EXTENSIONS),
        },
    )
