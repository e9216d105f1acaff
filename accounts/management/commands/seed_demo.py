from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from accounts.models import Institution, User

DEMO_USERS = (
    ("clinician", User.Role.CLINICIAN, "clinician-demo-pass"),
    ("pathologist", User.Role.PATHOLOGIST, "pathologist-demo-pass"),
    ("admin", User.Role.ADMIN, "admin-demo-pass"),
)


class Command(BaseCommand):
    help = (
        "Create the demo institution (slug 'demo'), one user per role with demo passwords, and "
        "register the bundled demo model and activate it when no model is active. Safe to run again: "
        "nothing is duplicated, and users that exist already are left as they are (their passwords are "
        "not reset). For demonstration only."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--model", default=str(settings.BASE_DIR / "inference" / "demo_model"), help="Model directory."
        )

    def handle(self, *args, model: str, **options):
        from inference.services import ModelRejected, model_activate, model_register

        existing = set()
        with transaction.atomic():
            institution, _ = Institution.objects.get_or_create(slug="demo", defaults={"name": "Demo Hospital"})
            for username, role, password in DEMO_USERS:
                if User.objects.filter(username=username).exists():
                    # An existing account is never changed: not its password, role or rights.
                    existing.add(username)
                    continue
                user = User(
                    username=username,
                    institution=institution,
                    role=role,
                    is_staff=role == User.Role.ADMIN,
                    is_superuser=role == User.Role.ADMIN,
                )
                user.set_password(password)
                user.save()
        from inference.models import ModelVersion

        try:
            version, _ = model_register(directory=model)
            # An administrator's later choice of model stands: only activate when none is active.
            if not ModelVersion.objects.filter(is_active=True).exists():
                # Off DEBUG, activation needs a passing site validation at every institution in use;
                # the demo model is seeded anyway, forced and audited, and shown "not validated at this site".
                model_activate(
                    version=version,
                    actor="system: seed_demo",
                    reason="bundled demo model: for demonstration, not validated at any site",
                    force=True,
                )
        except ModelRejected as exc:
            raise CommandError(f"cannot register the demo model at {model}: {exc}") from None
        version = ModelVersion.objects.get(is_active=True)
        self.stdout.write(f"Institution: {institution.name} (slug {institution.slug})")
        for username, role, password in DEMO_USERS:
            if username in existing:
                self.stdout.write(f"  {role.label:<13} user {username!r:<14} exists already: password not changed")
            else:
                self.stdout.write(f"  {role.label:<13} user {username!r:<14} password {password!r}")
        self.stdout.write(f"Active model: {version} ({version.path})")
