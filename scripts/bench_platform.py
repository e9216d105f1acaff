"""End-to-end throughput of the platform around the model, on PostgreSQL + Redis with real
``celery worker`` processes and the web server, every figure measured in one run:

(a) drain: N patches queued while no worker runs, then one worker started; patches/s from its
    first claim to its last result, and as a ratio to the bare LiteRT kernel measured in this run
    with the same threads; beside it the worker's served path without the database (decode,
    quality check, model), the most a worker could drain on this machine;
(b) uploads: single-patch API uploads per second, one client and four clients;
(c) load: a steady RATE of single-patch API uploads for SECONDS with one worker running;
    upload-to-result latency p50/p95/p99 (from the patch row's creation to its prediction's, both
    written by the server) and how many never got a result;
(d) scaling: the drain of (a) with two worker processes against one, each with one model thread
    (INFERENCE_THREADS=1), so that the ratio measures processes and not threads inside one.

It works on its own database (``cloudiopsy_bench``, created and dropped) on the server of
``DATABASE_URL`` and Redis database 13; nothing else is touched. ``verify_audit`` runs at the end.

Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/test python scripts/bench_platform.py [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BENCH_DB = "cloudiopsy_bench"
BROKER = "redis://127.0.0.1:6379/13"
SHARED = ROOT.parent / "shared" / "data"
DATA = ["crc-val-he-7k-png", "nct-crc-he-100k-samples", "kather2016-tfds-224"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Platform:
    """The bench database, its environment and the processes started on it."""

    def __init__(self, base_url: str, work: Path):
        parsed = urlparse(base_url)
        if parsed.scheme not in {"postgres", "postgresql"}:
            raise SystemExit("bench_platform needs DATABASE_URL=postgres://... (PostgreSQL), not SQLite")
        self.admin_url = urlunparse(parsed._replace(path="/postgres"))
        self.url = urlunparse(parsed._replace(path=f"/{BENCH_DB}"))
        self.work = work
        self.env = {
            **os.environ,
            "DEBUG": "true",
            "DATABASE_URL": self.url,
            "CELERY_BROKER_URL": BROKER,
            "DATA_DIR": str(work / "var"),
            "MEDIA_ROOT": str(work / "media"),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "LOG_LEVEL": "WARNING",
            "MFA_REQUIRED_ROLES": "",
            "LAB_RATE_LIMIT": "100000/min",
        }
        self.processes: list[subprocess.Popen] = []

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
            connection.execute(f"CREATE DATABASE {BENCH_DB}")
        import redis

        redis.Redis.from_url(BROKER).flushdb()

    def drop_database(self) -> None:
        import psycopg
        from django.db import connections

        connections.close_all()
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")

    def start_workers(self, count: int, threads: int) -> list[subprocess.Popen]:
        env = {**self.env, "INFERENCE_THREADS": str(threads)}
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "cloudiopsy", "worker", "--concurrency", "1",
                 "--hostname", f"bench{i}-{os.getpid()}@%h", "--without-mingle", "--without-gossip",
                 "--loglevel", "WARNING", "-Q", "celery"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / f"worker{i}.log", "ab"),
            )
            for i in range(count)
        ]  # fmt: skip
        self.processes += workers
        return workers

    def start_web(self) -> str:
        port = free_port()
        # runserver serves each request in a new thread: a connection kept for reuse would only be
        # left behind by its thread, until PostgreSQL runs out of connections.
        web = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=ROOT, env={**self.env, "DATABASE_CONN_MAX_AGE": "0"},
            stdout=subprocess.DEVNULL, stderr=open(self.work / "web.log", "ab"),
        )  # fmt: skip
        self.processes.append(web)
        base = f"http://127.0.0.1:{port}"
        import requests

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"{base}/healthz", timeout=2)
                return base
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("the web server did not start")

    def stop(self, processes: list[subprocess.Popen]) -> None:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self.processes.remove(process)

    def stop_all(self) -> None:
        self.stop(list(self.processes))


def setup_django(platform: Platform) -> None:
    os.environ.update(
        {k: platform.env[k] for k in ("DEBUG", "DATABASE_URL", "CELERY_BROKER_URL", "DATA_DIR", "MEDIA_ROOT")}
    )
    os.environ["DJANGO_SETTINGS_MODULE"] = "cloudiopsy.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def corpus(count: int) -> list[tuple[str, bytes]]:
    from inference.core.datasets import scan_folder

    roots = [SHARED / name for name in DATA if (SHARED / name).is_dir()] or [ROOT / "tests" / "fixtures" / "patches"]
    files = [image.path for root in roots for image in scan_folder(str(root))]
    return [(files[i % len(files)].name, files[i % len(files)].read_bytes()) for i in range(count)]


def world():
    from accounts.models import Institution, User
    from accounts.services import lab_system_create
    from inference.services import model_activate, model_register

    institution = Institution.objects.create(name="Bench Hospital", slug="bench")
    user = User.objects.create_user(
        "bench",
        password="bench-password-1",  # noqa: S106 - a throwaway database
        institution=institution,
        role="clinician",
    )
    version, _ = model_register(directory=ROOT / "inference" / "demo_model")
    model_activate(version=version, actor="bench")
    _, key = lab_system_create(institution=institution, name="bench LIS")
    return institution, user, key


def new_case(user, accession: str):
    from cases.services import PatientData, case_create

    return case_create(
        institution=user.institution, created_by=user, patient=PatientData(mrn=accession, name="Bench Patient"),
        accession=accession, specimen_site="colon",
    )  # fmt: skip


def kernel_rate(files: list[tuple[str, bytes]], threads: int, batch: int) -> float:
    from inference.core.model import Predictor
    from inference.core.preprocessing import decode_rgb, preprocess

    predictor = Predictor(ROOT / "inference" / "demo_model", num_threads=threads or None)
    tensors = preprocess([decode_rgb(data) for _, data in files], predictor.input_size)
    predictor.raw(tensors[:batch])
    usable = len(tensors) // batch * batch
    started = time.perf_counter()
    for start in range(0, usable, batch):
        predictor.raw(tensors[start : start + batch])
    return usable / (time.perf_counter() - started)


def served_rate(files: list[tuple[str, bytes]], threads: int, batch: int) -> float:
    """The worker's served path without the database: stored bytes -> decode -> quality check ->
    model, in batches (``inference.core.pipeline.analyse``). The ceiling of (a) on this machine."""
    from inference.core import pipeline
    from inference.core.model import Predictor

    predictor = Predictor(ROOT / "inference" / "demo_model", num_threads=threads or None)
    images = [data for _, data in files]
    pipeline.analyse(predictor, images[:batch])
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        pipeline.analyse(predictor, images[start : start + batch])
    return len(images) / (time.perf_counter() - started)


def wait_analysed(patch_ids: list[int], timeout: float) -> int:
    """Wait until every patch has a result; returns how many still have none at the timeout."""
    from cases.models import TissuePatch

    deadline = time.monotonic() + timeout
    while True:
        pending = TissuePatch.objects.filter(pk__in=patch_ids, status__in=TissuePatch.PENDING).count()
        if pending == 0 or time.monotonic() > deadline:
            return pending
        time.sleep(0.2)


def drain(platform: Platform, user, files, *, workers: int, threads: int, label: str) -> dict:
    """Queue the patches with no worker running, start the workers, time the drain from the
    first claim to the last result (timestamps written by the workers)."""
    from django.db.models import Max, Min

    from cases.models import TissuePatch
    from cases.services import patch_upload
    from inference.models import Prediction

    case = new_case(user, f"DRAIN-{label}")
    ids = []
    for start in range(0, len(files), 32):
        ids += [p.pk for p in patch_upload(case=case, uploaded_by=user, files=files[start : start + 32]).patches]
    processes = platform.start_workers(workers, threads)
    left = wait_analysed(ids, timeout=600)
    platform.stop(processes)
    first = TissuePatch.objects.filter(pk__in=ids).aggregate(Min("claimed_at"))["claimed_at__min"]
    last = Prediction.objects.filter(patch_id__in=ids).aggregate(Max("created_at"))["created_at__max"]
    seconds = (last - first).total_seconds()
    return {"patches": len(ids), "workers": workers, "threads": threads, "seconds": round(seconds, 2),
            "per_s": round(len(ids) / seconds, 1), "without_result": left}  # fmt: skip


def uploads(base: str, key: str, user, files, *, clients: int) -> float:
    import requests

    cases = [new_case(user, f"UP-{clients}-{i}") for i in range(clients)]

    def send(index: int) -> None:
        name, data = files[index % len(files)]
        case = cases[index % clients]
        response = requests.post(
            f"{base}/api/v1/cases/{case.pk}/patches/", files={"image": (name, data)},
            headers={"Authorization": f"Token {key}"}, timeout=60,
        )  # fmt: skip
        response.raise_for_status()

    count = 40 * clients
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(count)))
    return count / (time.perf_counter() - started)


def load(base: str, key: str, user, files, *, rate: float, seconds: float) -> dict:
    """Open loop: one single-patch upload every 1/rate s, whatever the answers' times."""
    import requests

    from cases.models import TissuePatch
    from inference.models import Prediction

    cases = [new_case(user, f"LOAD-{i}") for i in range(20)]
    ids: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        name, data = files[index % len(files)]
        try:
            response = requests.post(
                f"{base}/api/v1/cases/{cases[index % len(cases)].pk}/patches/", files={"image": (name, data)},
                headers={"Authorization": f"Token {key}"}, timeout=60,
            )  # fmt: skip
            response.raise_for_status()
            with lock:
                ids.extend(p["id"] for p in response.json()["patches"])
        except Exception as exc:
            with lock:
                errors.append(str(exc)[:200])

    total = int(rate * seconds)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for index in range(total):
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, index)
    sent_seconds = time.perf_counter() - started
    left = wait_analysed(ids, timeout=120)
    created = dict(TissuePatch.objects.filter(pk__in=ids).values_list("pk", "created_at"))
    latencies = [
        (done - created[patch]).total_seconds()
        for patch, done in Prediction.objects.filter(patch_id__in=ids).values_list("patch_id", "created_at")
    ]
    return {
        "rate_per_s": rate, "seconds": seconds, "uploads": total, "achieved_rate_per_s": round(total / sent_seconds, 1),
        "upload_errors": len(errors), "stored": len(ids), "without_result": left,
        "latency_s_p50": round(percentile(latencies, 0.50), 3), "latency_s_p95": round(percentile(latencies, 0.95), 3),
        "latency_s_p99": round(percentile(latencies, 0.99), 3),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=640, help="patches queued for each drain")
    parser.add_argument("--rate", type=float, default=20.0, help="uploads per second in the load test")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load test")
    parser.add_argument("--json", default=str(ROOT / "var" / "bench_platform.json"))
    args = parser.parse_args()
    base_url = os.environ.get("DATABASE_URL", "")
    work = Path(tempfile.mkdtemp(prefix="cloudiopsy-bench-"))
    platform = Platform(base_url, work)
    platform.create_database()
    result: dict = {"cpus": len(os.sched_getaffinity(0)), "batch": 32}
    try:
        setup_django(platform)
        from django.conf import settings

        _, user, key = world()
        files = corpus(args.patches)
        batch = settings.INFERENCE_BATCH_SIZE
        print(f"{len(files)} patches; kernel ...", flush=True)
        result["kernel_per_s"] = round(kernel_rate(files, 0, batch), 1)
        result["kernel_1_thread_per_s"] = round(kernel_rate(files, 1, batch), 1)
        result["served_per_s"] = round(served_rate(files, 0, batch), 1)
        result["served_vs_kernel"] = round(result["served_per_s"] / result["kernel_per_s"], 3)
        print("(a) drain, one worker ...", flush=True)
        result["drain"] = drain(platform, user, files, workers=1, threads=0, label="a")
        result["drain_vs_kernel"] = round(result["drain"]["per_s"] / result["kernel_per_s"], 3)
        print("(d) drain, one and two single-threaded workers ...", flush=True)
        one = drain(platform, user, files, workers=1, threads=1, label="d1")
        two = drain(platform, user, files, workers=2, threads=1, label="d2")
        result["scaling"] = {"one": one, "two": two, "two_vs_one": round(two["per_s"] / one["per_s"], 2)}
        base = platform.start_web()
        print("(b) API uploads ...", flush=True)
        result["uploads_per_s"] = {
            "one_client": round(uploads(base, key, user, files, clients=1), 1),
            "four_clients": round(uploads(base, key, user, files, clients=4), 1),
        }
        from cases.models import TissuePatch

        # The uploads of (b) are analysed before the load test starts, so that it begins from an empty queue.
        print("    (analysing them before the load test)", flush=True)
        workers = platform.start_workers(1, 0)
        wait_analysed(list(TissuePatch.objects.values_list("pk", flat=True)), timeout=600)
        print(f"(c) load: {args.rate:g} uploads/s for {args.seconds:g} s, one worker ...", flush=True)
        result["load"] = load(base, key, user, files, rate=args.rate, seconds=args.seconds)
        platform.stop(workers)
        from django.core.management import call_command

        call_command("verify_audit")
        result["verify_audit"] = "ok"
    finally:
        platform.stop_all()
        platform.drop_database()
    result["targets"] = {"drain_vs_kernel": 0.5, "load_latency_s_p95": 2.0, "two_vs_one": 1.6}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    drained, loaded, sent = result["drain"], result["load"], result["uploads_per_s"]
    rows = [
        ("LiteRT kernel (all cores / 1 thread)", f"{result['kernel_per_s']} / {result['kernel_1_thread_per_s']}/s"),
        ("served path without the database", f"{result['served_per_s']}/s = {result['served_vs_kernel']}x kernel"),
        ("(a) worker drain, one worker", f"{drained['per_s']}/s = {result['drain_vs_kernel']}x kernel (>= 0.5)"),
        ("(b) API uploads, 1 / 4 clients", f"{sent['one_client']} / {sent['four_clients']} patches/s"),
        (
            f"(c) load {args.rate:g}/s for {args.seconds:g} s: latency p50/p95/p99",
            f"{loaded['latency_s_p50']} / {loaded['latency_s_p95']} / {loaded['latency_s_p99']} s (p95 < 2)",
        ),
        (
            "    stored / without result / upload errors",
            f"{loaded['stored']} / {loaded['without_result']} / {loaded['upload_errors']}",
        ),
        ("(d) two workers vs one (1 thread each)", f"{result['scaling']['two_vs_one']}x (>= 1.6)"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
