"""Backups restore: every row of the snapshot, every image with its SHA-256, the audit trail that
verifies against the backup's anchor; and a damaged, incomplete or misdirected backup or restore is
refused with a message naming the problem (docs/backup.md)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections

from audit.anchors import audit_anchor
from backups.database import pg_environment, snapshot_anchor
from cases.models import TissuePatch
from cases.services import patch_upload
from tests.conftest import ROOT, fixture_patch, new_case, unavailable

IMAGES = [fixture_patch(name).read_bytes() for name in ("NORM-TCGA-CWFDHWAH.png", "TUM-TCGA-KECNIDCQ.png")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def needs_postgresql():
    if connection.vendor != "postgresql":
        unavailable("backups while uploads run are tested on PostgreSQL (set DATABASE_URL)")


def manage(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``manage.py`` in a process of its own, configured by ``env`` only (not by this test's settings)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "MEDIA_ROOT", "DATA_DIR", "STORAGE_BACKEND"} and not k.startswith("PG")
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, "DEBUG": "true", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def backup(out: Path, *extra: str) -> str:
    stdout = io.StringIO()
    call_command("backup", "--out", str(out), *extra, stdout=stdout, stderr=io.StringIO())
    return stdout.getvalue()


def upload(case, user, count: int = 1):
    return patch_upload(case=case, uploaded_by=user, files=[(f"p{i}.png", IMAGES[i % 2]) for i in range(count)])


class Uploader(threading.Thread):
    """Uploads one patch after another through the service, on its own connection, until stopped."""

    def __init__(self, case, user):
        super().__init__(daemon=True)
        self.case, self.user = case, user
        self.stop, self.error, self.done = threading.Event(), None, 0

    def run(self):
        try:
            while not self.stop.is_set():
                upload(self.case, self.user)
                self.done += 1
        except BaseException as error:  # re-raised by finish()
            self.error = error
        finally:
            connections.close_all()

    def finish(self):
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the uploader did not stop"
        if self.error is not None:
            raise self.error


class ScratchDatabase:
    """A new, empty PostgreSQL database on the test server, dropped afterwards."""

    def __init__(self):
        import psycopg

        s = connection.settings_dict
        self.name = f"helper_backup_restore_{uuid.uuid4().hex[:10]}"
        self.params = {"host": s["HOST"] or None, "port": s["PORT"] or None, "user": s["USER"] or None}
        if s["PASSWORD"]:
            self.params["password"] = s["PASSWORD"]
        with psycopg.connect(dbname="postgres", autocommit=True, **self.params) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        user = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
        self.url = f"postgres://{user}@{s['HOST'] or 'localhost'}:{s['PORT'] or 5432}/{self.name}"

    def connect(self):
        import psycopg

        return psycopg.connect(dbname=self.name, **self.params)

    def drop(self):
        import psycopg

        with psycopg.connect(dbname="postgres", autocommit=True, **self.params) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def counts(cursor, tables) -> dict[str, int]:
    result = {}
    for table in tables:
        cursor.execute(f'SELECT COUNT(*) FROM "{table}"')
        result[table] = cursor.fetchone()[0]
    return result


@pytest.mark.django_db(transaction=True)
def test_backup_taken_while_uploads_run_restores_into_a_new_database(clinician, demo_model, tmp_path, settings):
    needs_postgresql()
    case = new_case(clinician)
    upload(case, clinician, count=2)
    uploader = Uploader(case, clinician)
    uploader.start()
    try:
        deadline = time.monotonic() + 30
        while uploader.done < 2 and uploader.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        before = TissuePatch.objects.count()
        out = backup(tmp_path / "backup")
        after = TissuePatch.objects.count()
    finally:
        uploader.finish()
    assert after > before, "no upload committed while the backup ran: the test proves nothing"
    assert "backup complete" in out

    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    snapshot_patches = manifest["tables"]["cases_tissuepatch"]
    assert before <= snapshot_patches <= after
    assert manifest["stored_files"] == {
        "count": snapshot_patches,
        "copied": snapshot_patches,
        "bytes": manifest["stored_files"]["bytes"],
    }
    assert manifest["problems"] == [] and manifest["database"]["vendor"] == "postgresql"
    assert [v["backup_dir"] for v in manifest["model_versions"]] == [f"models/{demo_model.pk}"]

    target = ScratchDatabase()
    try:
        media = tmp_path / "restored-media"
        result = manage(
            "restore",
            str(tmp_path / "backup"),
            env={"DATABASE_URL": target.url, "MEDIA_ROOT": str(media), "DATA_DIR": str(tmp_path / "var")},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restore complete and verified" in result.stdout
        assert f"the anchor (event #{json.loads((tmp_path / 'backup' / 'audit-anchor.json').read_text())['id']}" in (
            result.stdout
        )

        source = {p.pk: (p.storage_name, p.sha256) for p in TissuePatch.objects.all()}
        with connection.cursor() as cursor:
            cursor.execute("SELECT id, hash FROM audit_auditevent")
            source_events = dict(cursor.fetchall())
        with target.connect() as restored, restored.cursor() as cursor:
            # Every row of the snapshot is back, and nothing else.
            assert counts(cursor, manifest["tables"]) == manifest["tables"]
            cursor.execute("SELECT id, storage_name, sha256 FROM cases_tissuepatch ORDER BY id")
            patches = cursor.fetchall()
            assert len(patches) == snapshot_patches
            for pk, name, digest in patches:
                assert source[pk] == (name, digest)
                assert sha256(media / name) == digest  # every image back, through the storage, intact
            # Every audit event back, identical, and the snapshot is one moment: each patch's upload
            # event is there with it (they commit together).
            cursor.execute("SELECT id, hash FROM audit_auditevent")
            events = dict(cursor.fetchall())
            assert len(events) == manifest["tables"]["audit_auditevent"]
            assert all(source_events[pk] == digest for pk, digest in events.items())
            cursor.execute("SELECT target_id FROM audit_auditevent WHERE action = 'patch.create'")
            assert sorted(int(row[0]) for row in cursor.fetchall()) == [pk for pk, _, _ in patches]
        assert sorted(p.relative_to(media).as_posix() for p in media.rglob("*") if p.is_file()) == sorted(
            name for _, name, _ in patches
        )
    finally:
        target.drop()


@pytest.fixture(scope="module")
def demo_platform(tmp_path_factory) -> Path:
    """The local demo (SQLite, files under DATA_DIR) with a case of two uploaded patches: its DATA_DIR."""
    data_dir = tmp_path_factory.mktemp("demo") / "var"
    for step in (("migrate", "-v0"), ("seed_demo",)):
        result = manage(*step, env={"DATA_DIR": str(data_dir)})
        assert result.returncode == 0, result.stderr
    script = (
        "from accounts.models import User\n"
        "from cases.services import PatientData, case_create, patch_upload\n"
        "user = User.objects.get(username='clinician')\n"
        "case = case_create(institution=user.institution, created_by=user, patient=PatientData(mrn='M1', "
        "name='Ada'), accession='S1', specimen_site='rectum')\n"
        f"patch_upload(case=case, uploaded_by=user, files=[(p.rsplit('/', 1)[1], open(p, 'rb').read()) for p in "
        f"{[str(fixture_patch(n)) for n in ('NORM-TCGA-CWFDHWAH.png', 'TUM-AACHEHDV.tif')]!r}])\n"
    )
    result = manage("shell", "-c", script, env={"DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr
    return data_dir


def test_demo_backup_and_restore_on_sqlite(demo_platform, tmp_path):
    result = manage("backup", "--out", str(tmp_path / "backup"), env={"DATA_DIR": str(demo_platform)})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["database"] == {"vendor": "sqlite", "file": "database.sqlite3"}
    assert manifest["tables"]["cases_tissuepatch"] == 2 and manifest["stored_files"]["copied"] == 2
    manifest_sha256 = result.stdout.split("manifest.json SHA-256: ")[1].split()[0]

    target = tmp_path / "target"
    (target / "media").mkdir(parents=True)
    (target / "media" / "left-over.bmp").write_bytes(b"x")
    result = manage("restore", str(tmp_path / "backup"), env={"DATA_DIR": str(target)})
    assert result.returncode == 1
    assert "the media storage is not empty (it holds left-over.bmp" in result.stderr
    with sqlite3.connect(target / "cloudiopsy.sqlite3") as db:  # nothing was written
        assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone() == (0,)

    (target / "media" / "left-over.bmp").unlink()
    result = manage(
        "restore", str(tmp_path / "backup"), "--manifest-sha256", manifest_sha256, env={"DATA_DIR": str(target)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restore complete and verified" in result.stdout
    with sqlite3.connect(target / "cloudiopsy.sqlite3") as db:
        assert counts(db.cursor(), manifest["tables"]) == manifest["tables"]
        for name, digest in db.execute("SELECT storage_name, sha256 FROM cases_tissuepatch"):
            assert sha256(target / "media" / name) == digest
    # The restored platform is usable as it is: its own checks pass.
    result = manage(
        "verify_audit", "--anchor", str(tmp_path / "backup" / "audit-anchor.json"), env={"DATA_DIR": str(target)}
    )
    assert result.returncode == 0 and "matches" in result.stdout, result.stderr


def test_restore_of_a_backup_with_missing_files_fails_its_checks_unless_allowed(demo_platform, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(demo_platform, source)
    lost = sorted((source / "media").rglob("*.bmp"))[0]
    lost.unlink()
    result = manage("backup", "--out", str(tmp_path / "backup"), "--allow-missing", env={"DATA_DIR": str(source)})
    assert result.returncode == 0, result.stderr
    assert "missing from storage" in result.stderr and "images: 1 of 2" in result.stdout

    result = manage("restore", str(tmp_path / "backup"), env={"DATA_DIR": str(tmp_path / "target")})
    assert result.returncode == 1
    assert "FAIL  stored files: 1 of 2 match their rows' SHA-256; 1 do not:" in result.stderr
    assert re.search(r"\n +cases_tissuepatch #\d+: file patches/\S+ missing, row [0-9a-f]{64}\n", result.stderr)
    assert "restored, but 1 check(s) failed (above): do not put this copy into service" in result.stderr
    assert "OK    audit trail" in result.stderr and "OK    row counts" in result.stderr

    result = manage("restore", str(tmp_path / "backup"), "--allow-missing", env={"DATA_DIR": str(tmp_path / "target2")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 2 match their rows' SHA-256 (1 missing already when backed up" in result.stdout


@pytest.mark.django_db(transaction=True)
def test_snapshot_anchor_is_the_audit_anchor(clinician):
    upload(new_case(clinician), clinician)
    with connection.cursor() as cursor:
        ours = snapshot_anchor(cursor, anchored_at="then")
    theirs = audit_anchor()
    assert ours is not None and ours["count"] >= 3
    assert {**ours, "anchored_at": None} == {**theirs, "anchored_at": None}


@pytest.mark.django_db(transaction=True)
def test_backup_refuses_an_out_folder_that_is_not_empty(tmp_path):
    out = tmp_path / "backup"
    out.mkdir()
    (out / "old.txt").write_text("yesterday")
    with pytest.raises(CommandError, match=r"backup failed: .*backup is not empty: a backup goes into a new or empty"):
        backup(out)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CommandError, match="exists and is not a folder"):
        backup(tmp_path / "file")


@pytest.mark.django_db(transaction=True)
def test_backup_fails_on_a_row_without_its_file_unless_allowed(clinician, tmp_path, settings):
    patches = upload(new_case(clinician), clinician, count=2).patches
    (Path(settings.MEDIA_ROOT) / patches[1].storage_name).unlink()
    with pytest.raises(CommandError, match=rf"cases_tissuepatch #{patches[1].pk} \(.*\): missing from storage"):
        backup(tmp_path / "backup")
    assert not (tmp_path / "backup").exists()  # nothing half-kept, no patient data left behind

    out = backup(tmp_path / "backup", "--allow-missing", "--quiet")
    assert out == ""
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["stored_files"]["count"] == 2 and manifest["stored_files"]["copied"] == 1
    assert [(p["id"], p["problem"]) for p in manifest["problems"]] == [(patches[1].pk, "missing from storage")]
    assert f"media/{patches[0].storage_name}" in manifest["files"]
    assert f"media/{patches[1].storage_name}" not in manifest["files"]


@pytest.mark.django_db(transaction=True)
def test_backup_leaves_a_manifest_of_every_file_and_a_private_folder(clinician, tmp_path):
    upload(new_case(clinician), clinician, count=2)
    out = backup(tmp_path / "backup")
    folder = tmp_path / "backup"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [name for name in on_disk if name != "manifest.json"]
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(folder / name), "size": (folder / name).stat().st_size}
    assert folder.stat().st_mode & 0o077 == 0
    assert manifest["migrations"]["cases"] and manifest["tables"]["audit_auditevent"] >= 3
    assert f"manifest.json SHA-256: {sha256(folder / 'manifest.json')}" in out


@pytest.fixture
def a_backup(clinician, tmp_path):
    upload(new_case(clinician), clinician, count=2)
    backup(tmp_path / "backup")
    return tmp_path / "backup"


def restore(directory: Path, *extra: str) -> str:
    stdout = io.StringIO()
    call_command("restore", str(directory), *extra, stdout=stdout, stderr=io.StringIO())
    return stdout.getvalue()


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_database_that_is_not_empty(a_backup):
    with pytest.raises(CommandError, match=r"restore failed: the target database \S+ is not empty: it has \d+ table"):
        restore(a_backup)


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_tampered_file(a_backup):
    image = next((a_backup / "media").rglob("*.*"))
    image.write_bytes(image.read_bytes()[:-1] + b"\x00")
    name = image.relative_to(a_backup).as_posix()
    with pytest.raises(CommandError, match=rf"{name} in the backup .* has SHA-256 \w+ .* the manifest records \w+"):
        restore(a_backup)


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_file_the_manifest_does_not_list(a_backup):
    (a_backup / "media" / "extra.bmp").write_bytes(b"not from the backup")
    with pytest.raises(CommandError, match="holds files its manifest does not list: media/extra.bmp"):
        restore(a_backup)


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_backup_without_manifest(a_backup):
    (a_backup / "manifest.json").unlink()
    with pytest.raises(CommandError, match="has no manifest.json: the backup is incomplete"):
        restore(a_backup)
    with pytest.raises(CommandError, match="is not a folder"):
        restore(a_backup / "nowhere")


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_backup_of_another_migration_state(a_backup):
    manifest = json.loads((a_backup / "manifest.json").read_text())
    manifest["migrations"]["cases"] = "0001_initial"
    (a_backup / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match=r"other migrations than this code \(cases: backup 0001_initial, this code"):
        restore(a_backup)


def test_backup_and_restore_explain_themselves():
    for name in ("backup", "restore"):
        result = manage(name, "--help", env={})
        assert result.returncode == 0 and "docs/backup.md" in " ".join(result.stdout.split())
    result = manage("restore", env={})
    assert result.returncode != 0 and "DIR" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_restore_refuses_a_manifest_other_than_the_one_backup_printed(a_backup):
    with pytest.raises(CommandError, match=r"manifest.json has SHA-256 \w+, not the 0+ given"):
        restore(a_backup, "--manifest-sha256", "0" * 64)


@pytest.mark.django_db(transaction=True)
def test_backup_names_a_missing_pg_dump(tmp_path, settings):
    needs_postgresql()
    settings.PG_BIN_DIR = str(tmp_path / "no-client-here")
    with pytest.raises(CommandError, match=r"pg_dump was not found in PG_BIN_DIR \(.*no-client-here\): install"):
        backup(tmp_path / "backup")
    assert not (tmp_path / "backup").exists()


def test_pg_client_gets_the_password_from_the_environment():
    settings_dict = {
        "NAME": "cloudiopsy",
        "USER": "app",
        "PASSWORD": "s3cret",
        "HOST": "db.internal",
        "PORT": 5433,
        "OPTIONS": {"sslmode": "verify-full", "pool": True},
    }
    env = pg_environment(settings_dict)
    assert {k: env[k] for k in ("PGDATABASE", "PGUSER", "PGPASSWORD", "PGHOST", "PGPORT", "PGSSLMODE")} == {
        "PGDATABASE": "cloudiopsy",
        "PGUSER": "app",
        "PGPASSWORD": "s3cret",
        "PGHOST": "db.internal",
        "PGPORT": "5433",
        "PGSSLMODE": "verify-full",
    }


def test_demo_backup_restores_into_s3_storage(demo_platform, tmp_path):
    """Images go back through the storage API: here into an S3-compatible bucket (moto's server)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint, bucket = f"http://127.0.0.1:{port}", "restored-patches"
        credentials = {"aws_access_key_id": "backup-test", "aws_secret_access_key": "backup-test-secret"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)
        s3.create_bucket(Bucket=bucket)
        result = manage("backup", "--out", str(tmp_path / "backup"), env={"DATA_DIR": str(demo_platform)})
        assert result.returncode == 0, result.stderr
        manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
        storage = {
            "DATA_DIR": str(tmp_path / "target"),
            "STORAGE_BACKEND": "s3",
            "AWS_STORAGE_BUCKET_NAME": bucket,
            "AWS_S3_ENDPOINT_URL": endpoint,
            "AWS_S3_REGION_NAME": "us-east-1",
            "AWS_S3_ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": credentials["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": credentials["aws_secret_access_key"],
        }
        s3.put_object(Bucket=bucket, Key="patches/9/someone-elses.bmp", Body=b"x")
        result = manage("restore", str(tmp_path / "backup"), env=storage)
        assert result.returncode == 1 and "the media storage is not empty (it holds patches/9/" in result.stderr
        s3.delete_object(Bucket=bucket, Key="patches/9/someone-elses.bmp")

        result = manage("restore", str(tmp_path / "backup"), env=storage)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "OK    stored files: 2 of 2 match their rows' SHA-256" in result.stdout
        images = {n.removeprefix("media/"): e for n, e in manifest["files"].items() if n.startswith("media/")}
        keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert keys == set(images)
        for key, entry in images.items():
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        assert not (tmp_path / "target" / "media").exists()  # nothing on local disk
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
def test_backup_holds_each_slide_as_uploaded_and_its_result_arrays(clinician, demo_model, tmp_path, settings):
    from slides.jobs import slide_run_inline
    from slides.models import Slide
    from slides.services import slide_register

    fixture = ROOT / "tests" / "fixtures" / "slides" / "mosaic-small.tiff"
    case = new_case(clinician)
    analysed = slide_run_inline(slide_register(case=case, actor=clinician, path=fixture, name="a.tiff").pk)
    waiting = slide_register(case=case, actor=clinician, path=fixture, name="b.tiff")  # no results yet
    backup(tmp_path / "backup", "--quiet")
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    folder = tmp_path / "backup" / "media"
    assert sha256(folder / analysed.storage_name) == analysed.sha256 == sha256(fixture)
    assert sha256(folder / waiting.storage_name) == waiting.sha256
    assert sha256(folder / analysed.results_name) == analysed.results_sha256
    assert Slide.objects.get(pk=waiting.pk).results_name == ""
    # Both slides, one result file, and the 12 region patches of the analysed slide.
    assert manifest["stored_files"]["count"] == 2 + 1 + 12 and not manifest["problems"]
