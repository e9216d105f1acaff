"""GET /metrics: who may read it, what it shows after real traffic, the broker's queues, and the
figures of several gunicorn processes added up (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from accounts.models import User
from cases.models import BiopsyCase, TissuePatch
from inference.models import WorkerHeartbeat
from tests.conftest import CASE_PAYLOAD, ROOT, fixture_patch, make_user, unavailable, verified_login

TOKEN = "test-metrics-token-" + "x" * 20


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _scrape(client) -> dict:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return _samples(response.content.decode())


@pytest.fixture
def token(settings):
    settings.METRICS_TOKEN = TOKEN
    return TOKEN


# Who may read it ---------------------------------------------------------------------------------


def test_anonymous_is_refused_when_no_token_is_configured(client, db, settings):
    settings.METRICS_TOKEN = ""
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer "}, {"HTTP_AUTHORIZATION": "Bearer anything"}):
        response = client.get("/metrics", **headers)
        assert response.status_code == 403
        assert b"cloudiopsy_" not in response.content


def test_scraper_without_the_right_token_gets_401_and_no_figures(client, db, token):
    for headers in (
        {},
        {"HTTP_AUTHORIZATION": "Bearer wrong-token"},
        {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}x"},
        {"HTTP_AUTHORIZATION": f"Basic {TOKEN}"},
        {"HTTP_AUTHORIZATION": f"Token {TOKEN}"},
    ):
        response = client.get("/metrics", **headers)
        assert response.status_code == 401, headers
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"cloudiopsy_" not in response.content and b"_bucket" not in response.content


def test_signed_in_user_who_is_not_a_superuser_is_refused(client, clinician, settings):
    settings.METRICS_TOKEN = ""
    client.force_login(clinician)
    response = client.get("/metrics")
    assert response.status_code == 403
    assert b"cloudiopsy_" not in response.content


def test_superuser_reads_metrics_only_after_the_second_factor(client, institution, settings):
    settings.METRICS_TOKEN = ""
    admin = make_user(institution, User.Role.ADMIN, username="root")
    admin.is_superuser = admin.is_staff = True
    admin.save()
    client.force_login(admin)
    assert client.get("/metrics").status_code == 302  # to the second factor
    verified_login(client, admin)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"cloudiopsy_patches" in response.content


def test_right_token_reads_metrics_and_nothing_is_cached(client, db, token):
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]
    assert client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


def _settings_in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DEBUG": "true", "DJANGO_SETTINGS_MODULE": "cloudiopsy.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; {code}"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_token_is_read_from_metrics_token_file(tmp_path):
    path = tmp_path / "metrics-token"
    path.write_text("from-a-file-123\n")
    result = _settings_in_subprocess("print(settings.METRICS_TOKEN)", METRICS_TOKEN_FILE=str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-a-file-123"


def test_missing_multiprocess_folder_is_a_clear_configuration_error(tmp_path):
    result = _settings_in_subprocess("pass", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "absent"))
    assert result.returncode != 0
    assert "PROMETHEUS_MULTIPROC_DIR" in result.stderr and "is not an existing folder" in result.stderr


# What it shows -----------------------------------------------------------------------------------


def _upload(api, case_id: int, *names: str):
    handles = [open(fixture_patch(name), "rb") for name in names]
    try:
        return api.post(f"/api/v1/cases/{case_id}/patches/", {"image": handles}, format="multipart")
    finally:
        for handle in handles:
            handle.close()


def test_scrape_after_real_traffic_shows_requests_tasks_audit_and_patches_by_status(
    client, lab_api, institution, demo_model, eager_celery, token, django_capture_on_commit_callbacks
):
    before = _scrape(client)
    upload_view = {"view": "api:case-patches", "method": "POST", "status": "2xx"}
    task = {"task": "inference.tasks.prediction_run", "outcome": "success"}

    first = lab_api.post("/api/v1/cases/", CASE_PAYLOAD, format="json")
    assert first.status_code == 201
    with django_capture_on_commit_callbacks(execute=True):
        analysed = _upload(lab_api, first.json()["id"], "NORM-TCGA-CWFDHWAH.png", "TUM-TCGA-KECNIDCQ.png")
    assert analysed.status_code in {201, 202}, analysed.content
    second = lab_api.post("/api/v1/cases/", {**CASE_PAYLOAD, "accession": "S26-0002"}, format="json").json()
    # Not analysed: the on-commit enqueue is never run, as if no worker had it yet.
    assert _upload(lab_api, second["id"], "NORM-TCGA-INTLNRAV.png").status_code in {201, 202}
    assert lab_api.get("/api/v1/cases/12345/").status_code == 404
    WorkerHeartbeat.objects.create(
        hostname="w1@gpu-host", last_seen=timezone.now() - datetime.timedelta(seconds=30), started_at=timezone.now()
    )

    after = _scrape(client)
    assert TissuePatch.objects.filter(status=TissuePatch.Status.DONE).count() == 2
    assert _value(after, "cloudiopsy_patches", status="done") == 2
    assert _value(after, "cloudiopsy_patches", status="queued") == 1
    for status in ("running", "failed", "unassessable"):
        assert _value(after, "cloudiopsy_patches", status=status) == 0
    assert _value(after, "cloudiopsy_cases", status="ready_for_review") == 1
    assert _value(after, "cloudiopsy_cases", status="analysing") == 1
    assert _value(after, "cloudiopsy_cases", status="signed_out") == 0

    def delta(name, **labels):
        return (_value(after, name, **labels) or 0) - (_value(before, name, **labels) or 0)

    assert delta("cloudiopsy_http_request_duration_seconds_count", **upload_view) == 2
    assert delta("cloudiopsy_http_request_duration_seconds_sum", **upload_view) > 0
    assert (
        delta("cloudiopsy_http_request_duration_seconds_count", view="api:case-list", method="POST", status="2xx") == 2
    )
    # The 404's label is the URL's name, never the path with its id.
    assert (
        delta("cloudiopsy_http_request_duration_seconds_count", view="api:case-detail", method="GET", status="4xx") == 1
    )
    assert not any("12345" in str(labels) for _, labels in after)
    assert delta("cloudiopsy_celery_tasks_total", **task) == 1
    assert delta("cloudiopsy_celery_task_duration_seconds_count", task=task["task"]) == 1
    # Case and patch creation, analysis, transitions: each appended to the audit chain.
    assert delta("cloudiopsy_audit_append_duration_seconds_count") >= 5

    assert _value(after, "cloudiopsy_analysis_results_in_window") == 2
    p50 = _value(after, "cloudiopsy_analysis_latency_seconds", quantile="0.5")
    longest = _value(after, "cloudiopsy_analysis_latency_seconds", quantile="1.0")
    assert p50 is not None and 0 <= p50 <= longest < 600
    age = _value(after, "cloudiopsy_worker_heartbeat_age_seconds", worker="w1@gpu-host")
    assert 29 <= age < 120
    assert _value(after, "cloudiopsy_database_up") == 1


def test_analysis_latency_is_upload_to_result_within_the_window(client, case, clinician, demo_model, token, settings):
    from inference.models import Prediction

    settings.METRICS_ANALYSIS_WINDOW_SECONDS = 3600
    now = timezone.now()
    patches = [
        TissuePatch.objects.create(
            case=case, storage_name=f"patches/x/{i}.png", sha256="0" * 64, source_sha256="0" * 64, width=224,
            height=224, format="PNG", original_name=f"{i}.png", enqueued_at=now, status=TissuePatch.Status.DONE,
        )
        for i in range(4)
    ]  # fmt: skip
    for patch, (uploaded_ago, result_ago) in zip(patches, [(20, 10), (50, 20), (70, 30), (9000, 7200)], strict=True):
        TissuePatch.objects.filter(pk=patch.pk).update(created_at=now - datetime.timedelta(seconds=uploaded_ago))
        prediction = Prediction.objects.create(
            patch=patch, model_version=demo_model, scores={"NORM": 1.0}, label="NORM", inference_seconds=0.1
        )
        Prediction.objects.filter(pk=prediction.pk).update(created_at=now - datetime.timedelta(seconds=result_ago))
    samples = _scrape(client)
    # Latencies 10, 30 and 40 s in the window; the result of two hours ago is outside it.
    assert _value(samples, "cloudiopsy_analysis_results_in_window") == 3
    assert _value(samples, "cloudiopsy_analysis_latency_seconds", quantile="0.5") == pytest.approx(30, abs=1)
    assert _value(samples, "cloudiopsy_analysis_latency_seconds", quantile="1.0") == pytest.approx(40, abs=1)


def test_webhook_deliveries_by_outcome(client, institution, case, token):
    from accounts.services import lab_system_create
    from webhooks.models import WebhookDelivery, WebhookEndpoint

    lab, _ = lab_system_create(institution=institution, name="LIS")
    endpoint = WebhookEndpoint.objects.create(lab_system=lab, url="https://lis.example.org/hook")
    for status in ["delivered", "delivered", "failed", "pending"]:
        WebhookDelivery.objects.create(
            endpoint=endpoint, event=WebhookEndpoint.Event.CASE_READY, case=case, payload={}, status=status
        )
    samples = _scrape(client)
    assert _value(samples, "cloudiopsy_webhook_deliveries", status="delivered") == 2
    assert _value(samples, "cloudiopsy_webhook_deliveries", status="failed") == 1
    assert _value(samples, "cloudiopsy_webhook_deliveries", status="pending") == 1
    assert _value(samples, "cloudiopsy_webhook_deliveries", status="sending") == 0


def test_scrape_queries_do_not_grow_with_the_rows(client, case, clinician, token, django_assert_num_queries):
    def add_rows(n: int, start: int) -> None:
        for i in range(start, start + n):
            WorkerHeartbeat.objects.create(hostname=f"w{i}@host", last_seen=timezone.now(), started_at=timezone.now())
            BiopsyCase.objects.filter(pk=case.pk).update(status=BiopsyCase.Status.ANALYSING)

    add_rows(1, 0)
    with django_assert_num_queries(7):  # patches, cases, slides, chunks, webhooks by status; heartbeats; latencies
        client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    add_rows(20, 1)
    with django_assert_num_queries(7):
        samples = _scrape(client)
    assert sum(1 for name, _ in samples if name == "cloudiopsy_worker_heartbeat_age_seconds") == 21


def test_a_worker_gone_for_more_than_a_day_is_no_longer_reported(client, db, token):
    long_ago = timezone.now() - datetime.timedelta(days=2)
    WorkerHeartbeat.objects.create(hostname="old@host", last_seen=long_ago, started_at=long_ago)
    samples = _scrape(client)
    assert _value(samples, "cloudiopsy_worker_heartbeat_age_seconds", worker="old@host") is None


# The broker --------------------------------------------------------------------------------------


def test_broker_that_cannot_be_reached_is_marked_down_not_a_500(client, db, token, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    started = time.monotonic()
    samples = _scrape(client)
    assert time.monotonic() - started < 10
    assert _value(samples, "cloudiopsy_broker_up") == 0
    assert not [name for name, _ in samples if name == "cloudiopsy_queue_messages"]
    assert _value(samples, "cloudiopsy_patches", status="queued") == 0  # the rest is still there


def test_configured_broker_reports_each_celery_queue(client, db, token):
    samples = _scrape(client)
    assert _value(samples, "cloudiopsy_broker_up") == 1
    for queue in ("celery", "webhooks"):
        assert _value(samples, "cloudiopsy_queue_messages", queue=queue) is not None


def _reachable(url: str) -> bool:
    from cloudiopsy.celery import app

    try:
        with app.connection_for_read(url) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        return True
    except Exception:
        return False


def _broker_urls() -> list:
    redis_url = os.environ.get("CELERY_BROKER_URL", "")
    return [
        pytest.param(redis_url if redis_url.startswith("redis://") else None, id="redis"),
        pytest.param(os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"), id="rabbitmq"),
    ]


@pytest.mark.services
@pytest.mark.parametrize("url", _broker_urls())
def test_queue_depth_is_asked_of_redis_and_rabbitmq(url):
    """Messages put on a queue of its own (nobody else's work is touched) are counted by the same
    passive declare on both brokers; a queue the broker has never seen counts 0."""
    from kombu import Exchange, Producer, Queue

    from cloudiopsy.celery import app, broker_queue_depths

    if url is None:
        unavailable("CELERY_BROKER_URL is not a Redis URL")
    if not _reachable(url):
        unavailable(f"the broker at {url.split('@')[-1]} is not reachable")
    name = f"test-metrics-{uuid.uuid4().hex[:12]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    # Publisher confirms: RabbitMQ routes a message asynchronously, and without waiting for its
    # confirm a declare on another channel may count fewer than were published (seen in CI: 1 of 3).
    with app.connection_for_write(url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel)
        for i in range(3):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json")
        try:
            depths = broker_queue_depths(url=url, queues=[name, f"{name}-never-declared"])
        finally:
            queue(conn.default_channel).delete()
            queue.exchange(conn.default_channel).delete()
    assert depths == {name: 3, f"{name}-never-declared": 0}


# Several processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.services
@pytest.mark.slow
def test_gunicorn_processes_add_up_in_multiprocess_mode(db, tmp_path):
    """Two gunicorn workers, each replaced after 5 requests: 24 requests are served by at least five
    processes, most of them gone by the scrape, and the scrape (by whichever process) counts all 24."""
    from tests.integration.workers import database_url

    if connection.vendor != "postgresql":
        unavailable("the test database is not PostgreSQL (set DATABASE_URL)")
    folder = tmp_path / "prometheus"
    folder.mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "DEBUG": "true",
        "DATABASE_URL": database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "METRICS_TOKEN": TOKEN,
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_REQUESTS": "false",
    }
    log = open(tmp_path / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "cloudiopsy.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", "2", "--max-requests", "5", "--max-requests-jitter", "0", "--timeout", "60"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/login/", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "gunicorn.log").read_text()[-3000:]) from None
                time.sleep(0.3)

        def get_login(_):
            with urllib.request.urlopen(f"{base}/login/", timeout=30) as answer:
                return answer.status

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(get_login, range(23))) == {200}
        request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            samples = _samples(answer.read().decode())
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    served_by = {path.stem.rsplit("_", 1)[-1] for path in folder.glob("histogram_*.db")}
    assert len(served_by) >= 5, served_by
    labels = {"view": "login", "method": "GET", "status": "2xx"}
    assert _value(samples, "cloudiopsy_http_request_duration_seconds_count", **labels) == 24
    assert _value(samples, "cloudiopsy_patches", status="queued") == 0


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_worker_serves_its_task_metrics_on_worker_metrics_port(institution, demo_model, tmp_path):
    from tests.conftest import lab_client
    from tests.integration.workers import Worker, flush_broker, require_postgres_and_redis, wait_for

    broker = require_postgres_and_redis()
    flush_broker(broker)
    port = _free_port()
    worker = Worker("metrics", broker, tmp_path, WORKER_METRICS_PORT=str(port))
    try:
        worker.wait_ready()
        api = lab_client(institution)
        case = api.post("/api/v1/cases/", CASE_PAYLOAD, format="json").json()
        response = _upload(api, case["id"], "NORM-TCGA-CWFDHWAH.png")
        assert response.status_code in {201, 202}, response.content
        patch_id = response.json()["patches"][0]["id"]
        wait_for(
            lambda: TissuePatch.objects.get(pk=patch_id).status == TissuePatch.Status.DONE,
            timeout=120,
            what=f"the worker to analyse patch {patch_id}:\n{worker.log()}",
        )

        def scraped():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                samples = _samples(answer.read().decode())
            task = "inference.tasks.prediction_run"
            return _value(samples, "cloudiopsy_celery_tasks_total", task=task, outcome="success") and samples

        samples = wait_for(scraped, timeout=30, what="the worker's task metrics")
    finally:
        worker.stop()
        flush_broker(broker)
    assert (
        _value(samples, "cloudiopsy_celery_tasks_total", task="inference.tasks.prediction_run", outcome="success") == 1
    )
    assert _value(samples, "cloudiopsy_celery_task_duration_seconds_count", task="inference.tasks.prediction_run") == 1
    # The worker's port shows what the worker measured, not the platform's figures (those are /metrics').
    assert _value(samples, "cloudiopsy_patches", status="done") is None


def test_slides_and_their_chunks_are_counted_by_status(client, db, token, case, demo_model):
    from pathlib import Path

    from slides import jobs
    from slides.services import slide_register

    fixture = Path(__file__).parent / "fixtures" / "slides" / "mosaic-small.tiff"
    slide = slide_register(case=case, actor=case.created_by, path=fixture, name="a.tiff")
    slide_register(case=case, actor=case.created_by, path=fixture, name="b.tiff")
    jobs.slide_tile(slide_id=slide.pk)  # one chunk of 98 tiles (256 a chunk), queued
    samples = _scrape(client)
    assert _value(samples, "cloudiopsy_slides", status="queued") == 1
    assert _value(samples, "cloudiopsy_slides", status="analysing") == 1
    assert _value(samples, "cloudiopsy_slides", status="done") == 0
    assert _value(samples, "cloudiopsy_slide_chunks", status="queued") == 1
