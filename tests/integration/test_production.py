"""The production shape, with real processes and no mocks: scripts/serve.py (check, migrate,
collectstatic, gunicorn, a Celery worker, Celery beat) with DEBUG off and every secret read from a
file, against PostgreSQL and Redis, PostgreSQL and RabbitMQ, S3-compatible storage (moto's server), and
a worker on another "machine" (a network namespace that reaches the services only over a veth link).

Locally these skip when a service is missing; under CI=true they fail instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from PIL import Image

from accounts.services import lab_system_create
from cases.models import TissuePatch
from inference.models import WorkerHeartbeat
from tests.conftest import ROOT, fixture_patch, stored_files, unavailable
from tests.integration.workers import database_url, flush_broker, require_postgres_and_redis, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Two patches the demo model classifies with confidence (as tests/integration/test_run_platform.py).
PATCHES = {"TUM-TCGA-KECNIDCQ.png": "TUM", "NORM-TCGA-INTLNRAV.png": "NORM"}
# Settings the production processes must not inherit from the test run: they get their own.
NOT_INHERITED = (
    "DEBUG", "SECRET_KEY", "AUDIT_HMAC_KEY", "FIELD_ENCRYPTION_KEY", "DATABASE_URL", "CELERY_BROKER_URL",
    "METRICS_TOKEN", "OIDC_RP_CLIENT_SECRET", "MEDIA_ROOT", "STATIC_ROOT", "DATA_DIR", "REDIS_CACHE_URL",
    "STORAGE_BACKEND", "DJANGO_SETTINGS_MODULE", "ALLOWED_HOSTS", "MIGRATE_DATABASE_URL",
)  # fmt: skip


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_secret(folder: Path, name: str, value: str) -> str:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / name
    path.write_text(value + "\n")  # as `echo` or a secrets manager writes it: the newline is stripped
    path.chmod(0o600)
    return str(path)


def production_env(tmp: Path, *, database: str, broker: str, **extra: str) -> dict[str, str]:
    """A production environment: DEBUG off, every secret in a file of its own, nothing from the test run."""
    from cryptography.fernet import Fernet

    env = {
        k: v
        for k, v in os.environ.items()
        if k.removesuffix("_FILE") not in NOT_INHERITED and not k.startswith(("AWS_", "CELERY_"))
    }
    folder = tmp / "secrets"
    env.update(
        SECRET_KEY_FILE=write_secret(folder, "secret_key", secrets.token_urlsafe(50)),
        AUDIT_HMAC_KEY_FILE=write_secret(folder, "audit_hmac_key", secrets.token_hex(32)),
        FIELD_ENCRYPTION_KEY_FILE=write_secret(folder, "field_encryption_key", Fernet.generate_key().decode()),
        DATABASE_URL_FILE=write_secret(folder, "database_url", database),
        CELERY_BROKER_URL_FILE=write_secret(folder, "celery_broker_url", broker),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        # The test is the TLS-terminating proxy: it sends X-Forwarded-Proto: https.
        BEHIND_TLS_PROXY="true",
        DATA_DIR=str(tmp / "data"),
        MEDIA_ROOT=str(tmp / "media"),
        WEB_CONCURRENCY="2",
        WORKER_CONCURRENCY="1",
        WORKER_HEARTBEAT_SECONDS="1",
        INFERENCE_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(extra)
    return env


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer to check, not to follow


NO_REDIRECTS = urllib.request.build_opener(_NoRedirect)


class Serve:
    """scripts/serve.py as a subprocess in a session of its own, its output in a log file."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str):
        self.env = env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "scripts/serve.py", "--bind", f"127.0.0.1:{self.port}", *args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None):
        """(status, headers, body); None for the status when nothing answers."""
        request = urllib.request.Request(
            self.base + path, data=data, headers={"X-Forwarded-Proto": "https", **(headers or {})}
        )
        try:
            with NO_REDIRECTS.open(request, timeout=20) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()
        except OSError:
            return None, {}, b""

    def wait_healthy(self, timeout: float = 150) -> dict:
        def healthy():
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited ({self.process.returncode}):\n{self.log()}")
            status, _, body = self.request("/healthz")
            return json.loads(body) if status == 200 else None

        try:
            return wait_for(healthy, timeout, "/healthz to answer 200", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def stop(self) -> None:
        """SIGTERM, as systemd or Ctrl-C would: everything started must end, and cleanly."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=90)
        finally:
            self._kill_leftovers()
            self._log.close()
        assert code == 0, self.log()
        stopped = re.search(r"serve: stopped: (.*)", self.log())
        assert stopped, self.log()
        statuses = re.findall(r"(\w+) \(status (-?\d+)\)", stopped.group(1))
        assert statuses and all(code == "0" for _, code in statuses), stopped.group(0)  # each ended cleanly
        assert self.request("/healthz")[0] is None  # nothing listens any more

    def _kill_leftovers(self) -> None:
        """Any process of its session still alive a few seconds after it exits is an error; kill it."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        raise AssertionError(f"processes of serve.py outlived it:\n{self.log()}")

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


@contextlib.contextmanager
def serving(tmp: Path, env: dict[str, str], *args: str):
    platform = Serve(tmp, env, *args)
    try:
        yield platform
        platform.stop()
    finally:
        platform.close()


def multipart(paths: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for path in paths:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + path.read_bytes()
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def lab_uploads_and_gets_results(platform: Serve, institution, accession: str) -> dict:
    """A lab system creates a case over HTTP, uploads the patches, and polls until they are analysed."""
    _, key = lab_system_create(institution=institution, name=f"LIS {accession}")
    auth = {"Authorization": f"Token {key}"}
    payload = {"patient": {"mrn": accession, "name": "Prod Test"}, "accession": accession, "specimen_site": "colon"}
    status, _, body = platform.request(
        "/api/v1/cases/", json.dumps(payload).encode(), {**auth, "Content-Type": "application/json"}
    )
    assert status == 201, (status, body, platform.log())
    case_id = json.loads(body)["id"]
    data, content_type = multipart([fixture_patch(name) for name in PATCHES])
    status, _, body = platform.request(
        f"/api/v1/cases/{case_id}/patches/", data, {**auth, "Content-Type": content_type}
    )
    assert status == 202, (status, body)

    def analysed():
        code, _, raw = platform.request(f"/api/v1/cases/{case_id}/", headers=auth)
        case = json.loads(raw) if code == 200 else {}
        return case if case.get("status") == "ready_for_review" else None

    try:
        case = wait_for(analysed, 120, "the patches to be analysed", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{platform.log()}") from None
    labels = {patch["original_name"]: patch["prediction"]["label"] for patch in case["patches"]}
    assert labels == PATCHES, case
    case["auth"] = auth
    return case


def assert_production_web(platform: Serve) -> None:
    """DEBUG is off, and static files come from WhiteNoise: compressed, hashed, cached for a year."""
    status, _, body = platform.request("/no-such-page/")
    assert status == 404 and b"URLconf" not in body  # no debug page
    status, headers, _ = platform.request("/login/", headers={"X-Forwarded-Proto": "http"})
    assert status == 301 and headers["Location"].startswith("https://")  # cleartext goes to https

    static_root = Path(platform.env["DATA_DIR"]) / "static"
    manifest = json.loads((static_root / "staticfiles.json").read_text())["paths"]
    hashed = manifest["admin/css/base.css"]
    assert hashed != "admin/css/base.css"
    status, headers, body = platform.request(f"/static/{hashed}", headers={"Accept-Encoding": "gzip"})
    assert status == 200, platform.log()
    assert "immutable" in headers["Cache-Control"] and "max-age=315360000" in headers["Cache-Control"]
    assert headers["Content-Encoding"] == "gzip" and body[:2] == b"\x1f\x8b"
    assert "Set-Cookie" not in headers  # answered before sessions
    status, _, _ = platform.request("/static/admin/css/no-such-file.css")
    assert status == 404


@pytest.fixture
def institution_with_model(demo_model, institution):
    return institution


@pytest.fixture
def redis_broker():
    url = require_postgres_and_redis()
    flush_broker(url)
    yield url
    flush_broker(url)


def test_production_shape_on_postgres_and_redis(tmp_path, institution_with_model, redis_broker):
    env = production_env(tmp_path, database=database_url(), broker=redis_broker)
    with serving(tmp_path, env) as platform:
        health = platform.wait_healthy()
        assert health["broker"]["transport"] == "redis" and health["database"]["engine"] == "postgresql"
        log = platform.log()
        assert "migrating the database" in log and "collecting static files" in log
        assert all(f"started {name} (pid" in log for name in ("web", "worker", "beat"))
        assert_production_web(platform)
        case = lab_uploads_and_gets_results(platform, institution_with_model, "PROD-REDIS-1")
        status, headers, body = platform.request(
            f"/api/v1/patches/{case['patches'][0]['id']}/image/", headers=case["auth"]
        )
        assert status == 200 and body.startswith(b"\x89PNG") and "no-store" in headers["Cache-Control"]
    assert len(stored_files(tmp_path / "media")) == len(PATCHES)  # the filesystem storage, by default


def serve_refusal(env: dict[str, str]) -> str:
    """What serve.py says when it refuses to start (it must, with status 2 and no traceback)."""
    result = subprocess.run(
        [sys.executable, "scripts/serve.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


def test_serve_refuses_to_start_without_its_secrets_or_database(tmp_path):
    broker = "redis://127.0.0.1:6379/12"
    env = production_env(tmp_path, database=database_url(), broker=broker)
    for name in ("AUDIT_HMAC_KEY_FILE", "DATABASE_URL_FILE"):
        del env[name]
    assert "refusing to start: missing AUDIT_HMAC_KEY, DATABASE_URL" in serve_refusal(env)

    env = production_env(tmp_path, database=database_url(), broker=broker, SECRET_KEY="also-in-the-environment")
    assert "both SECRET_KEY and SECRET_KEY_FILE are set" in serve_refusal(env)

    env = production_env(tmp_path, database=database_url(), broker=broker)
    env["AUDIT_HMAC_KEY_FILE"] = str(tmp_path / "secrets" / "not-there")
    said = serve_refusal(env)
    assert "AUDIT_HMAC_KEY_FILE names" in said and "cannot be read" in said

    env = production_env(tmp_path, database=database_url(), broker=broker, DEBUG="true")
    assert "DEBUG is on" in serve_refusal(env)

    env = production_env(tmp_path, database=database_url(), broker="filesystem://")
    assert "embedded filesystem broker" in serve_refusal(env)

    env = production_env(tmp_path, database=via(database_url(), "127.0.0.1", free_port()), broker=broker)
    assert "cannot connect to the database at 127.0.0.1:" in serve_refusal(env)


SETTINGS_PROBE = """
import json, django
django.setup()
from django.conf import settings
from django.core.files.storage import storages
storage = storages["default"]
print(json.dumps({
    "secret_key": settings.SECRET_KEY, "database_host": settings.DATABASES["default"]["HOST"],
    "database_password": settings.DATABASES["default"]["PASSWORD"], "broker": settings.CELERY_BROKER_URL,
    "middleware": settings.MIDDLEWARE, "staticfiles": settings.STORAGES["staticfiles"]["BACKEND"],
    "storage": type(storage).__module__ + "." + type(storage).__name__,
    "bucket": getattr(storage, "bucket_name", None), "acl": getattr(storage, "default_acl", None),
    "querystring_auth": getattr(storage, "querystring_auth", None), "secret": getattr(storage, "secret_key", None),
}))
"""


def settings_in(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SETTINGS_PROBE], cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "cloudiopsy.settings"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_production_settings_read_secrets_and_storage_from_files(tmp_path):
    s3 = {
        "STORAGE_BACKEND": "s3",
        "AWS_STORAGE_BUCKET_NAME": "hospital-patches",
        "AWS_S3_ENDPOINT_URL": "https://objects.hospital.example",
        "AWS_ACCESS_KEY_ID": "cloudiopsy",
        "AWS_SECRET_ACCESS_KEY_FILE": write_secret(tmp_path / "secrets", "s3", " s3 secret with spaces "),
    }
    env = production_env(
        tmp_path, database="postgres://app:p%40ss@db.hospital.example:5432/cloudiopsy",
        broker="amqp://app:mq-pass@mq.hospital.example:5672/cloudiopsy", **s3,
    )  # fmt: skip
    result = settings_in(env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["secret_key"] == Path(env["SECRET_KEY_FILE"]).read_text().removesuffix("\n")
    assert seen["database_host"] == "db.hospital.example" and seen["database_password"] == "p@ss"
    assert seen["broker"] == "amqp://app:mq-pass@mq.hospital.example:5672/cloudiopsy"
    middleware = seen["middleware"]
    whitenoise = middleware.index("whitenoise.middleware.WhiteNoiseMiddleware")
    assert middleware[whitenoise - 1] == "django.middleware.security.SecurityMiddleware"
    assert seen["staticfiles"] == "whitenoise.storage.CompressedManifestStaticFilesStorage"
    assert seen["storage"] == "storages.backends.s3.S3Storage" and seen["bucket"] == "hospital-patches"
    assert seen["acl"] == "private" and seen["querystring_auth"] is False
    assert seen["secret"] == " s3 secret with spaces "  # only the trailing newline is stripped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"STORAGE_BACKEND": "s3"}, "STORAGE_BACKEND=s3 needs AWS_STORAGE_BUCKET_NAME (the bucket for stored images)"),
        ({"STORAGE_BACKEND": "nfs"}, "STORAGE_BACKEND must be filesystem or s3, not 'nfs'"),
        ({"FIELD_ENCRYPTION_KEY_FILE": "/dev/null"}, "FIELD_ENCRYPTION_KEY_FILE names /dev/null, which is empty"),
        (
            {"CELERY_BROKER_URL": "redis://elsewhere:6379/0"},
            "both CELERY_BROKER_URL and CELERY_BROKER_URL_FILE are set: set only one of them",
        ),
    ],
)
def test_production_settings_refuse_unclear_storage_and_secrets(tmp_path, change, message):
    result = settings_in(
        {**production_env(tmp_path, database=database_url(), broker="redis://127.0.0.1:1/0"), **change}
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"django.core.exceptions.ImproperlyConfigured: {message}"


def test_systemd_units_and_procfile_are_valid_and_read_secrets_from_files(tmp_path):
    """The units parse, name programs that exist (with /opt/cloudiopsy being this checkout), and hand
    every secret over as a credential file, never in the environment file."""
    units = sorted((ROOT / "deploy" / "systemd").glob("cloudiopsy-*.service"))
    assert [unit.stem for unit in units] == [
        "cloudiopsy-beat",
        "cloudiopsy-migrate",
        "cloudiopsy-web",
        "cloudiopsy-worker",
    ]
    for unit in units:
        text = unit.read_text()
        wanted = ["SECRET_KEY", "AUDIT_HMAC_KEY", "FIELD_ENCRYPTION_KEY", "DATABASE_URL"]
        wanted += [] if unit.stem == "cloudiopsy-migrate" else ["CELERY_BROKER_URL"]
        for name in wanted:
            assert re.search(rf"^Environment=.*\b{name}_FILE=%d/\w+", text, re.M), (unit.name, name)
        credentials = set(re.findall(r"^LoadCredential=(\w+):", text, re.M))
        for used in re.findall(r"_FILE=%d/(\w+)", "\n".join(re.findall(r"^Environment=.*", text, re.M))):
            assert used in credentials, (unit.name, used)  # every file named is loaded
    example = (ROOT / "deploy" / "cloudiopsy.env.example").read_text()
    assigned = dict(re.findall(r"^(\w+)=(.*)$", example, re.M))
    assert not {"SECRET_KEY", "AUDIT_HMAC_KEY", "FIELD_ENCRYPTION_KEY", "DATABASE_URL", "CELERY_BROKER_URL"} & set(
        assigned
    )
    procfile = dict(
        line.split(": ", 1)
        for line in (ROOT / "deploy" / "Procfile").read_text().splitlines()
        if ": " in line and not line.startswith("#")
    )
    assert set(procfile) == {"release", "web", "worker", "beat"}

    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed: the units' syntax was not checked")
    copies = []
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/cloudiopsy", str(ROOT)))
        copies.append(str(copy))
    result = subprocess.run([analyze, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# RabbitMQ ------------------------------------------------------------------------------------------


@pytest.fixture
def rabbitmq_broker():
    """An AMQP URL: TEST_AMQP_URL, or a virtual host of its own on the local RabbitMQ (removed after)."""
    given = os.environ.get("TEST_AMQP_URL")
    vhost = None
    if given:
        url = given
    else:
        try:
            socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        except OSError as exc:
            unavailable(f"RabbitMQ is not reachable at 127.0.0.1:5672: {exc}")
        url = "amqp://guest:guest@127.0.0.1:5672//"
        ctl = shutil.which("rabbitmqctl")
        if ctl:
            name = f"cloudiopsy-test-{uuid.uuid4().hex[:8]}"
            made = subprocess.run([ctl, "add_vhost", name], capture_output=True, timeout=60)
            if made.returncode == 0:
                vhost = name
                subprocess.run([ctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                               capture_output=True, timeout=60)  # fmt: skip
                url = f"amqp://guest:guest@127.0.0.1:5672/{name}"
    from kombu import Connection

    try:
        try:
            with Connection(url, connect_timeout=5) as connection:
                connection.ensure_connection(max_retries=1)
        except Exception as exc:
            unavailable(f"cannot connect to RabbitMQ at {url.split('@')[-1]}: {exc}")
        yield url
    finally:
        if vhost:
            subprocess.run([shutil.which("rabbitmqctl"), "delete_vhost", vhost], capture_output=True, timeout=60)


def test_production_shape_with_rabbitmq_as_the_broker(tmp_path, institution_with_model, rabbitmq_broker):
    require_postgres_and_redis()  # PostgreSQL (Redis is not used here)
    env = production_env(tmp_path, database=database_url(), broker=rabbitmq_broker)
    with serving(tmp_path, env) as platform:
        health = platform.wait_healthy()
        assert health["broker"]["transport"] == "amqp", health
        lab_uploads_and_gets_results(platform, institution_with_model, "PROD-AMQP-1")
    assert "amqp://guest:**@127.0.0.1:5672" in platform.log_path.read_text(errors="replace")


# S3-compatible storage -----------------------------------------------------------------------------


class MotoS3:
    """moto's S3-compatible server (moto[server]) on ``host``, with one bucket."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1"):
        if importlib.util.find_spec("moto.server") is None:
            unavailable("moto[server] is not installed")
        self.port = free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self.access_key, self.secret_key = "cloudiopsy-test", secrets.token_hex(16)
        self.bucket = f"cloudiopsy-{uuid.uuid4().hex[:10]}"
        self._log = open(tmp / f"moto-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(self._answers, 30, f"moto's S3 server on {self.endpoint}")
            self.client().create_bucket(Bucket=self.bucket)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            unavailable(f"moto's S3 server exited ({self.process.returncode})")
        try:
            socket.create_connection(self.endpoint.removeprefix("http://").split(":"), timeout=1).close()
            return True
        except OSError:
            return False

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def env(self, tmp: Path) -> dict[str, str]:
        return {
            "STORAGE_BACKEND": "s3",
            "AWS_STORAGE_BUCKET_NAME": self.bucket,
            "AWS_S3_ENDPOINT_URL": self.endpoint,
            "AWS_S3_REGION_NAME": "us-east-1",
            "AWS_S3_ADDRESSING_STYLE": "path",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY_FILE": write_secret(tmp / "secrets", "s3_secret_key", self.secret_key),
        }

    def keys(self) -> set[str]:
        listing = self.client().list_objects_v2(Bucket=self.bucket)
        return {item["Key"] for item in listing.get("Contents", [])}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def moto_s3(tmp_path):
    server = MotoS3(tmp_path)
    yield server
    server.stop()


def assert_images_in_the_bucket(s3: MotoS3, platform: Serve, case: dict, media_roots: list[Path]) -> None:
    names = dict(TissuePatch.objects.filter(case_id=case["id"]).values_list("id", "storage_name"))
    assert s3.keys() == set(names.values())  # every stored image, and nothing else, is in the bucket
    client = s3.client()
    for patch in case["patches"]:
        key = names[patch["id"]]
        grants = client.get_object_acl(Bucket=s3.bucket, Key=key)["Grants"]
        assert all("URI" not in grant["Grantee"] for grant in grants), grants  # private: no AllUsers grant
        stored = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert stored[:2] == b"BM"  # re-encoded on upload (BMP), as the filesystem would hold it
        status, _, body = platform.request(f"/api/v1/patches/{patch['id']}/image/", headers=case["auth"])
        assert status == 200 and body.startswith(b"\x89PNG"), (status, body[:200])
        assert Image.open(io.BytesIO(body)).tobytes() == Image.open(io.BytesIO(stored)).convert("RGB").tobytes()
    for media_root in media_roots:
        assert stored_files(media_root) == []  # nothing on local disk


def test_production_shape_with_s3_storage(tmp_path, institution_with_model, redis_broker, moto_s3):
    env = production_env(tmp_path, database=database_url(), broker=redis_broker, **moto_s3.env(tmp_path))
    with serving(tmp_path, env) as platform:
        platform.wait_healthy()
        case = lab_uploads_and_gets_results(platform, institution_with_model, "PROD-S3-1")
        assert_images_in_the_bucket(moto_s3, platform, case, [tmp_path / "media"])


# A worker on another machine -----------------------------------------------------------------------


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or {"postgres": 5432, "redis": 6379}[parts.scheme]


def via(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (credentials kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"))


class TcpForwarder:
    """Listens on ``listen_host`` (an ephemeral port) and pipes every connection to ``target``: makes a
    service that listens on 127.0.0.1 only reachable on the veth address, as a remote host would see it."""

    def __init__(self, listen_host: str, target: tuple[str, int]):
        self.target = target
        self.loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"forward-{target[1]}", daemon=True)
        self.thread.start()
        start = asyncio.start_server(self._handle, listen_host, 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}

        async def pipe(source, sink):
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}

    def close(self) -> None:
        async def shut():
            self.server.close()
            for writer in list(self._writers):
                writer.close()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class NetworkNamespace:
    """A network namespace joined to the host by a veth pair: host side ``<net>.1``, namespace ``<net>.2``."""

    def __init__(self):
        if os.geteuid() != 0:
            unavailable("network namespaces need root")
        if not shutil.which("ip"):
            unavailable("iproute2 (`ip`) is not installed")
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.ns_if = f"cldtest-{tag}", f"cldh{tag}", f"cldn{tag}"
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        third = random.choice([n for n in range(100, 255) if f" 10.231.{n}." not in used])
        self.host_ip, self.ns_ip = f"10.231.{third}.1", f"10.231.{third}.2"
        made = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if made.returncode:
            unavailable(f"cannot create a network namespace: {made.stderr.strip()}")
        try:
            for command in (
                ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                ["ip", "link", "set", self.ns_if, "netns", self.name],
                ["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if],
                ["ip", "link", "set", self.host_if, "up"],
                ["ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if],
                ["ip", "-n", self.name, "link", "set", self.ns_if, "up"],
                ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ):
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    unavailable(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
        except BaseException:
            self.remove()
            raise

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)  # takes its peer with it
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def test_worker_on_another_machine_reaches_services_over_the_network_only(
    tmp_path, institution_with_model, redis_broker
):
    namespace = NetworkNamespace()
    forwarders: list[TcpForwarder] = []
    s3 = platform = worker = None
    try:
        # PostgreSQL and Redis listen on loopback only: forwarders make them reachable on the veth address.
        database = TcpForwarder(namespace.host_ip, address(database_url()))
        forwarders.append(database)
        redis = TcpForwarder(namespace.host_ip, address(redis_broker))
        forwarders.append(redis)
        db = via(database_url(), namespace.host_ip, database.port)
        broker = via(redis_broker, namespace.host_ip, redis.port)
        s3 = MotoS3(tmp_path, host=namespace.host_ip)  # one object store for every host

        # The other machine: not one of the host's loopback services is reachable from it.
        probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)"
        blocked = subprocess.run(
            namespace.command(sys.executable, "-c", probe, "127.0.0.1", "5432"), capture_output=True
        )
        assert blocked.returncode != 0
        reached = subprocess.run(namespace.command(sys.executable, "-c", probe, namespace.host_ip, str(database.port)))
        assert reached.returncode == 0

        # This host: the web app and beat, and no worker.
        web_env = production_env(tmp_path / "web", database=database_url(), broker=redis_broker, **s3.env(tmp_path))
        platform = Serve(tmp_path, web_env, "--processes", "web,beat")

        # The worker machine: its own configuration, its own empty media folder, everything over the veth.
        worker_tmp = tmp_path / "machine-b"
        worker_env = production_env(worker_tmp, database=db, broker=broker, **s3.env(worker_tmp))
        worker_log = open(tmp_path / "machine-b.log", "wb")
        worker = subprocess.Popen(
            namespace.command(sys.executable, "-m", "celery", "-A", "cloudiopsy", "worker", "--pool", "solo",
                              "--loglevel", "INFO", "--hostname", "machine-b@cloudiopsy-test", "--without-gossip",
                              "--without-mingle"),
            cwd=ROOT, env=worker_env, stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        health = platform.wait_healthy()  # the worker's heartbeat counts: it reached PostgreSQL
        assert health["worker"]["workers"] == 1
        assert list(WorkerHeartbeat.objects.values_list("hostname", flat=True)) == ["machine-b@cloudiopsy-test"]
        case = lab_uploads_and_gets_results(platform, institution_with_model, "PROD-NETNS-1")
        assert_images_in_the_bucket(s3, platform, case, [Path(web_env["MEDIA_ROOT"]), Path(worker_env["MEDIA_ROOT"])])
        worker_log.flush()
        log = (tmp_path / "machine-b.log").read_text(errors="replace")
        assert "machine-b@cloudiopsy-test ready" in log and "inference.tasks.prediction_run" in log, log[-4000:]
        assert "succeeded" in log
        platform.stop()
        worker.terminate()
        assert worker.wait(timeout=60) == 0, log[-4000:]
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        if platform is not None:
            platform.close()
        if s3 is not None:
            s3.stop()
        for forwarder in forwarders:
            forwarder.close()
        namespace.remove()
    assert subprocess.run(["ip", "netns", "pids", namespace.name], capture_output=True).returncode != 0  # gone
