from django.core.management.base import BaseCommand, CommandError

from accounts.models import LabSystem
from accounts.services import lab_system_revoke


class Command(BaseCommand):
    help = "Revoke a lab system's API token for good (it answers 401 from then on)."

    def add_arguments(self, parser):
        parser.add_argument("--institution", required=True, help="Institution slug.")
        parser.add_argument("--name", required=True, help="Name of the lab system.")

    def handle(self, *args, institution: str, name: str, **options):
        lab_system = LabSystem.objects.filter(institution__slug=institution, name=name).first()
        if lab_system is None:
            raise CommandError(f"no lab system named {name!r} in institution {institution!r}")
        if lab_system_revoke(lab_system=lab_system):
            self.stdout.write(f"Revoked the token of {lab_system}")
        else:
            self.stdout.write(f"The token of {lab_system} was already revoked")
