from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Q

from accounts.models import Institution, User
from cloudiopsy.admin_tenancy import INSTITUTION_ADMIN_GROUP, INSTITUTION_ADMIN_PERMISSIONS


@dataclass(frozen=True)
class DemoUser:
    username: str
    role: str
    password: str
    label: str
    staff: bool = False  # may sign in to /admin/ (as far as their group's permissions go)
    operator: bool = False  # a platform operator: superuser, no institution


DEMO_USERS = (
    DemoUser("clinician", User.Role.CLINICIAN, "clinician-demo-pass", "Clinician"),
    DemoUser("pathologist", User.Role.PATHOLOGIST, "pathologist-demo-pass", "Pathologist"),
    # Sees the dashboards (turnaround, queue, workload, AI performance), no patient and no case.
    DemoUser("labmanager", User.Role.LAB_MANAGER, "labmanager-demo-pass", "Lab manager"),
    # The hospital's administrator: /admin/ for the demo institution only, through the group's permissions.
    DemoUser("admin", User.Role.ADMIN, "admin-demo-pass", "Institution admin", staff=True),
    # Runs the platform for every institution; separate from any hospital's accounts, and rare.
    DemoUser("operator", User.Role.ADMIN, "operator-demo-pass", "Platform operator", staff=True, operator=True),
)


def institution_admin_group() -> tuple[Group, bool]:
    """The group of institution administrators, with its permissions when it is new (an existing
    group is left as an operator may have changed it)."""
    group, created = Group.objects.get_or_create(name=INSTITUTION_ADMIN_GROUP)
    if created:
        wanted = Q()
        for name in INSTITUTION_ADMIN_PERMISSIONS:
            app_label, codename = name.split(".")
            wanted |= Q(content_type__app_label=app_label, codename=codename)
        group.permissions.set(Permission.objects.filter(wanted))
    return group, created


class Command(BaseCommand):
    help = (
        "Create the demo institution (slug 'demo'), one user per role with demo passwords (the "
        "institution administrator 'admin' manages only that institution in /admin/, through the group "
        f"'{INSTITUTION_ADMIN_GROUP}'; 'operator' is a platform operator, a superuser of no institution), "
        "and register the bundled demo model and activate it when no model is active. Safe to run again: "
        "nothing is duplicated, and users and the group that exist already are left as they are (no "
        "password is reset). For demonstration only."
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
            group, group_created = institution_admin_group()
            for demo in DEMO_USERS:
                if User.objects.filter(username=demo.username).exists():
                    # An existing account is never changed: not its password, role, groups or rights.
                    existing.add(demo.username)
                    continue
                user = User(
                    username=demo.username,
                    institution=None if demo.operator else institution,
                    role=demo.role,
                    is_staff=demo.staff,
                    is_superuser=demo.operator,
                )
                user.set_password(demo.password)
                user.save()
                if demo.staff and not demo.operator:
                    user.groups.add(group)
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
        for demo in DEMO_USERS:
            if demo.username in existing:
                self.stdout.write(f"  {demo.label:<17} user {demo.username!r:<13} exists already: not changed")
            else:
                self.stdout.write(f"  {demo.label:<17} user {demo.username!r:<13} password {demo.password!r}")
        self.stdout.write(
            f"Group {group.name!r}: "
            + (f"{group.permissions.count()} permissions" if group_created else "exists already: not changed")
            + "; 'admin' sees only this institution in /admin/, 'operator' every institution."
        )
        self.stdout.write(f"Active model: {version} ({version.path})")
