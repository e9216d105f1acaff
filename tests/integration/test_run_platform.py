"""`make run`'s script with embedded defaults: SQLite and the filesystem broker, no services."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.conftest import ROOT, fixture_patch
from tests.integration.workers import wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


def _multipart(path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_run_platform_serves_login_and_analyses_a_patch_without_services(tmp_path):
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE", "MEDIA_ROOT"}
    }
    env.update(DATA_DIR=str(tmp_path / "var"), REDIS_URL="redis://127.0.0.1:1/0", DEBUG="true", PORT=str(port))
    log = open(tmp_path / "run.log", "wb")
    runner = subprocess.Popen(
        [sys.executable, "scripts/run_platform.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: _request(f"{base}/login/")[0] == 200, 120, "the login page")
            status, page = _request(f"{base}/login/")
            assert b"Log in" in page
            token = subprocess.run(
                [sys.executable, "manage.py", "create_lab_token", "--institution", "demo", "--name", "run-test"],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            key = next(line for line in token.splitlines() if line.startswith("LAB_TOKEN=")).split("=", 1)[1]
            auth = {"Authorization": f"Token {key}"}
            payload = {"patient": {"mrn": "R-1", "name": "Run Test"}, "accession": "R-1", "specimen_site": "colon"}
            status, body = _request(
                f"{base}/api/v1/cases/", json.dumps(payload).encode(), {**auth, "Content-Type": "application/json"}
            )
            assert status == 201, body
            case_id = json.loads(body)["id"]
            data, content_type = _multipart(fixture_patch("TUM-TCGA-KECNIDCQ.png"))
            status, body = _request(
                f"{base}/api/v1/cases/{case_id}/patches/", data, {**auth, "Content-Type": content_type}
            )
            assert status == 202, body

            def analysed():
                code, raw = _request(f"{base}/api/v1/cases/{case_id}/", headers=auth)
                case = json.loads(raw) if code == 200 else {}
                return case if case.get("status") == "ready_for_review" else None

            case = wait_for(analysed, 120, "the patch to be analysed", interval=0.5)
            assert case["patches"][0]["prediction"]["label"] == "TUM"
            # The example client for lab integrators, against the same running server.
            client = subprocess.run(
                [sys.executable, "examples/lis_client.py", "--url", base, "--token", key, "--accession", "R-2",
                 "--mrn", "R-2", "--name", "Client Test", "--timeout", "120",
                 str(fixture_patch("NORM-TCGA-INTLNRAV.png")), str(fixture_patch("TUM-AACHEHDV.tif"))],
                cwd=ROOT, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            assert client.returncode == 0, client.stderr
            assert "2 patches queued, 0 rejected" in client.stdout
            assert "NORM-TCGA-INTLNRAV.png: done NORM" in client.stdout
            assert "TUM-AACHEHDV.tif: done TUM" in client.stdout
            assert '"status": "preliminary"' in client.stdout
            status, health = _request(f"{base}/healthz")
            health = json.loads(health)
            assert status == 200, health
            assert health["broker"]["transport"] == "filesystem" and health["database"]["engine"] == "sqlite"
        except AssertionError:
            log.flush()
            pytest.fail((tmp_path / "run.log").read_text(errors="replace")[-6000:])
    finally:
        runner.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            runner.wait(timeout=40)
        finally:
            if runner.poll() is None:
                runner.kill()
            log.close()
    time.sleep(0.5)
    assert _request(f"{base}/login/")[0] is None  # the web server stopped with it
    assert (tmp_path / "var" / "cloudiopsy.sqlite3").exists()
