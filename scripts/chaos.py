"""Faults injected while patches flow, on PostgreSQL + Redis with real web, `celery worker` and
`celery beat` processes; per fault: patches lost, analysed twice, stored half, and time to recover.

Patches are uploaded through the API at a steady rate by a lab system; meanwhile:

- kill:     SIGKILL the worker in the middle of a batch, then start a new one (3 times, 50 in --long);
- broker:   the broker loses every message (FLUSHDB of its Redis database, as a restart of a Redis
            that keeps nothing on disk does) while patches are queued and no worker is running;
            --long also really restarts the Redis server (every client on it sees the outage);
- postgres: PostgreSQL restarted under the platform (--long only: the whole server goes down);
- disk:     the image store fills up (MEDIA_ROOT is a tmpfs whose size is cut to what it holds),
            then space is freed again (needs root to mount).

At the end every accepted patch (HTTP 202) must have a result: "lost" counts those without one after
the wait. "twice" counts patches with more than one prediction or more than one prediction.create
audit event. "half stored" counts patch rows whose file is missing or differs from its SHA-256.
"recovery" is the time from the fault to the moment every patch accepted before it had a result
(disk: to the first upload accepted after space was freed). `verify_audit` runs last.

The short form (the default; the test suite runs it) shortens the reconciler's timeouts so it takes
about two minutes; --long uses the platform's defaults for the broker fault (re-send after
ANALYSIS_REQUEUE_AFTER_SECONDS, reconciler every RECONCILE_INTERVAL_SECONDS), to show the recovery
a hospital gets. It works on its own database (cloudiopsy_chaos) and Redis database 14.

Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python scripts/chaos.py [--long]
       [--faults kill,broker,disk[,postgres]] [--json OUT]
Exit status 1 if any patch was lost, analysed twice or half stored, or the audit trail fails to verify.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_platform as bench  # the same platform harness as the benchmark

bench.BENCH_DB = "cloudiopsy_chaos"
bench.BROKER = "redis://127.0.0.1:6379/14"
ROOT = bench.ROOT

SHORT = {
    "WORKER_HEARTBEAT_SECONDS": "2",  # a killed worker is taken for lost after 3 silent heartbeats
    "ANALYSIS_STALE_AFTER_SECONDS": "20",
    "CELERY_TASK_SOFT_TIME_LIMIT": "12",
    "CELERY_TASK_TIME_LIMIT": "15",
    "ANALYSIS_REQUEUE_AFTER_SECONDS": "8",
    "RECONCILE_INTERVAL_SECONDS": "4",
}
# The defaults, but for the stale timeout, which a task hung without dying would wait for (a killed
# worker's patches are handed on once its heartbeat is silent for WORKER_LOST_AFTER_SECONDS).
LONG = {"ANALYSIS_STALE_AFTER_SECONDS": "60", "CELERY_TASK_SOFT_TIME_LIMIT": "40", "CELERY_TASK_TIME_LIMIT": "50"}


class Chaos:
    def __init__(self, platform: bench.Platform, key: str, user, files, *, rate: float):
        self.platform, self.key, self.user, self.files, self.rate = platform, key, user, files, rate
        self.accepted: list[tuple[float, int]] = []  # (time accepted, patch id)
        self.refused: dict[str, int] = {}
        self.lock = threading.Lock()
        self.worker: subprocess.Popen | None = None
        self.worker_started = None
        self.base = ""
        self.cases: list = []

    # Processes -----------------------------------------------------------------------------------
    def start_worker(self) -> None:
        from django.utils import timezone

        self.worker_started = timezone.now()
        log = open(self.platform.work / "worker.log", "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "cloudiopsy", "worker", "--pool", "solo", "--loglevel", "INFO",
             "--hostname", f"chaos-{time.monotonic_ns()}@%h", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=self.platform.env, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        self.platform.processes.append(self.worker)

    def kill_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
            self.platform.processes.remove(self.worker)
        self.worker = None

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.platform.stop([self.worker])
            self.worker = None

    def start_beat(self) -> None:
        log = open(self.platform.work / "beat.log", "ab")
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "cloudiopsy", "beat", "--loglevel", "INFO",
             "--schedule", str(self.platform.work / "beat-schedule")],
            cwd=ROOT, env=self.platform.env, stdout=log, stderr=log,
        )  # fmt: skip
        self.platform.processes.append(beat)

    # Traffic ---------------------------------------------------------------------------------------
    def feed(self, seconds: float | None = None, stop: threading.Event | None = None) -> threading.Thread:
        """Upload single patches at self.rate (open loop), on a thread, for ``seconds`` or until ``stop``."""
        stop = stop or threading.Event()

        def run() -> None:
            import requests

            started = time.monotonic()
            index = 0
            while not stop.is_set() and (seconds is None or time.monotonic() < started + seconds):
                name, data = self.files[index % len(self.files)]
                case = self.cases[index % len(self.cases)]
                try:
                    response = requests.post(
                        f"{self.base}/api/v1/cases/{case.pk}/patches/", files={"image": (name, data)},
                        headers={"Authorization": f"Token {self.key}"}, timeout=30,
                    )  # fmt: skip
                    outcome = str(response.status_code)
                    if response.status_code == 202:
                        with self.lock:
                            self.accepted += [(time.monotonic(), p["id"]) for p in response.json()["patches"]]
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                if outcome != "202":
                    with self.lock:
                        self.refused[outcome] = self.refused.get(outcome, 0) + 1
                index += 1
                time.sleep(max(0.0, started + index / self.rate - time.monotonic()))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def accepted_before(self, moment: float) -> list[int]:
        with self.lock:
            return [pk for at, pk in self.accepted if at <= moment]

    def wait_done(self, ids: list[int], timeout: float) -> float | None:
        """Seconds until every one of ``ids`` has a result, or None at the timeout."""
        from django.db import close_old_connections

        from cases.models import TissuePatch

        started = time.monotonic()
        while time.monotonic() < started + timeout:
            try:
                close_old_connections()
                if not TissuePatch.objects.filter(pk__in=ids, status__in=TissuePatch.PENDING).exists():
                    return time.monotonic() - started
            except Exception:  # the database itself may be what is down
                from django.db import connection

                connection.close()
            time.sleep(0.5)
        return None

    def wait_claimed(self, since, timeout: float) -> bool:
        """Wait until a patch claimed after ``since`` (the current worker's start) is being analysed."""
        from cases.models import TissuePatch

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if TissuePatch.objects.filter(status=TissuePatch.Status.RUNNING, claimed_at__gt=since).exists():
                return True
            time.sleep(0.05)
        return False


def fault_kill(chaos: Chaos, kills: int, settle: float) -> dict:
    """SIGKILL the worker mid-batch ``kills`` times, a new worker started at once each time."""
    stop = threading.Event()
    feeder = chaos.feed(stop=stop)
    time.sleep(3)
    recoveries, mid_batch = [], 0
    for _ in range(kills):
        mid_batch += chaos.wait_claimed(chaos.worker_started, timeout=20)
        chaos.kill_worker()
        recoveries.append(time.monotonic())
        chaos.start_worker()
        time.sleep(1)
    stop.set()
    feeder.join()
    last = recoveries[-1]
    recovered = chaos.wait_done(chaos.accepted_before(last), timeout=settle)
    return {"injected": kills, "killed_mid_batch": mid_batch, "recovery_s": _round(recovered)}


def fault_broker(chaos: Chaos, restart: bool, settle: float) -> dict:
    """Patches queued with no worker running, then the broker loses every message."""
    import redis

    chaos.stop_worker()
    feeder = chaos.feed(seconds=4)
    feeder.join()
    if restart:
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, capture_output=True)
        time.sleep(1)
        subprocess.run(
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
             "--save", "", "--appendonly", "no"],
            check=True, capture_output=True,
        )  # fmt: skip
        time.sleep(1)
    else:
        redis.Redis.from_url(bench.BROKER).flushdb()
    lost_at = time.monotonic()
    chaos.start_worker()
    recovered = chaos.wait_done(chaos.accepted_before(lost_at), timeout=settle)
    return {"injected": 1, "how": "redis restarted" if restart else "FLUSHDB", "recovery_s": _round(recovered)}


def fault_postgres(chaos: Chaos, settle: float) -> dict:
    feeder = chaos.feed(seconds=12)
    time.sleep(3)
    cluster = sorted(os.listdir("/etc/postgresql"))[-1]
    down_at = time.monotonic()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart", "-m", "fast"], check=True)
    feeder.join()
    from django.db import connection

    connection.close()
    recovered = chaos.wait_done(chaos.accepted_before(time.monotonic()), timeout=settle)
    return {"injected": 1, "recovery_s": _round(None if recovered is None else time.monotonic() - down_at)}


def fault_disk(chaos: Chaos, media: Path) -> dict:
    """Cut the tmpfs under MEDIA_ROOT to what it holds; free space again after a few seconds."""
    used_kb = int(
        subprocess.run(["du", "-sk", str(media)], capture_output=True, text=True, check=True).stdout.split()[0]
    )
    subprocess.run(["mount", "-o", f"remount,size={used_kb + 64}k", str(media)], check=True)
    refused_before = dict(chaos.refused)
    feeder = chaos.feed(seconds=10)
    time.sleep(5)
    subprocess.run(["mount", "-o", "remount,size=512m", str(media)], check=True)
    freed_at = time.monotonic()
    feeder.join()
    with chaos.lock:
        first_after = min((at for at, _ in chaos.accepted if at > freed_at), default=None)
    refused = {k: v - refused_before.get(k, 0) for k, v in chaos.refused.items() if v - refused_before.get(k, 0)}
    return {"injected": 1, "refused_while_full": refused,
            "recovery_s": _round(None if first_after is None else first_after - freed_at)}  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def damage(ids: list[int]) -> dict:
    """Accepted patches without a result, analysed twice, or whose stored file is missing or altered."""
    from django.core.files.storage import default_storage
    from django.db.models import Count

    from audit.models import AuditEvent
    from cases.models import TissuePatch
    from inference.models import Prediction

    lost = TissuePatch.objects.filter(pk__in=ids, status__in=TissuePatch.PENDING).count()
    twice_rows = Prediction.objects.values("patch_id", "model_version_id").annotate(n=Count("id")).filter(n__gt=1)
    twice_events = (
        AuditEvent.objects.filter(action="prediction.create")
        .values("after__patch")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    half = 0
    for patch in TissuePatch.objects.only("storage_name", "sha256"):
        try:
            with default_storage.open(patch.storage_name, "rb") as handle:
                if hashlib.sha256(handle.read()).hexdigest() != patch.sha256:
                    half += 1
        except OSError:
            half += 1
    return {"accepted": len(ids), "lost": lost, "twice": twice_rows.count() + twice_events.count(), "half_stored": half}


def mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(path)], check=False)
    return mounted.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="50 kills, the broker restarted, PostgreSQL restarted")
    parser.add_argument("--faults", default="", help="comma-separated subset of kill,broker,disk,postgres")
    parser.add_argument("--rate", type=float, default=8.0, help="single-patch uploads per second while faults run")
    parser.add_argument("--json", default=str(ROOT / "var" / "chaos.json"))
    args = parser.parse_args()
    # A SIGTERM runs the clean-up too: the workers live in sessions of their own and would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    faults = [
        f for f in (args.faults or ("kill,broker,disk,postgres" if args.long else "kill,broker,disk")).split(",") if f
    ]
    unknown = set(faults) - {"kill", "broker", "disk", "postgres"}
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="cloudiopsy-chaos-"))
    platform = bench.Platform(os.environ.get("DATABASE_URL", ""), work)
    platform.env.update(LONG if args.long else SHORT)
    platform.env["LOG_LEVEL"] = "INFO"
    media = work / "media"
    on_tmpfs = "disk" in faults and mount_tmpfs(media)
    if "disk" in faults and not on_tmpfs:
        print("disk: needs root and mount (tmpfs); not run", flush=True)
        faults.remove("disk")
    platform.create_database()
    report: dict = {"form": "long" if args.long else "short", "settings": LONG if args.long else SHORT, "faults": {}}
    settle = 240.0 if args.long else 90.0
    try:
        bench.setup_django(platform)
        _, user, key = bench.world()
        chaos = Chaos(platform, key, user, bench.corpus(64), rate=args.rate)
        chaos.cases = [bench.new_case(user, f"CHAOS-{i}") for i in range(8)]
        chaos.base = platform.start_web()
        chaos.start_beat()
        chaos.start_worker()
        for fault in faults:
            print(f"{fault} ...", flush=True)
            if fault == "kill":
                result = fault_kill(chaos, kills=50 if args.long else 3, settle=settle)
            elif fault == "broker":
                result = fault_broker(chaos, restart=args.long, settle=settle)
            elif fault == "postgres":
                result = fault_postgres(chaos, settle=settle)
            else:
                result = fault_disk(chaos, media)
            if chaos.worker is None:
                chaos.start_worker()
            print(f"    {result}", flush=True)
            report["faults"][fault] = result
        ids = [pk for _, pk in chaos.accepted]
        chaos.wait_done(ids, timeout=settle)
        report["refused"] = chaos.refused
        report.update(damage(ids))
        from django.core.management import call_command

        try:
            call_command("verify_audit")
            report["verify_audit"] = "ok"
        except Exception as exc:
            report["verify_audit"] = f"FAILED: {exc}"
    finally:
        platform.stop_all()
        platform.drop_database()
        if on_tmpfs:
            subprocess.run(["umount", str(media)], check=False)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print()
    for fault, result in report["faults"].items():
        print(f"{fault:<9} injected {result['injected']:>3}   recovery {result['recovery_s']} s")
    print(f"accepted {report['accepted']}, lost {report['lost']}, analysed twice {report['twice']}, "
          f"half stored {report['half_stored']}, refused {report['refused']}")  # fmt: skip
    print(f"verify_audit: {report['verify_audit']}")
    print(f"wrote {args.json}")
    bad = report["lost"] or report["twice"] or report["half_stored"] or report["verify_audit"] != "ok"
    unrecovered = [f for f, r in report["faults"].items() if r["recovery_s"] is None]
    if unrecovered:
        print(f"no recovery within {settle:g} s after: {', '.join(unrecovered)}")
    return 1 if bad or unrecovered else 0


if __name__ == "__main__":
    sys.exit(main())
