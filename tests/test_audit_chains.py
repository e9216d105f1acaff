"""One audit chain per institution (and one for the platform): appends for different institutions
never wait for each other, one institution's still chain in order, verify_audit and anchors cover
every chain, and the global chain from before them stays valid (docs/audit.md)."""

from __future__ import annotations

import datetime
import importlib
import io
import itertools
import json
import threading
import time
from types import SimpleNamespace

import pytest
from django.apps import apps
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction

from accounts.models import Institution
from audit.anchors import audit_anchor
from audit.models import AuditEvent
from audit.services import GENESIS, audit_record, audit_record_many, audit_verify, content_hash, event_sign
from tests.conftest import triggers_set_aside, unavailable

pytestmark = pytest.mark.django_db


@pytest.fixture
def hospitals(db) -> tuple[Institution, Institution]:
    return (
        Institution.objects.create(name="Hospital A", slug="hospital-a"),
        Institution.objects.create(name="Hospital B", slug="hospital-b"),
    )


def fact(institution: Institution | None, n: int = 0) -> dict:
    """audit_record's arguments for one event of ``institution`` (the platform's for None)."""
    return {
        "actor": None,
        "action": "test.event",
        "target_type": "test.thing",
        "target_id": n,
        "after": {"n": n},
        "institution_id": institution.pk if institution else None,
    }


def chain(number: int | None) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(chain=number).order_by("id"))


def linked(events: list[AuditEvent], start: str) -> bool:
    return [e.prev_hash for e in events] == [start] + [e.hash for e in events[:-1]]


def legacy_events(count: int) -> list[AuditEvent]:
    """Keyed events in one global chain, as audit_record wrote them before per-institution chains."""
    previous = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first() or GENESIS
    made = []
    for n in range(count):
        event = AuditEvent(
            created_at=datetime.datetime(2026, 6, 1, 12, n, tzinfo=datetime.UTC),
            actor_type="system",
            actor_label="system",
            action="test.global",
            institution_id=n % 2 + 1,
            after={"n": n},
            prev_hash=previous,
        )
        event_sign(event, key=django_settings.AUDIT_HMAC_KEY)
        event.save()
        made.append(event)
        previous = event.hash
    return made


def close_global_chain() -> None:
    migration = importlib.import_module("audit.migrations.0006_per_institution_chains")
    schema_editor = SimpleNamespace(
        connection=connection, execute=lambda sql, params=(): connection.cursor().execute(sql, params)
    )
    migration.close_global_chain(apps, schema_editor)


def verify_names(event: AuditEvent, why: str) -> None:
    _, bad, reason = audit_verify()
    assert (bad, why in reason) == (event, True), reason
    with pytest.raises(CommandError, match=f"audit event #{event.pk} "):
        call_command("verify_audit")


# Chains


def test_each_institution_and_the_platform_have_their_own_chain(hospitals):
    a, b = hospitals
    for n, owner in enumerate([a, b, None, a, a, b, None]):
        audit_record(**fact(owner, n))
    assert [len(chain(a.pk)), len(chain(b.pk)), len(chain(0))] == [3, 2, 2]
    for number in (a.pk, b.pk, 0):
        assert linked(chain(number), GENESIS)  # no global chain before them: they start at GENESIS
    assert all(e.chain == e.institution_id for e in chain(a.pk) + chain(b.pk))
    assert audit_verify() == (7, None, "")


def test_an_event_moved_to_another_chain_does_not_verify(hospitals):
    a, b = hospitals
    moved = audit_record(**fact(a))
    audit_record(**fact(a, 1))
    with triggers_set_aside() as cursor:
        cursor.execute("UPDATE audit_auditevent SET chain = %s WHERE id = %s", [b.pk, moved.pk])
    # Its prev_hash (GENESIS) fits B's chain: its hash, which covers its chain, gives it away.
    verify_names(moved, "its content does not match its hash")


def test_an_edit_or_a_removal_in_one_chain_is_named_while_the_others_verify(hospitals):
    a, b = hospitals
    events = [audit_record(**fact(owner, n)) for n, owner in enumerate([a, b, a, b, a, b])]
    with triggers_set_aside() as cursor:
        cursor.execute("UPDATE audit_auditevent SET reason = 'edited' WHERE id = %s", [events[3].pk])
    checked, bad, why = audit_verify()
    assert (checked, bad) == (3, events[3]) and "content does not match" in why
    with triggers_set_aside() as cursor:
        cursor.execute("UPDATE audit_auditevent SET reason = '' WHERE id = %s", [events[3].pk])
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [events[2].pk])
    checked, bad, why = audit_verify()
    assert (checked, bad) == (3, events[4]) and "prev_hash does not match" in why


def test_events_cut_from_the_end_of_one_chain_are_caught_by_the_anchor(hospitals, tmp_path):
    a, b = hospitals
    for n, owner in enumerate([a, b, None, a]):
        audit_record(**fact(owner, n))
    call_command("audit_anchor", out=str(tmp_path / "anchor.json"), stdout=io.StringIO())
    anchor = json.loads((tmp_path / "anchor.json").read_text())
    assert [(e["chain"], e["count"]) for e in anchor["chains"]] == [(0, 1), (a.pk, 2), (b.pk, 1)]
    assert (anchor["id"], anchor["count"]) == (chain(a.pk)[-1].pk, 4)
    for n in range(3):
        audit_record(**fact(b, 10 + n))  # later events of other chains are fine
    out = io.StringIO()
    call_command("verify_audit", anchor=str(tmp_path / "anchor.json"), stdout=out)
    assert "the anchor (event #" in out.getvalue() and "4 events in 3 chains) matches" in out.getvalue()

    cut = chain(a.pk)[-1]
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [cut.pk])
    assert audit_verify() == (6, None, "")  # a shorter chain is still a valid chain
    with pytest.raises(
        CommandError,
        match=f"the anchored event #{cut.pk} of the chain of institution {a.pk} is gone and that chain now ends "
        f"at event #{chain(a.pk)[-1].pk}, with 1 events where the anchor counted 2: events were cut",
    ):
        call_command("verify_audit", anchor=str(tmp_path / "anchor.json"))

    # A whole chain gone is cut too.
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE chain = 0")
    anchor["chains"] = [e for e in anchor["chains"] if e["chain"] == 0]
    anchor["id"], anchor["count"] = anchor["chains"][0]["id"], 1
    (tmp_path / "platform.json").write_text(json.dumps(anchor))
    with pytest.raises(CommandError, match="of the platform chain is gone and that chain now is empty"):
        call_command("verify_audit", anchor=str(tmp_path / "platform.json"))


# The global chain from before per-institution chains


def test_the_upgrade_closes_the_global_chain_and_every_chain_continues_it(hospitals, tmp_path):
    a, b = hospitals
    old = legacy_events(3)
    # An anchor the code from before took (format 1) stays good.
    (tmp_path / "old.json").write_text(
        json.dumps({"format": "cloudiopsy-audit-anchor/1", "id": old[-1].pk, "hash": old[-1].hash, "count": 3})
    )
    close_global_chain()
    close_global_chain()  # a second run finds it closed
    marker = AuditEvent.objects.order_by("id").last()
    assert (marker.action, marker.chain, marker.prev_hash, marker.hash_scheme) == (
        "audit.chains_split",
        None,
        old[-1].hash,
        "hmac-sha256",
    )
    assert marker.after == {"global_events": 3, "last_global_id": old[-1].pk, "last_global_hash": old[-1].hash}
    for n, owner in enumerate([a, None, b, a]):
        audit_record(**fact(owner, n))
    for number in (a.pk, 0, b.pk):
        assert linked(chain(number), marker.hash)
    assert [(e.pk, e.hash) for e in chain(None)] == [(e.pk, e.hash) for e in old] + [(marker.pk, marker.hash)]
    assert audit_verify() == (8, None, "")
    out = io.StringIO()
    call_command("verify_audit", anchor=str(tmp_path / "old.json"), stdout=out)
    assert (
        "OK: 8 audit events verify; the anchor (event #" in out.getvalue() and "3 events in 1 chain" in out.getvalue()
    )
    anchor = audit_anchor()
    assert [e["chain"] for e in anchor["chains"]] == [None, 0, a.pk, b.pk] and anchor["chains"][0]["count"] == 4

    # Cutting the global chain's end breaks the first event of the chains after it.
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [marker.pk])
    verify_names(chain(a.pk)[0], "prev_hash does not match")


def test_the_upgrade_appends_nothing_to_an_empty_trail():
    close_global_chain()
    assert not AuditEvent.objects.exists()


def test_an_event_added_to_the_global_chain_after_chains_began_is_named(hospitals):
    a, _ = hospitals
    legacy_events(2)
    close_global_chain()
    audit_record(**fact(a))
    (late,) = legacy_events(1)  # as a process still running the code from before would
    verify_names(late, "it is in the global chain, which ended when per-institution chains began")


def test_unkeyed_global_events_are_vouched_for_by_the_chains_after_them(hospitals):
    a, _ = hospitals
    event = AuditEvent(
        created_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        actor_type="system",
        action="test.unkeyed",
        prev_hash=GENESIS,
        hash_scheme=AuditEvent.HashScheme.SHA256,
    )
    event.hash = content_hash(event, key=None)
    event.save()
    assert "no event has a keyed hash" in audit_verify().why
    audit_record(**fact(a))
    assert audit_verify() == (2, None, "") and chain(a.pk)[0].prev_hash == event.hash


# Batches


def test_a_batch_makes_the_same_chains_as_one_append_at_a_time(hospitals, monkeypatch, django_assert_max_num_queries):
    a, b = hospitals
    audit_record(**fact(a, -1))  # chains already under way
    records = [fact(owner, n) for n, owner in enumerate([a, b, b, None, a, a, b, a] * 4)]

    def run(append) -> list[tuple]:
        ticks = itertools.count()
        start = datetime.datetime(2026, 7, 1, tzinfo=datetime.UTC)
        clock = SimpleNamespace(now=lambda: start + datetime.timedelta(microseconds=next(ticks)))
        monkeypatch.setattr("audit.services.timezone", clock)
        events = append()
        monkeypatch.undo()
        return [(e.chain, e.prev_hash, e.hash) for e in events]

    with pytest.raises(RuntimeError), transaction.atomic():
        one_at_a_time = run(lambda: [audit_record(**record) for record in records])
        raise RuntimeError("roll back: the batch below makes the same events")
    with django_assert_max_num_queries(12):  # a lock and a last hash per chain, one insert
        batch = run(lambda: audit_record_many(records))
    assert batch == one_at_a_time
    events = list(AuditEvent.objects.exclude(target_id="-1").order_by("id"))
    assert [e.after["n"] for e in events] == list(range(32))  # inserted in order
    assert audit_verify() == (33, None, "") and audit_record_many([]) == []


# Concurrency, on PostgreSQL (SQLite runs one writing transaction at a time)


def needs_postgresql():
    if connection.vendor != "postgresql":
        unavailable("appends wait for each other per chain on PostgreSQL only (set DATABASE_URL)")


class Writer(threading.Thread):
    """Runs ``work`` in its own thread, on its own database connection."""

    def __init__(self, work):
        super().__init__(daemon=True)
        self.work, self.error, self.result = work, None, None
        self.done = threading.Event()

    def run(self):
        try:
            self.result = self.work()
        except BaseException as error:  # re-raised by finish()
            self.error = error
        finally:
            self.done.set()
            connections.close_all()

    def finish(self, timeout: float = 10):
        self.join(timeout)
        assert not self.is_alive(), "the writer did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def held_open(owner: Institution | None, appended: threading.Event, release: threading.Event) -> Writer:
    """A writer that appends an event of ``owner`` and keeps its transaction open until ``release``."""

    def work():
        with transaction.atomic():
            event = audit_record(**fact(owner))
            appended.set()
            assert release.wait(20)
        return event

    writer = Writer(work)
    writer.start()
    assert appended.wait(10)
    return writer


@pytest.mark.django_db(transaction=True)
def test_appends_for_different_institutions_do_not_wait_for_each_other(hospitals):
    needs_postgresql()
    a, b = hospitals
    release = threading.Event()
    holder = held_open(a, threading.Event(), release)
    try:
        started = time.monotonic()
        other = Writer(lambda: audit_record(**fact(b)))
        other.start()
        assert other.done.wait(2), "an append for another institution waited for an open transaction"
        other.finish()
        platform = Writer(lambda: audit_record(**fact(None)))
        platform.start()
        assert platform.done.wait(2)
        platform.finish()
        assert time.monotonic() - started < 2 and holder.is_alive()
    finally:
        release.set()
    holder.finish()
    assert audit_verify() == (3, None, "")


@pytest.mark.django_db(transaction=True)
def test_appends_for_one_institution_wait_until_the_first_commits(hospitals):
    needs_postgresql()
    a, _ = hospitals
    release = threading.Event()
    holder = held_open(a, threading.Event(), release)
    try:
        second = Writer(lambda: audit_record(**fact(a, 1)))
        second.start()
        assert not second.done.wait(1), "the second append did not wait for the chain's lock"
    finally:
        release.set()
    first = holder.finish()
    assert second.finish().prev_hash == first.hash
    assert audit_verify() == (2, None, "")


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_append_releases_its_chain(hospitals):
    needs_postgresql()
    a, _ = hospitals
    rolled_back, release = threading.Event(), threading.Event()

    def work():
        with transaction.atomic():
            with pytest.raises(RuntimeError), transaction.atomic():
                audit_record(**fact(a))
                raise RuntimeError("the change failed")
            rolled_back.set()
            assert release.wait(20)

    holder = Writer(work)
    holder.start()
    try:
        assert rolled_back.wait(10)
        other = Writer(lambda: audit_record(**fact(a, 1)))
        other.start()
        assert other.done.wait(2), "the chain stayed locked after its append was rolled back"
        other.finish()
    finally:
        release.set()
    holder.finish()
    assert audit_verify() == (1, None, "")


@pytest.mark.django_db(transaction=True)
def test_two_transactions_appending_to_two_chains_in_opposite_orders_do_not_deadlock(hospitals):
    needs_postgresql()
    a, b = hospitals  # a's chain has the lower lock key
    first_a, first_b, waiting = threading.Event(), threading.Event(), threading.Event()

    def a_then_b():
        with transaction.atomic():
            audit_record(**fact(a, 1))
            first_a.set()
            assert first_b.wait(10)
            waiting.set()
            return audit_record(**fact(b, 2))  # waits for the other transaction: a greater key, safe

    def b_then_a():
        assert first_a.wait(10)
        with transaction.atomic():
            audit_record(**fact(b, 3))
            first_b.set()
            assert waiting.wait(10)
            time.sleep(0.3)  # the other transaction is waiting for b's chain now
            return audit_record(**fact(a, 4))  # a's chain is held: waiting could deadlock

    one, other = Writer(a_then_b), Writer(b_then_a)
    one.start()
    other.start()
    crossed = other.finish(timeout=10)
    one.finish(timeout=10)
    # The event of A joined the chain its transaction held; it verifies there.
    assert (crossed.institution_id, crossed.chain) == (a.pk, b.pk)
    assert [e.after["n"] for e in chain(b.pk)] == [3, 4, 2]
    assert audit_verify() == (4, None, "")


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_from_four_writers_verify_exactly(hospitals, tmp_path):
    needs_postgresql()
    a, b = hospitals
    start = threading.Barrier(4)

    def appends(owner: Institution, first: int):
        def work():
            start.wait(10)
            for n in range(first, first + 15):
                with transaction.atomic():
                    audit_record(**fact(owner, n))
            audit_record_many([fact(owner, n) for n in range(first + 15, first + 20)])
            audit_record_many([fact(a, first + 20), fact(b, first + 21), fact(None, first + 22)])

        return work

    writers = [Writer(appends(owner, first)) for owner, first in [(a, 0), (a, 100), (b, 200), (b, 300)]]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.finish(timeout=60)
    assert AuditEvent.objects.count() == 4 * 23
    assert audit_verify() == (4 * 23, None, "")
    assert {e.chain for e in AuditEvent.objects.all()} == {a.pk, b.pk, 0}
    call_command("audit_anchor", out=str(tmp_path / "anchor.json"), stdout=io.StringIO())
    out = io.StringIO()
    call_command("verify_audit", anchor=str(tmp_path / "anchor.json"), stdout=out)
    assert "92 events in 3 chains) matches" in out.getvalue()
