from django.core.management.base import BaseCommand

from audit.models import AuditEvent


class Command(BaseCommand):
    help = (
        "Print the latest audit event's id, time and hash. Keep these lines off-site (printed, e-mailed, "
        "in another system): a later verify_audit plus a matching anchor proves nothing before it changed."
    )

    def handle(self, *args, **options):
        last = AuditEvent.objects.order_by("-id").first()
        if last is None:
            self.stdout.write("no audit events yet")
            return
        self.stdout.write(f"AUDIT_ANCHOR id={last.pk} time={last.created_at.isoformat()} hash={last.hash}")
