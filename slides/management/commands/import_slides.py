from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from cases.services import CaseError
from slides.imports import slides_import


class Command(BaseCommand):
    help = (
        "Register the slides a scanner wrote to the import folder (SLIDE_IMPORT_DIR, or --folder): "
        "<institution slug>/<case accession>/<file>. Each settled file is checked and stored like an "
        "uploaded slide and queued for analysis, then moved to imported/; a bad one to rejected/ with "
        "its reason. The worker's beat runs this every minute when SLIDE_IMPORT_DIR is set."
    )

    def add_arguments(self, parser):
        parser.add_argument("--folder", default="", help="The import folder (default: SLIDE_IMPORT_DIR).")
        parser.add_argument(
            "--settle",
            type=float,
            default=None,
            help="Seconds a file must be unchanged before it is taken (default SLIDE_IMPORT_SETTLE_SECONDS).",
        )

    def handle(self, *args, folder: str, settle: float | None, **options):
        if not (folder or settings.SLIDE_IMPORT_DIR):
            raise CommandError("no import folder: set SLIDE_IMPORT_DIR or give --folder")
        try:
            report = slides_import(root=Path(folder) if folder else None, settle_seconds=settle)
        except CaseError as exc:
            raise CommandError(str(exc)) from None
        for name, slide_id in report.imported:
            self.stdout.write(f"imported {name}: slide {slide_id}, queued for analysis")
        for name, reason in report.rejected:
            self.stdout.write(f"rejected {name}: {reason}")
        for name in report.waiting:
            self.stdout.write(f"waiting for {name} (still being written)")
        if not (report.imported or report.rejected or report.waiting):
            self.stdout.write("nothing to import")
