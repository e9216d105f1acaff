"""The pathologist worklist: ordering checked against a hand-computed order, filters, counts,
assignment."""

from __future__ import annotations

import pytest

from accounts.models import User
from audit.models import AuditEvent
from cases.models import BiopsyCase, TissuePatch
from cases.review import NotAllowed, case_assign
from cases.selectors import case_counts, worklist
from cases.services import CaseError, patch_upload
from inference.models import Prediction
from tests.conftest import fixture_patch, make_user, new_case, verified_login

pytestmark = pytest.mark.django_db


def _case(clinician, model, accession, priority, results):
    """A ready case whose patches have predictions with the given (label, uncertainty)."""
    case = new_case(clinician, accession=accession, mrn=accession)
    BiopsyCase.objects.filter(pk=case.pk).update(priority=priority)
    files = [(f"{i}.png", fixture_patch("TUM-TCGA-KECNIDCQ.png").read_bytes()) for i in range(len(results))]
    for patch, (label, uncertainty) in zip(
        patch_upload(case=case, uploaded_by=clinician, files=files).patches, results, strict=True
    ):
        Prediction.objects.create(
            patch=patch, model_version=model, scores={label: 1.0}, label=label, uncertainty=uncertainty,
            needs_attention=uncertainty > 0.6, inference_seconds=0.001,
        )  # fmt: skip
    TissuePatch.objects.filter(case=case).update(status=TissuePatch.Status.DONE)
    BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.READY_FOR_REVIEW)
    return case


@pytest.fixture
def cases(clinician, demo_model):
    return {
        "A": _case(clinician, demo_model, "A", "routine", [("NORM", 0.2), ("NORM", 0.1)]),
        "B": _case(clinician, demo_model, "B", "urgent", [("NORM", 0.1)]),
        "C": _case(clinician, demo_model, "C", "routine", [("TUM", 0.9), ("NORM", 0.3)]),
        "D": _case(clinician, demo_model, "D", "routine", [("TUM", 0.2), ("TUM", 0.15)]),
        "E": _case(clinician, demo_model, "E", "urgent", [("NORM", 0.5)]),
    }


def test_worklist_order_matches_the_hand_computed_one(cases, pathologist):
    # Urgent first (E: uncertainty 0.5, then B: 0.1); then routine by the most uncertain patch
    # (C: 0.9); A and D tie at 0.2, and D has more suspected tumour (2 against 0).
    ordered = [c.accession for c in worklist(principal=pathologist)]
    assert ordered == ["E", "B", "C", "D", "A"]
    first = worklist(principal=pathologist)[2]
    assert (first.ai_max_uncertainty, first.ai_tumour_patches, first.ai_attention) == (0.9, 1, 1)


def test_worklist_filters_and_counts(cases, pathologist, client):
    assert [c.accession for c in worklist(principal=pathologist, priority="urgent")] == ["E", "B"]
    BiopsyCase.objects.filter(accession="A").update(specimen_site="caecum", status=BiopsyCase.Status.SIGNED_OUT)
    assert [c.accession for c in worklist(principal=pathologist, site="caec", status="")] == ["A"]
    assert case_counts(principal=pathologist) == {
        "open": 0, "analysing": 0, "ready_for_review": 4, "signed_out": 1,
    }  # fmt: skip
    verified_login(client, pathologist)
    page = client.get("/cases/worklist/").content.decode()
    rows = [page.index(f">{a}</a>") for a in ("E", "B", "C", "D")]
    assert rows == sorted(rows) and ">A</a>" not in page


def test_self_assignment_and_admin_assignment(cases, pathologist, clinician, institution):
    case = cases["C"]
    case_assign(case=case, assignee=pathologist, by=pathologist)
    admin = make_user(institution, User.Role.ADMIN)
    other = make_user(institution, User.Role.PATHOLOGIST, username="second-pathologist")
    case_assign(case=case, assignee=other, by=admin)
    case.refresh_from_db()
    assert case.assigned_to == other
    assert [e.after for e in AuditEvent.objects.filter(action="case.assign").order_by("id")] == [
        {"assigned_to": pathologist.pk}, {"assigned_to": other.pk},
    ]  # fmt: skip
    with pytest.raises(NotAllowed):
        case_assign(case=case, assignee=pathologist, by=other)
    with pytest.raises(CaseError):
        case_assign(case=case, assignee=clinician, by=clinician)
