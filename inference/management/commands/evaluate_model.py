import json
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from accounts.models import Institution
from inference.core import evaluation, pipeline
from inference.core.datasets import scan_folder
from inference.core.model import Predictor
from inference.models import ModelVersion
from inference.selectors import POSITIVE_CLASS, OperatingPoint, operating_point

BINARY = ("NORM", POSITIVE_CLASS)  # the operating point is measured as TUM against normal mucosa


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class Command(BaseCommand):
    help = (
        "Evaluate a model on a folder-per-class dataset through the served path (decode, quality "
        "check, preprocessing, batched LiteRT inference, calibrated scores). Writes a JSON report with "
        "accuracy, balanced accuracy, macro and per-class precision/recall/F1, ROC AUC, confusion matrix "
        "and expected calibration error, plus confusion_matrix.png, roc.png and reliability.png beside "
        "it. When the folder holds only some of the model's classes, scores are restricted to those "
        "classes and renormalised (the report says so). Patches the quality check rejects are counted "
        "and listed, and left out of the metrics. With --institution, the institution's operating point "
        "(its validated TUM-probability threshold, else the model's default) is applied and its "
        "sensitivity and specificity (TUM against NORM) on these data are reported."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--model", default="", help="Model directory, or a registered version (id or NAME:VERSION)."
        )
        parser.add_argument("--data", action="append", required=True, help="Dataset root; repeatable.")
        parser.add_argument("--json", dest="json_path", required=True, help="Where to write the JSON report.")
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--no-quality-check", action="store_true", help="Score every patch, even rejected ones.")
        parser.add_argument(
            "--institution",
            default="",
            help="Institution slug: apply its operating point (validate_site) and report it as operating_point.",
        )

    def handle(self, *args, model: str, data: list[str], json_path: str, batch_size: int, **opts):
        directory = self._model_directory(model)
        institution = None
        if opts["institution"]:
            institution = Institution.objects.filter(slug=opts["institution"]).first()
            if institution is None:
                raise CommandError(f"no institution with slug {opts['institution']!r}")
        try:
            predictor = Predictor(directory)
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot load the model at {directory}: {exc}") from None
        point = self._operating_point(institution, predictor) if institution is not None else None
        images = []
        for root in data:
            try:
                images += scan_folder(root, predictor.classes)
            except (FileNotFoundError, ValueError) as exc:
                raise CommandError(str(exc)) from None
        if not images:
            raise CommandError(f"no images of the model's classes ({', '.join(predictor.classes)}) in {data}")
        probabilities, labels, rejected, tumour = [], [], [], []
        for start in tqdm(range(0, len(images), batch_size), desc="evaluating", unit="batch", file=self.stderr):
            chunk = images[start : start + batch_size]
            outcomes = self._analyse(predictor, chunk, skip_quality=opts["no_quality_check"])
            for image, outcome in zip(chunk, outcomes, strict=True):
                if outcome.prediction is None:
                    rejected.append({"file": str(image.path), "status": outcome.status, "reason": outcome.reason})
                    continue
                probabilities.append([outcome.prediction.scores[c] for c in predictor.classes])
                labels.append(image.label)
                tumour.append(outcome.prediction.scores.get(POSITIVE_CLASS))
        if not labels:
            raise CommandError("every patch was rejected by the quality check; see --no-quality-check")
        report = evaluation.evaluate(np.array(probabilities), labels, list(predictor.classes))
        scored = evaluation.restrict_to_classes(np.array(probabilities), list(predictor.classes), report["classes"])
        out = Path(json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        plots = evaluation.save_plots(out.parent, scored, labels, report)
        report = {
            "model": {
                "name": predictor.metadata["name"],
                "version": predictor.metadata["version"],
                "path": str(directory),
            },
            "data": data,
            "quality_rejected": rejected,
            **({"operating_point": self._measured(point, tumour, labels)} if point is not None else {}),
            **report,
            "plots": [p.name for p in plots],
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
        self.stdout.write(
            f"{report['n']} patches, accuracy {report['accuracy']:.4f}, balanced accuracy "
            f"{report['balanced_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}, ECE {report['ece']:.4f}"
            + (f" ({report['note']})" if report["note"] else "")
            + (f"; {len(rejected)} rejected by quality check" if rejected else "")
        )
        if point is not None:
            measured = report["operating_point"]
            if measured is None:
                self.stdout.write(f"The model has no {POSITIVE_CLASS} class: no operating point applies.")
            else:
                status = "validated" if measured["validated"] else "not validated"
                self.stdout.write(
                    f"Operating point of {opts['institution']} ({status} at this site): {POSITIVE_CLASS} probability "
                    f">= {measured['threshold']:.4f}, sensitivity {_fmt(measured['sensitivity'])}, specificity "
                    f"{_fmt(measured['specificity'])}"
                )
        self.stdout.write(f"Wrote {out} and {', '.join(p.name for p in plots)}")

    def _operating_point(self, institution: Institution, predictor: Predictor) -> OperatingPoint:
        version = ModelVersion.objects.filter(
            name=predictor.metadata["name"],
            version=str(predictor.metadata["version"]),
            file_sha256=predictor.file_sha256,
        ).first()
        if version is None:
            raise CommandError(
                f"the model at {predictor.directory} is not registered: --institution needs a registered version"
            )
        return operating_point(institution_id=institution.pk, model_version=version)

    @staticmethod
    def _measured(point: OperatingPoint, tumour: list[float | None], labels: list[str]) -> dict | None:
        """The operating point's sensitivity (TUM) and specificity (NORM) on the evaluated patches."""
        if not tumour or tumour[0] is None:
            return None
        keep = [i for i, label in enumerate(labels) if label in BINARY]
        scores = np.array([tumour[i] for i in keep], dtype=np.float64)
        positives = np.array([labels[i] == POSITIVE_CLASS for i in keep], dtype=bool)
        rates = evaluation.rates_at_threshold(scores, positives, point.threshold)
        return {
            "class": POSITIVE_CLASS,
            "threshold": point.threshold,
            "sensitivity": rates["sensitivity"]["value"],
            "specificity": rates["specificity"]["value"],
            "validated": point.validated,
        }

    def _analyse(self, predictor, chunk, *, skip_quality: bool):
        payloads = [image.path.read_bytes() for image in chunk]
        if not skip_quality:
            return pipeline.analyse(predictor, payloads)
        from inference.core.preprocessing import decode_rgb, preprocess

        batch = preprocess([decode_rgb(p) for p in payloads], predictor.input_size)
        return [pipeline.PatchOutcome(pipeline.DONE, prediction=p) for p in predictor.predict(batch)]

    def _model_directory(self, reference: str) -> Path:
        if not reference:
            active = ModelVersion.objects.filter(is_active=True).first()
            if active is None:
                raise CommandError("no active model; pass --model")
            return active.directory
        if Path(reference).is_dir():
            return Path(reference)
        from inference.management.commands.activate_model import find_version

        return find_version(reference).directory
