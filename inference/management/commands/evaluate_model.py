import json
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from inference.core import evaluation, pipeline
from inference.core.datasets import scan_folder
from inference.core.model import Predictor
from inference.models import ModelVersion


class Command(BaseCommand):
    help = (
        "Evaluate a model on a folder-per-class dataset through the served path (decode, quality "
        "check, preprocessing, batched LiteRT inference, calibrated scores). Writes a JSON report with "
        "accuracy, balanced accuracy, macro and per-class precision/recall/F1, ROC AUC, confusion matrix "
        "and expected calibration error, plus confusion_matrix.png, roc.png and reliability.png beside "
        "it. When the folder holds only some of the model's classes, scores are restricted to those "
        "classes and renormalised (the report says so). Patches the quality check rejects are counted "
        "and listed, and left out of the metrics."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--model", default="", help="Model directory, or a registered version (id or NAME:VERSION)."
        )
        parser.add_argument("--data", action="append", required=True, help="Dataset root; repeatable.")
        parser.add_argument("--json", dest="json_path", required=True, help="Where to write the JSON report.")
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--no-quality-check", action="store_true", help="Score every patch, even rejected ones.")

    def handle(self, *args, model: str, data: list[str], json_path: str, batch_size: int, **opts):
        directory = self._model_directory(model)
        try:
            predictor = Predictor(directory)
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot load the model at {directory}: {exc}") from None
        images = []
        for root in data:
            try:
                images += scan_folder(root, predictor.classes)
            except (FileNotFoundError, ValueError) as exc:
                raise CommandError(str(exc)) from None
        if not images:
            raise CommandError(f"no images of the model's classes ({', '.join(predictor.classes)}) in {data}")
        probabilities, labels, rejected = [], [], []
        for start in tqdm(range(0, len(images), batch_size), desc="evaluating", unit="batch", file=self.stderr):
            chunk = images[start : start + batch_size]
            outcomes = self._analyse(predictor, chunk, skip_quality=opts["no_quality_check"])
            for image, outcome in zip(chunk, outcomes, strict=True):
                if outcome.prediction is None:
                    rejected.append({"file": str(image.path), "status": outcome.status, "reason": outcome.reason})
                    continue
                probabilities.append([outcome.prediction.scores[c] for c in predictor.classes])
                labels.append(image.label)
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
        self.stdout.write(f"Wrote {out} and {', '.join(p.name for p in plots)}")

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
