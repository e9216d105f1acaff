from django.core.management.base import BaseCommand, CommandError

from accounts.models import LabSystem
from webhooks.services import endpoint_set


class Command(BaseCommand):
    help = (
        "Set a lab system's webhook URL (https to a public address, unless WEBHOOK_ALLOW_HTTP / "
        "WEBHOOK_ALLOW_PRIVATE_HOSTS). The platform POSTs signed JSON events there when a case is ready "
        "for review or signed out. Prints a new signing secret once, as WEBHOOK_SECRET=<secret>; the "
        "database keeps it only encrypted (FIELD_ENCRYPTION_KEY). Run it again to replace a lost secret. "
        "See docs/webhooks.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("--institution", required=True)
        parser.add_argument("--name", required=True, help="Name of the lab system.")
        parser.add_argument("--url", required=True, help="http(s) URL to POST events to.")

    def handle(self, *args, institution: str, name: str, url: str, **options):
        lab_system = LabSystem.objects.filter(institution__slug=institution, name=name).first()
        if lab_system is None:
            raise CommandError(f"no lab system named {name!r} in institution {institution!r}")
        try:
            endpoint, secret = endpoint_set(lab_system=lab_system, url=url)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"Webhook of {lab_system}: {endpoint.url}. Keep the secret: it is not shown again.")
        self.stdout.write(f"WEBHOOK_SECRET={secret}")
