"""Management commands and /healthz."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import Institution, LabSystem, User
from inference.models import ModelVersion, WorkerHeartbeat
from tests.conftest import DEMO_MODEL_NAME, ROOT, unavailable

pytestmark = pytest.mark.django_db


def test_seed_demo_is_idempotent_and_prints_passwords():
    out = io.StringIO()
    call_command("seed_demo", stdout=out)
    call_command("seed_demo", stdout=io.StringIO())
    assert Institution.objects.filter(slug="demo").count() == 1
    users = {u.username: u for u in User.objects.all()}
    assert {u.role for u in users.values()} == {"clinician", "pathologist", "admin"}
    assert all(u.institution.slug == "demo" for u in users.values())
    assert users["admin"].is_staff and not users["clinician"].is_staff
    assert users["pathologist"].check_password("pathologist-demo-pass")
    assert "'pathologist-demo-pass'" in out.getvalue()
    active = ModelVersion.objects.get(is_active=True)
    assert ModelVersion.objects.count() == 1 and active.classes[-1] == "TUM"


def test_seed_demo_never_changes_an_existing_user():
    call_command("seed_demo", stdout=io.StringIO())
    admin = User.objects.get(username="admin")
    admin.set_password("a-changed-long-passphrase")
    admin.is_superuser = False
    admin.save()
    call_command("seed_demo", stdout=io.StringIO(), stderr=io.StringIO())
    admin.refresh_from_db()
    assert admin.check_password("a-changed-long-passphrase") and not admin.is_superuser


def test_create_lab_token_prints_a_working_key_once(client):
    call_command("seed_demo", stdout=io.StringIO())
    out, err = io.StringIO(), io.StringIO()
    call_command("create_lab_token", institution="demo", name="LIS", stdout=out, stderr=err)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("LAB_TOKEN=")]
    assert len(lines) == 1
    key = lines[0].removeprefix("LAB_TOKEN=")
    assert LabSystem.objects.get().token_hash != key
    response = client.get("/api/v1/cases/", HTTP_AUTHORIZATION=f"Token {key}")
    assert response.status_code == 200


def test_create_lab_token_errors_name_the_problem():
    call_command("seed_demo", stdout=io.StringIO())
    with pytest.raises(CommandError, match="no institution with slug 'nowhere'"):
        call_command("create_lab_token", institution="nowhere", name="LIS")
    call_command("create_lab_token", institution="demo", name="LIS", stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(CommandError, match="already has a lab system named 'LIS'"):
        call_command("create_lab_token", institution="demo", name="LIS")


@pytest.mark.django_db(transaction=True)
def test_create_lab_token_from_the_shell_prints_the_line():
    # The command as scripts use it: a separate process, the key on a line of its own.
    from django.db import connection

    if connection.vendor != "postgresql":
        unavailable("PostgreSQL is not the test database (set DATABASE_URL)")
    call_command("seed_demo", stdout=io.StringIO())
    env = {**os.environ, "DEBUG": "true"}
    result = subprocess.run(
        [sys.executable, "manage.py", "create_lab_token", "--institution", "demo", "--name", "shell"],
        cwd=ROOT,
        env={**env, "DATABASE_URL": _database_url()},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("LAB_TOKEN=cldy_")]


def _database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    return f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


def test_healthz_reports_each_part_and_503_when_one_is_down(client):
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"]["ok"] and body["broker"]["ok"]
    assert not body["worker"]["ok"] and not body["model"]["ok"]
    call_command("seed_demo", stdout=io.StringIO())
    now = timezone.now()
    WorkerHeartbeat.objects.create(hostname="w@test", last_seen=now, started_at=now)
    response = client.get("/healthz")
    assert response.status_code == 200, response.json()
    assert response.json()["model"]["version"] == DEMO_MODEL_NAME
    WorkerHeartbeat.objects.update(last_seen=now - timezone.timedelta(minutes=5))
    assert client.get("/healthz").status_code == 503


def test_healthz_reports_unreachable_broker(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["broker"]["ok"] is False and body["broker"]["error"]
    assert body["status"] == "unavailable"
