from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from django.db import connection, transaction
from PIL import Image
from rest_framework.test import APIClient

from accounts.models import Institution, User
from accounts.services import lab_system_create

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_PATCHES = ROOT / "tests" / "fixtures" / "patches"
SHARED_DATA = ROOT.parent / "shared" / "data"
DEMO_MODEL = ROOT / "inference" / "demo_model"
_DEMO_METADATA = json.loads((DEMO_MODEL / "metadata.json").read_text())
DEMO_MODEL_NAME = f"{_DEMO_METADATA['name']} v{_DEMO_METADATA['version']}"  # as the platform shows it
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str):
    """Skip locally; fail under CI, where every real service and the shared data must be present."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        unavailable(f"{SHARED_DATA} is absent")
    return SHARED_DATA


def fixture_patch(name: str) -> Path:
    matches = list(FIXTURE_PATCHES.rglob(name))
    assert matches, name
    return matches[0]


def png_bytes(size=(224, 224), color=(200, 120, 160), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.SLIDE_UPLOAD_DIR = tmp_path / "slide-uploads"
    settings.SLIDE_CACHE_DIR = tmp_path / "slide-cache"
    return settings.MEDIA_ROOT


def stored_files(media_root: Path) -> list[Path]:
    return [p for p in Path(media_root).rglob("*") if p.is_file()] if Path(media_root).exists() else []


@pytest.fixture
def institution(db):
    return Institution.objects.create(name="St Mary's", slug="stmarys")


@pytest.fixture
def other_institution(db):
    return Institution.objects.create(name="Other Hospital", slug="other")


def make_user(institution, role, username=None):
    return User.objects.create_user(
        username=username or f"{role}-{institution.slug}",
        password="not-a-real-pass-1",
        institution=institution,
        role=role,
    )


@pytest.fixture
def clinician(institution):
    return make_user(institution, User.Role.CLINICIAN)


@pytest.fixture
def pathologist(institution):
    return make_user(institution, User.Role.PATHOLOGIST)


def authenticator(user):
    """The user's confirmed TOTP authenticator (created when missing), as if they had enrolled."""
    from django_otp.plugins.otp_totp.models import TOTPDevice

    return TOTPDevice.objects.filter(user=user, confirmed=True).first() or TOTPDevice.objects.create(
        user=user, name="test authenticator", confirmed=True
    )


def totp_code(device, steps_ahead: int = 0) -> str:
    """The code the user's authenticator app shows now (or ``steps_ahead`` 30-second steps later:
    a code is accepted once, and one step of clock drift is allowed)."""
    import time

    from django_otp.oath import TOTP

    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + steps_ahead * device.step
    return f"{totp.token():0{device.digits}d}"


def verified_login(client, user):
    """Sign ``user`` in as if they had passed their second factor (TOTP) too.

    Pathologists, administrators and superusers must pass one before any page (MFA_REQUIRED_ROLES);
    tests of other features sign them in with this instead of ``force_login``.
    """
    from django_otp import DEVICE_ID_SESSION_KEY

    client.force_login(user)
    session = client.session
    session[DEVICE_ID_SESSION_KEY] = authenticator(user).persistent_id
    session.save()
    return client


@pytest.fixture
def clinician_client(client, clinician):
    client.force_login(clinician)
    return client


def lab_client(institution) -> APIClient:
    _, key = lab_system_create(institution=institution, name="LIS")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return api


@pytest.fixture
def lab_api(institution):
    return lab_client(institution)


def new_case(user, accession: str = "S1", mrn: str = "M1"):
    from cases.services import PatientData, case_create

    return case_create(
        institution=user.institution,
        created_by=user,
        patient=PatientData(mrn=mrn, name=f"Patient {mrn}"),
        accession=accession,
        specimen_site="rectum",
    )


@pytest.fixture
def case(clinician):
    return new_case(clinician)


@pytest.fixture
def demo_model(db):
    from inference.services import model_activate, model_register

    version, _ = model_register(directory=DEMO_MODEL)
    model_activate(version=version, actor="test")
    version.refresh_from_db()
    return version


@pytest.fixture
def eager_celery():
    """Tasks run in the calling process (for tests of what a task does, not of the worker)."""
    from cloudiopsy.celery import app

    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


CASE_PAYLOAD = {
    "patient": {"mrn": "MRN-001", "name": "Ada Example", "birth_date": "1961-03-04", "sex": "female"},
    "accession": "S26-0001",
    "specimen_site": "sigmoid colon",
    "priority": "urgent",
    "clinical_notes": "Polyp, 12 mm.",
}


@contextlib.contextmanager
def triggers_set_aside():
    """As the table's owner, behind the append-only triggers' back, in one transaction: PostgreSQL
    disables them, SQLite drops them and creates them again."""
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER USER")
            yield cursor
            cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER USER")
        else:
            cursor.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_auditevent'"
            )
            triggers = cursor.fetchall()
            for name, _ in triggers:
                cursor.execute(f'DROP TRIGGER "{name}"')
            yield cursor
            for _, sql in triggers:
                cursor.execute(sql)


@pytest.fixture(autouse=True)
def _audit_trail_emptied_before_flush(request):
    """A transactional test ends with Django's flush, which the audit table refuses while it holds
    events (TRUNCATE on PostgreSQL, DELETE FROM on SQLite). Empty it first, as its owner; an empty
    table may be flushed. Belongs in conftest.py, for every transactional test of the suite."""
    marker = request.node.get_closest_marker("django_db")
    by_marker = marker is not None and (marker.kwargs.get("transaction") or marker.args[:1] == (True,))
    if not (by_marker or {"transactional_db", "live_server"} & set(request.fixturenames)):
        yield
        return
    request.getfixturevalue("transactional_db")  # set up first, so that it is flushed after this teardown
    yield
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent")


from tests.browser import browser  # noqa: E402, F401 - the headless Chromium fixture, for every browser test
