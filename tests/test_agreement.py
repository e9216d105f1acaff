"""The AI-vs-pathologist dashboard, against hand-computed figures."""

from __future__ import annotations

import pytest

from accounts.models import User
from cases.review import review_submit
from cases.selectors import agreement_stats
from cases.services import patch_upload
from inference import services
from tests.conftest import fixture_patch, make_user, new_case, verified_login

pytestmark = pytest.mark.django_db


@pytest.fixture
def reviews(institution, clinician, demo_model):
    case = new_case(clinician)
    names = ["TUM-TCGA-KECNIDCQ.png", "NORM-TCGA-INTLNRAV.png", "NORM-AAAWMSFI.tif", "TUM-AACHEHDV.tif"]
    patches = patch_upload(case=case, uploaded_by=clinician, files=[(n, fixture_patch(n).read_bytes()) for n in names])
    patches = patches.patches
    services.prediction_run(patch_ids=[p.pk for p in patches])
    reader = make_user(institution, User.Role.PATHOLOGIST, username="reader")
    tum, norm, norm2, tum2 = patches  # the demo model says TUM, NORM, NORM, TUM
    review_submit(patch=tum, pathologist=reader, decision="confirm")
    review_submit(patch=norm, pathologist=reader, decision="confirm")
    review_submit(patch=norm2, pathologist=reader, decision="override", final_label="MUC", reason_code="wrong_class")
    review_submit(patch=tum2, pathologist=reader, decision="confirm")
    # A change of mind: the latest review of a patch is the one that counts.
    review_submit(patch=tum2, pathologist=reader, decision="override", final_label="STR", reason_code="wrong_class")
    return demo_model


def test_agreement_figures_match_hand_computed_values(reviews, institution):
    stats = agreement_stats(institution=institution)
    # Latest reviews: TUM->TUM, NORM->NORM, NORM->MUC, TUM->STR: 2 of 4 agree.
    assert stats["reviews"] == 4 and stats["agreement"] == 0.5
    assert stats["confusion"] == {"TUM": {"TUM": 1, "STR": 1}, "NORM": {"NORM": 1, "MUC": 1}}
    assert stats["classes"] == ["MUC", "NORM", "STR", "TUM"]
    assert stats["per_version"] == {str(reviews): {"reviews": 4, "agreement": 0.5}}
    assert [(n, a) for _, n, a in stats["per_week"]] == [(4, 0.5)]


def test_dashboard_is_for_administrators(reviews, institution, client, pathologist):
    verified_login(client, pathologist)
    assert client.get("/cases/agreement/").status_code == 403
    verified_login(client, make_user(institution, User.Role.ADMIN))
    page = client.get("/cases/agreement/").content.decode()
    assert "50% agreement" in page and 'id="reviews">4<' in page
    assert "<th>NORM</th><td>1</td><td>1</td><td>0</td><td>0</td>" in page.replace("\n", "")
    chart = client.get("/cases/agreement/chart.png")
    assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG"
