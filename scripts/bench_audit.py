"""Benchmark of audit appends on PostgreSQL: how far per-institution chains let writers run in parallel.

Each writer is a process with its own database connection, appending one event per transaction for
``--seconds``; ``--hold-ms`` keeps each transaction open that long after its append (the rest of a
request's work before commit: the chain's lock is held until then). Measured in the same run:

(a) 1 writer, and 4 writers on the same institution (one chain: they queue for its lock);
(b) 4 writers on 4 institutions (4 chains), and the same with every chain behind one lock, as every
    append was before per-institution chains;
(c) ``audit_record_many`` of 32 events against 32 ``audit_record`` calls, one transaction each.

It runs in a database of its own, ``cloudiopsy_bench_audit`` on the server of ``DATABASE_URL``
(created and migrated first, dropped at the end), and checks that every chain verifies afterwards.

Usage: DATABASE_URL=postgres://USER@HOST:PORT/DB python scripts/bench_audit.py [--seconds S]
       [--hold-ms MS ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DATABASE = "cloudiopsy_bench_audit"
WRITERS = 4
BATCH = 32


def server_url(url: str, database: str) -> str:
    """``url`` with its database replaced (same server, user and options)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def server_execute(url: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)


def fact(institution_id: int, n: int) -> dict:
    return {
        "actor": None,
        "action": "bench.append",
        "target_type": "bench.thing",
        "target_id": n,
        "after": {"n": n},
        "institution_id": institution_id,
    }


def writer(job: dict, start, results) -> None:
    """One process appending events of ``job["institution_id"]`` until ``job["seconds"]`` have passed."""
    from django.db import connections, transaction

    from audit import services

    institution_id, seconds, hold = job["institution_id"], job["seconds"], job["hold"]
    connections.close_all()  # this process's own connection
    if job["one_lock"]:
        services._lock_key = lambda chain: 0  # every chain behind one lock, as before per-institution chains
    services.audit_record(**fact(institution_id, -1))  # connect and warm up
    start.wait()
    began = time.perf_counter()
    count = 0
    while time.perf_counter() - began < seconds:
        with transaction.atomic():
            services.audit_record(**fact(institution_id, count))
            if hold:
                time.sleep(hold)
        count += 1
    results.put(count / (time.perf_counter() - began))
    connections.close_all()


def appends_per_s(institutions: list[int], *, seconds: float, hold: float, one_lock: bool = False) -> float:
    """Appends per second of all writers together, one process per entry of ``institutions``."""
    from django.db import connections

    connections.close_all()  # no connection may cross the fork
    context = multiprocessing.get_context("fork")
    start = context.Barrier(len(institutions))
    results = context.Queue()
    processes = [
        context.Process(
            target=writer,
            args=({"institution_id": i, "seconds": seconds, "hold": hold, "one_lock": one_lock}, start, results),
        )
        for i in institutions
    ]
    for process in processes:
        process.start()
    rates = [results.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join(60)
        if process.exitcode != 0:
            raise RuntimeError(f"a writer failed (exit code {process.exitcode})")
    return sum(rates)


def batch_vs_loop(institution_id: int, repeats: int) -> dict:
    """Events per second of one audit_record_many of BATCH events and of BATCH audit_record calls."""
    from django.db import transaction

    from audit.services import audit_record, audit_record_many

    many, loop = [], []
    records = [fact(institution_id, n) for n in range(BATCH)]
    for _ in range(repeats + 1):  # the first round warms up
        started = time.perf_counter()
        with transaction.atomic():
            audit_record_many(records)
        many.append(time.perf_counter() - started)
        started = time.perf_counter()
        with transaction.atomic():
            for record in records:
                audit_record(**record)
        loop.append(time.perf_counter() - started)
    many_rate = BATCH / statistics.median(many[1:])
    loop_rate = BATCH / statistics.median(loop[1:])
    return {
        "size": BATCH,
        "audit_record_many_events_per_s": round(many_rate),
        "audit_record_loop_events_per_s": round(loop_rate),
        "many_vs_loop": round(many_rate / loop_rate, 2),
    }


def measure(args, institutions: list[int]) -> dict:
    runs = []
    for hold_ms in args.hold_ms:
        hold = hold_ms / 1000
        one = appends_per_s(institutions[:1], seconds=args.seconds, hold=hold)
        same = appends_per_s(institutions[:1] * WRITERS, seconds=args.seconds, hold=hold)
        spread = appends_per_s(institutions, seconds=args.seconds, hold=hold)
        one_lock = appends_per_s(institutions, seconds=args.seconds, hold=hold, one_lock=True)
        runs.append(
            {
                "hold_ms": hold_ms,
                "appends_per_s": {
                    "1_writer": round(one),
                    "4_writers_1_institution": round(same),
                    "4_writers_4_institutions": round(spread),
                    "4_writers_4_institutions_one_lock_as_before": round(one_lock),
                },
                "ratios": {
                    "4_writers_1_institution_vs_1_writer": round(same / one, 2),
                    "4_writers_4_institutions_vs_1_writer": round(spread / one, 2),
                    "4_institutions_vs_1_institution": round(spread / same, 2),
                    "4_institutions_vs_one_lock_as_before": round(spread / one_lock, 2),
                },
            }
        )
    return {"writers": runs, "batch": batch_vs_loop(institutions[0], args.repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="How long each writer scenario runs.")
    parser.add_argument(
        "--hold-ms",
        type=float,
        nargs="+",
        default=[0.0, 2.0],
        help="Milliseconds each transaction stays open after its append (one scenario set per value).",
    )
    parser.add_argument("--repeats", type=int, default=30, help="Batches of 32 timed each way.")
    parser.add_argument("--json", help="Also write the result to this file.")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        print(
            "bench_audit.py measures PostgreSQL's per-chain locks: set DATABASE_URL=postgres://USER@HOST:PORT/DB "
            f"(a server where it may create and drop the database {BENCH_DATABASE}); SQLite runs one writer at a "
            "time and has nothing to measure here.",
            file=sys.stderr,
        )
        return 2
    bench_url = server_url(url, BENCH_DATABASE)
    maintenance_url = url  # only to create and drop the benchmark's database; nothing in it is touched
    if bench_url.rstrip("/") == url.rstrip("/"):
        print(f"DATABASE_URL names {BENCH_DATABASE} itself: give another database on that server", file=sys.stderr)
        return 2
    server_execute(maintenance_url, f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")  # an aborted run's
    server_execute(maintenance_url, f"CREATE DATABASE {BENCH_DATABASE}")
    try:
        os.environ["DATABASE_URL"] = bench_url
        os.environ.setdefault("DEBUG", "true")  # local keys; the query log is switched off below
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cloudiopsy.settings")
        import django

        django.setup()
        from django.conf import settings
        from django.core.management import call_command
        from django.db import connection, connections

        settings.DEBUG = False  # no per-query logging in the measured processes
        call_command("migrate", verbosity=0)
        from accounts.models import Institution
        from audit.models import AuditEvent
        from audit.services import audit_verify

        institutions = [
            Institution.objects.create(name=f"Bench hospital {n}", slug=f"bench-{n}").pk for n in range(WRITERS)
        ]
        with connection.cursor() as cursor:
            cursor.execute("SELECT version()")
            server = cursor.fetchone()[0].split(" on ")[0]
        result = {
            "database": server,
            "cpus": os.cpu_count(),
            "seconds_per_scenario": args.seconds,
            **measure(args, institutions),
        }
        checked, bad, why = audit_verify()
        if bad is not None or checked != AuditEvent.objects.count():
            raise RuntimeError(f"the benchmark's chains do not verify: event #{bad and bad.pk}: {why}")
        result["events_verified"] = checked
        connections.close_all()
    finally:
        server_execute(maintenance_url, f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)")
    line = json.dumps(result, indent=2)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
