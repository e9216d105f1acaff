"""Production settings: `check --deploy` is clean, and unsafe combinations refuse to start."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _production_env(**overrides) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DEBUG", "DATABASE_URL", "AUDIT_HMAC_KEY", "FIELD_ENCRYPTION_KEY"}
    }
    env.update(
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        AUDIT_HMAC_KEY=secrets.token_hex(32),
        FIELD_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/test",
        ALLOWED_HOSTS="cloudiopsy.example-hospital.org",
    )
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def _manage(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_prints_no_warnings_with_production_settings():
    result = _manage("check", "--deploy", env=_production_env())
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ({"DATABASE_URL": None}, "DATABASE_URL is not set"),
        ({"AUDIT_HMAC_KEY": None}, "AUDIT_HMAC_KEY"),
        ({"SECRET_KEY": None}, "SECRET_KEY"),
        ({"FIELD_ENCRYPTION_KEY": None}, "FIELD_ENCRYPTION_KEY"),
    ],
)
def test_production_refuses_to_start_without_its_database_or_keys(missing, message):
    result = _manage("check", env=_production_env(**missing))
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("django.core.exceptions.ImproperlyConfigured")


@pytest.mark.django_db
def test_production_headers(client, settings, clinician):
    """What the deploy settings send (set here as production would; tests run with DEBUG on)."""
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 31_536_000
    response = client.get("/login/", secure=True)
    assert response["Strict-Transport-Security"].startswith("max-age=31536000")
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "object-src 'none'" in policy and "frame-ancestors 'none'" in policy
    script_src = policy.split("script-src")[1].split(";")[0]
    assert "'self'" in script_src and "'unsafe-inline'" not in script_src
    assert response["X-Frame-Options"] == "DENY" and response["Referrer-Policy"] == "same-origin"
    insecure = client.get("/login/")
    assert insecure.status_code == 301 and insecure["Location"].startswith("https://")
    assert client.get("/healthz").status_code != 301  # load balancers probe over http

    client.force_login(clinician)
    page = client.get("/cases/", secure=True)
    nonce = page["Content-Security-Policy"].split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}"' in page.content.decode()  # our own inline scripts carry it
    assert "no-store" in page["Cache-Control"]


def test_database_out_of_reach_is_a_503_to_retry_not_a_500(rf):
    """handler500 tells a lost database (a restart, a failover) from a bug: 503 with Retry-After."""
    from django.db import OperationalError
    from django.urls import get_resolver

    server_error = get_resolver().resolve_error_handler(500)  # cloudiopsy.api.server_error

    for path, kind in (("/api/v1/cases/1/patches/", "application/problem+json"), ("/cases/1/", "text/html")):
        try:
            raise OperationalError("server closed the connection unexpectedly")
        except OperationalError:
            response = server_error(rf.post(path))
        assert response.status_code == 503 and response["Retry-After"] == "30"
        assert response["Content-Type"].startswith(kind)
        assert b"database cannot be reached" in response.content
    try:
        raise ValueError("a bug")
    except ValueError:
        assert server_error(rf.get("/api/v1/cases/")).status_code == 500


def test_a_view_that_meets_the_database_down_answers_503_even_under_debug(rf):
    from django.db import InterfaceError, OperationalError

    from cloudiopsy.middleware import DatabaseUnavailableMiddleware

    middleware = DatabaseUnavailableMiddleware(lambda request: None)
    for error in (OperationalError("connection refused"), InterfaceError("connection already closed")):
        response = middleware.process_exception(rf.post("/api/v1/cases/2/patches/"), error)
        assert response.status_code == 503 and response["Retry-After"] == "30"
    assert middleware.process_exception(rf.get("/cases/"), ValueError("a bug")) is None
