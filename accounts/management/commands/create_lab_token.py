import datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from accounts.models import Institution, LabSystem, Scope
from accounts.services import lab_system_create


class Command(BaseCommand):
    help = (
        "Create an API token for a lab information system of an institution. The key is printed "
        "once, on its own line as LAB_TOKEN=<key>; only its hash is stored. Scopes: "
        + ", ".join(Scope.values)
        + " (default: all)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--institution", required=True, help="Institution slug, e.g. 'demo'.")
        parser.add_argument("--name", required=True, help="Name of the lab system, unique per institution.")
        parser.add_argument("--scopes", default="", help="Comma-separated scopes, e.g. cases:write,patches:write.")
        parser.add_argument("--expires-days", type=int, default=None, help="The token expires after this many days.")

    def handle(self, *args, institution: str, name: str, scopes: str, expires_days: int | None, **options):
        inst = Institution.objects.filter(slug=institution).first()
        if inst is None:
            raise CommandError(f"no institution with slug {institution!r}")
        name = name.strip()
        if not name:
            raise CommandError("--name must not be empty")
        if LabSystem.objects.filter(institution=inst, name=name).exists():
            raise CommandError(f"institution {institution!r} already has a lab system named {name!r}")
        if expires_days is not None and expires_days < 1:
            raise CommandError("--expires-days must be at least 1")
        chosen = [s.strip() for s in scopes.split(",") if s.strip()] or None
        expires_at = timezone.now() + datetime.timedelta(days=expires_days) if expires_days else None
        try:
            lab_system, key = lab_system_create(institution=inst, name=name, scopes=chosen, expires_at=expires_at)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(
            f"Created lab system {lab_system.name!r} for {inst.slug} with scopes {', '.join(lab_system.scopes)}"
            + (f", expiring {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else "")
            + ". Keep the key: it is not shown again."
        )
        self.stdout.write(f"LAB_TOKEN={key}")
