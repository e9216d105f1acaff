"""Run the whole platform locally: migrate, seed the demo, start the web server and a worker.

Used by ``make run``. Picks the broker: ``CELERY_BROKER_URL`` when set, else Redis at
``REDIS_URL`` (default redis://127.0.0.1:6379/0) when it answers, else the embedded filesystem
broker under DATA_DIR (no server needed). Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent


def redis_answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def demo_refusal(env: dict[str, str]) -> str:
    """Why this environment is not the local demo's (empty if it is): make run migrates and seeds
    demo users into the database it is given, with DEBUG on."""
    if env.get("DEBUG", "").lower() in {"0", "false", "no", "off"}:
        return (
            "DEBUG=false is a production setting; make run is the local demo (DEBUG on). "
            "For production see README.md, 'Production'."
        )
    database = env.get("DATABASE_URL", "")
    if database and env.get("DEMO_DATABASE", "").lower() not in {"1", "true", "yes"}:
        where = urlparse(database)
        return (
            f"DATABASE_URL points at {where.hostname or 'a server'}/{where.path.lstrip('/')}: make run would "
            "migrate it and add demo users and a demo model there. Unset DATABASE_URL for the demo's own "
            "SQLite database, or say that this database is a demo one with DEMO_DATABASE=true."
        )
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args()

    env = dict(os.environ)
    refusal = demo_refusal(env)
    if refusal:
        print(f"make run: {refusal}", file=sys.stderr)
        return 2
    env.setdefault("DEBUG", "true")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not env.get("CELERY_BROKER_URL"):
        redis_url = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        if redis_answers(redis_url):
            env["CELERY_BROKER_URL"] = redis_url
        else:
            env["CELERY_BROKER_URL"] = "filesystem://"
    print(f"broker: {env['CELERY_BROKER_URL']}", flush=True)
    print(
        f"database: {env.get('DATABASE_URL') or 'SQLite under ' + env.get('DATA_DIR', str(ROOT / 'var'))}", flush=True
    )

    python = sys.executable
    manage = [python, str(ROOT / "manage.py")]
    for command in (["migrate", "--noinput"], ["seed_demo"]):
        subprocess.run(manage + command, env=env, cwd=ROOT, check=True)

    children = [
        subprocess.Popen(
            [
                python,
                "-m",
                "celery",
                "-A",
                "cloudiopsy",
                "worker",
                "--beat",
                "--loglevel",
                "INFO",
                "--concurrency",
                env.get("WORKER_CONCURRENCY", "1"),
                "--hostname",
                f"worker-{os.getpid()}@%h",
                "--schedule",
                str(Path(env.get("DATA_DIR", ROOT / "var")) / "celerybeat-schedule"),
            ],
            env=env,
            cwd=ROOT,
        ),
        subprocess.Popen([*manage, "runserver", "--noreload", f"{args.host}:{args.port}"], env=env, cwd=ROOT),
    ]
    print(f"Cloudiopsy: http://{args.host}:{args.port}/  (Ctrl-C stops the web server and the worker)", flush=True)

    def stop(*_, code: int = 0):
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        sys.exit(code)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    print("a process of the platform exited; stopping the others", file=sys.stderr, flush=True)
    stop(code=1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
