"""Slide files in storage, and a local path for OpenSlide (which reads files, not streams).

With the filesystem storage a worker reads the stored file where it is. With object storage (S3)
each worker keeps a copy of the slides it reads in SLIDE_CACHE_DIR, named by checksum, fetched
once and checked against the slide's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

logger = logging.getLogger(__name__)

READ_BLOCK = 8 * 1024 * 1024


class LocalFile(File):
    """A file already on local disk: the filesystem storage moves it into place instead of copying
    (``FileSystemStorage._save`` checks for ``temporary_file_path``)."""

    def temporary_file_path(self) -> str:
        return self.file.name


def bytes_store(name: str, data: bytes) -> str:
    """Write ``data`` to storage under exactly ``name``, replacing what is there (job arrays are
    rewritten with the same content when a chunk is redone)."""
    if default_storage.exists(name):
        default_storage.delete(name)
    return default_storage.save(name, ContentFile(data))


def bytes_read(name: str) -> bytes:
    with default_storage.open(name, "rb") as handle:
        return handle.read()


def discard(name: str) -> None:
    try:
        if name and default_storage.exists(name):
            default_storage.delete(name)
    except Exception as exc:  # the storage's own errors
        logger.error("could not remove %s from storage: %s", name, exc)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def slide_local_path(storage_name: str, sha256: str) -> Path:
    """A local file holding the stored slide, for OpenSlide."""
    try:
        path = Path(default_storage.path(storage_name))
    except NotImplementedError:  # object storage: no local path
        path = None
    if path is not None and path.exists():
        return path
    cache = Path(settings.SLIDE_CACHE_DIR)
    cached = cache / f"{sha256}{Path(storage_name).suffix.lower()}"
    if cached.exists():
        os.utime(cached)  # most recently used: the last to be evicted
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, default_storage.open(storage_name, "rb") as source:
            while block := source.read(READ_BLOCK):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise OSError(f"the stored slide {storage_name} does not match its checksum")
        os.replace(partial, cached)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("copied slide %s from storage to %s", storage_name, cached)
    cache_trim(cache, keep=cached)
    return cached


def cache_trim(cache: Path, *, keep: Path) -> None:
    """Remove the least recently used copies until the cache holds at most SLIDE_CACHE_MAX_BYTES
    (never ``keep``, the one just fetched). A worker still reading a removed copy keeps reading
    it: the file goes when its last handle closes."""
    limit = settings.SLIDE_CACHE_MAX_BYTES
    copies = sorted(
        (p for p in cache.iterdir() if p.is_file() and p.suffix != ".part"), key=lambda p: p.stat().st_mtime
    )
    total = sum(p.stat().st_size for p in copies)
    for path in copies:
        if total <= limit:
            break
        if path == keep:
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        total -= size
        logger.info("slide cache over %d bytes: removed %s", limit, path.name)


def npz_bytes(**arrays) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def npz_read(name: str) -> dict:
    import numpy as np

    with np.load(io.BytesIO(bytes_read(name)), allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}
