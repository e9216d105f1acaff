from dataclasses import replace
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.core.datasets import CANONICAL_CLASSES, DEMO_SOURCES, DEMO_WEIGHTS, scan_folder
from inference.core.model import file_sha256
from inference.core.threads import available_cpus, configure_threads, thread_plan
from inference.core.training import (
    TrainingConfig,
    default_operating_point,
    leave_one_dataset_out,
    pooled_generalisation,
    train_classifier,
)

SHARED_DATA = Path(settings.BASE_DIR).parent / "shared" / "data"
DEFAULT_WEIGHTS = SHARED_DATA / DEMO_WEIGHTS


class Command(BaseCommand):
    help = (
        "Train a MobileNetV2 tissue classifier on folder-per-class H&E datasets (NCT-CRC-HE-100K, "
        "CRC-VAL-HE-7K, Kather 2016, MedMNIST-style folders or Cloudiopsy's export of reviewed labels), "
        "streaming images from disk: a class head on the frozen backbone, then fine-tuning of the top "
        "blocks, with histology augmentation, class weighting and early stopping; temperature scaling "
        "on the validation split; metrics on a held-out test split. Writes a model version directory "
        "(model.keras, model.tflite, metadata.json, MODEL_CARD.md). Without --data it trains on the "
        "real samples in ../shared/data (the bundled demo model's recipe)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--data", action="append", help="Dataset root; repeat for several.")
        parser.add_argument("--classes", default="all", help="Comma-separated classes, e.g. NORM,TUM, or 'all'.")
        parser.add_argument(
            "--weights", default=str(DEFAULT_WEIGHTS), help="No-top MobileNetV2 weights file, or 'imagenet'."
        )
        parser.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width (match the weights).")
        parser.add_argument("--epochs", type=int, default=30, help="Most epochs of phase 1, the head (early stopping).")
        parser.add_argument(
            "--fine-tune-epochs", type=int, default=15, help="Most epochs of phase 2, fine-tuning (0: skip it)."
        )
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--test-fraction", type=float, default=0.15, help="Held-out test share (by group).")
        parser.add_argument("--val-fraction", type=float, default=0.15, help="Validation share (by group).")
        parser.add_argument(
            "--leave-one-dataset-out",
            action="store_true",
            help="First train once per --data source on the others and test on it; figures go into the card.",
        )
        parser.add_argument(
            "--recipe",
            choices=("v3", "v2"),
            default="v3",
            help="Augmentation recipe: v3 (lab-robust: scale 0.25-1.0 µm/px with same-class mosaics, stain-matrix "
            "jitter, scanner colour/focus/noise/JPEG) or v2 (the demo model v2's, for comparison).",
        )
        parser.add_argument(
            "--compare-recipe",
            choices=("v3", "v2"),
            help="With --leave-one-dataset-out: also run it for this recipe and record its figures beside this "
            "version's in metadata and the model card (the demo model v3 compares with v2).",
        )
        parser.add_argument(
            "--init-from",
            metavar="NAME:VERSION|DIR",
            help="Fine-tune this model version (registered NAME:VERSION or a model directory) on --data, e.g. a "
            "hospital's export_reviews output mixed with base data; keeps its classes; low learning rates.",
        )
        parser.add_argument(
            "--head-learning-rate", type=float, help="Phase 1 learning rate (default 2e-3; 2e-4 with --init-from)."
        )
        parser.add_argument(
            "--fine-tune-learning-rate",
            type=float,
            help="Phase 2 learning rate (default 1e-4; 2e-5 with --init-from).",
        )
        parser.add_argument(
            "--head-views",
            type=int,
            default=8,
            help="Augmented views per training image whose backbone features are computed once for the head "
            "phase and cycled over its epochs (0: run the backbone on a new view every epoch; at least --epochs: a "
            "new view every epoch, cached).",
        )
        parser.add_argument(
            "--feature-cache-mb",
            type=int,
            default=2048,
            help="Most memory for those cached features (float16 7x7x1280 maps, 125 KB a view); fewer views fit "
            "beyond it, and the head phase streams when not even one does.",
        )
        parser.add_argument(
            "--threads",
            type=int,
            help=f"CPU cores to use (default: those this process may run on, {available_cpus()} here): one "
            "data-loading thread a core, TensorFlow half of them, BLAS/OpenMP single-threaded.",
        )
        parser.add_argument("--loaders", type=int, help="Data-loading (augmentation) threads (default: one a core).")
        parser.add_argument("--name", default="tissue-mobilenetv2")
        parser.add_argument("--model-version", default="1")
        parser.add_argument("--out", required=True, help="Output model directory.")

    def handle(self, *args, **opts):
        data = opts["data"] or [str(SHARED_DATA / name) for name in DEMO_SOURCES]
        if opts["classes"].strip().lower() == "all":
            classes = CANONICAL_CLASSES
        else:
            classes = tuple(c.strip().upper() for c in opts["classes"].split(",") if c.strip())
            unknown = [c for c in classes if c not in CANONICAL_CLASSES]
            if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
                raise CommandError(
                    f"--classes needs at least two distinct of {', '.join(CANONICAL_CLASSES)}; "
                    f"unknown: {', '.join(unknown) or 'none'}"
                )
        if not opts["init_from"] and opts["weights"] != "imagenet" and not Path(opts["weights"]).is_file():
            raise CommandError(f"weights file not found: {opts['weights']}")
        if opts["epochs"] < 1 or opts["fine_tune_epochs"] < 0:
            raise CommandError("--epochs must be at least 1 and --fine-tune-epochs at least 0")
        if not (0 <= opts["test_fraction"] < 0.5 and 0 <= opts["val_fraction"] < 0.5):
            raise CommandError("--test-fraction and --val-fraction must be between 0 and 0.5")
        if opts["head_views"] < 0 or opts["feature_cache_mb"] < 0:
            raise CommandError("--head-views and --feature-cache-mb must be at least 0")
        if any(opts[name] is not None and opts[name] < 1 for name in ("threads", "loaders")):
            raise CommandError("--threads and --loaders must be at least 1")
        parent = _parent(opts["init_from"]) if opts["init_from"] else None
        if parent is not None:
            if opts["classes"].strip().lower() != "all" and tuple(classes) != tuple(parent["classes"]):
                raise CommandError(f"--classes must be the parent's ({', '.join(parent['classes'])}) with --init-from")
            classes = tuple(parent["classes"])
        plan = thread_plan(opts["threads"], opts["loaders"])
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
            head_epochs=opts["epochs"],
            fine_tune_epochs=opts["fine_tune_epochs"],
            batch_size=opts["batch_size"],
            val_fraction=opts["val_fraction"],
            test_fraction=opts["test_fraction"],
            seed=opts["seed"],
            name=opts["name"],
            version=opts["model_version"],
            recipe=opts["recipe"],
            init_from=str(parent["directory"]) if parent else None,
            head_learning_rate=opts["head_learning_rate"] or (2e-4 if parent else 2e-3),
            fine_tune_learning_rate=opts["fine_tune_learning_rate"] or (2e-5 if parent else 1e-4),
            head_views=opts["head_views"],
            feature_cache_mb=opts["feature_cache_mb"],
            loaders=plan.loaders,
            extra={"lineage": _lineage(parent, images)} if parent else {},
        )

        def say(line: str) -> None:
            self.stdout.write(line)
            self.stdout.flush()

        applied = configure_threads(plan)
        say(
            f"threads: {plan.cpus} cores, {plan.loaders} data-loading, TensorFlow {plan.intra_op} intra-op / "
            f"{plan.inter_op} inter-op{'' if applied['tensorflow'] else ' (not applied: TensorFlow already running)'}"
        )

        try:
            if opts["leave_one_dataset_out"]:
                if len(data) < 2:
                    raise CommandError("--leave-one-dataset-out needs at least two --data sources")
                lodo = leave_one_dataset_out(images, config, progress=say)
                extra = {
                    **config.extra,
                    "leave_one_dataset_out": _summary(lodo),
                    "generalisation": pooled_generalisation(lodo),
                    "operating_point": default_operating_point(lodo),
                }
                if opts["compare_recipe"]:
                    say(f"leave one dataset out again with recipe {opts['compare_recipe']}, for comparison")
                    baseline = leave_one_dataset_out(
                        images, replace(config, recipe=opts["compare_recipe"]), progress=say
                    )
                    extra["generalisation_baseline"] = {
                        "label": f"recipe {opts['compare_recipe']}",
                        **pooled_generalisation(baseline),
                    }
                config = TrainingConfig(**{**config.__dict__, "extra": extra})
                say(f"pooled over held-out sources: {extra['generalisation']}")
            metadata = train_classifier(images, config, opts["out"], progress=say)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        test = metadata["metrics"]["test"] or {}
        say(f"Wrote {opts['out']} (test accuracy {test.get('accuracy')}, macro F1 {test.get('macro_f1')})")


def _parent(reference: str) -> dict:
    """{"directory", "name", "version", "classes", "sha256"} of the model version to start from."""
    from inference.core.model import MODEL_FILE, read_metadata
    from inference.models import ModelVersion

    directory = Path(reference)
    if not directory.is_dir():
        name, _, version = reference.rpartition(":")
        found = ModelVersion.objects.filter(name=name, version=version).first() if name else None
        if found is None:
            raise CommandError(f"--init-from {reference}: neither a model directory nor a registered NAME:VERSION")
        directory = found.directory
    try:
        metadata = read_metadata(directory)
    except (OSError, ValueError) as exc:
        raise CommandError(f"--init-from {reference}: {exc}") from None
    return {
        "directory": directory,
        "name": metadata["name"],
        "version": str(metadata["version"]),
        "classes": metadata["classes"],
        "sha256": file_sha256(directory / MODEL_FILE),
    }


def _lineage(parent: dict, images: list) -> dict:
    """Both parents of a fine-tuned version: the model it started from and the data it saw."""
    from inference.core.datasets import dataset_version

    roots = {i.source: i.path.parent.parent for i in images}
    return {
        "parent": f"{parent['name']}:{parent['version']}",
        "parent_sha256": parent["sha256"],
        "dataset_versions": {s: v for s, v in ((s, dataset_version(r)) for s, r in roots.items()) if v},
        "trained_on_sha256": sorted(
            {file_sha256(i.path) for i in images if dataset_version(i.path.parent.parent)}
        ),  # reviewed patches it saw: shadow evaluation and site validation leave them out
    }


def _summary(lodo: dict) -> dict:
    return {
        source: {
            k: v
            for k, v in row.items()
            if k not in {"report", "norm_vs_tum_scores", "simulated_other_lab_scores", "tum_probabilities"}
        }
        | {"per_class_recall": {c: r["recall"] for c, r in row["report"]["per_class"].items()}}
        for source, row in lodo.items()
    }
