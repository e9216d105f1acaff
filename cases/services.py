"""Writes on cases and patches. Each function owns its transaction."""

from __future__ import annotations

import datetime
import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Institution, LabSystem, User
from audit.services import audit_record, audit_record_many
from cases.models import BiopsyCase, Patient, TissuePatch
from cases.signals import patches_queued
from cases.uploads import UploadRejected, ValidatedImage, validate_image

logger = logging.getLogger(__name__)


class CaseError(ValueError):
    """A request that cannot be carried out; the message is for the user."""


class StorageUnavailable(CaseError):
    """The image store refused a write: full or over quota (``full``, HTTP 507), or unreachable
    (HTTP 503). Nothing of the upload is kept."""

    def __init__(self, message: str, *, full: bool):
        super().__init__(message)
        self.full = full

    @property
    def status_code(self) -> int:
        return 507 if self.full else 503


def _stored(name: str, data: bytes) -> str:
    """Write one image to storage; a write that fails leaves nothing behind and says why."""
    return storage_save(name, ContentFile(data), what="image")


def storage_save(name: str, content: File, *, what: str) -> str:
    """Save ``content`` (an image, a slide) to storage under ``name``; returns the stored name.

    Raises:
        StorageUnavailable: the store is full (507) or cannot be written (503); nothing is kept.
    """
    try:
        return default_storage.save(name, content)
    except Exception as exc:  # the storage's own errors: OSError on disk, botocore's on S3
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        logger.error("storing an uploaded %s as %s failed: %s", what, name, exc)
        _discard(name)  # a file cut short by a full disk
        if full:
            raise StorageUnavailable(
                f"the {what} store is full: nothing from this upload was stored. Tell the platform's "
                "administrators; try again once space has been freed.",
                full=True,
            ) from exc
        raise StorageUnavailable(
            f"the {what} store cannot be written to right now: nothing from this upload was stored. "
            "Try again in a few minutes.",
            full=False,
        ) from exc


def _discard(name: str) -> None:
    try:
        if default_storage.exists(name):
            default_storage.delete(name)
    except Exception as exc:
        logger.error("could not remove %s from storage after a failed upload: %s", name, exc)


class NoValidImage(CaseError):
    """An upload in which no file was acceptable; ``rejected`` says why for each file."""

    def __init__(self, rejected: list[tuple[str, str]]):
        self.rejected = rejected
        detail = "; ".join(f"{name}: {reason}" for name, reason in rejected) or "no file was uploaded"
        super().__init__(f"no valid image in the upload ({detail})")


@dataclass(frozen=True)
class PatientData:
    mrn: str
    name: str = ""
    birth_date: datetime.date | None = None
    sex: str = Patient.Sex.UNKNOWN


def actor_fields(actor: User | LabSystem, user_field: str, lab_field: str) -> dict:
    return {lab_field: actor} if isinstance(actor, LabSystem) else {user_field: actor}


def patient_get_or_create(*, institution: Institution, data: PatientData, actor=None) -> Patient:
    """The institution's patient with this MRN; created when new. An existing patient's
    identity must match what was sent, so a typo in an MRN cannot attach a case to someone else."""
    patient = Patient.objects.filter(institution=institution, mrn=data.mrn).first()
    if patient is None:
        if not data.name:
            raise CaseError("a new patient needs a name")
        patient = Patient.objects.create(
            institution=institution, mrn=data.mrn, name=data.name, birth_date=data.birth_date, sex=data.sex
        )
        audit_record(actor=actor, action="patient.create", target=patient, after={"mrn": patient.mrn})
        return patient
    mismatched = [
        field
        for field, sent in (("name", data.name), ("birth_date", data.birth_date))
        if sent and getattr(patient, field) and sent != getattr(patient, field)
    ]
    if mismatched:
        raise CaseError(f"patient {data.mrn} already exists with a different {' and '.join(mismatched)}; check the MRN")
    return patient


@transaction.atomic
def case_create(
    *,
    institution: Institution,
    created_by: User | LabSystem,
    patient: PatientData,
    accession: str,
    specimen_site: str,
    priority: str = BiopsyCase.Priority.ROUTINE,
    clinical_notes: str = "",
) -> BiopsyCase:
    """Create a biopsy case (and its patient when new). CaseError when the accession is taken."""
    accession = accession.strip()
    if BiopsyCase.objects.filter(institution=institution, accession=accession).exists():
        raise CaseError(f"accession {accession} already exists")
    patient_row = patient_get_or_create(institution=institution, data=patient, actor=created_by)
    try:
        with transaction.atomic():
            case = BiopsyCase.objects.create(
                institution=institution,
                patient=patient_row,
                accession=accession,
                specimen_site=specimen_site.strip(),
                priority=priority,
                clinical_notes=clinical_notes,
                **actor_fields(created_by, "created_by", "created_by_lab"),
            )
    except IntegrityError:
        # Another request created the same accession between our check and our insert.
        raise CaseError(f"accession {accession} already exists") from None
    audit_record(
        actor=created_by,
        action="case.create",
        target=case,
        after={
            "accession": case.accession,
            "patient": patient_row.pk,
            "specimen_site": case.specimen_site,
            "priority": case.priority,
            "status": case.status,
        },
    )
    return case


@dataclass(frozen=True)
class UploadResult:
    patches: list[TissuePatch]
    rejected: list[tuple[str, str]]  # (file name as sent, reason)


def patch_upload(
    *,
    case: BiopsyCase,
    uploaded_by: User | LabSystem,
    files: Iterable[tuple[str, bytes | IO[bytes]]],
    rejected: list[tuple[str, str]] | None = None,
    on_created: Callable[[list[TissuePatch]], None] | None = None,
) -> UploadResult:
    """Validate every file, store the valid ones and queue them for analysis.

    ``files`` holds (name, bytes or an open file); each file is read, decoded, checked and written
    to storage on its own, so a request holds one decoded image at a time. ``rejected`` lists
    files the caller already refused (name, reason), reported alongside. ``on_created`` is called
    with the new patches inside the transaction (a slide's regions are linked to them there); if it
    raises, nothing is kept.

    The files are written before the transaction, which only inserts the rows (one insert) and
    their audit events (one append); if it rolls back the files are removed. The analysis task
    is sent only after commit (ids only).

    Raises:
        CaseError: the case is signed out. NoValidImage: no file is valid (nothing is stored).
    """
    if case.status == BiopsyCase.Status.SIGNED_OUT:
        raise CaseError("the case is signed out; patches can no longer be added")
    rejected = list(rejected or [])
    written: list[tuple[ValidatedImage, str]] = []
    try:
        received = 0
        for name, data in files:
            received += 1
            try:
                image = validate_image(name, data.read() if hasattr(data, "read") else data)
            except UploadRejected as exc:
                rejected.append((name, str(exc)))
                continue
            saved_name = _stored(TissuePatch.new_storage_name(case.institution_id), image.stored_bytes)
            written.append((image.without_pixels(), saved_name))
        if not received and not rejected:
            raise CaseError("no file was uploaded (form field 'image')")
        if not written:
            raise NoValidImage(rejected)
        with transaction.atomic():
            case = BiopsyCase.objects.select_for_update().get(pk=case.pk)
            if case.status == BiopsyCase.Status.SIGNED_OUT:
                raise CaseError("the case is signed out; patches can no longer be added")
            now = timezone.now()
            patches = TissuePatch.objects.bulk_create(
                [
                    TissuePatch(
                        case=case,
                        storage_name=saved_name,
                        sha256=image.sha256,
                        source_sha256=image.source_sha256,
                        width=image.width,
                        height=image.height,
                        format=image.format,
                        original_name=image.original_name,
                        enqueued_at=now,
                        **actor_fields(uploaded_by, "uploaded_by", "uploaded_by_lab"),
                    )
                    for image, saved_name in written
                ]
            )
            audit_record_many(
                [
                    {
                        "actor": uploaded_by,
                        "action": "patch.create",
                        "target": patch,
                        "institution_id": case.institution_id,
                        "after": {
                            "case": case.pk,
                            "name": patch.original_name,
                            "sha256": patch.sha256,
                            "status": patch.status,
                        },
                    }
                    for patch in patches
                ]
            )
            from cases.transitions import case_transition, cases_touch

            if not case_transition(case_ids=[case.pk], to=BiopsyCase.Status.ANALYSING, actor=uploaded_by):
                cases_touch(case_ids=[case.pk])  # already analysing: it has new patches all the same
            case.refresh_from_db(fields=["status", "updated_at"])
            if on_created is not None:
                on_created(patches)
            ids = [p.pk for p in patches]
            transaction.on_commit(lambda: patches_queued.send(sender=TissuePatch, patch_ids=ids))
    except BaseException:
        for _, saved_name in written:
            _discard(saved_name)
        raise
    return UploadResult(patches=patches, rejected=rejected)
