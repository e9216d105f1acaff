"""Run Cloudiopsy on this host in its production shape (``make serve``).

DEBUG off. First the settings are checked (``check --deploy``), the database migrated and the static
files collected; then the web app runs under gunicorn (deploy/gunicorn.conf.py), and a Celery worker
and Celery beat run as processes of their own. It refuses to start, naming what is missing, without
SECRET_KEY, AUDIT_HMAC_KEY, FIELD_ENCRYPTION_KEY, DATABASE_URL and CELERY_BROKER_URL (each as the
variable or, better, as NAME_FILE naming a file that holds it).

On several hosts run only what each host is for (``--processes web``, ``--processes worker``; beat on
exactly one host) and migrate from one host only (``--no-migrate`` elsewhere). SIGTERM or Ctrl-C stops
every process it started; if one of them exits, the others are stopped and it exits non-zero.
See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("SECRET_KEY", "AUDIT_HMAC_KEY", "FIELD_ENCRYPTION_KEY", "DATABASE_URL", "CELERY_BROKER_URL")
PROCESSES = ("web", "worker", "beat")
FALSE = {"0", "false", "no", "off"}


def say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


def refusal(env: dict[str, str]) -> str:
    """Why this environment cannot run the production shape (empty when it can)."""
    if (env.get("DEBUG") or "false").strip().lower() not in FALSE:
        return "DEBUG is on; the production shape runs with DEBUG off (unset DEBUG). For the local demo: make run."
    missing = [name for name in REQUIRED if not env.get(name) and not env.get(f"{name}_FILE")]
    if missing:
        return (
            f"missing {', '.join(missing)}: set each as NAME_FILE naming a file that holds it (or as NAME). "
            "See docs/deployment.md and deploy/cloudiopsy.env.example."
        )
    return ""


def load_settings():
    """Django's settings, read here so that a configuration error is one line, not a traceback."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudiopsy.settings")
    try:
        import django

        django.setup()
    except ImproperlyConfigured as exc:
        say(f"refusing to start: configuration error: {exc}")
        raise SystemExit(2) from None
    if settings.CELERY_BROKER_URL.startswith("filesystem://"):
        say(
            "refusing to start: CELERY_BROKER_URL is the embedded filesystem broker, which only works on "
            "one host for the local demo: use redis://... or amqp://..."
        )
        raise SystemExit(2)
    return settings


def prepare(*, migrate: bool, collectstatic: bool, env: dict[str, str]) -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError
    from django.db import DatabaseError, connection, connections

    try:
        call_command("check", deploy=True)
    except SystemCheckError as exc:
        say(f"refusing to start: the system checks failed:\n{exc}")
        raise SystemExit(2) from None
    try:
        connection.ensure_connection()
    except DatabaseError as exc:
        where = f"{connection.settings_dict['HOST'] or 'localhost'}:{connection.settings_dict['PORT'] or 5432}"
        say(f"refusing to start: cannot connect to the database at {where}: {str(exc).strip().splitlines()[0]}")
        raise SystemExit(2) from None
    if migrate:
        # As the database owner when MIGRATE_DATABASE_URL is given (docs/audit.md): only this
        # short-lived process ever sees the owner's credentials.
        migrate_env = dict(env)
        owner = {k: migrate_env.pop(k) for k in ("MIGRATE_DATABASE_URL", "MIGRATE_DATABASE_URL_FILE") if k in env}
        if owner:
            for key in ("DATABASE_URL", "DATABASE_URL_FILE"):
                migrate_env.pop(key, None)
            key = next(iter(owner))
            migrate_env[key.replace("MIGRATE_", "")] = owner[key]
        say("migrating the database" + (" (as MIGRATE_DATABASE_URL's role)" if owner else ""))
        result = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=migrate_env, check=False
        )
        if result.returncode:
            say(f"migrate failed (exit status {result.returncode}); nothing was started")
            raise SystemExit(1)
    if collectstatic:
        say("collecting static files")
        call_command("collectstatic", interactive=False, verbosity=1)
    connections.close_all()


def commands(args, settings) -> dict[str, list[str]]:
    celery = [sys.executable, "-m", "celery", "-A", "cloudiopsy"]
    worker = [*celery, "worker", "--loglevel", args.log_level, "--hostname", args.worker_name]
    if args.worker_concurrency:
        worker += ["--concurrency", str(args.worker_concurrency)]
    if args.queues:
        worker += ["--queues", args.queues]
    schedule = Path(settings.DATA_DIR) / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    return {
        "web": [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(ROOT / "deploy" / "gunicorn.conf.py"),
            "cloudiopsy.wsgi",
        ],
        "worker": worker,
        "beat": [*celery, "beat", "--loglevel", args.log_level, "--schedule", str(schedule)],
    }


def supervise(children: dict[str, subprocess.Popen], stopping: dict, stop_timeout: float) -> int:
    exited = None
    while stopping["signal"] is None and exited is None:
        exited = next((name for name, child in children.items() if child.poll() is not None), None)
        time.sleep(0.2)
    if exited:
        say(f"{exited} exited with status {children[exited].returncode}; stopping the others")
    else:
        say(f"{signal.Signals(stopping['signal']).name}: stopping {', '.join(children)}")
    for child in children.values():
        if child.poll() is None:
            child.terminate()  # gunicorn and celery both shut down gracefully on SIGTERM
    deadline = time.monotonic() + stop_timeout
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within {stop_timeout:.0f}s; killing it")
            child.kill()
            child.wait()
    say("stopped: " + ", ".join(f"{name} (status {child.returncode})" for name, child in children.items()))
    return 1 if exited else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--processes",
        default=os.environ.get("SERVE_PROCESSES", ",".join(PROCESSES)),
        help="which processes this host runs, comma-separated: web, worker, beat (default: all three)",
    )
    parser.add_argument("--no-migrate", action="store_true", help="do not migrate (another host does)")
    parser.add_argument(
        "--bind",
        default=os.environ.get("GUNICORN_BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}"),
        help="address:port gunicorn listens on, the reverse proxy's upstream (default 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--worker-name", default=os.environ.get("WORKER_NAME", "worker@%h"), help="Celery worker node name"
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=int(os.environ.get("WORKER_CONCURRENCY") or 0) or None,
        help="worker processes (default: one per CPU)",
    )
    parser.add_argument("--queues", default=os.environ.get("WORKER_QUEUES", ""), help="queues the worker consumes")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=float(os.environ.get("SERVE_STOP_TIMEOUT", "60")),
        help="seconds the processes get to finish their work when stopping, then they are killed",
    )
    args = parser.parse_args()
    wanted = [name.strip() for name in args.processes.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(PROCESSES))
    if unknown or not wanted:
        say(f"--processes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PROCESSES)}")
        return 2

    os.environ.setdefault("DEBUG", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["GUNICORN_BIND"] = args.bind
    why = refusal(dict(os.environ))
    if why:
        say(f"refusing to start: {why}")
        return 2
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    settings = load_settings()
    env = dict(os.environ)
    prepare(migrate=not args.no_migrate, collectstatic="web" in wanted, env=env)

    # Figures of processes from an earlier run would be added to this run's (docs/observability.md).
    multiproc = env.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc:
        for stale in Path(multiproc).glob("*.db"):
            stale.unlink()
    # The processes never see the database owner's credentials.
    child_env = {k: v for k, v in env.items() if not k.startswith("MIGRATE_DATABASE_URL")}
    children: dict[str, subprocess.Popen] = {}
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum  # set before the first child starts: none is ever left behind

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name, command in commands(args, settings).items():
        if name in wanted:
            children[name] = subprocess.Popen(command, cwd=ROOT, env=child_env)
            say(f"started {name} (pid {children[name].pid}): {' '.join(command[1:])}")
    if "web" in children:
        say(f"web app on http://{args.bind}/ (put the TLS-terminating reverse proxy in front of it)")
    return supervise(children, stopping, args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
