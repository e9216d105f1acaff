"""Request ids and log lines: the middleware, the filter and formatters, the id's way through an
on-commit enqueue, and (with a real worker) into the worker's log lines for the task it sent."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import uuid

import pytest
from django.http import HttpResponse
from django.test import RequestFactory

from cloudiopsy.logging import (
    TASK_HEADER,
    JsonFormatter,
    PlainFormatter,
    RequestIdFilter,
    RequestIdMiddleware,
    current_request_id,
    request_id_var,
    task_var,
)
from tests.conftest import ROOT, fixture_patch, lab_client

HEX_ID = re.compile(r"[0-9a-f]{32}")


def _through_middleware(header: str | None):
    seen = {}

    def view(request):
        seen["id"] = current_request_id()
        seen["attribute"] = request.request_id
        return HttpResponse("ok")

    headers = {} if header is None else {"HTTP_X_REQUEST_ID": header}
    response = RequestIdMiddleware(view)(RequestFactory().get("/somewhere", **headers))
    return seen, response


@pytest.mark.parametrize("header", ["abc-123", "A.b_C-9", "x" * 64, "0f" * 16])
def test_sane_request_id_is_kept_and_returned(header):
    seen, response = _through_middleware(header)
    assert seen == {"id": header, "attribute": header}
    assert response["X-Request-ID"] == header
    assert current_request_id() is None  # reset once the request is answered


@pytest.mark.parametrize(
    "header",
    ["", "x" * 65, "has space", "new\nline", 'quote"d', "semi;colon", "é-accent", "a/b", "{json}", "%0a"],
)
def test_unusable_request_id_is_replaced_by_a_fresh_one(header):
    seen, response = _through_middleware(header)
    assert HEX_ID.fullmatch(seen["id"]), seen
    assert response["X-Request-ID"] == seen["id"] != header


def test_each_request_without_an_id_gets_its_own():
    ids = {_through_middleware(None)[0]["id"] for _ in range(20)}
    assert len(ids) == 20 and all(HEX_ID.fullmatch(i) for i in ids)


def test_id_is_reset_even_when_the_view_raises():
    def view(request):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        RequestIdMiddleware(view)(RequestFactory().get("/", HTTP_X_REQUEST_ID="failing-request"))
    assert current_request_id() is None


def test_full_stack_returns_the_id_and_logs_an_access_line(client, db, caplog):
    with caplog.at_level(logging.INFO, logger="cloudiopsy.access"):
        response = client.get("/login/?next=/cases/MRN-SECRET/", HTTP_X_REQUEST_ID="from-the-proxy-1")
    assert response["X-Request-ID"] == "from-the-proxy-1"
    (record,) = [r for r in caplog.records if r.name == "cloudiopsy.access"]
    assert (record.method, record.path, record.view, record.status) == ("GET", "/login/", "login", 200)
    assert record.duration_ms >= 0
    assert "MRN-SECRET" not in record.getMessage()  # the query string is not logged


def _record(message="hello %s", args=("world",), **extra) -> logging.LogRecord:
    record = logging.LogRecord("cases.services", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_filter_adds_the_request_and_task_of_the_context():
    record = _record()
    RequestIdFilter().filter(record)
    assert (record.request_id, record.task_name, record.task_id) == (None, None, None)
    request_token = request_id_var.set("req-1")
    task_token = task_var.set(("inference.tasks.prediction_run", "task-9"))
    try:
        record = _record()
        assert RequestIdFilter().filter(record) is True
    finally:
        task_var.reset(task_token)
        request_id_var.reset(request_token)
    assert (record.request_id, record.task_name, record.task_id) == (
        "req-1",
        "inference.tasks.prediction_run",
        "task-9",
    )


def test_json_line_has_timestamp_level_logger_message_and_request_id():
    token = request_id_var.set("req-42")
    try:
        record = _record(case=7)
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "cases.services"
    assert data["message"] == "hello world" and data["request_id"] == "req-42" and data["case"] == 7
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", data["timestamp"])
    assert "task_id" not in data and "task_name" not in data


def test_json_line_without_a_request_has_no_request_id_and_keeps_tracebacks():
    try:
        raise ValueError("bad patch")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RequestIdFilter().filter(record)
    data = json.loads(JsonFormatter().format(record))
    assert "request_id" not in data
    assert "ValueError: bad patch" in data["exc_info"]


def test_plain_line_shows_the_request_id_only_when_there_is_one():
    with_id = _record(request_id="req-7")
    without = _record(request_id=None)
    assert PlainFormatter().format(with_id).endswith("WARNING cases.services [req-7] hello world")
    assert PlainFormatter().format(without).endswith("WARNING cases.services hello world")
    assert "request_tag" not in json.loads(JsonFormatter().format(with_id))  # nothing left on the record


def _settings_in_subprocess(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DEBUG": "true", "DJANGO_SETTINGS_MODULE": "cloudiopsy.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; {code}"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_log_format_setting_is_json_or_plain():
    result = _settings_in_subprocess("print(settings.LOGGING['handlers']['console']['formatter'])", LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "json"
    result = _settings_in_subprocess("pass", LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "LOG_FORMAT must be json or plain, not 'xml'" in result.stderr


def test_json_logging_configured_by_settings_writes_json_lines():
    code = "import logging; logging.getLogger('cases.services').warning('written %s', 'as json')"
    result = _settings_in_subprocess(code, LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "cases.services", "written as json")


def test_publish_handler_puts_the_request_id_in_the_message_headers():
    from cloudiopsy.celery import _request_id_to_message

    headers: dict = {}
    _request_id_to_message(headers=headers)
    assert headers == {}  # outside a request: nothing to carry
    token = request_id_var.set("req-to-worker")
    try:
        _request_id_to_message(headers=headers)
    finally:
        request_id_var.reset(token)
    assert headers == {TASK_HEADER: "req-to-worker"}


@pytest.mark.django_db(transaction=True)
def test_request_id_survives_until_the_on_commit_enqueue(institution, demo_model):
    """patches_queued is sent after commit; with real commits (no test transaction) that is still
    inside the request, so the analysis message gets the request's id."""
    from cases.signals import patches_queued
    from cloudiopsy.celery import _request_id_to_message

    seen = []

    def receiver(sender=None, patch_ids=(), **kwargs):
        headers: dict = {}
        _request_id_to_message(headers=headers)
        seen.append((patch_ids, current_request_id(), headers))

    patches_queued.connect(receiver, dispatch_uid="test-request-id-on-commit")
    # The real receiver would publish to the broker: set it aside for this test.
    from inference.tasks import analysis_enqueue

    patches_queued.disconnect(dispatch_uid="inference.tasks.analysis_enqueue")
    try:
        api = lab_client(institution)
        case = api.post("/api/v1/cases/", _case_payload(), format="json").json()
        with open(fixture_patch("NORM-TCGA-CWFDHWAH.png"), "rb") as image:
            response = api.post(
                f"/api/v1/cases/{case['id']}/patches/", {"image": image}, format="multipart",
                HTTP_X_REQUEST_ID="upload-req-1",
            )  # fmt: skip
    finally:
        patches_queued.disconnect(dispatch_uid="test-request-id-on-commit")
        patches_queued.connect(analysis_enqueue, dispatch_uid="inference.tasks.analysis_enqueue")
    assert response.status_code in {201, 202}, response.content
    assert len(seen) == 1
    patch_ids, request_id, headers = seen[0]
    assert patch_ids == [response.json()["patches"][0]["id"]]
    assert request_id == "upload-req-1" and headers == {TASK_HEADER: "upload-req-1"}


def _case_payload() -> dict:
    from tests.conftest import CASE_PAYLOAD

    return {**CASE_PAYLOAD, "accession": f"S-{uuid.uuid4().hex[:8]}"}


# With a real worker ------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue  # the worker's start-up banner is not a log line
        if isinstance(data, dict):
            lines.append(data)
    return lines


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_upload_request_id_reaches_the_workers_log_lines_for_its_analysis(institution, demo_model, tmp_path):
    from cases.models import TissuePatch
    from tests.integration.workers import Worker, flush_broker, require_postgres_and_redis, wait_for

    broker = require_postgres_and_redis()
    flush_broker(broker)
    web_log = tmp_path / "web.log"
    handler = logging.FileHandler(web_log)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    worker = Worker("reqid", broker, tmp_path, LOG_FORMAT="json")
    request_id = f"it-{uuid.uuid4().hex}"
    try:
        worker.wait_ready()
        api = lab_client(institution)
        case = api.post("/api/v1/cases/", _case_payload(), format="json").json()
        with open(fixture_patch("TUM-TCGA-KECNIDCQ.png"), "rb") as image:
            response = api.post(
                f"/api/v1/cases/{case['id']}/patches/", {"image": image}, format="multipart",
                HTTP_X_REQUEST_ID=request_id,
            )  # fmt: skip
        assert response.status_code in {201, 202}, response.content
        assert response["X-Request-ID"] == request_id
        patch_id = response.json()["patches"][0]["id"]
        wait_for(
            lambda: TissuePatch.objects.get(pk=patch_id).status == TissuePatch.Status.DONE,
            timeout=120,
            what=f"the worker to analyse patch {patch_id}:\n{worker.log()}",
        )
        worker_lines = wait_for(
            lambda: [
                line
                for line in _json_lines(worker.log_path.read_text(errors="replace"))
                if line.get("request_id") == request_id
            ],
            timeout=30,
            what="the worker's log line with the request id",
        )
    finally:
        worker.stop()
        root.removeHandler(handler)
        handler.close()
        flush_broker(broker)

    web_lines = [line for line in _json_lines(web_log.read_text()) if line.get("request_id") == request_id]
    assert any(
        line["logger"] == "cloudiopsy.access" and line["path"] == f"/api/v1/cases/{case['id']}/patches/"
        for line in web_lines
    ), web_lines
    # The worker's lines for this request are those of the analysis task it sent, and say so.
    assert {line["task_name"] for line in worker_lines} == {"inference.tasks.prediction_run"}
    finished = [line for line in worker_lines if "succeeded" in line["message"]]
    assert finished, worker_lines
    for line in worker_lines:
        assert {"timestamp", "level", "logger", "message", "task_id"} <= line.keys()
    # A line of another task (none here) or outside a task would carry no request id.
    all_lines = _json_lines(worker.log_path.read_text(errors="replace"))
    assert all(line.get("request_id") in {None, request_id} for line in all_lines)
