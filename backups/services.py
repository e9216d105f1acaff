"""Backups that restore: the database as one consistent snapshot, the stored images of the rows in
that snapshot, the registered model versions, and an audit anchor read from that same snapshot,
with a manifest of every file's SHA-256; and their restore into an empty database and media root,
verified afterwards. docs/backup.md says what is in a backup and how to schedule, restore and test it.

No function here runs file or network I/O inside a transaction of its own making, with one
exception that is the point: on PostgreSQL, ``pg_dump`` runs while a read-only, repeatable-read
transaction keeps the snapshot it exported, so that the file list, the counts and the audit anchor
are read from exactly the data that is dumped. That transaction writes nothing and locks nothing
that ``pg_dump`` itself would not.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, default_storage
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from backups.database import (
    Snapshot,
    StoredFile,
    pg_environment,
    pg_program,
    pg_run,
    snapshot_read,
    table_names,
    utc_iso,
)
from backups.exceptions import BackupError
from backups.files import (
    ANCHOR_FILE,
    DUMP_FILES,
    FORMAT,
    MANIFEST,
    MEDIA_DIR,
    MODELS_DIR,
    PROBLEMS_SHOWN,
    Progress,
    Ticker,
    digest_or_none,
    every_file,
    every_link,
    file_digest,
    safe_relative,
    write_stream,
)
from backups.verify import RestoreReport, restore_verify
from inference.core.model import MODEL_FILE


@dataclass
class BackupResult:
    directory: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    problems: list[dict[str, Any]]


def _quiet(_: str) -> None:
    pass


def _now() -> str:
    return timezone.now().astimezone(datetime.UTC).isoformat(timespec="seconds")


def _platform_version() -> dict[str, str | None]:
    base = Path(settings.BASE_DIR)
    version = None
    try:
        version = tomllib.loads((base / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    commit = getattr(settings, "PLATFORM_GIT_COMMIT", "") or None
    if commit is None and (base / ".git").exists() and shutil.which("git"):
        try:
            result = subprocess.run(  # noqa: S603
                ["git", "-C", str(base), "rev-parse", "HEAD"],  # noqa: S607
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0:
            commit = result.stdout.strip() or None
    return {"version": version, "git_commit": commit}


# Backup


def _out_prepare(out: Path) -> bool:
    """Check that ``out`` is absent or an empty folder; make it (owner only). True when it was made."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BackupError(f"{out} exists and is not a folder: give a new or empty folder to --out")
        if any(out.iterdir()):
            raise BackupError(
                f"{out} is not empty: a backup goes into a new or empty folder, so that it never mixes with "
                "or overwrites another one"
            )
        out.chmod(0o700)
        return False
    try:
        out.mkdir(parents=True, mode=0o700)
    except OSError as error:
        raise BackupError(f"cannot create {out}: {error.strerror or error}") from None
    return True


def _out_discard(out: Path, *, made: bool) -> None:
    """Remove what a failed backup wrote: it holds patient data and no manifest."""
    if made:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _database_dump(out: Path, *, progress: Progress) -> tuple[Snapshot, str]:
    """Dump the database into ``out``; the snapshot's contents, and the time it was taken."""
    if connection.in_atomic_block:
        raise BackupError("a backup cannot run inside a database transaction (it takes a snapshot of its own)")
    vendor = connection.vendor
    if vendor not in DUMP_FILES:
        raise BackupError(f"backups support PostgreSQL and SQLite, not {vendor}")
    dump = out / DUMP_FILES[vendor]
    if vendor == "postgresql":
        program = pg_program("pg_dump")
        env = pg_environment(connection.settings_dict)
        with transaction.atomic(), connection.cursor() as cursor:
            # One snapshot for everything: exported to pg_dump, and read here for the list of stored
            # files, the counts and the audit anchor, so all of them describe exactly the dumped data.
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cursor.execute("SELECT pg_export_snapshot(), now()")
            snapshot_id, taken = cursor.fetchone()
            taken_at = utc_iso(taken)
            snapshot = snapshot_read(cursor, vendor, taken_at=taken_at)
            progress(f"database: snapshot {snapshot_id} taken at {taken_at}; running pg_dump")
            # pg_dump imports the snapshot at its start; the exporting transaction must stay open
            # until then, so it stays open until pg_dump is done. It is read-only and holds no lock
            # that pg_dump does not hold as well.
            pg_run([program, "--format=custom", "--no-password", f"--snapshot={snapshot_id}", f"--file={dump}"], env)
    else:
        connection.ensure_connection()
        taken_at = _now()
        target = sqlite3.connect(dump)
        try:
            # One step (pages=-1): every page is copied under one read lock, a consistent snapshot
            # even while the platform writes. Then everything else is read from the copy itself.
            connection.connection.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file, no -wal/-shm
            snapshot = snapshot_read(target.cursor(), vendor, taken_at=taken_at)
        finally:
            target.close()
        progress(f"database: SQLite copied at {taken_at}")
    dump.chmod(0o600)
    return snapshot, taken_at


def _stored_files_copy(
    files: list[StoredFile], out: Path, *, storage: Storage, hashes: dict[str, tuple[str, int]], progress: Progress
) -> list[dict[str, Any]]:
    """Copy each stored file through the storage API into out/media/<storage name>; the problems."""
    problems = []
    ticker = Ticker(progress, "images", len(files))
    for stored in files:
        try:
            relative = f"{MEDIA_DIR}/{safe_relative(stored.storage_name, 'its storage name')}"
        except BackupError as error:
            problems.append(
                {"table": stored.table, "id": stored.row_id, "storage_name": stored.storage_name, "problem": str(error)}
            )
            ticker.tick()
            continue
        destination = out / relative
        why = None
        try:
            with storage.open(stored.storage_name, "rb") as source:
                digest, size = write_stream(source, destination)
        except FileNotFoundError:
            why = "missing from storage"
        except OSError as error:
            why = f"cannot be read from storage: {error.strerror or error}"
        else:
            if digest != stored.sha256:
                why = f"its stored file has SHA-256 {digest}, the row records {stored.sha256}"
            else:
                hashes[relative] = (digest, size)
        if why:
            destination.unlink(missing_ok=True)
            problems.append(
                {"table": stored.table, "id": stored.row_id, "storage_name": stored.storage_name, "problem": why}
            )
        ticker.tick()
    return problems


def _model_directory(path: str) -> Path:
    directory = Path(path)
    return directory if directory.is_absolute() else Path(settings.BASE_DIR) / directory


def _model_versions_copy(
    versions: list[dict[str, Any]], out: Path, *, hashes: dict[str, tuple[str, int]], progress: Progress
) -> list[dict[str, Any]]:
    """Copy each model version's directory into out/models/<id>/, checking model.keras against the
    row's SHA-256; versions sharing a directory share its copy. The problems."""
    problems = []
    copies: dict[Path, str] = {}
    for version in versions:
        label = f"{version['name']} v{version['version']}"
        directory = _model_directory(version["path"]).resolve()
        if directory in copies:
            version["backup_dir"] = copies[directory]
            continue
        if not (directory / MODEL_FILE).is_file():
            problems.append({"model_version": version["id"], "path": version["path"], "problem": "directory missing"})
            continue
        digest, _ = file_digest(directory / MODEL_FILE)
        if digest != version["file_sha256"]:
            problems.append(
                {
                    "model_version": version["id"],
                    "path": version["path"],
                    "problem": f"{MODEL_FILE} has SHA-256 {digest}, the row records {version['file_sha256']}",
                }
            )
            continue
        backup_dir = f"{MODELS_DIR}/{version['id']}"
        for name in every_file(directory):
            with (directory / name).open("rb") as source:
                hashes[f"{backup_dir}/{name}"] = write_stream(source, out / backup_dir / name)
        copies[directory] = version["backup_dir"] = backup_dir
        progress(f"  model version {label}: {directory}")
    return problems


def problem_text(problem: dict[str, Any]) -> str:
    if "model_version" in problem:
        return f"model version #{problem['model_version']} ({problem['path']}): {problem['problem']}"
    return f"{problem['table']} #{problem['id']} ({problem['storage_name']}): {problem['problem']}"


def backup_create(
    *, out: str | Path, allow_missing: bool = False, progress: Progress | None = None, storage: Storage | None = None
) -> BackupResult:
    """Back the platform up into ``out`` (a new or empty folder); see docs/backup.md.

    The database is dumped first, as one snapshot; the stored images of the rows in that snapshot
    and the model versions' directories are then copied (uploads store their files before their
    rows commit, so each row of the snapshot has its file). The manifest comes last: a folder
    without one is not a backup. A row whose file is missing or differs from its recorded SHA-256
    fails the backup (and the folder is cleared) unless ``allow_missing``; either way it is reported.

    Raises:
        BackupError: the folder is not new or empty, a client program fails, or files are missing.
    """
    progress = progress or _quiet
    storage = storage or default_storage
    out = Path(out).absolute()
    made = _out_prepare(out)
    try:
        started = _now()
        snapshot, taken_at = _database_dump(out, progress=progress)
        vendor = connection.vendor
        hashes: dict[str, tuple[str, int]] = {}
        progress(f"images: copying {len(snapshot.files)} stored files through the storage API")
        problems = _stored_files_copy(snapshot.files, out, storage=storage, hashes=hashes, progress=progress)
        progress(f"model versions: {len(snapshot.model_versions)}")
        problems += _model_versions_copy(snapshot.model_versions, out, hashes=hashes, progress=progress)
        if problems and not allow_missing:
            shown = "; ".join(problem_text(p) for p in problems[:PROBLEMS_SHOWN])
            more = f" (and {len(problems) - PROBLEMS_SHOWN} more)" if len(problems) > PROBLEMS_SHOWN else ""
            raise BackupError(
                f"{len(problems)} stored file(s) cannot be backed up: {shown}{more}. Nothing was kept; "
                "rerun with --allow-missing to back up everything else and list them in the manifest"
            )
        if snapshot.anchor is not None:
            anchor_path = out / ANCHOR_FILE
            with os.fdopen(os.open(anchor_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(json.dumps(snapshot.anchor, sort_keys=True) + "\n")
        manifest = {
            "format": FORMAT,
            "created_at": started,
            "snapshot_at": taken_at,
            "finished_at": _now(),
            "platform": _platform_version(),
            "database": {"vendor": vendor, "file": DUMP_FILES[vendor]},
            "migrations": snapshot.migrations,
            "tables": snapshot.tables,
            "stored_files": {
                "count": len(snapshot.files),
                "copied": len(snapshot.files) - sum("storage_name" in p for p in problems),
                "bytes": sum(size for name, (_, size) in hashes.items() if name.startswith(f"{MEDIA_DIR}/")),
            },
            "model_versions": snapshot.model_versions,
            "audit_anchor": ANCHOR_FILE if snapshot.anchor is not None else None,
            "problems": problems,
            "files": {},
        }
        for name in every_file(out):
            digest, size = hashes.get(name) or file_digest(out / name)
            manifest["files"][name] = {"sha256": digest, "size": size}
        # Last, and whole or not at all: a folder with a manifest is a complete backup.
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        partial = out / f".{MANIFEST}.partial"
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(out / MANIFEST)
    except BaseException:
        _out_discard(out, made=made)
        raise
    return BackupResult(
        directory=out,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(text.encode()).hexdigest(),
        problems=problems,
    )


# Restore


def manifest_read(directory: Path, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """The backup's manifest, once every file it lists is checked (and the manifest itself against
    ``expected_sha256``, the digest ``backup`` printed, when given); BackupError says what is wrong."""
    if not directory.is_dir():
        raise BackupError(f"{directory} is not a folder")
    path = directory / MANIFEST
    if not path.is_file():
        raise BackupError(
            f"{directory} has no {MANIFEST}: the backup is incomplete (it failed or is still running) or the "
            "folder is not a backup; nothing was restored"
        )
    if expected_sha256 is not None:
        digest, _ = file_digest(path)
        if digest != expected_sha256.strip().lower():
            raise BackupError(
                f"{path} has SHA-256 {digest}, not the {expected_sha256} given: it is not the manifest that backup "
                "wrote, or it was changed since; nothing was restored"
            )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise BackupError(f"{path} is not valid JSON ({error}); nothing was restored") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f'{path} is not a Cloudiopsy backup manifest (no "format": "{FORMAT}")')
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("database", {}).get("file") not in files:
        raise BackupError(f"{path} does not list the backup's files, or not its database file")
    for name in files:
        safe_relative(name, "the manifest names a file")
    links = every_link(directory)
    if links:
        raise BackupError(f"{directory} holds symbolic links ({', '.join(links[:5])}): a backup holds none")
    unlisted = sorted(set(every_file(directory)) - set(files) - {MANIFEST})
    if unlisted:
        raise BackupError(
            f"{directory} holds files its manifest does not list: {', '.join(unlisted[:PROBLEMS_SHOWN])}; "
            "the backup was changed after it was taken"
        )
    for name, recorded in sorted(files.items()):
        if not (directory / name).is_file():
            raise BackupError(f"{name} is missing from the backup {directory}; nothing was restored")
        digest, size = file_digest(directory / name)
        if (digest, size) != (recorded.get("sha256"), recorded.get("size")):
            raise BackupError(
                f"{name} in the backup {directory} has SHA-256 {digest} ({size} bytes), the manifest records "
                f"{recorded.get('sha256')} ({recorded.get('size')} bytes): the backup is damaged or was changed; "
                "nothing was restored"
            )
    return manifest


def _code_migrations() -> dict[str, str]:
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    leaves: dict[str, str] = {}
    for app, name in loader.graph.leaf_nodes():
        leaves[app] = max(name, leaves.get(app, ""))
    return leaves


def _migrations_check(manifest: dict[str, Any]) -> None:
    backed_up = manifest.get("migrations") or {}
    code = _code_migrations()
    differ = [
        f"{app}: backup {backed_up.get(app, 'none')}, this code {name}"
        for app, name in sorted(code.items())
        if backed_up.get(app) != name
    ]
    if differ:
        platform = manifest.get("platform") or {}
        made_by = ", ".join(f"{k} {v}" for k, v in platform.items() if v) or "an unrecorded version"
        raise BackupError(
            f"the backup's database is at other migrations than this code ({'; '.join(differ)}): restore it with "
            f"the platform version that made it ({made_by}), then upgrade as usual (manage.py migrate)"
        )


def _storage_first_file(storage: Storage, path: str = "") -> str | None:
    try:
        directories, files = storage.listdir(path)
    except FileNotFoundError:
        return None
    if files:
        return f"{path}/{files[0]}" if path else files[0]
    for directory in directories:
        found = _storage_first_file(storage, f"{path}/{directory}" if path else directory)
        if found:
            return found
    return None


def _restore_preflight(
    directory: Path, manifest: dict[str, Any], *, storage: Storage
) -> tuple[list[tuple[Path, str]], int]:
    """Every refusal before anything is written. The model directories to copy (target, backup
    dir), and how many are in place already with the backup's files."""
    vendor = manifest["database"].get("vendor")
    if vendor != connection.vendor:
        raise BackupError(
            f"the backup holds a {vendor} database, but this platform is configured for {connection.vendor}"
        )
    if connection.in_atomic_block:
        raise BackupError("a restore cannot run inside a database transaction")
    _migrations_check(manifest)
    try:
        with connection.cursor() as cursor:
            tables = table_names(cursor, connection.vendor)
    except DatabaseError as error:
        name = connection.settings_dict.get("NAME")
        raise BackupError(f"cannot reach the target database {name}: {str(error).strip()}") from None
    if tables:
        name = connection.settings_dict.get("NAME")
        raise BackupError(
            f"the target database {name} is not empty: it has {len(tables)} table(s) ({', '.join(tables[:5])}). "
            "A restore goes into a new, empty database (createdb; do not run migrate first), never over one in use"
        )
    found = _storage_first_file(storage)
    if found:
        raise BackupError(
            f"the media storage is not empty (it holds {found}, for one): restore into an empty MEDIA_ROOT or "
            "bucket, never over one in use"
        )
    copies, in_place = [], set()
    for version in manifest.get("model_versions") or []:
        backup_dir = version.get("backup_dir")
        if backup_dir is None:
            continue  # missing when backed up (--allow-missing): the verification reports it
        target = _model_directory(version["path"])
        prefix = f"{backup_dir}/"
        names = {name[len(prefix) :]: entry for name, entry in manifest["files"].items() if name.startswith(prefix)}
        if target.exists():
            differ = [name for name, entry in names.items() if digest_or_none(target / name) != entry["sha256"]]
            if differ:
                raise BackupError(
                    f"model version {version['name']} v{version['version']}: {target} exists with other files "
                    f"({', '.join(sorted(differ)[:5])}) than the backup's; move it away first"
                )
            in_place.add(target)
        elif (target, backup_dir) not in copies:
            copies.append((target, backup_dir))
    return copies, len(in_place)


def _database_restore(directory: Path, manifest: dict[str, Any], *, progress: Progress) -> None:
    dump = directory / manifest["database"]["file"]
    if connection.vendor == "postgresql":
        program = pg_program("pg_restore")
        env = pg_environment(connection.settings_dict)
        connection.close()
        progress(f"database: pg_restore into {connection.settings_dict['NAME']}")
        # One transaction: a restore that fails leaves the database as empty as it found it.
        # --no-owner/--no-privileges: objects belong to the role that restores; docs/audit.md's
        # grants for the application's role are run again afterwards, as after every migrate.
        pg_run(
            [
                program,
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                "--no-password",
                f"--dbname={env['PGDATABASE']}",
                str(dump),
            ],
            env,
        )
    else:
        connection.ensure_connection()
        progress(f"database: SQLite into {connection.settings_dict['NAME']}")
        source = sqlite3.connect(f"{dump.resolve().as_uri()}?mode=ro", uri=True)
        try:
            source.backup(connection.connection)
        finally:
            source.close()


def _media_restore(directory: Path, manifest: dict[str, Any], *, storage: Storage, progress: Progress) -> int:
    prefix = f"{MEDIA_DIR}/"
    names = sorted(name for name in manifest["files"] if name.startswith(prefix))
    ticker = Ticker(progress, "images", len(names))
    for name in names:
        storage_name = name[len(prefix) :]
        with (directory / name).open("rb") as handle:
            saved = storage.save(storage_name, File(handle, name=PurePosixPath(storage_name).name))
        if saved != storage_name:
            raise BackupError(f"the storage saved {storage_name} as {saved}: another file took its name meanwhile")
        ticker.tick()
    return len(names)


def _models_restore(directory: Path, manifest: dict[str, Any], copies: list[tuple[Path, str]]) -> None:
    for target, backup_dir in copies:
        prefix = f"{backup_dir}/"
        for name in sorted(n for n in manifest["files"] if n.startswith(prefix)):
            destination = target / name[len(prefix) :]
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / name, destination)


def backup_restore(
    *,
    directory: str | Path,
    allow_missing: bool = False,
    manifest_sha256: str | None = None,
    previous_key_files: Iterable[str] = (),
    progress: Progress | None = None,
    storage: Storage | None = None,
) -> RestoreReport:
    """Restore the backup in ``directory`` into the configured database and media storage, both
    empty, and verify the result: the audit trail against the backup's anchor, every stored file
    against its row's SHA-256, the row counts against the manifest, the model files.

    Raises:
        BackupError: refused before anything was written (a damaged or incomplete backup, a target
            that is not empty, another database vendor or migration state), or a step failed.
    """
    progress = progress or _quiet
    storage = storage or default_storage
    directory = Path(directory).absolute()
    progress(f"checking {directory}")
    manifest = manifest_read(directory, expected_sha256=manifest_sha256)
    progress(f"  {len(manifest['files'])} files match the manifest's SHA-256")
    copies, in_place = _restore_preflight(directory, manifest, storage=storage)
    _database_restore(directory, manifest, progress=progress)
    progress("images: restoring through the storage API")
    _media_restore(directory, manifest, storage=storage, progress=progress)
    _models_restore(directory, manifest, copies)
    progress(f"model versions: {len(copies)} directories restored, {in_place} in place already with the same files")
    return restore_verify(
        directory,
        manifest,
        storage=storage,
        allow_missing=allow_missing,
        previous_key_files=previous_key_files,
        progress=progress,
    )
