"""A whole slide through the platform's distributed slide job (``slides/jobs.py``), on PostgreSQL +
Redis with real ``celery worker`` processes, every figure measured in one run:

(1) one worker on slide A: tiles/s, time to the first result and time to DONE;
(2) two worker processes on slide A, registered again: tiles/s and its ratio to (1) (target >= 1.7);
(3) one worker on slide B, the same tissue density on four times the glass (four times the tiles):
    tiles/s and the peak memory of the worker, as a ratio to its peak on slide A (target: about 1,
    memory must not grow with slide size).

The slides are tiled pyramidal TIFFs written for the run (``scripts/bench_slides.py``'s
``slide_write``: real H&E tiles of ``../shared/data`` when present, the committed fixtures otherwise,
at 0.25 µm/px like a 40x scan). A is a block of 39 x 39 tissue tiles (1,521 in 6 chunks) on 47 x 47
tiles of glass, 21,056 px square; B doubles the side of both (6,084 tiles in 24 chunks). Each is
registered with ``slide_register`` for a case of the demo institution (``seed_demo``), whose
clinician is the actor. The workers are started and ready before the slide is registered; each
measurement has its own workers, stopped before the next, and the broker is purged in between.

How each figure is taken, from the rows the workers write:
- tiles/s: the slide's tissue tiles over the time from ``Slide.analysis_started_at`` (the end of
  tiling) to the last ``SlideChunk.finished_at`` (model loading in a worker's first chunk included);
- first result: from ``Slide.created_at`` (registration) to the first chunk committed;
- DONE: from registration to ``Slide.finished_at`` (tiling, chunks and the finish);
- peak RSS: ``VmHWM`` in /proc of each worker's pool process at DONE, before it is stopped. The
  workers run as deployed (prefork pool, ``--concurrency 1``, via ``bench_platform.Platform``), so
  the process that analyses the chunks is the pool's child, and that is the one measured. The
  JSON also has its RSS every second against the tiles finished (``rss_trace_mb``: it levels off
  once the allocator and OpenSlide's cache are warm) and each chunk's claim and commit times.
Every worker has one model thread (INFERENCE_THREADS=1), so that (2) measures processes and not
threads inside one. Tiles are still read on as many threads as the worker sees CPUs (up to 4,
``inference.core.slides.chunk_analyse``); with ``--pin`` each worker is bound to a CPU of its own
(the first worker to the first CPU, the second to the second), so that it is one core's worth of
work and reads on one thread. On this 2-CPU machine both ways gave the same one-worker rate
within the noise: the model thread, not reading, sets the pace.

It works on its own database (``cloudiopsy_bench_slides``, created and dropped) on the server of
``DATABASE_URL`` and Redis database 12; nothing else is touched.

Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python scripts/bench_slide_workers.py [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from scripts.bench_platform import Platform, new_case, setup_django  # noqa: E402
from scripts.bench_slides import MPP, SHARED, slide_write  # noqa: E402

BENCH_DB = "cloudiopsy_bench_slides"
BROKER = "redis://127.0.0.1:6379/12"
WORKER_THREADS = 1


class SlidePlatform(Platform):
    """``bench_platform``'s platform on a database and a Redis database of this benchmark's own."""

    def __init__(self, base_url: str, work: Path, *, chunk_tiles: int):
        super().__init__(base_url, work)
        self.url = urlunparse(urlparse(self.admin_url)._replace(path=f"/{BENCH_DB}"))
        self.env.update({"DATABASE_URL": self.url, "CELERY_BROKER_URL": BROKER, "SLIDE_CHUNK_TILES": str(chunk_tiles)})

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
            connection.execute(f"CREATE DATABASE {BENCH_DB}")
        self.purge()

    def drop_database(self) -> None:
        import psycopg
        from django.db import connections

        connections.close_all()
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")

    def purge(self) -> None:
        import redis

        redis.Redis.from_url(BROKER).flushdb()


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (read from /proc: this kernel may lack ``.../children``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name, in parentheses, may hold spaces: the fields after it are fixed.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (the most it has been resident) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} for process {pid}")


def pin(pid: int, cpu: int) -> None:
    """Bind every thread of a worker and of its pool processes to one CPU; threads and processes
    started later inherit it (and the slide core, seeing one CPU, reads on one thread)."""
    for process in (pid, *children(pid)):
        for thread in Path(f"/proc/{process}/task").iterdir():
            try:
                os.sched_setaffinity(int(thread.name), {cpu})
            except ProcessLookupError:
                pass  # a thread that ended meanwhile


def workers_ready(platform: SlidePlatform, processes, since, timeout: float = 120) -> None:
    """Wait for a heartbeat from each worker started at ``since`` (written once it takes tasks)."""
    from inference.models import WorkerHeartbeat

    names = [f"bench{i}-{os.getpid()}@" for i in range(len(processes))]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a worker exited with {process.returncode}: see {platform.work}/worker*.log")
        ready = WorkerHeartbeat.objects.filter(started_at__gte=since)
        if all(ready.filter(hostname__startswith=name).exists() for name in names):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the workers were not ready after {timeout:g} s: see {platform.work}/worker*.log")


def measure(
    platform: SlidePlatform, actor, path: Path, *, workers: int, label: str, timeout: float, pinned: bool
) -> dict:
    """Start the workers, register the slide, wait for DONE, read the figures, stop the workers."""
    from django.db.models import Max, Min
    from django.utils import timezone

    from slides.models import Slide, SlideChunk
    from slides.services import slide_register

    platform.purge()
    since = timezone.now()
    processes = platform.start_workers(workers, WORKER_THREADS)
    cpus = sorted(os.sched_getaffinity(0))
    try:
        if pinned:  # at once, before the worker forks its pool process, and again once it has
            for i, process in enumerate(processes):
                pin(process.pid, cpus[i % len(cpus)])
        workers_ready(platform, processes, since)
        if pinned:
            for i, process in enumerate(processes):
                pin(process.pid, cpus[i % len(cpus)])
        # The pool is forked before the worker is ready; its processes are the ones that work.
        pools = [child for process in processes for child in children(process.pid)]
        case = new_case(actor, f"BENCH-SLIDE-{label}")
        slide = slide_register(case=case, actor=actor, path=path, name=f"{label}.svs")
        waiting = time.monotonic()
        deadline = waiting + timeout
        trace: list[list[float]] = []  # [tiles finished, largest pool process RSS MB], every second
        while slide.status not in (Slide.Status.DONE, Slide.Status.FAILED):
            if time.monotonic() > deadline:
                raise RuntimeError(f"slide {label} not done after {timeout:g} s ({slide.status}, "
                                   f"{slide.tiles_finished}/{slide.tiles_total} tiles)")  # fmt: skip
            if len(trace) < time.monotonic() - waiting:
                trace.append([slide.tiles_finished, max(memory_mb(pid, "VmRSS") for pid in pools)])
            time.sleep(0.2)
            slide.refresh_from_db()
        # Read at DONE, before the workers go on to the region patches the finish queued.
        peak = max(memory_mb(pid, "VmHWM") for pid in pools)
        pool_cpus = [sorted(os.sched_getaffinity(pid)) for pid in pools]
    finally:
        platform.stop(processes)
    if slide.status == Slide.Status.FAILED:
        raise RuntimeError(f"slide {label} failed: {slide.failure_reason}")
    chunks = SlideChunk.objects.filter(slide=slide)
    span = chunks.aggregate(first=Min("finished_at"), last=Max("finished_at"))
    start = slide.analysis_started_at
    seconds = (span["last"] - start).total_seconds()
    names = sorted({c.worker for c in chunks})
    # Each chunk as [index, worker, claimed, committed (s from the end of tiling), analysis s]:
    # shows whether the workers were busy at the same time.
    timeline = [
        [c.index, names.index(c.worker), round((c.claimed_at - start).total_seconds(), 2),
         round((c.finished_at - start).total_seconds(), 2), round(c.seconds, 2)]
        for c in chunks
    ]  # fmt: skip
    return {
        "workers": workers,
        "pool_processes": len(pools),
        "cpus_of_pool_processes": pool_cpus,
        "tiles": slide.tiles_total,
        "chunks": slide.chunks_total,
        "chunks_per_worker": [sum(1 for c in chunks if c.worker == name) for name in names],
        "busy_s_per_worker": [round(sum(c.seconds for c in chunks if c.worker == name), 2) for name in names],
        "chunk_timeline": timeline,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(slide.tiles_total / seconds, 1),
        "first_result_s": round((span["first"] - slide.created_at).total_seconds(), 2),
        "done_s": round((slide.finished_at - slide.created_at).total_seconds(), 2),
        "peak_rss_mb": peak,
        "rss_trace_mb": trace,
    }


def slide_facts(path: Path) -> dict:
    from inference.core import slides

    info = slides.slide_inspect(path)
    return {"pixels": f"{info.width} x {info.height}", "file_mb": round(path.stat().st_size / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tissue",
        type=int,
        default=39,
        help="side of slide A's tissue block, in model tiles (39: 1,521 tissue tiles, 6 chunks); "
        "slide B doubles the side of both the tissue and the glass",
    )
    parser.add_argument(
        "--chunk-tiles", type=int, default=256, help="tiles per chunk task (SLIDE_CHUNK_TILES of the workers)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="bind each worker to a CPU of its own (one reading thread) instead of every CPU, as deployed",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one slide to be DONE")
    parser.add_argument(
        "--json", default=str(ROOT / "var" / "bench_slide_workers.json"), help="where the figures are written"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cloudiopsy-bench-slide-workers-"))
    try:
        platform = SlidePlatform(os.environ.get("DATABASE_URL", ""), work, chunk_tiles=args.chunk_tiles)
    except SystemExit:  # not PostgreSQL
        work.rmdir()
        raise
    small, large = work / "slide-a.svs", work / "slide-b.svs"
    cells = args.tissue + 8
    result: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": len(os.sched_getaffinity(0)),
        "mpp": MPP,
        "source": str(SHARED) if SHARED.is_dir() else "tests/fixtures/patches",
        "chunk_tiles": args.chunk_tiles,
        "inference_threads": WORKER_THREADS,
        "pool": "prefork, --concurrency 1 (the pool process measured)",
        "pinned": args.pin,
    }
    platform.create_database()
    try:
        print(f"writing slides A ({args.tissue}^2 tissue tiles) and B (4x) while the database is set up ...",
              flush=True)  # fmt: skip
        # Writing takes longer than anything measured: both at once, beside the migrations.
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            writes = [
                pool.submit(slide_write, small, cells, args.tissue),
                pool.submit(slide_write, large, 2 * cells, 2 * args.tissue),
            ]
            os.environ["LOG_LEVEL"] = "ERROR"  # this process's own log lines would break up the report
            setup_django(platform)
            from django.core.management import call_command

            from accounts.models import User

            call_command("seed_demo", stdout=open(os.devnull, "w"))
            actor = User.objects.get(username="clinician")
            for write in writes:
                write.result()
        result["slides"] = {"A": slide_facts(small), "B": slide_facts(large)}
        print(f"    {time.perf_counter() - started:.0f} s", flush=True)
        print("(1) one worker, slide A ...", flush=True)
        one = measure(platform, actor, small, workers=1, label="a1", timeout=args.timeout, pinned=args.pin)
        print("(2) two workers, slide A ...", flush=True)
        two = measure(platform, actor, small, workers=2, label="a2", timeout=args.timeout, pinned=args.pin)
        print("(3) one worker, slide B ...", flush=True)
        large_one = measure(platform, actor, large, workers=1, label="b1", timeout=args.timeout, pinned=args.pin)
    finally:
        platform.stop_all()
        platform.drop_database()
        platform.purge()
        shutil.rmtree(work, ignore_errors=True)
    result.update({"one_worker_a": one, "two_workers_a": two, "one_worker_b": large_one})
    result["two_vs_one"] = round(two["tiles_per_s"] / one["tiles_per_s"], 2)
    result["peak_rss_b_vs_a"] = round(large_one["peak_rss_mb"] / one["peak_rss_mb"], 2)
    result["targets"] = {"two_vs_one": 1.7, "peak_rss_b_vs_a": "about 1"}
    result["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    header = ("", "tiles", "chunks", "tiles/s", "first result s", "DONE s", "peak RSS MB")
    rows = [
        ("(1) slide A, one worker", one),
        ("(2) slide A, two workers", two),
        ("(3) slide B, one worker", large_one),
    ]
    table = [header] + [
        (name, str(r["tiles"]), str(r["chunks"]), str(r["tiles_per_s"]), str(r["first_result_s"]),
         str(r["done_s"]), str(r["peak_rss_mb"]))
        for name, r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        figures = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join([row[0].ljust(widths[0]), *figures]))
    print(f"\nslides: A {result['slides']['A']['pixels']} px, B {result['slides']['B']['pixels']} px at {MPP} µm/px; "
          f"{result['cpus']} CPUs")  # fmt: skip
    print(f"two workers / one:          {result['two_vs_one']}x (>= 1.7); chunks per worker {two['chunks_per_worker']}")
    print(f"peak RSS slide B / slide A: {result['peak_rss_b_vs_a']} (about 1)")
    print(f"\n{result['total_s']:.0f} s in all; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
