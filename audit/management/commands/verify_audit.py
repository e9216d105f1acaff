from django.core.management.base import BaseCommand, CommandError

from audit.services import audit_verify


class Command(BaseCommand):
    help = (
        "Walk the audit trail's hash chain from the first event. Exits non-zero, naming the first event "
        "that does not verify, when any event was altered, removed or inserted out of order."
    )

    def handle(self, *args, **options):
        checked, bad, why = audit_verify()
        if bad is not None:
            when = f"{bad.created_at:%Y-%m-%d %H:%M:%S} UTC"
            raise CommandError(
                f"audit event #{bad.pk} ({bad.action}, {when}) does not verify: {why}; "
                f"the {checked} events before it verified"
            )
        self.stdout.write(f"OK: {checked} audit events verify")
