"""One hash chain per institution (and one for the platform) instead of one for the whole trail.

The events already in the table stay as they are, in the global chain they were written in: the new
``chain`` column is empty for them (adding a nullable column without a default issues no UPDATE, so
the append-only trigger does not object, and SQLite adds it without rebuilding the table, so its
triggers stay). Where the trail holds events, one keyed event, ``audit.chains_split``, closes the
global chain; every per-institution chain starts from its hash, so cutting the end of the global
chain breaks the first event of every chain after it.

Schema change and closing event are one migration, one transaction on PostgreSQL: no append can fall
between them. The global advisory lock keeps out appends by processes still running the code from
before (they would extend the global chain after its closing event: restart them with the migration).
"""

import importlib

from django.conf import settings
from django.db import migrations, models
from django.db.migrations.exceptions import IrreversibleError
from django.utils import timezone


def close_global_chain(apps, schema_editor):
    from audit.services import APPEND_LOCK_KEY, event_sign

    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])  # as appends before did
    AuditEvent = apps.get_model("audit", "AuditEvent")
    if AuditEvent.objects.filter(chain__isnull=False).exists():
        return  # chains began already: the global chain was closed
    last = AuditEvent.objects.order_by("-id").first()
    if last is None or last.action == "audit.chains_split":
        return
    event = AuditEvent(
        created_at=timezone.now(),
        actor_type="system",
        actor_label="system",
        action="audit.chains_split",
        after={
            "global_events": AuditEvent.objects.count(),
            "last_global_id": last.pk,
            "last_global_hash": last.hash,
        },
        reason="From this event on, each institution's events, and the platform's, form their own chain, "
        "each starting from this event's hash; the events up to this one stay in the global chain.",
        prev_hash=last.hash,
    )
    event_sign(event, key=settings.AUDIT_HMAC_KEY)
    event.save()


def refuse_to_forget_chains(apps, schema_editor):
    # Each chained event's hash covers its chain: dropping the column would break every one of them.
    if apps.get_model("audit", "AuditEvent").objects.filter(chain__isnull=False).exists():
        raise IrreversibleError("audit events in per-institution chains exist: dropping chain would break them")


def sqlite_triggers_restore(apps, schema_editor):
    # Dropping the column may rebuild the table on SQLite, which drops 0005's triggers.
    if schema_editor.connection.vendor == "sqlite":
        protection = importlib.import_module("audit.migrations.0005_append_only_everywhere")
        for statement in protection.SQLITE_CREATE:
            schema_editor.execute(statement.replace("CREATE TRIGGER", "CREATE TRIGGER IF NOT EXISTS"))


class Migration(migrations.Migration):
    dependencies = [("audit", "0005_append_only_everywhere")]

    operations = [
        # Runs last when migrating back.
        migrations.RunPython(migrations.RunPython.noop, sqlite_triggers_restore),
        migrations.AddField(
            model_name="auditevent",
            name="chain",
            field=models.PositiveBigIntegerField(
                blank=True,
                help_text="The hash chain the event was appended to: an institution's id, or 0 for the platform "
                "(normally that of ``institution_id``; docs/audit.md). Empty for the global chain of the events "
                "recorded before per-institution chains.",
                null=True,
            ),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(fields=["chain", "id"], name="audit_chain"),
        ),
        # The closing event stays when migrating back: the trail is append-only.
        migrations.RunPython(close_global_chain, migrations.RunPython.noop),
        # Last, so that it runs first when migrating back.
        migrations.RunPython(migrations.RunPython.noop, refuse_to_forget_chains),
    ]
