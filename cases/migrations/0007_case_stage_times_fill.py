"""Fill ``status_changed_at`` and ``ready_for_review_at`` of existing cases from the audit trail.

Every status change was recorded by ``case_transition`` as an event on the case ("case.status",
"case.sign_out") whose ``after`` holds the new status; "case.create" holds the first one. The latest
such event gives the time the case entered its status; the latest one whose status is
ready_for_review the time it last became ready. A case with no such event (none should exist) keeps
its creation time as ``status_changed_at`` and no ``ready_for_review_at``. The audit trail is only
read.
"""

from django.db import migrations

READY = "ready_for_review"
BATCH = 1000


def fill(apps, schema_editor):
    BiopsyCase = apps.get_model("cases", "BiopsyCase")
    AuditEvent = apps.get_model("audit", "AuditEvent")
    changed: dict[int, object] = {}
    ready: dict[int, object] = {}
    events = (
        AuditEvent.objects.filter(target_type="cases.biopsycase")
        .order_by("id")
        .values_list("target_id", "after", "created_at")
    )
    for target_id, after, created_at in events.iterator(chunk_size=BATCH):
        status = after.get("status") if isinstance(after, dict) else None
        if not status or not str(target_id).isdigit():
            continue
        changed[int(target_id)] = created_at
        if status == READY:
            ready[int(target_id)] = created_at
    cases = []
    for case in BiopsyCase.objects.only("pk", "created_at").order_by("pk").iterator(chunk_size=BATCH):
        case.status_changed_at = changed.get(case.pk, case.created_at)
        case.ready_for_review_at = ready.get(case.pk)
        cases.append(case)
        if len(cases) >= BATCH:
            BiopsyCase.objects.bulk_update(cases, ["status_changed_at", "ready_for_review_at"])
            cases = []
    if cases:
        BiopsyCase.objects.bulk_update(cases, ["status_changed_at", "ready_for_review_at"])


class Migration(migrations.Migration):

    dependencies = [
        ("cases", "0006_case_stage_times"),
        ("audit", "0006_per_institution_chains"),
    ]

    # Migrating back: 0006 drops the columns.
    operations = [migrations.RunPython(fill, migrations.RunPython.noop)]
