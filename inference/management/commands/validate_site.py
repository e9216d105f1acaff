import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from accounts.models import Institution, User
from inference.management.commands.activate_model import actor_name, find_version
from inference.models import ModelVersion
from inference.sites import (
    DEFAULT_MIN_PER_CLASS,
    SiteValidationError,
    site_images_from_folder,
    site_validate,
    site_validation_report,
)


def _rate(proportion: dict) -> str:
    if proportion["value"] is None:
        return "n/a"
    return f"{proportion['value']:.3f} (95% CI {proportion['low']:.3f}-{proportion['high']:.3f}, n = {proportion['n']})"


class Command(BaseCommand):
    help = (
        "Validate a model version at one institution on its own labelled tissue, and choose the "
        "institution's operating point. DIR is a folder per class (NORM and TUM at least; NCT/Kather "
        "layouts or export_reviews output). Every image goes through the served path; the calibrated "
        "TUM probability is the score. Reports accuracy, per-class sensitivity/specificity with Wilson "
        "95% intervals, ROC AUC of TUM vs NORM with a bootstrap 95% interval, ECE and reliability bins, "
        "a site-refitted temperature (informational) and quality-check rejections; chooses the highest "
        "TUM-probability threshold whose sensitivity on the data reaches the target. Stores a "
        "SiteValidation (passed: at least SITE_VALIDATION_MIN_PER_CLASS analysed images per class and "
        "the target reached) with an audit event. Bad data store nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("--institution", required=True, help="Institution slug.")
        parser.add_argument("--data", required=True, help="Folder per class (NORM/, TUM/, ...).")
        parser.add_argument("--model", default="", help="Model version NAME:VERSION or id (default: the active one).")
        parser.add_argument(
            "--target-sensitivity",
            type=float,
            default=None,
            help=f"Tumour sensitivity the threshold must reach, 0..1 (default {settings.SITE_TARGET_SENSITIVITY}).",
        )
        parser.add_argument("--json", dest="json_path", default="", help="Also write the report as JSON here.")
        parser.add_argument(
            "--min-per-class",
            type=int,
            default=DEFAULT_MIN_PER_CLASS,
            help="Refuse data with fewer images than this in a class (passing needs SITE_VALIDATION_MIN_PER_CLASS).",
        )
        parser.add_argument("--batch-size", type=int, default=settings.INFERENCE_BATCH_SIZE)
        parser.add_argument("--by", default="", help="User name of who runs it (recorded).")

    def handle(self, *args, institution: str, data: str, model: str, by: str, **options):
        site = Institution.objects.filter(slug=institution).first()
        if site is None:
            raise CommandError(f"no institution with slug {institution!r}")
        version = self._version(model)
        user = User.objects.filter(username=by).first() if by else None
        if by and user is None:
            raise CommandError(f"no user named {by!r}")
        bar = None

        def progress(done: int) -> None:
            nonlocal bar
            if bar is None:  # opened at the first batch, after the data passed the checks
                bar = tqdm(total=len(images), desc="validating", unit="patch", file=self.stderr)
            bar.update(done)

        try:
            images = site_images_from_folder(directory=data, classes=list(version.classes))
            validation = site_validate(
                institution=site,
                model_version=version,
                images=images,
                data_source=str(Path(data).resolve()),
                target_sensitivity=options["target_sensitivity"],
                min_per_class=options["min_per_class"],
                user=user,
                actor=actor_name(by),
                batch_size=options["batch_size"],
                progress=progress,
            )
        except SiteValidationError as exc:
            raise CommandError(f"{version} at {site.slug}: {exc}; nothing was stored") from None
        finally:
            if bar is not None:
                bar.close()
        self._summary(validation)
        if options["json_path"]:
            out = Path(options["json_path"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(site_validation_report(validation), indent=2) + "\n")
            self.stdout.write(f"Wrote {out}")

    def _version(self, reference: str) -> ModelVersion:
        if reference:
            return find_version(reference)
        active = ModelVersion.objects.filter(is_active=True).first()
        if active is None:
            raise CommandError("no active model; pass --model NAME:VERSION")
        return active

    def _summary(self, validation) -> None:
        m = validation.metrics
        checks = m["checks"]
        if validation.passed:
            verdict = "PASSED"
        else:
            why = []
            if not checks["enough_per_class"]:
                why.append(f"fewer than {m['min_per_class']} analysed images in a class")
            if not checks["target_reached"]:
                why.append("target sensitivity not reached")
            verdict = f"NOT PASSED ({'; '.join(why)})"
        point = m["operating_point"]
        default = point["at_default_threshold"]
        auc = m["roc_auc"]
        quality = m["quality_check"]
        calibration = m["calibration"]
        lines = [
            f"Site validation {validation.pk}: {validation.model_version} at {validation.institution.slug}: {verdict}",
            f"  images: {', '.join(f'{c} {n}' for c, n in m['images'].items())}; "
            f"rejected by quality check: {quality['rejected']} ({quality['rate']:.1%})"
            + (f" {quality['by_reason']}" if quality["by_reason"] else ""),
            f"  accuracy {_rate(m['accuracy'])}" + (f" ({m['note']})" if m["note"] else ""),
        ]
        for name, rates in m["per_class"].items():
            lines.append(
                f"  {name}: sensitivity {_rate(rates['sensitivity'])}; specificity {_rate(rates['specificity'])}"
            )
        lines += [
            f"  ROC AUC TUM vs NORM {auc['value']:.3f} (bootstrap 95% CI {auc['low']:.3f}-{auc['high']:.3f})",
            f"  ECE {m['ece']:.4f}; temperature refitted on this site {calibration['site_temperature']:.3f} "
            f"(model {calibration['model_temperature']:.3f}): ECE {calibration['ece_after']:.4f} (informational)",
            f"  operating point: TUM probability >= {validation.threshold:.4f}: sensitivity "
            f"{_rate(point['sensitivity'])} (target {validation.target_sensitivity}), specificity "
            f"{_rate(point['specificity'])}",
            f"  at the model's default threshold {point['default_threshold']:.3f}: sensitivity "
            f"{_rate(default['sensitivity'])}, specificity {_rate(default['specificity'])}",
        ]
        self.stdout.write("\n".join(lines))
