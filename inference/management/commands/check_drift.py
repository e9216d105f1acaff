import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Institution
from inference import drift

EXIT_DRIFT = 1
EXIT_USAGE = 2


class Command(BaseCommand):
    help = (
        "Compare each institution's weekly figures (stain optical density, sharpness, quality-control "
        "rejections by reason, uncertainty, needs-attention share, predicted class mix, suspected-tumour "
        "share, agreement with pathologists) for the active model version with the baseline of its site "
        "validation there (the latest passing one, else the latest). Prints what left its band in the "
        "latest complete or the current ISO week (-v 2: every judged figure) and records a drift.detected "
        "audit event per drifting institution. Exit status: 0 no drift (also: no baseline, too few "
        "patches), 1 drift, 2 usage error. Bands: inference/drift.py."
    )

    def add_arguments(self, parser):
        parser.add_argument("--institution", default="", help="Institution slug (default: every institution).")
        parser.add_argument(
            "--weeks",
            type=int,
            default=drift.DEFAULT_WEEKS,
            help=f"ISO weeks to compute, the current one last (default {drift.DEFAULT_WEEKS}); "
            "only the last two are judged.",
        )
        parser.add_argument(
            "--min-patches",
            type=int,
            default=None,
            help="Patches a figure needs in a week to be judged (default DRIFT_MIN_PATCHES, "
            f"{drift.DEFAULT_MIN_PATCHES}).",
        )
        parser.add_argument("--json", dest="json_path", default="", help="Also write every figure as JSON here.")

    def handle(self, *args, institution: str, weeks: int, min_patches: int | None, json_path: str, **options):
        if weeks < 1:
            raise CommandError("--weeks must be at least 1", returncode=EXIT_USAGE)
        if min_patches is not None and min_patches < 1:
            raise CommandError("--min-patches must be at least 1", returncode=EXIT_USAGE)
        institutions = Institution.objects.order_by("slug")
        if institution:
            institutions = institutions.filter(slug=institution)
            if not institutions.exists():
                raise CommandError(f"no institution with slug {institution!r}", returncode=EXIT_USAGE)
        verbose = options["verbosity"] >= 2
        reports = []
        drifting = []
        for site in institutions:
            report = drift.drift_report(institution=site, weeks=weeks, min_patches=min_patches)
            reports.append(report)
            self._print(report, verbose=verbose)
            if report.drifted:
                drift.drift_record(report=report)
                drifting.append(site.slug)
        if json_path:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
        if drifting:
            raise CommandError(f"drift detected at {', '.join(drifting)}", returncode=EXIT_DRIFT)

    def _print(self, report: drift.DriftReport, *, verbose: bool) -> None:
        site = report.institution
        self.stdout.write(self.style.MIGRATE_HEADING(f"{site.name} ({site.slug})"))
        if report.note:
            self.stdout.write(f"  {report.note}: nothing judged")
            return
        validation = report.validation
        status = "passed" if validation.passed else "NOT passed: the latest validation, used until one passes"
        self.stdout.write(
            f"  {report.model_version} against site validation #{validation.pk} of "
            f"{validation.created_at:%Y-%m-%d} ({status}); figures over fewer than {report.min_patches} "
            "patches are not judged"
        )
        judged = [w for w in report.weeks if w.judged]
        rows = [(w.week, f) for w in reversed(judged) for f in w.figures if verbose or f.drifted]
        if rows:
            self.stdout.write(
                f"  {'week':<9} {'figure':<48} {'value':>9} {'baseline':>9} {'band':>19} {'n':>5}  status"
            )
            for week, figure in rows:
                band = f"{_number(figure.low)}..{_number(figure.high)}" if figure.low is not None else "-"
                line = (
                    f"  {week:<9} {figure.label:<48} {_number(figure.value):>9} {_number(figure.baseline):>9} "
                    f"{band:>19} {figure.n:>5}  {figure.status.upper() if figure.drifted else figure.status}"
                )
                self.stdout.write(self.style.ERROR(line) if figure.drifted else line)
        if report.drifted:
            self.stdout.write(self.style.ERROR(f"  DRIFT: {len(report.drifted)} figure(s) out of band"))
        else:
            too_few = sum(f.status == drift.TOO_FEW for w in judged for f in w.figures)
            patches = ", ".join(f"{w.week} {w.analysed}" for w in judged)
            self.stdout.write(
                self.style.SUCCESS(f"  no drift (patches analysed: {patches}; {too_few} figure(s) with too few)")
            )


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
