"""Shadow evaluation before activation: a candidate worse on the reviewed patches is refused
unless forced with a reason, and the figures are audited."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from audit.models import AuditEvent
from cases.review import review_confirm_all
from cases.services import patch_upload
from inference import services
from inference.models import ModelVersion
from tests.conftest import DEMO_MODEL, fixture_patch, make_user, new_case

pytestmark = pytest.mark.django_db


@pytest.fixture
def reviewed_case(institution, clinician, demo_model):
    case = new_case(clinician)
    names = ["TUM-TCGA-KECNIDCQ.png", "NORM-TCGA-INTLNRAV.png", "TUM-AACHEHDV.tif", "NORM-AAAWMSFI.tif"]
    patches = patch_upload(case=case, uploaded_by=clinician, files=[(n, fixture_patch(n).read_bytes()) for n in names])
    services.prediction_run(patch_ids=[p.pk for p in patches.patches])
    review_confirm_all(case=case, pathologist=make_user(institution, User.Role.PATHOLOGIST))
    return case


def _worse_candidate(tmp_path):
    """The demo network with NORM and TUM swapped in its class list: deliberately wrong."""
    target = tmp_path / "swapped"
    shutil.copytree(DEMO_MODEL, target)
    meta = json.loads((target / "metadata.json").read_text())
    classes = meta["classes"]
    i, j = classes.index("NORM"), classes.index("TUM")
    classes[i], classes[j] = classes[j], classes[i]
    meta.update(version="swapped", classes=classes)
    (target / "metadata.json").write_text(json.dumps(meta))
    return target


def test_worse_candidate_is_refused_then_allowed_with_force_and_reason(reviewed_case, demo_model, tmp_path):
    candidate, _ = services.model_register(directory=_worse_candidate(tmp_path))
    shadow = services.shadow_evaluate(candidate=candidate, baseline=demo_model)
    assert shadow["patches"] == 4
    assert shadow["active"]["accuracy"] == 1.0 and shadow["candidate"]["accuracy"] == 0.0

    with pytest.raises(CommandError, match="worse than the active"):
        call_command("activate_model", f"{candidate.name}:swapped")
    with pytest.raises(CommandError, match="needs a reason"):
        call_command("activate_model", f"{candidate.name}:swapped", force=True)
    assert ModelVersion.objects.get(is_active=True) == demo_model

    call_command(
        "activate_model", f"{candidate.name}:swapped", force=True, reason="urgent rollback test", stdout=io.StringIO()
    )
    assert ModelVersion.objects.get(is_active=True) == candidate
    event = AuditEvent.objects.filter(action="model.activate").last()
    assert event.after["forced"] is True and event.reason == "urgent rollback test"
    assert event.after["shadow_evaluation"]["candidate"]["accuracy"] == 0.0


def test_equal_candidate_activates_without_force(reviewed_case, demo_model, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(DEMO_MODEL, same)
    meta = json.loads((same / "metadata.json").read_text())
    meta["version"] = "same"
    (same / "metadata.json").write_text(json.dumps(meta))
    candidate, _ = services.model_register(directory=same)
    services.model_activate(version=candidate, actor="test")
    assert ModelVersion.objects.get(is_active=True) == candidate
    event = AuditEvent.objects.filter(action="model.activate").last()
    assert event.after["shadow_evaluation"]["candidate"]["accuracy"] == 1.0 and event.after["forced"] is False
