"""What ``restore`` checks once everything is back: the audit trail against the backup's anchor,
every stored file against its row's SHA-256, every table's row count against the manifest, and
the model files against their rows."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.core.files.storage import Storage
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from backups.database import StoredFile, quote, stored_file_sources, table_counts
from backups.files import ANCHOR_FILE, PROBLEMS_SHOWN, Progress, digest_or_none
from inference.core.model import MODEL_FILE
from inference.models import ModelVersion


@dataclass
class RestoreReport:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.lines.append(f"OK    {line}")

    def fail(self, line: str) -> None:
        self.lines.append(f"FAIL  {line}")
        self.failures.append(line)

    def detail(self, line: str) -> None:
        self.lines.append(f"        {line}")


def restore_verify(
    directory: Path,
    manifest: dict[str, Any],
    *,
    storage: Storage,
    allow_missing: bool,
    previous_key_files: Iterable[str],
    progress: Progress,
) -> RestoreReport:
    report = RestoreReport()
    progress("verifying")
    anchor = directory / ANCHOR_FILE if manifest.get("audit_anchor") else None
    output = io.StringIO()
    try:
        options = {"previous_key_file": list(previous_key_files), "stdout": output}
        if anchor is not None:
            options["anchor"] = str(anchor)
        call_command("verify_audit", **options)
        report.ok(f"audit trail: {output.getvalue().strip()}")
    except CommandError as error:
        report.fail(f"audit trail: {error}")

    known = {(p["table"], p["id"]) for p in manifest.get("problems", []) if "storage_name" in p}
    checked = bad = excused = 0
    details = []
    for stored in _files_now():
        checked += 1
        try:
            with storage.open(stored.storage_name, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            digest = None
        if digest == stored.sha256:
            continue
        if allow_missing and (stored.table, stored.row_id) in known:
            excused += 1
            continue
        bad += 1
        if bad <= PROBLEMS_SHOWN:
            found = "missing" if digest is None else f"SHA-256 {digest}"
            details.append(f"{stored.table} #{stored.row_id}: file {stored.storage_name} {found}, row {stored.sha256}")
    line = f"stored files: {checked - bad - excused} of {checked} match their rows' SHA-256"
    if excused:
        line += f" ({excused} missing already when backed up, allowed by --allow-missing)"
    if bad:
        report.fail(f"{line}; {bad} do not:")
        for detail in details:
            report.detail(detail)
        if bad > len(details):
            report.detail(f"and {bad - len(details)} more")
    else:
        report.ok(line)

    with connection.cursor() as cursor:
        counts = table_counts(cursor, connection.vendor)
    expected = manifest.get("tables") or {}
    differ = [
        f"{table}: {counts.get(table, 'absent')} rows, the manifest {expected.get(table, 'absent')}"
        for table in sorted(set(counts) | set(expected))
        if counts.get(table) != expected.get(table)
    ]
    if differ:
        report.fail(f"row counts differ from the manifest: {'; '.join(differ)}")
    else:
        report.ok(f"row counts: {len(counts)} tables, {sum(counts.values())} rows, as in the manifest")

    model_problems = []
    known_models = {p["model_version"] for p in manifest.get("problems", []) if "model_version" in p}
    versions = list(ModelVersion.objects.order_by("id"))
    for version in versions:
        digest = digest_or_none(version.directory / MODEL_FILE)
        if digest != version.file_sha256 and not (allow_missing and version.pk in known_models):
            found = "missing" if digest is None else f"SHA-256 {digest}"
            model_problems.append(f"{version} ({version.directory}): {MODEL_FILE} {found}, row {version.file_sha256}")
    if model_problems:
        report.fail(f"model versions: {'; '.join(model_problems)}")
    else:
        report.ok(f"model versions: {len(versions)} in place, model files matching their rows")
    return report


def _files_now() -> Iterable[StoredFile]:
    with connection.cursor() as cursor:
        for table, id_column, name_column, sha_column in stored_file_sources():
            cursor.execute(
                f"SELECT {quote(id_column)}, {quote(name_column)}, {quote(sha_column)} "  # noqa: S608
                f"FROM {quote(table)} WHERE {quote(name_column)} <> '' ORDER BY {quote(id_column)}"
            )
            for row_id, name, sha in cursor.fetchall():
                yield StoredFile(table, int(row_id), name, sha)
