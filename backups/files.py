"""The backup folder's layout, and copying and hashing its files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from backups.exceptions import BackupError

FORMAT = "cloudiopsy-backup/1"
MANIFEST = "manifest.json"
DUMP_FILES = {"postgresql": "database.pgdump", "sqlite": "database.sqlite3"}
ANCHOR_FILE = "audit-anchor.json"
MEDIA_DIR = "media"
MODELS_DIR = "models"
CHUNK = 1 << 20
PROBLEMS_SHOWN = 20  # in an error message; the manifest and the report list every one

Progress = Callable[[str], None]


def safe_relative(name: str, what: str) -> PurePosixPath:
    """``name`` as a relative path that stays inside its folder, or BackupError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name != str(path):
        raise BackupError(f"{what} {name!r} is not a plain relative path; refusing to use it")
    return path


def private_folder(path: Path) -> None:
    """Make ``path`` and its missing parents, each readable by its owner only."""
    if not path.is_dir():
        private_folder(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)


def write_stream(source: IO[bytes], destination: Path) -> tuple[str, int]:
    """Copy ``source`` into a new file readable by its owner only; its SHA-256 and size."""
    private_folder(destination.parent)
    digest, size = hashlib.sha256(), 0
    descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(descriptor, "wb") as target:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
            target.write(chunk)
    return digest.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def every_file(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())


def every_link(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_symlink())


class Ticker:
    """Reports 'what: done/total' about every 5% (and at the end), not once per file."""

    def __init__(self, progress: Progress, what: str, total: int):
        self.progress, self.what, self.total, self.done = progress, what, total, 0
        self.step = max(1, total // 20)

    def tick(self) -> None:
        self.done += 1
        if self.done % self.step == 0 or self.done == self.total:
            self.progress(f"  {self.what}: {self.done}/{self.total}")


def digest_or_none(path: Path) -> str | None:
    return file_digest(path)[0] if path.is_file() else None
