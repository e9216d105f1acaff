"""Slides a scanner writes to a shared folder, registered without an upload.

Layout of SLIDE_IMPORT_DIR (the scanner, or a script on its share, puts each slide in the folder of
its institution and case)::

    <institution slug>/<case accession>/<slide file>      e.g. stmarys/S26-0412/S26-0412-A1.svs

A file is taken once it has not changed for SLIDE_IMPORT_SETTLE_SECONDS (the scanner has finished
writing it). It is checked and stored exactly as an uploaded slide (``slide_register``: the same
checks, the same audit event, queued for analysis), then moved to ``imported/`` beside its case's
folders; a file that cannot be a slide, or names an institution or case that does not exist, is
moved to ``rejected/`` with a ``.reason.txt`` next to it. Nothing is ever deleted.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from accounts.models import Institution
from cases.models import BiopsyCase
from cases.services import CaseError
from slides.services import SLIDE_EXTENSIONS, slide_register

logger = logging.getLogger(__name__)

DONE_DIRS = ("imported", "rejected")


@dataclass
class ImportReport:
    imported: list[tuple[str, int]] = field(default_factory=list)  # (file, slide id)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    waiting: list[str] = field(default_factory=list)  # still being written


def _candidates(root: Path) -> list[Path]:
    found = []
    for institution_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in DONE_DIRS):
        for case_dir in sorted(p for p in institution_dir.iterdir() if p.is_dir()):
            found += sorted(p for p in case_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    return found


def _set_aside(root: Path, path: Path, where: str, reason: str = "") -> Path:
    target_dir = root / where / path.parent.parent.name / path.parent.name
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    if target.exists():  # the same name again: keep both
        target = target_dir / f"{path.stem}-{int(time.time())}{path.suffix}"
    shutil.move(str(path), target)
    if reason:
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
    return target


def slides_import(*, root: Path | None = None, settle_seconds: float | None = None) -> ImportReport:
    """Register every settled slide file under ``root`` (default SLIDE_IMPORT_DIR)."""
    if not (root or settings.SLIDE_IMPORT_DIR):
        raise CaseError("no slide import folder: set SLIDE_IMPORT_DIR")
    root = Path(root or settings.SLIDE_IMPORT_DIR)
    settle = settings.SLIDE_IMPORT_SETTLE_SECONDS if settle_seconds is None else settle_seconds
    report = ImportReport()
    if not root.is_dir():
        raise CaseError(f"the slide import folder {root} does not exist")
    for path in _candidates(root):
        name = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
        if time.time() - path.stat().st_mtime < settle:
            report.waiting.append(name)
            continue
        reason = ""
        if path.suffix.lower() not in SLIDE_EXTENSIONS:
            reason = f"'{path.suffix or 'no extension'}' is not a slide format ({', '.join(SLIDE_EXTENSIONS)})"
        institution = Institution.objects.filter(slug=path.parent.parent.name).first()
        case = (
            BiopsyCase.objects.filter(institution=institution, accession=path.parent.name).first()
            if institution
            else None
        )
        if not reason and institution is None:
            reason = f"no institution with the slug {path.parent.parent.name!r}"
        elif not reason and case is None:
            reason = f"no case {path.parent.name!r} at {institution}: create the case first, then move the file back"
        if not reason:
            try:
                slide = slide_register(case=case, actor=None, path=path, name=path.name)
            except CaseError as exc:
                reason = str(exc)
            else:
                _set_aside(root, path, "imported")
                report.imported.append((name, slide.pk))
                logger.info("imported slide %s as slide %s", name, slide.pk)
                continue
        _set_aside(root, path, "rejected", reason)
        report.rejected.append((name, reason))
        logger.warning("slide import refused %s: %s", name, reason)
    return report
