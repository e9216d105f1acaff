"""Slides taken from a scanner's import folder: registered like uploads, set aside once taken,
refused with a reason when they cannot be, never deleted."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from audit.models import AuditEvent
from slides.imports import slides_import
from slides.models import Slide

FIXTURE = Path(__file__).parent / "fixtures" / "slides" / "mosaic-small.tiff"


def _drop(root: Path, institution: str, accession: str, name: str, data: bytes | None = None, age: float = 120):
    folder = root / institution / accession
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if data is None:
        shutil.copy(FIXTURE, path)
    else:
        path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_settled_slide_is_registered_and_set_aside(case, institution, tmp_path, settings):
    root = tmp_path / "scanner"
    settings.SLIDE_IMPORT_DIR = str(root)
    path = _drop(root, institution.slug, case.accession, "A1.svs")
    fresh = _drop(root, institution.slug, case.accession, "A2.svs", age=0)  # still being written
    report = slides_import()
    assert [name for name, _ in report.imported] == [f"{institution.slug}/{case.accession}/A1.svs"]
    assert report.waiting == [f"{institution.slug}/{case.accession}/A2.svs"]
    slide = Slide.objects.get()
    assert slide.case == case and slide.status == Slide.Status.QUEUED and slide.original_name == "A1.svs"
    assert not path.exists() and fresh.exists()
    assert (root / "imported" / institution.slug / case.accession / "A1.svs").exists()
    event = AuditEvent.objects.get(action="slide.create")
    assert event.target_id == str(slide.pk)
    assert slides_import().imported == []  # taken once


@pytest.mark.parametrize(
    ("where", "name", "data", "reason"),
    [
        ("nosuch", "S1", None, "no institution"),
        ("INSTITUTION", "NO-SUCH-CASE", None, "no case"),
        ("INSTITUTION", "CASE", b"not a slide at all" * 10, "not"),
        ("INSTITUTION", "CASE", None, "is not a slide format"),
    ],
    ids=["unknown-institution", "unknown-case", "not-a-slide", "wrong-extension"],
)
def test_file_that_cannot_be_imported_is_set_aside_with_its_reason(
    case, institution, tmp_path, where, name, data, reason
):
    root = tmp_path / "scanner"
    slug = institution.slug if where == "INSTITUTION" else where
    accession = case.accession if name == "CASE" else name
    filename = "scan.png" if reason == "is not a slide format" else "scan.svs"
    _drop(root, slug, accession, filename, data)
    report = slides_import(root=root)
    assert len(report.rejected) == 1 and reason in report.rejected[0][1]
    kept = root / "rejected" / slug / accession / filename
    assert kept.exists() and reason in kept.with_name(filename + ".reason.txt").read_text()
    assert not Slide.objects.exists()


def test_command_reports_what_it_did_and_needs_a_folder(case, institution, tmp_path, settings):
    settings.SLIDE_IMPORT_DIR = ""
    with pytest.raises(CommandError, match="no import folder"):
        call_command("import_slides", stdout=io.StringIO())
    root = tmp_path / "scanner"
    _drop(root, institution.slug, case.accession, "A1.svs")
    out = io.StringIO()
    call_command("import_slides", "--folder", str(root), stdout=out)
    assert f"imported {institution.slug}/{case.accession}/A1.svs: slide" in out.getvalue()
    with pytest.raises(CommandError, match="does not exist"):
        call_command("import_slides", "--folder", str(tmp_path / "absent"), stdout=io.StringIO())
