"""Audit integrity: the keyed chain, what verify_audit catches and what only an anchor catches,
the database refusing to change or empty the trail, and the client address behind proxies
(docs/audit.md)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import importlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from types import SimpleNamespace

import pytest
from django.apps import apps
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.test import RequestFactory

from audit import tasks
from audit.models import AuditEvent
from audit.services import (
    GENESIS,
    audit_record,
    audit_verify,
    client_address,
    content_hash,
    event_sign,
    key_fingerprint,
)
from cases.services import PatientData, case_create
from tests.conftest import ROOT, triggers_set_aside, unavailable

pytestmark = pytest.mark.django_db


def record(count: int, start: int = 0) -> list[AuditEvent]:
    return [
        audit_record(
            actor=None, action="test.event", target_type="test.thing", target_id=n, after={"n": n}, reason=f"event {n}"
        )
        for n in range(start, start + count)
    ]


def events() -> list[AuditEvent]:
    return list(AuditEvent.objects.order_by("id"))


def rewrite(first: AuditEvent, *, sign, until: AuditEvent | None = None) -> None:
    """Edit ``first`` and re-chain it and the events after it in its chain (through ``until``, else to
    the end) as someone who can write the table would: ``sign`` sets each event's hash fields."""
    chain = AuditEvent.objects.filter(chain=first.chain)
    previous = chain.filter(id__lt=first.pk).order_by("-id").values_list("hash", flat=True).first()
    if previous is None and first.chain is not None:  # a chain starts where the global chain ends
        previous = AuditEvent.objects.filter(chain=None).order_by("-id").values_list("hash", flat=True).first()
    previous = previous or GENESIS
    later = chain.filter(id__gte=first.pk, id__lte=(until or chain.order_by("id").last()).pk).order_by("id")
    with triggers_set_aside():
        for event in later:
            if event.pk == first.pk:
                event.reason = "rewritten afterwards"
            event.prev_hash = previous
            sign(event)
            event.save()
            previous = event.hash


def plain_sha256(event: AuditEvent) -> None:
    event.hash = content_hash(event, key=None)


def plain_sha256_labelled_unkeyed(event: AuditEvent) -> None:
    event.hash_scheme, event.key_id = AuditEvent.HashScheme.SHA256, ""
    event.hash = content_hash(event, key=None)


def hmac_with_a_guessed_key(event: AuditEvent) -> None:
    event.hash = content_hash(event, key="a guessed key")  # key_id left as the real key's


def hmac_with_own_key(event: AuditEvent) -> None:
    event_sign(event, key="the intruder's own key")


def hmac_with_the_audit_key(event: AuditEvent) -> None:
    event_sign(event, key=django_settings.AUDIT_HMAC_KEY)


def write_anchor(path) -> dict:
    call_command("audit_anchor", out=str(path), stdout=io.StringIO())
    return json.loads(path.read_text())


# The keyed chain


def test_events_are_hmac_sha256_of_the_canonical_content_with_the_audit_key(settings):
    settings.AUDIT_HMAC_KEY = "k" * 64
    first, second = record(2)
    second.refresh_from_db()
    content = {
        "created_at": second.created_at.astimezone(datetime.UTC).isoformat(timespec="microseconds"),
        "actor": ["system", "", "system", None],
        "action": "test.event",
        "target": ["test.thing", "1"],
        "before": None,
        "after": {"n": 1},
        "reason": "event 1",
        "client_address": None,
        "prev_hash": first.hash,
        "chain": 0,  # the platform's chain: the event names no institution
    }
    message = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    assert second.hash == hmac.new(b"k" * 64, message, hashlib.sha256).hexdigest()
    assert second.hash != hashlib.sha256(message).hexdigest()
    fingerprint = hmac.new(b"k" * 64, b"cloudiopsy-audit-key-id", hashlib.sha256).hexdigest()[:8]
    assert (second.hash_scheme, second.key_id) == ("hmac-sha256", fingerprint)
    assert first.prev_hash == GENESIS
    assert audit_verify() == (2, None, "")
    out = io.StringIO()
    call_command("verify_audit", stdout=out)
    assert out.getvalue().strip() == "OK: 2 audit events verify"


def test_verify_audit_names_the_first_altered_event(institution, clinician):
    for i in range(3):
        case_create(
            institution=institution,
            created_by=clinician,
            patient=PatientData(mrn=f"V{i}", name="Verify"),
            accession=f"V-{i}",
            specimen_site="colon",
        )
    victim = AuditEvent.objects.filter(action="case.create").order_by("id")[1]
    with triggers_set_aside() as cursor:
        cursor.execute("UPDATE audit_auditevent SET reason = %s WHERE id = %s", ["edited later", victim.pk])
    with pytest.raises(CommandError, match=f"audit event #{victim.pk} \\(case.create.*content does not match"):
        call_command("verify_audit")


@pytest.mark.parametrize(
    ("sign", "from_first", "why"),
    [
        (plain_sha256, False, "its hash is a plain SHA-256 where a keyed HMAC belongs"),
        (plain_sha256_labelled_unkeyed, False, "unkeyed (plain SHA-256) hash in a per-institution chain"),
        (plain_sha256_labelled_unkeyed, True, "unkeyed (plain SHA-256) hash in a per-institution chain"),
        (hmac_with_a_guessed_key, False, "its content does not match its hash"),
        (hmac_with_own_key, False, "made with another key"),
    ],
)
def test_a_chain_rewritten_without_the_key_does_not_verify(sign, from_first, why):
    record(4)
    first = events()[0 if from_first else 2]
    rewrite(first, sign=sign)
    assert [e.prev_hash for e in events()[1:]] == [e.hash for e in events()[:-1]]  # the links were redone
    checked, bad, reason = audit_verify()
    assert (checked, bad, why in reason) == (0 if from_first else 2, first, True), reason
    with pytest.raises(CommandError, match=re.escape(why)):
        call_command("verify_audit")


def test_events_made_with_a_rotated_key_verify_with_that_key_only(settings, tmp_path):
    settings.AUDIT_HMAC_KEY = "the old key"
    record(2)
    settings.AUDIT_HMAC_KEY = "the new key"
    record(1)
    checked, bad, why = audit_verify()
    assert (checked, bad) == (0, events()[0])
    assert f"another key (key id {key_fingerprint('the old key')!r}" in why
    old = tmp_path / "old.key"
    old.write_text("the old key\n")
    out = io.StringIO()
    call_command("verify_audit", previous_key_file=[str(old)], stdout=out)
    assert "OK: 3 audit events verify" in out.getvalue()


def test_an_event_removed_from_the_middle_is_named():
    record(4)
    gone, after = events()[1:3]
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [gone.pk])
    checked, bad, why = audit_verify()
    assert (checked, bad) == (1, after) and "prev_hash does not match" in why
    with pytest.raises(CommandError, match=f"audit event #{after.pk} \\(test.event.*the 1 events before it verified"):
        call_command("verify_audit")


def test_unkeyed_events_from_before_the_upgrade_are_kept_and_vouched_for_by_a_keyed_event():
    previous = GENESIS
    for n in range(3):  # as audit_record wrote them before the chain was keyed
        event = AuditEvent(
            created_at=datetime.datetime(2026, 1, 1, 12, n, tzinfo=datetime.UTC),
            actor_type="system",
            actor_label="system",
            action="test.legacy",
            after={"n": n},
            prev_hash=previous,
            hash_scheme=AuditEvent.HashScheme.SHA256,
        )
        event.hash = content_hash(event, key=None)
        event.save()
        previous = event.hash
    legacy = events()
    # Unkeyed events alone are what a rewrite without the key looks like.
    assert "no event has a keyed hash" in audit_verify().why

    migration = importlib.import_module("audit.migrations.0004_keyed_chain_start")
    schema_editor = SimpleNamespace(
        connection=connection, execute=lambda sql, params=(): connection.cursor().execute(sql, params)
    )
    migration.forwards(apps, schema_editor)
    migration.forwards(apps, schema_editor)  # a second run finds the chain keyed already
    start = events()[-1]
    assert [(e.pk, e.hash) for e in events()[:3]] == [(e.pk, e.hash) for e in legacy]  # nothing re-hashed
    assert (start.action, start.hash_scheme, start.prev_hash) == ("audit.chain_keyed", "hmac-sha256", legacy[-1].hash)
    assert start.after == {"unkeyed_events": 3, "last_unkeyed_id": legacy[-1].pk, "last_unkeyed_hash": legacy[-1].hash}
    record(1)
    assert audit_verify() == (5, None, "")
    out = io.StringIO()
    call_command("verify_audit", stdout=out)
    assert "OK: 5 audit events verify (3 from before keyed chaining, with plain SHA-256 hashes)" in out.getvalue()

    # Rewriting an unkeyed event needs the keyed event after it rewritten too, which needs the key.
    rewrite(legacy[1], sign=plain_sha256, until=legacy[2])
    checked, bad, why = audit_verify()
    assert (checked, bad) == (3, start) and "prev_hash does not match" in why


def test_the_upgrade_appends_nothing_to_an_empty_trail():
    migration = importlib.import_module("audit.migrations.0004_keyed_chain_start")
    migration.forwards(apps, SimpleNamespace(connection=connection, execute=lambda sql, params=(): None))
    assert not AuditEvent.objects.exists() and audit_verify() == (0, None, "")


# Anchors


def test_anchor_names_the_last_event_and_still_matches_as_the_trail_grows(tmp_path):
    record(2)
    out = io.StringIO()
    call_command("audit_anchor", out=str(tmp_path / "anchor.json"), stdout=out)
    anchor = json.loads((tmp_path / "anchor.json").read_text())
    assert json.loads(out.getvalue()) == anchor
    last = events()[-1]
    assert anchor["format"] == "cloudiopsy-audit-anchor/2"
    assert (anchor["id"], anchor["count"]) == (last.pk, 2)
    (platform,) = anchor["chains"]
    assert (platform["chain"], platform["id"], platform["hash"], platform["count"]) == (0, last.pk, last.hash, 2)
    assert (platform["hash_scheme"], platform["key_id"]) == (
        "hmac-sha256",
        key_fingerprint(django_settings.AUDIT_HMAC_KEY),
    )
    assert datetime.datetime.fromisoformat(platform["created_at"]) == last.created_at
    record(1, start=2)
    out = io.StringIO()
    call_command("verify_audit", anchor=str(tmp_path / "anchor.json"), stdout=out)
    assert (
        out.getvalue().strip()
        == f"OK: 3 audit events verify; the anchor (event #{last.pk}, 2 events in 1 chain) matches"
    )


def test_events_cut_from_the_end_pass_the_chain_but_not_the_anchor(tmp_path):
    record(3)
    write_anchor(tmp_path / "anchor.json")
    last = events()[-1]
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [last.pk])
    # A shorter chain is still a valid chain: this is what the anchor is for (docs/audit.md).
    out = io.StringIO()
    call_command("verify_audit", stdout=out)
    assert "OK: 2 audit events verify" in out.getvalue()
    with pytest.raises(
        CommandError,
        match=f"anchored event #{last.pk} of the platform chain is gone and that chain now ends at event "
        f"#{last.pk - 1}, with 2 events where the anchor counted 3: events were cut from the end",
    ):
        call_command("verify_audit", anchor=str(tmp_path / "anchor.json"))


def test_anchor_catches_a_chain_rewritten_with_the_key(tmp_path):
    record(3)
    write_anchor(tmp_path / "anchor.json")
    rewrite(events()[1], sign=hmac_with_the_audit_key)
    assert audit_verify().bad is None  # whoever holds the key can make a chain that verifies...
    with pytest.raises(CommandError, match="no longer has the anchored hash: the chain was rewritten"):
        call_command("verify_audit", anchor=str(tmp_path / "anchor.json"))  # ...but not one that matches the anchor


def test_anchor_whose_count_differs_is_reported(tmp_path):
    record(2)
    anchor = write_anchor(tmp_path / "anchor.json")
    anchor["chains"][0]["count"] = anchor["count"] = 3
    (tmp_path / "anchor.json").write_text(json.dumps(anchor))
    with pytest.raises(CommandError, match=f"2 events of the platform chain up to #{anchor['id']} where the anchor "):
        call_command("verify_audit", anchor=str(tmp_path / "anchor.json"))


def test_an_empty_trail_has_no_anchor(tmp_path):
    out = io.StringIO()
    call_command("audit_anchor", out=str(tmp_path / "anchor.json"), stdout=out)
    assert out.getvalue().strip() == "no audit events yet: nothing to anchor"
    assert not (tmp_path / "anchor.json").exists()


def test_beat_task_logs_the_anchor_and_adds_a_file_per_new_anchor(settings, tmp_path, caplog):
    settings.AUDIT_ANCHOR_DIR = str(tmp_path)
    assert tasks.audit_anchor_write() is None
    record(2)
    with caplog.at_level("INFO", logger="audit.services"):
        first = tasks.audit_anchor_write()
    assert tasks.audit_anchor_write() == first  # nothing new since: no second file
    record(1, start=2)
    second = tasks.audit_anchor_write()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [
        f"audit-anchor-{first:012d}-{2:012d}.json",
        f"audit-anchor-{second:012d}-{3:012d}.json",
    ]
    assert 'AUDIT_ANCHOR {"anchored_at"' in caplog.text and f'"id": {first}' in caplog.text
    out = io.StringIO()
    call_command("verify_audit", anchor=str(files[0]), stdout=out)
    assert f"the anchor (event #{first}, 2 events in 1 chain) matches" in out.getvalue()


# Command errors: a clear message, no traceback


def _anchor_text(**changes) -> str:
    """An anchor from before per-institution chains (format 1), still accepted."""
    anchor = {"format": "cloudiopsy-audit-anchor/1", "id": 1, "count": 1, "hash": "a" * 64}
    return json.dumps({**anchor, **changes})


def _chains_anchor_text(*entries, **changes) -> str:
    chains = [{"chain": 0, "id": 1, "count": 1, "hash": "a" * 64, **entry} for entry in entries]
    anchor = {"format": "cloudiopsy-audit-anchor/2", "id": 1, "count": len(chains), "chains": chains}
    return json.dumps({**anchor, **changes})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the anchor file .*missing.json: No such file or directory"),
        ("{not json", "anchor file .* cannot be used: it is not JSON"),
        ('{"id": 1, "hash": "x"}', 'cannot be used: it is not an audit anchor \\(no "format"'),
        (_anchor_text(id="1"), "its 'id' is not a positive whole number"),
        (_anchor_text(count=0), "its 'count' is not a positive whole number"),
        (_anchor_text(hash="A" * 64), "its 'hash' is not 64 lowercase hexadecimal digits"),
        (_chains_anchor_text(chains=[], count=1), "its 'chains' is not a list of chains"),
        (_chains_anchor_text({}, chains=[[]]), "chain entry 1 is not an object"),
        (_chains_anchor_text({}, {"id": 0}), "chain entry 2's 'id' is not a positive whole number"),
        (_chains_anchor_text({}, {"chain": -1}), "chain entry 2's 'chain' is neither null nor a whole number"),
        (_chains_anchor_text({}, {}), "it names chain 0 twice"),
        (_chains_anchor_text({}, {"chain": 5}, count=3), "its 'id' and 'count' are not its chains'"),
        (b"\xff\xfe\x00", "the anchor file .* is not text"),
    ],
)
def test_verify_audit_refuses_an_unusable_anchor_file(tmp_path, content, message):
    record(1)
    path = tmp_path / "missing.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CommandError, match=message):
        call_command("verify_audit", anchor=str(path))


def test_verify_audit_refuses_a_missing_or_empty_previous_key_file(tmp_path):
    with pytest.raises(CommandError, match="cannot read the key file .*nope.key: No such file"):
        call_command("verify_audit", previous_key_file=[str(tmp_path / "nope.key")])
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(CommandError, match="the key file .*empty.key is empty"):
        call_command("verify_audit", previous_key_file=[str(tmp_path / "empty.key")])


def test_audit_anchor_reports_a_file_it_cannot_write(tmp_path):
    record(1)
    with pytest.raises(CommandError, match="cannot write the anchor to .*no-such-dir/anchor.json: No such file"):
        call_command("audit_anchor", out=str(tmp_path / "no-such-dir" / "anchor.json"), stdout=io.StringIO())


def test_verify_audit_from_the_shell_reports_a_missing_anchor_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "verify_audit", "--anchor", str(tmp_path / "missing.json")],
        cwd=ROOT,
        env={**os.environ, "DEBUG": "true", "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "CommandError: cannot read the anchor file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.django_db(transaction=True)
def test_verify_audit_from_the_shell_exits_1_when_the_tail_was_cut(tmp_path):
    if connection.vendor != "postgresql":
        unavailable("another process shares the test database on PostgreSQL only (set DATABASE_URL)")
    record(3)
    write_anchor(tmp_path / "anchor.json")
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [events()[-1].pk])
    db = connection.settings_dict
    result = subprocess.run(
        [sys.executable, "manage.py", "verify_audit", "--anchor", str(tmp_path / "anchor.json")],
        cwd=ROOT,
        env={
            **os.environ,
            "DEBUG": "true",
            "DATA_DIR": str(tmp_path),
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "events were cut from the end of the trail" in result.stderr and "Traceback" not in result.stderr


# The database refuses


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_auditevent SET reason = 'x' WHERE id = %s", "DELETE FROM audit_auditevent WHERE id = %s"],
)
def test_database_refuses_to_update_or_delete_an_event(statement):
    (event,) = record(1)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(statement, [event.pk])
    with pytest.raises(DatabaseError, match="append-only: UPDATE"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(reason="through the ORM too")
    with pytest.raises(DatabaseError, match="append-only: DELETE"), transaction.atomic():
        AuditEvent.objects.all().delete()
    event.refresh_from_db()
    assert event.reason == "event 0" and audit_verify() == (1, None, "")


def test_postgresql_refuses_to_truncate_the_trail_unless_it_is_empty():
    if connection.vendor != "postgresql":
        unavailable("SQLite has no TRUNCATE (DELETE FROM is refused as a delete); set DATABASE_URL")
    record(2)
    for statement in ("TRUNCATE audit_auditevent", "TRUNCATE accounts_institution, audit_auditevent CASCADE"):
        with pytest.raises(DatabaseError, match="append-only: TRUNCATE is not allowed"):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(statement)
    assert AuditEvent.objects.count() == 2
    with triggers_set_aside() as cursor:
        cursor.execute("DELETE FROM audit_auditevent")
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE audit_auditevent")  # nothing to lose: the suite's flush relies on this


def test_flush_cannot_erase_the_trail():
    record(2)
    with pytest.raises(CommandError, match="couldn't be flushed") as refused:
        call_command("flush", interactive=False, verbosity=0)
    assert "append-only" in str(refused.value.__cause__)
    assert AuditEvent.objects.count() == 2 and audit_verify() == (2, None, "")


def test_verify_audit_fails_while_the_triggers_are_set_aside():
    record(1)
    with triggers_set_aside(), pytest.raises(CommandError, match="no longer refuses changes to them: trigger audit_"):
        call_command("verify_audit")
    call_command("verify_audit", stdout=io.StringIO())


def _after_migrate_sql() -> list[str]:
    """The statements docs/audit.md says to run after every migrate."""
    doc = (ROOT / "docs" / "audit.md").read_text()
    block = next(b for b in re.findall(r"```sql\n(.*?)```", doc, re.S) if "REVOKE UPDATE, DELETE, TRUNCATE" in b)
    return [statement.strip() for statement in block.split(";") if statement.strip()]


def test_application_role_from_the_docs_can_append_events_but_not_change_or_unprotect_them():
    if connection.vendor != "postgresql":
        unavailable("roles exist on PostgreSQL only (set DATABASE_URL)")
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not cursor.fetchone()[0]:
            unavailable("creating a role needs a superuser")
    role = f"audit_app_{uuid.uuid4().hex[:12]}"  # created in the test's transaction, and rolled back with it
    record(1)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role}")
        for statement in _after_migrate_sql():
            cursor.execute(statement.replace("cloudiopsy_app", role))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL ROLE {role}")
        audit_record(actor=None, action="test.as_application", target_type="test.thing", target_id=1)
        cursor.execute("RESET ROLE")
    for statement, refusal in [
        ("UPDATE audit_auditevent SET reason = 'x'", "permission denied for table audit_auditevent"),
        ("DELETE FROM audit_auditevent", "permission denied for table audit_auditevent"),
        ("TRUNCATE audit_auditevent", "permission denied for table audit_auditevent"),
        ("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only", "must be owner"),
        ("DROP TRIGGER audit_event_no_truncate ON audit_auditevent", "must be owner"),
    ]:
        with pytest.raises(DatabaseError, match=refusal), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL ROLE {role}")
            cursor.execute(statement)
    assert AuditEvent.objects.count() == 2 and audit_verify() == (2, None, "")


# The client address behind trusted proxies


@pytest.mark.parametrize(
    ("header", "hops", "meta", "expected"),
    [
        pytest.param("", 1, {"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "10.0.0.5", id="no-proxy-header-ignored"),
        pytest.param("X-Forwarded-For", 1, {"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "203.0.113.9", id="one-hop"),
        pytest.param(
            "X-Forwarded-For",
            1,
            {"HTTP_X_FORWARDED_FOR": "198.51.100.66, 203.0.113.9"},
            "203.0.113.9",
            id="spoofed-left",
        ),
        pytest.param(
            "X-Forwarded-For",
            2,
            {"HTTP_X_FORWARDED_FOR": "198.51.100.66,203.0.113.9, 10.0.0.2"},
            "203.0.113.9",
            id="two-hops",
        ),
        pytest.param("X-Forwarded-For", 2, {"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "10.0.0.5", id="too-short"),
        pytest.param("X-Forwarded-For", 1, {"HTTP_X_FORWARDED_FOR": "<script>"}, "10.0.0.5", id="garbage"),
        pytest.param("X-Forwarded-For", 1, {"HTTP_X_FORWARDED_FOR": "203.0.113.9:443"}, "10.0.0.5", id="with-port"),
        pytest.param("X-Forwarded-For", 1, {"HTTP_X_FORWARDED_FOR": "203.0.113.9,"}, "10.0.0.5", id="empty-entry"),
        pytest.param("X-Forwarded-For", 1, {}, "10.0.0.5", id="missing-header"),
        pytest.param("X-Forwarded-For", 1, {"HTTP_X_FORWARDED_FOR": "2001:DB8:0:0::1"}, "2001:db8::1", id="ipv6"),
        pytest.param("X-Forwarded-For", 1, {"HTTP_X_FORWARDED_FOR": "fe80::1%eth0"}, "10.0.0.5", id="ipv6-zone"),
        pytest.param("X-Real-IP", 1, {"HTTP_X_REAL_IP": " 203.0.113.9 "}, "203.0.113.9", id="other-header"),
        pytest.param("X-Forwarded-For", 0, {"HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "10.0.0.5", id="zero-hops"),
        pytest.param("", 1, {"REMOTE_ADDR": ""}, None, id="no-remote-addr"),
    ],
)
def test_client_address(settings, header, hops, meta, expected):
    settings.TRUSTED_PROXY_HEADER, settings.TRUSTED_PROXY_COUNT = header, hops
    request = RequestFactory().get("/", **{"REMOTE_ADDR": "10.0.0.5", **meta})
    assert client_address(request) == expected
    assert client_address(None) is None


def test_failed_login_behind_a_proxy_records_the_address_the_proxy_saw(client, settings):
    settings.TRUSTED_PROXY_HEADER, settings.TRUSTED_PROXY_COUNT = "X-Forwarded-For", 1
    client.post(
        "/login/",
        {"username": "nobody", "password": "wrong"},
        REMOTE_ADDR="10.0.0.2",
        HTTP_X_FORWARDED_FOR="198.51.100.66, 203.0.113.9",
    )
    assert AuditEvent.objects.get(action="auth.login_failed").client_address == "203.0.113.9"
