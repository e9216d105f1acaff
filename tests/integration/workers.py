"""Real Celery worker processes against the test database, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

from tests.conftest import ROOT, unavailable


def require_postgres_and_redis() -> str:
    """The broker URL; skip (locally) or fail (CI) unless PostgreSQL and Redis are in use and up."""
    if connection.vendor != "postgresql":
        unavailable("the test database is not PostgreSQL (set DATABASE_URL)")
    broker = settings.CELERY_BROKER_URL
    if not broker.startswith("redis://"):
        unavailable("the broker is not Redis (set CELERY_BROKER_URL=redis://...)")
    import redis

    try:
        redis.Redis.from_url(broker, socket_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {broker} is not reachable: {exc}")
    return broker


def flush_broker(broker: str) -> None:
    import redis

    redis.Redis.from_url(broker).flushdb()


def queue_length(broker: str, queue: str = "celery") -> int:
    import redis

    return int(redis.Redis.from_url(broker).llen(queue))


def database_url() -> str:
    s = connection.settings_dict
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"postgres://{s['USER']}{password}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


class Worker:
    """A `celery worker` process (solo pool: the process that runs tasks is the one we kill)."""

    def __init__(self, name: str, broker: str, log_dir: Path, **env: str):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        worker_env = {
            **os.environ,
            "DEBUG": "true",
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": broker,
            "MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "DATA_DIR": str(log_dir / "data"),
            "WORKER_HEARTBEAT_SECONDS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "cloudiopsy", "worker", "--pool", "solo",
             "--loglevel", "INFO", "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=worker_env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 90) -> None:
        from inference.models import WorkerHeartbeat

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.log()}")
            if WorkerHeartbeat.objects.filter(hostname__startswith=f"{self.name}@").exists():
                return
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
