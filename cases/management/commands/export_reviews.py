from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime

from accounts.models import Institution
from audit.services import audit_record
from cases.export import reviews_export


class Command(BaseCommand):
    help = (
        "Export pathologist-reviewed patches for retraining: folder per final class, manifest.csv and "
        "dataset.json (the dataset version is the manifest's SHA-256). Nothing identifying is written. "
        "train_model --data DIR reads it directly and records the dataset version."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, help="Output folder (created).")
        parser.add_argument("--since", default="", help="Only reviews from this date or date-time on.")
        parser.add_argument("--institution", default="", help="Institution slug.")
        parser.add_argument(
            "--model-version", default="", help="Only reviews of this model version (NAME:VERSION or id)."
        )

    def handle(self, *args, out: str, since: str, institution: str, model_version: str, **options):
        from inference.management.commands.activate_model import find_version

        when = None
        if since:
            when = parse_datetime(since) or (parse_date(since) and parse_datetime(since + "T00:00:00+00:00"))
            if when is None:
                raise CommandError(f"--since must be a date or date-time, not {since!r}")
        inst = None
        if institution:
            inst = Institution.objects.filter(slug=institution).first()
            if inst is None:
                raise CommandError(f"no institution with slug {institution!r}")
        version = find_version(model_version) if model_version else None
        info = reviews_export(out=out, since=when, institution=inst, model_version=version)
        audit_record(
            actor=None,
            action="reviews.export",
            institution_id=inst.pk if inst else None,
            after={"images": info["images"], "dataset_version": info["dataset_version"], "out": out},
        )
        self.stdout.write(
            f"Exported {info['images']} reviewed patches to {out} (dataset version {info['dataset_version']})"
        )
