"""The database side of a backup: what a snapshot holds, read with plain SQL so that the same code
reads a PostgreSQL snapshot (Django's cursor inside the transaction that exported it) and SQLite's
copy (a sqlite3 cursor on the backup file); and the PostgreSQL client programs, which get their
connection settings through the environment, never on their command line."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from audit.anchors import ANCHOR_FORMAT
from audit.models import AuditEvent
from backups.exceptions import BackupError
from cases.models import TissuePatch
from inference.models import ModelVersion


@dataclass(frozen=True)
class StoredFile:
    """A file in storage that a row names, with the SHA-256 the row records for it."""

    table: str
    row_id: int
    storage_name: str
    sha256: str


@dataclass
class Snapshot:
    """What a backup holds, read from the database snapshot that was dumped."""

    tables: dict[str, int]
    migrations: dict[str, str]
    files: list[StoredFile]
    model_versions: list[dict[str, Any]]
    anchor: dict[str, Any] | None


def stored_file_sources() -> list[tuple[str, str, str, str]]:
    """(table, id column, storage-name column, sha256 column) of every model whose rows name a
    stored file. A model that stores files in ``default_storage`` must be listed here. Rows with
    an empty name (a slide not analysed yet has no result arrays) name no file."""
    from slides.models import Slide

    def source(model, name: str, sha: str) -> tuple[str, str, str, str]:
        meta = model._meta
        return (meta.db_table, meta.pk.column, meta.get_field(name).column, meta.get_field(sha).column)

    return [
        source(TissuePatch, "storage_name", "sha256"),
        source(Slide, "storage_name", "sha256"),  # the slide as uploaded
        source(Slide, "results_name", "results_sha256"),  # its per-tile results (the viewer's heatmap)
    ]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# The snapshot: read with plain SQL, so that the same code reads a PostgreSQL snapshot (Django's
# cursor inside the exporting transaction) and SQLite's copy (a sqlite3 cursor on the backup file).


def table_names(cursor, vendor: str) -> list[str]:
    if vendor == "postgresql":
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname = ANY (current_schemas(false)) "
            "ORDER BY c.relname"
        )
    else:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
    return [row[0] for row in cursor.fetchall()]


def table_counts(cursor, vendor: str) -> dict[str, int]:
    counts = {}
    for table in table_names(cursor, vendor):
        cursor.execute(f"SELECT COUNT(*) FROM {quote(table)}")  # noqa: S608 - a table name from the catalogue, quoted
        counts[table] = cursor.fetchone()[0]
    return counts


def last_migrations(cursor) -> dict[str, str]:
    """The last applied migration of each app (by name: migrations are numbered)."""
    cursor.execute("SELECT app, name FROM django_migrations")
    last: dict[str, str] = {}
    for app, name in cursor.fetchall():
        if name > last.get(app, ""):
            last[app] = name
    return dict(sorted(last.items()))


def utc_iso(value: Any) -> str:
    when = parse_datetime(value) if isinstance(value, str) else value
    if timezone.is_naive(when):
        when = timezone.make_aware(when, datetime.UTC)  # Django stores UTC on SQLite
    return when.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def snapshot_anchor(cursor, *, anchored_at: str) -> dict[str, Any] | None:
    """``audit.anchors.audit_anchor`` of the data ``cursor`` sees: each chain's last event, its hash
    and how many events of its chain lead up to it; None when the trail is empty. Kept equal to
    ``audit_anchor`` (tests/test_backup.py compares them), so ``verify_audit --anchor`` reads it."""
    table = quote(AuditEvent._meta.db_table)
    cursor.execute(f"SELECT chain, MAX(id), COUNT(id) FROM {table} GROUP BY chain")  # noqa: S608
    lasts = {chain: (last, count) for chain, last, count in cursor.fetchall()}
    if not lasts:
        return None
    ids = ", ".join(str(int(last)) for last, _ in lasts.values())
    cursor.execute(f"SELECT id, hash, created_at, hash_scheme, key_id FROM {table} WHERE id IN ({ids})")  # noqa: S608
    events = {row[0]: row[1:] for row in cursor.fetchall()}
    chains = []
    for chain in sorted(lasts, key=lambda chain: (chain is not None, chain or 0)):
        last, count = lasts[chain]
        event_hash, created_at, hash_scheme, key_id = events[last]
        chains.append(
            {
                "chain": None if chain is None else int(chain),
                "id": int(last),
                "hash": event_hash,
                "count": int(count),
                "created_at": utc_iso(created_at),
                "hash_scheme": hash_scheme,
                "key_id": key_id,
            }
        )
    return {
        "format": ANCHOR_FORMAT,
        "id": max(entry["id"] for entry in chains),
        "count": sum(entry["count"] for entry in chains),
        "chains": chains,
        "anchored_at": anchored_at,
    }


def snapshot_read(cursor, vendor: str, *, taken_at: str) -> Snapshot:
    files = []
    for table, id_column, name_column, sha_column in stored_file_sources():
        cursor.execute(
            f"SELECT {quote(id_column)}, {quote(name_column)}, {quote(sha_column)} "  # noqa: S608
            f"FROM {quote(table)} WHERE {quote(name_column)} <> '' ORDER BY {quote(id_column)}"
        )
        files += [StoredFile(table, int(row_id), name, sha) for row_id, name, sha in cursor.fetchall()]
    cursor.execute(
        f"SELECT id, name, version, path, file_sha256 FROM {quote(ModelVersion._meta.db_table)} ORDER BY id"  # noqa: S608
    )
    model_versions = [
        {"id": int(pk), "name": name, "version": version, "path": path, "file_sha256": sha}
        for pk, name, version, path, sha in cursor.fetchall()
    ]
    return Snapshot(
        tables=table_counts(cursor, vendor),
        migrations=last_migrations(cursor),
        files=files,
        model_versions=model_versions,
        anchor=snapshot_anchor(cursor, anchored_at=taken_at),
    )


# PostgreSQL client programs: connection settings through the environment, never the command line.

_LIBPQ_OPTIONS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}


def pg_environment(settings_dict: dict[str, Any]) -> dict[str, str]:
    """The environment for pg_dump/pg_restore to reach the database of ``settings_dict``; the
    password goes in PGPASSWORD, where other users cannot read it (unlike a process's arguments)."""
    env = dict(os.environ)
    values = {
        "PGHOST": settings_dict.get("HOST"),
        "PGPORT": settings_dict.get("PORT"),
        "PGUSER": settings_dict.get("USER"),
        "PGPASSWORD": settings_dict.get("PASSWORD"),
        "PGDATABASE": settings_dict.get("NAME"),
    }
    for option, variable in _LIBPQ_OPTIONS.items():
        values[variable] = (settings_dict.get("OPTIONS") or {}).get(option)
    env.update({name: str(value) for name, value in values.items() if value not in (None, "")})
    return env


def pg_program(name: str) -> str:
    directory = getattr(settings, "PG_BIN_DIR", "") or None
    found = shutil.which(name, path=directory)
    if found is None:
        where = f"in PG_BIN_DIR ({directory})" if directory else "on PATH"
        raise BackupError(
            f"{name} was not found {where}: install the PostgreSQL client programs of the server's major "
            "version or newer (e.g. the postgresql-client package), or set PG_BIN_DIR to their folder"
        )
    return found


def pg_run(arguments: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(arguments, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        detail = " ".join(result.stderr.strip().splitlines()[-5:]) or "no message"
        raise BackupError(f"{Path(arguments[0]).name} failed (exit status {result.returncode}): {detail}")
