"""Keyed chaining: each event says how its hash was made and with which key.

The events already in the table were hashed with plain SHA-256, and that is what they are marked
with: nothing is re-hashed (which would erase the evidence the old hashes carry). Adding a column
with a default issues no UPDATE, so the append-only trigger does not object.
"""

from django.db import migrations, models
from django.db.migrations.exceptions import IrreversibleError


def refuse_to_forget_keyed_events(apps, schema_editor):
    # Dropping the columns would relabel keyed events as unkeyed on the way forward again.
    if apps.get_model("audit", "AuditEvent").objects.exclude(hash_scheme="sha256").exists():
        raise IrreversibleError(
            "audit events with keyed hashes exist: dropping hash_scheme and key_id would break the chain"
        )


class Migration(migrations.Migration):
    dependencies = [("audit", "0002_append_only_trigger")]

    operations = [
        migrations.AddField(
            model_name="auditevent",
            name="hash_scheme",
            field=models.CharField(
                choices=[
                    ("sha256", "SHA-256, unkeyed (before keyed chaining)"),
                    ("hmac-sha256", "HMAC-SHA256 with the audit key"),
                ],
                default="sha256",
                help_text="How ``hash`` was made; unkeyed only before keyed chaining.",
                max_length=12,
            ),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="auditevent",
            name="key_id",
            field=models.CharField(
                blank=True,
                default="",
                help_text="Fingerprint of the key that made ``hash`` (first 8 hex digits of HMAC(key, "
                "'cloudiopsy-audit-key-id')); empty when unkeyed. Tells a rotated or wrong key from tampering.",
                max_length=8,
            ),
            preserve_default=False,
        ),
        # Last, so that it runs first when migrating back.
        migrations.RunPython(migrations.RunPython.noop, refuse_to_forget_keyed_events),
    ]
