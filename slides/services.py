"""Writes on slides: resumable uploads and registering a checked slide file. Each function owns
its transaction; files are written and checked outside them.

The upload protocol (web and API alike), after tus.io's core:

1. ``slide_upload_start``: the case, the file name, its total size (and optionally its SHA-256
   and µm/px). Name, extension and size are checked here, before any byte is sent.
2. ``slide_upload_append``: the bytes from ``offset`` on, in pieces of at most
   SLIDE_UPLOAD_PIECE_BYTES. An offset other than the bytes received so far is refused with the
   right offset (HTTP 409), so a client that lost its connection asks, and resumes from there.
3. When the last byte arrives the file is checked (``slide_upload_finish``): checksum, OpenSlide
   opens it, pyramid levels, µm/px, pixel cap; no pixel data is read. A bad file is rejected with
   the reason and removed: nothing is stored. A good one is stored as uploaded, becomes a Slide
   (queued) with its audit event, and is sent for tiling after commit.
"""

from __future__ import annotations

import fcntl
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import IO

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.models import LabSystem, User
from audit.services import audit_record
from cases.models import BiopsyCase
from cases.services import CaseError, actor_fields, storage_save
from cases.uploads import UploadRejected, check_file_name
from inference.core.slides import SlideError, SlideInfo, slide_inspect
from slides import storage
from slides.models import Slide, SlideUpload
from slides.signals import slide_queued

logger = logging.getLogger(__name__)

# What OpenSlide reads from one file (MIRAX and VMS, several files per slide, cannot be uploaded
# as one). Hamamatsu NDPI is recognised by its extension, so the extension is kept on disk.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide")
WRITE_BLOCK = 1024 * 1024


class SlideRejected(CaseError):
    """A slide upload that cannot go on; the message says why. ``status_code`` is the HTTP answer."""

    status_code = 400


class SlideTooLarge(SlideRejected):
    status_code = 413


class OffsetMismatch(SlideRejected):
    """A piece sent at the wrong offset: ``expected`` is where the upload stands."""

    status_code = 409

    def __init__(self, expected: int):
        super().__init__(f"this upload has {expected} bytes; send the bytes from offset {expected}")
        self.expected = expected


def slide_name_check(name: str) -> tuple[str, str]:
    """A display-safe name and its lower-case extension, or SlideRejected."""
    try:
        clean = check_file_name(name)
    except UploadRejected as exc:
        raise SlideRejected(str(exc)) from None
    suffix = Path(clean).suffix.lower()
    if suffix not in SLIDE_EXTENSIONS:
        raise SlideRejected(
            f"'{suffix or 'no extension'}' is not a whole-slide image format this platform reads; "
            f"send one of {', '.join(SLIDE_EXTENSIONS)} (patches go to the patch upload)"
        )
    return clean, suffix


def upload_path(upload: SlideUpload) -> Path:
    """The partial file of an upload (its extension kept: OpenSlide needs it for some formats)."""
    return Path(settings.SLIDE_UPLOAD_DIR) / f"{upload.pk}{Path(upload.original_name).suffix.lower()}"


def _open_case(case: BiopsyCase) -> None:
    if case.status == BiopsyCase.Status.SIGNED_OUT:
        raise SlideRejected("the case is signed out; slides can no longer be added")


def slide_upload_start(
    *,
    case: BiopsyCase,
    actor: User | LabSystem,
    name: str,
    size: int,
    sha256: str = "",
    mpp: float | None = None,
) -> SlideUpload:
    """Open a resumable upload of one slide file of ``size`` bytes to ``case``.

    Raises:
        SlideRejected: the case is signed out, the name or extension is not a slide's, the
            checksum is malformed, the µm/px is not positive. SlideTooLarge: over SLIDE_MAX_BYTES.
    """
    _open_case(case)
    clean, _ = slide_name_check(name)
    if size <= 0:
        raise SlideRejected("the file is empty (0 bytes)")
    if size > settings.SLIDE_MAX_BYTES:
        raise SlideTooLarge(
            f"the file is {size:,} bytes; the limit for a slide is {settings.SLIDE_MAX_BYTES:,} bytes (SLIDE_MAX_BYTES)"
        )
    sha256 = (sha256 or "").strip().lower()
    if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
        raise SlideRejected("sha256 must be 64 hexadecimal characters")
    if mpp is not None and not (0 < mpp < 100):
        raise SlideRejected("mpp must be the scanner's µm per pixel at full resolution, e.g. 0.25")
    upload = SlideUpload.objects.create(
        case=case,
        original_name=clean,
        size_bytes=size,
        sha256=sha256,
        mpp=mpp,
        **actor_fields(actor, "created_by", "created_by_lab"),
    )
    path = upload_path(upload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return upload


def slide_upload_append(*, upload: SlideUpload, offset: int, data: IO[bytes], length: int) -> SlideUpload:
    """Write ``length`` bytes read from ``data`` at ``offset``; when they complete the file, check
    it and make it a Slide (``upload.slide``). Returns the upload as it now stands.

    Pieces of one upload are written one at a time (a lock on its file), so two clients resuming
    at once cannot interleave; the database is updated after the write, outside any transaction.

    Raises:
        OffsetMismatch (409), SlideRejected (400) for a piece that does not fit or a file that is not
        a usable slide (then nothing is kept), SlideTooLarge (413) for a piece over the cap.
    """
    if upload.status != SlideUpload.Status.RECEIVING:
        raise SlideRejected(f"this upload is {upload.get_status_display().lower()}: start a new one")
    if length > settings.SLIDE_UPLOAD_PIECE_BYTES:
        raise SlideTooLarge(
            f"a piece may hold at most {settings.SLIDE_UPLOAD_PIECE_BYTES:,} bytes (SLIDE_UPLOAD_PIECE_BYTES)"
        )
    path = upload_path(upload)
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        raise SlideRejected("this upload's partial file is gone (expired or aborted): start a new one") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        upload.refresh_from_db(fields=["received_bytes", "status"])
        if upload.status != SlideUpload.Status.RECEIVING:
            raise SlideRejected(f"this upload is {upload.get_status_display().lower()}: start a new one")
        if offset != upload.received_bytes:
            raise OffsetMismatch(upload.received_bytes)
        if offset + length > upload.size_bytes:
            raise SlideRejected(
                f"{offset + length:,} bytes is more than the {upload.size_bytes:,} announced for this file"
            )
        handle.seek(offset)
        handle.truncate()  # drop what a piece cut short left after the agreed offset
        written = _copy(data, handle, length)
        handle.flush()
        os.fsync(handle.fileno())
        # What arrived counts even when the piece was cut short (a dropped connection): the
        # client asks for the offset and resumes from there, as with tus.
        SlideUpload.objects.filter(pk=upload.pk).update(received_bytes=F("received_bytes") + written)
        upload.received_bytes += written
    if written != length:
        raise SlideRejected(
            f"the piece ended after {written:,} of its {length:,} bytes; resume from offset {upload.received_bytes}"
        )
    if upload.received_bytes == upload.size_bytes:
        slide_upload_finish(upload=upload)
    return upload


def _copy(source: IO[bytes], target: IO[bytes], length: int) -> int:
    written = 0
    while written < length:
        try:
            block = source.read(min(WRITE_BLOCK, length - written))
        except OSError:  # the client went away mid-piece (Django's UnreadablePostError is one)
            break
        if not block:
            break
        target.write(block)
        written += len(block)
    return written


def slide_upload_finish(*, upload: SlideUpload) -> Slide:
    """Check the complete file and register it (``slide_register``); a rejected file is removed
    and the upload marked rejected with the reason."""
    path = upload_path(upload)
    actor = upload.created_by_lab or upload.created_by
    try:
        if upload.sha256:
            actual = storage.file_sha256(path)
            if actual != upload.sha256:
                raise SlideRejected(
                    f"the file's SHA-256 is {actual}, not the {upload.sha256} announced: the upload was corrupted; "
                    "start again"
                )
        slide = slide_register(
            case=upload.case, actor=actor, path=path, name=upload.original_name, mpp=upload.mpp, move=True
        )
    except SlideRejected as exc:
        upload.status, upload.error = SlideUpload.Status.REJECTED, str(exc)
        upload.save(update_fields=["status", "error", "updated_at"])
        path.unlink(missing_ok=True)
        raise
    upload.status, upload.slide = SlideUpload.Status.COMPLETE, slide
    upload.save(update_fields=["status", "slide", "updated_at"])
    return slide


def slide_upload_abort(*, upload: SlideUpload) -> None:
    """Give up an upload: its partial file is removed."""
    if upload.status == SlideUpload.Status.RECEIVING:
        SlideUpload.objects.filter(pk=upload.pk, status=SlideUpload.Status.RECEIVING).update(
            status=SlideUpload.Status.ABORTED, updated_at=timezone.now()
        )
        upload_path(upload).unlink(missing_ok=True)
        upload.status = SlideUpload.Status.ABORTED


def slide_uploads_expire(*, older_than: timedelta | None = None) -> int:
    """Abort uploads with no new piece for SLIDE_UPLOAD_EXPIRE_HOURS (their partial files use disk)."""
    cutoff = timezone.now() - (older_than or timedelta(hours=settings.SLIDE_UPLOAD_EXPIRE_HOURS))
    stale = list(SlideUpload.objects.filter(status=SlideUpload.Status.RECEIVING, updated_at__lt=cutoff))
    for upload in stale:
        slide_upload_abort(upload=upload)
    return len(stale)


def slide_register(
    *,
    case: BiopsyCase,
    actor: User | LabSystem,
    path: Path,
    name: str,
    mpp: float | None = None,
    move: bool = False,
) -> Slide:
    """Check a complete slide file, store it as it is and queue it for analysis.

    ``move``: the file is the upload's own and may be moved into storage; otherwise (an import
    folder) it is copied and left where it is.

    Raises:
        SlideRejected: not a usable slide (the reason from ``slide_inspect``), or the case is signed out.
        StorageUnavailable: storage refused the file (nothing kept).
    """
    _open_case(case)
    clean, suffix = slide_name_check(name)
    try:
        info: SlideInfo = slide_inspect(path, mpp=mpp, max_pixels=settings.SLIDE_MAX_PIXELS)
    except SlideError as exc:
        raise SlideRejected(f"{clean}: {exc}") from None
    sha256 = storage.file_sha256(path)
    target = Slide.new_storage_name(case.institution_id, suffix)
    with open(path, "rb") as handle:
        # The upload's own file is moved into place where the storage allows; an imported one copied.
        content = storage.LocalFile(handle, name=str(path)) if move else File(handle)
        stored = storage_save(target, content, what="slide")
    try:
        with transaction.atomic():
            case = BiopsyCase.objects.select_for_update().get(pk=case.pk)
            _open_case(case)
            slide = Slide.objects.create(
                case=case,
                storage_name=stored,
                original_name=clean,
                sha256=sha256,
                size_bytes=info.size_bytes,
                vendor=info.vendor,
                width=info.width,
                height=info.height,
                mpp=info.mpp,
                mpp_source=info.mpp_source,
                levels=[list(level) for level in info.levels],
                objective_power=info.objective_power,
                enqueued_at=timezone.now(),
                **actor_fields(actor, "uploaded_by", "uploaded_by_lab"),
            )
            audit_record(
                actor=actor,
                action="slide.create",
                target=slide,
                institution_id=case.institution_id,
                after={
                    "case": case.pk,
                    "name": clean,
                    "sha256": sha256,
                    "size_bytes": info.size_bytes,
                    "vendor": info.vendor,
                    "width": info.width,
                    "height": info.height,
                    "mpp": info.mpp,
                    "mpp_source": info.mpp_source,
                    "status": slide.status,
                },
            )
            from cases.transitions import case_transition, cases_touch

            if not case_transition(case_ids=[case.pk], to=BiopsyCase.Status.ANALYSING, actor=actor):
                cases_touch(case_ids=[case.pk])
            transaction.on_commit(lambda: slide_queued.send(sender=Slide, slide_id=slide.pk))
    except BaseException:
        storage.discard(stored)
        raise
    logger.info(
        "slide %s registered: %s, %d x %d px at %.3f µm/px", slide.pk, info.vendor, info.width, info.height, info.mpp
    )
    return slide
