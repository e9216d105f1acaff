"""Log lines that can be followed across processes: a request id on every line, JSON or plain.

``RequestIdMiddleware`` takes the caller's ``X-Request-ID`` (when it is a sane token) or makes one,
keeps it in a context variable for the request, returns it in the response and logs one line per
request. The Celery signal handlers in ``cloudiopsy/celery.py`` carry it in a message header into
the tasks sent during the request, so that the worker's lines for that task carry it too.
``RequestIdFilter`` (on the handler) puts it, and the running task's name and id, on each record;
``JsonFormatter`` and ``PlainFormatter`` write the line (``LOG_FORMAT``). See docs/observability.md.

Imports neither Django settings nor Celery at module level: ``LOGGING`` names these classes and
the logging configuration may be applied before either is ready.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
import uuid
from contextvars import ContextVar, Token
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
# The Celery message header that carries the request id from the web process to the worker.
TASK_HEADER = "cloudiopsy_request_id"
_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

request_id_var: ContextVar[str | None] = ContextVar("cloudiopsy_request_id", default=None)
# (task name, task id) of the Celery task running in this context.
task_var: ContextVar[tuple[str, str] | None] = ContextVar("cloudiopsy_task", default=None)

access_logger = logging.getLogger("cloudiopsy.access")


def sane_request_id(value: Any) -> str | None:
    """``value`` when it is a usable request id (1-64 of ``A-Z a-z 0-9 . _ -``), else None: a
    caller's id goes into log lines and headers, so nothing that could forge or break a line."""
    if isinstance(value, str) and _SANE_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return request_id_var.get()


def request_id_set(value: str | None) -> Token:
    return request_id_var.set(value)


def request_id_reset(token: Token) -> None:
    request_id_var.reset(token)


class RequestIdMiddleware:
    """First in ``MIDDLEWARE``: every line logged while the request is handled (and every task it
    sends) carries its id. Logs one line per request (logger ``cloudiopsy.access``) when
    ``LOG_REQUESTS`` is on: method, path without the query string (which may hold an MRN
    search), view, status and duration."""

    def __init__(self, get_response):
        from django.conf import settings

        self.get_response = get_response
        self.log_requests = settings.LOG_REQUESTS

    def __call__(self, request):
        request_id = sane_request_id(request.headers.get(REQUEST_ID_HEADER)) or new_request_id()
        request.request_id = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            response = self.get_response(request)
            response[REQUEST_ID_HEADER] = request_id
            if self.log_requests:
                match = getattr(request, "resolver_match", None)
                access_logger.info(
                    "%s %s %s",
                    request.method,
                    request.path,
                    response.status_code,
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "view": (match.view_name or match.route) if match else None,
                        "status": response.status_code,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
            return response
        finally:
            request_id_var.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts ``request_id``, ``task_name`` and ``task_id`` (None when there is none) on every record
    the handler writes. Attach it to handlers, not loggers: a handler sees the records of every
    logger below it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        task = task_var.get()
        if getattr(record, "task_name", None) is None:
            record.task_name = task[0] if task else None
        if getattr(record, "task_id", None) is None:
            record.task_id = task[1] if task else None
        return True


# Added by RequestIdFilter; left out of a JSON line when None ("when there is one").
_OPTIONAL_FIELDS = ("request_id", "task_name", "task_id")


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: ``timestamp`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
    ``message``, then ``request_id`` / ``task_name`` / ``task_id`` when there are, the record's
    ``extra`` fields and ``exc_info`` (the traceback, as text) for exceptions."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["timestamp"] = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        for field in _OPTIONAL_FIELDS:
            if log_data.get(field) is None:
                log_data.pop(field, None)


class PlainFormatter(logging.Formatter):
    """The local demo's lines: ``time level logger [request id] message``; the brackets only when
    there is a request id."""

    def __init__(self, fmt: str | None = None, *args, **kwargs):
        super().__init__(fmt or "%(asctime)s %(levelname)s %(name)s%(request_tag)s %(message)s", *args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        try:
            return super().format(record)
        finally:
            del record.request_tag  # the record goes on to other handlers (a JSON one would show it)
