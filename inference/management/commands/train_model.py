from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.core.datasets import CANONICAL_CLASSES, scan_folder
from inference.core.training import TrainingConfig, train_classifier

SHARED_DATA = Path(settings.BASE_DIR).parent / "shared" / "data"
DEFAULT_DATA = ("nct-crc-he-100k-samples", "crc-val-he-7k-png", "kather2016-tfds-224", "kather2016-tiles-150")
DEFAULT_WEIGHTS = SHARED_DATA / "mobilenetv2-0.35-imagenet" / "mobilenet_v2_0.35_224_no_top.h5"


class Command(BaseCommand):
    help = (
        "Train a MobileNetV2 tissue classifier on folder-per-class H&E datasets (NCT-CRC-HE-100K, "
        "CRC-VAL-HE-7K or Kather 2016 layouts) and write a model version directory (model.keras + "
        "metadata.json with the training data, hold-out metrics and seed). Without --data it trains "
        "on the real samples in ../shared/data (the bundled demo model's recipe)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--data", action="append", help="Dataset root; repeat for several.")
        parser.add_argument("--classes", default="all", help="Comma-separated classes, e.g. NORM,TUM, or 'all'.")
        parser.add_argument(
            "--weights", default=str(DEFAULT_WEIGHTS), help="No-top MobileNetV2 weights file, or 'imagenet'."
        )
        parser.add_argument("--alpha", type=float, default=0.35)
        parser.add_argument("--epochs", type=int, default=60)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--name", default="tissue-mobilenetv2-demo")
        parser.add_argument("--model-version", dest="model_version", default="1")
        parser.add_argument("--out", required=True, help="Output model directory.")

    def handle(self, *args, **opts):
        data = opts["data"] or [str(SHARED_DATA / name) for name in DEFAULT_DATA]
        if opts["classes"].strip().lower() == "all":
            classes = CANONICAL_CLASSES
        else:
            classes = tuple(c.strip().upper() for c in opts["classes"].split(",") if c.strip())
            unknown = [c for c in classes if c not in CANONICAL_CLASSES]
            if unknown or len(classes) < 2:
                raise CommandError(
                    f"--classes needs at least two of {', '.join(CANONICAL_CLASSES)}; unknown: {', '.join(unknown)}"
                )
        if opts["weights"] != "imagenet" and not Path(opts["weights"]).is_file():
            raise CommandError(f"weights file not found: {opts['weights']}")
        if opts["epochs"] < 1:
            raise CommandError("--epochs must be at least 1")
        images = []
        for root in data:
            try:
                images += scan_folder(root, classes)
            except (FileNotFoundError, ValueError) as exc:
                raise CommandError(str(exc)) from None
        if not images:
            raise CommandError("no images of the requested classes in the given data")
        config = TrainingConfig(
            classes=classes,
            weights=opts["weights"],
            alpha=opts["alpha"],
            epochs=opts["epochs"],
            seed=opts["seed"],
            name=opts["name"],
            version=opts["model_version"],
        )
        try:
            metadata = train_classifier(images, config, opts["out"], progress=self.stdout.write)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        accuracy = metadata["metrics"].get("holdout_accuracy")
        self.stdout.write(f"Wrote {opts['out']} (hold-out accuracy {accuracy})")
