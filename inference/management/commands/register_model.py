from django.core.management.base import BaseCommand, CommandError

from inference.services import ModelRejected, model_activate, model_register


class Command(BaseCommand):
    help = (
        "Register a model version directory (model.keras, model.tflite, metadata.json). Verifies every "
        "file against the SHA-256 recorded in its metadata, that its classes are ones the platform "
        "knows and that the serving copy loads. Registering does not activate it unless --activate."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", help="Model version directory.")
        parser.add_argument("--activate", action="store_true", help="Also make it the active model.")
        parser.add_argument("--by", default="", help="Who activates (recorded), default: the OS user.")

    def handle(self, *args, path: str, activate: bool, by: str, **options):
        try:
            version, created = model_register(directory=path)
            self.stdout.write(f"{'Registered' if created else 'Already registered'}: {version} (id {version.pk})")
            if activate:
                from inference.management.commands.activate_model import actor_name

                model_activate(version=version, actor=actor_name(by))
                self.stdout.write(f"Active model: {version}")
        except ModelRejected as exc:
            raise CommandError(f"{path}: {exc}") from None
