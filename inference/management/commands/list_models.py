from django.core.management.base import BaseCommand

from inference.models import ModelVersion


class Command(BaseCommand):
    help = "List registered model versions, the active one marked with *, with their test accuracy."

    def handle(self, *args, **options):
        versions = ModelVersion.objects.order_by("name", "created_at")
        if not versions:
            self.stdout.write("No model versions registered.")
            return
        for v in versions:
            test = (v.metadata.get("metrics") or {}).get("test") or {}
            accuracy = test.get("accuracy")
            self.stdout.write(
                f"{'*' if v.is_active else ' '} {v.pk:>4}  {v.name}:{v.version:<10} classes {','.join(v.classes)}  "
                f"test accuracy {accuracy if accuracy is not None else 'n/a'}  {v.path}"
            )
