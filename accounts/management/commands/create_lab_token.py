from django.core.management.base import BaseCommand, CommandError

from accounts.models import Institution, LabSystem
from accounts.services import lab_system_create


class Command(BaseCommand):
    help = (
        "Create an API token for a lab information system of an institution. The key is printed "
        "once, on its own line as LAB_TOKEN=<key>; only its hash is stored."
    )

    def add_arguments(self, parser):
        parser.add_argument("--institution", required=True, help="Institution slug, e.g. 'demo'.")
        parser.add_argument("--name", required=True, help="Name of the lab system, unique per institution.")

    def handle(self, *args, institution: str, name: str, **options):
        inst = Institution.objects.filter(slug=institution).first()
        if inst is None:
            raise CommandError(f"no institution with slug {institution!r}")
        name = name.strip()
        if not name:
            raise CommandError("--name must not be empty")
        if LabSystem.objects.filter(institution=inst, name=name).exists():
            raise CommandError(f"institution {institution!r} already has a lab system named {name!r}")
        lab_system, key = lab_system_create(institution=inst, name=name)
        self.stderr.write(
            f"Created lab system {lab_system.name!r} for {inst.slug}. Keep the key: it is not shown again."
        )
        self.stdout.write(f"LAB_TOKEN={key}")
