"""Fixtures of the integration tests that run real `celery worker` processes."""

from __future__ import annotations

import pytest

from tests.integration.workers import Worker, flush_broker, require_postgres_and_redis


@pytest.fixture
def broker():
    """The Redis broker of the tests, emptied before and after (skips, or fails under CI, without it)."""
    url = require_postgres_and_redis()
    flush_broker(url)
    yield url
    flush_broker(url)


@pytest.fixture
def workers(broker, tmp_path):
    """``start(name, **env)`` starts a worker with these settings and waits for its heartbeat; all
    are stopped at the end."""
    started: list[Worker] = []

    def start(name: str, **env: str) -> Worker:
        worker = Worker(name, broker, tmp_path, **env)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
