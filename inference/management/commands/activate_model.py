import getpass

from django.core.management.base import BaseCommand, CommandError

from accounts.models import User
from inference.models import ModelVersion
from inference.services import ModelRejected, model_activate


def actor_name(by: str) -> str:
    try:
        system_user = getpass.getuser()
    except (KeyError, OSError):
        system_user = "unknown"
    return by or f"system: {system_user}"


def find_version(reference: str) -> ModelVersion:
    """A model version by id, 'name:version', 'name vVERSION' or a unique version string."""
    reference = reference.strip()
    queryset = ModelVersion.objects.all()
    if reference.isdigit() and queryset.filter(pk=int(reference)).exists():
        return queryset.get(pk=int(reference))
    for separator in (":", " v"):
        if separator in reference:
            name, _, version = reference.rpartition(separator)
            match = queryset.filter(name=name.strip(), version=version.strip()).first()
            if match:
                return match
    matches = list(queryset.filter(version=reference)) or list(queryset.filter(name=reference))
    if len(matches) == 1:
        return matches[0]
    raise CommandError(f"no single model version matches {reference!r}; use an id or NAME:VERSION (see `list_models`)")


class Command(BaseCommand):
    help = (
        "Make a registered model version the active one (the one workers serve). Re-verifies its files "
        "and refuses a model the platform cannot serve. Shadow evaluation first: both models on every "
        "reviewed patch (pathologists' classes as truth); a worse candidate needs --force and --reason. "
        "With REQUIRE_SITE_VALIDATION (default: on unless DEBUG), every institution with users or cases "
        "needs a passing validation of the version (validate_site) unless --force and --reason. "
        "Records who activated it, when, what it replaced, the shadow figures and the site validations."
    )

    def add_arguments(self, parser):
        parser.add_argument("version", help="Model version: id, NAME:VERSION, or a unique version string.")
        parser.add_argument("--by", default="", help="User name of who activates it (recorded).")
        parser.add_argument("--reason", default="", help="Why (recorded; required with --force).")
        parser.add_argument(
            "--force",
            action="store_true",
            help="Activate even if it does worse than the active model on reviewed patches, or lacks a "
            "passing site validation where one is required (needs --reason).",
        )

    def handle(self, *args, version: str, by: str, reason: str, force: bool, **options):
        model_version = find_version(version)
        user = User.objects.filter(username=by).first() if by else None
        if by and user is None:
            raise CommandError(f"no user named {by!r}")
        try:
            activation = model_activate(
                version=model_version, actor=actor_name(by), user=user, reason=reason, force=force
            )
        except ModelRejected as exc:
            raise CommandError(f"{model_version}: {exc}") from None
        if activation is None:
            self.stdout.write(f"{model_version} is already active")
        else:
            self.stdout.write(f"Active model: {model_version} (was {activation.previous or 'none'})")
