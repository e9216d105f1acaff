"""Where the trail already holds events (hashed with plain SHA-256), append one keyed event after them.

Its HMAC covers the last unkeyed hash, and through the chain every unkeyed event: verify_audit
accepts unkeyed events only when a keyed event follows them, so a chain rewritten by someone
without the key (every hash recomputed as plain SHA-256) does not verify. On an empty table
there is nothing to vouch for and nothing is appended.
"""

from django.conf import settings
from django.db import migrations
from django.utils import timezone


def forwards(apps, schema_editor):
    from audit.services import APPEND_LOCK_KEY, event_sign

    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])  # as audit_record does
    AuditEvent = apps.get_model("audit", "AuditEvent")
    last = AuditEvent.objects.order_by("-id").first()
    if last is None or last.hash_scheme != "sha256":
        return
    event = AuditEvent(
        created_at=timezone.now(),
        actor_type="system",
        actor_label="system",
        action="audit.chain_keyed",
        after={
            "unkeyed_events": AuditEvent.objects.filter(hash_scheme="sha256").count(),
            "last_unkeyed_id": last.pk,
            "last_unkeyed_hash": last.hash,
        },
        reason="From this event on, each hash is an HMAC-SHA256 with the audit key; "
        "the events before it keep their plain SHA-256.",
        prev_hash=last.hash,
    )
    event_sign(event, key=settings.AUDIT_HMAC_KEY)
    event.save()


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_auditevent_hash_scheme_key_id")]
    # The event stays when migrating back: the trail is append-only.
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
