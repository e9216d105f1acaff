"""Management commands and /healthz."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import Institution, LabSystem, User
from cloudiopsy.admin_tenancy import INSTITUTION_ADMIN_GROUP, INSTITUTION_ADMIN_PERMISSIONS
from inference.models import ModelVersion, WorkerHeartbeat
from tests.conftest import DEMO_MODEL_NAME, ROOT, unavailable

pytestmark = pytest.mark.django_db


def test_seed_demo_is_idempotent_and_prints_passwords():
    out = io.StringIO()
    call_command("seed_demo", stdout=out)
    call_command("seed_demo", stdout=io.StringIO())
    assert Institution.objects.filter(slug="demo").count() == 1
    users = {u.username: u for u in User.objects.all()}
    assert set(users) == {"clinician", "pathologist", "labmanager", "admin", "operator"}
    assert {u.role for u in users.values()} == {"clinician", "pathologist", "lab_manager", "admin"}
    assert all(users[name].institution.slug == "demo" for name in ("clinician", "pathologist", "labmanager", "admin"))
    assert not any(users[name].is_staff for name in ("clinician", "pathologist", "labmanager"))
    assert users["pathologist"].check_password("pathologist-demo-pass")
    # The hospital's administrator is staff of the demo institution, not a superuser...
    admin = users["admin"]
    assert admin.is_staff and not admin.is_superuser and admin.role == "admin"
    assert [g.name for g in admin.groups.all()] == [INSTITUTION_ADMIN_GROUP]
    # ...the platform operator is a superuser of no institution.
    operator = users["operator"]
    assert operator.is_superuser and operator.is_staff and operator.institution is None
    assert operator.check_password("operator-demo-pass")
    text = out.getvalue()
    assert "'pathologist-demo-pass'" in text and "'operator-demo-pass'" in text and "Platform operator" in text
    active = ModelVersion.objects.get(is_active=True)
    assert ModelVersion.objects.count() == 1 and active.classes[-1] == "TUM"


def test_seed_demo_gives_institution_administrators_only_the_listed_permissions():
    call_command("seed_demo", stdout=io.StringIO())
    group = Group.objects.get(name=INSTITUTION_ADMIN_GROUP)
    granted = {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.select_related("content_type")}
    assert granted == set(INSTITUTION_ADMIN_PERMISSIONS)
    admin = User.objects.get(username="admin")
    for refused in (
        "audit.change_auditevent",
        "audit.delete_auditevent",
        "inference.change_prediction",
        "inference.change_modelversion",
        "inference.add_modelactivation",
        "auth.change_group",
        "accounts.delete_user",
        "cases.delete_patient",
        "otp_totp.view_totpdevice",
    ):
        assert not admin.has_perm(refused), refused


def test_seeded_institution_admin_sees_only_the_demo_institution_in_the_admin(client):
    from cases.models import Patient
    from tests.conftest import verified_login

    call_command("seed_demo", stdout=io.StringIO())
    demo = Institution.objects.get(slug="demo")
    other = Institution.objects.create(name="Elsewhere", slug="elsewhere")
    Patient.objects.create(institution=demo, mrn="D-1", name="Demo Person")
    Patient.objects.create(institution=other, mrn="E-1", name="Elsewhere Person")
    verified_login(client, User.objects.get(username="admin"))
    patients = client.get("/admin/cases/patient/").content.decode()
    assert "Demo Person" in patients and "Elsewhere Person" not in patients
    assert client.get("/admin/audit/auditevent/").status_code == 200
    assert client.get("/admin/auth/group/").status_code == 403
    verified_login(client, User.objects.get(username="operator"))
    patients = client.get("/admin/cases/patient/").content.decode()
    assert "Demo Person" in patients and "Elsewhere Person" in patients


def test_seed_demo_never_changes_an_existing_user():
    call_command("seed_demo", stdout=io.StringIO())
    admin = User.objects.get(username="admin")
    admin.set_password("a-changed-long-passphrase")
    admin.is_staff = False
    admin.save()
    admin.groups.clear()
    operator = User.objects.get(username="operator")
    operator.is_superuser = False
    operator.save()
    out = io.StringIO()
    call_command("seed_demo", stdout=out, stderr=io.StringIO())
    admin.refresh_from_db()
    operator.refresh_from_db()
    assert admin.check_password("a-changed-long-passphrase") and not admin.is_staff and not admin.groups.exists()
    assert not operator.is_superuser
    assert "'admin-demo-pass'" not in out.getvalue() and "exists already" in out.getvalue()


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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/hospital"}, "127.0.0.1/hospital"),
        ({"DEBUG": "false"}, "production setting"),
    ],
)
def test_make_run_refuses_a_database_or_settings_that_are_not_the_demo(tmp_path, env, message):
    import subprocess
    import sys

    from tests.conftest import ROOT

    base = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DEBUG"}}
    result = subprocess.run(
        [sys.executable, "scripts/run_platform.py"],
        cwd=ROOT,
        env={**base, "DATA_DIR": str(tmp_path / "var"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "var").exists()  # nothing migrated, seeded or started
