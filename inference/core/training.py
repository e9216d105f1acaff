"""Transfer learning of a MobileNetV2 tissue classifier on folder-per-class data.

This first version trains a classification head on a frozen ImageNet MobileNetV2 backbone:
features of every training image (and its eight 90-degree rotations/flips, which keep
histology semantics) are computed once, the head is fitted on them, and the backbone and head
are saved together as one Keras model. A stratified hold-out split, chosen by group (slide)
where file names tell it, measures accuracy on images the model never saw.
"""

from __future__ import annotations

import json
import platform
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.core.datasets import LabelledImage, manifest_sha256
from inference.core.model import METADATA_FILE, MODEL_FILE, file_sha256
from inference.core.preprocessing import preprocess


@dataclass(frozen=True)
class TrainingConfig:
    classes: tuple[str, ...]
    weights: str  # path to a no-top weights file, or "imagenet" (downloads: needs internet)
    alpha: float = 0.35
    input_size: int = 224
    epochs: int = 60
    seed: int = 1
    holdout_fraction: float = 0.25
    name: str = "tissue-mobilenetv2"
    version: str = "1"


def split_holdout(
    images: list[LabelledImage], fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Split per class into (train, holdout), keeping each group wholly on one side.

    Every class with at least two groups gets at least one group in each side.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not security
    train: list[LabelledImage] = []
    holdout: list[LabelledImage] = []
    by_class: dict[str, dict[str, list[LabelledImage]]] = defaultdict(lambda: defaultdict(list))
    for image in images:
        by_class[image.label][f"{image.source}/{image.group}"].append(image)
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        n_holdout = 0 if len(groups) < 2 else max(1, round(len(groups) * fraction))
        for i, group in enumerate(groups):
            (holdout if i < n_holdout else train).extend(by_class[label][group])
    return train, holdout


def _dihedral(image: Image.Image) -> list[Image.Image]:
    rotations = [image.rotate(angle, expand=True) for angle in (0, 90, 180, 270)]
    return rotations + [r.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for r in rotations]


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def train_classifier(
    images: list[LabelledImage],
    config: TrainingConfig,
    out: str | Path,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, evaluate on the hold-out split and write a model version directory.

    Args:
        images: labelled images (see ``datasets.scan_folder``); labels outside ``config.classes``
            are ignored.
        config: what to train.
        out: directory to write ``model.keras`` and ``metadata.json`` into (created).
        progress: called with one line of progress text at a time.

    Returns:
        The metadata written to metadata.json.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    images = [i for i in images if i.label in config.classes]
    missing = [c for c in config.classes if not any(i.label == c for i in images)]
    if missing:
        raise ValueError(f"no training images for class(es): {', '.join(missing)}")
    train, holdout = split_holdout(images, config.holdout_fraction, config.seed)
    progress(f"{len(train)} training and {len(holdout)} hold-out images, {len(config.classes)} classes")

    backbone = keras.applications.MobileNetV2(
        input_shape=(config.input_size, config.input_size, 3),
        alpha=config.alpha,
        include_top=False,
        weights=config.weights,
        pooling="avg",
    )
    backbone.trainable = False
    index = {name: i for i, name in enumerate(config.classes)}

    def features(batch_images: list[Image.Image]) -> np.ndarray:
        chunks = []
        for start in range(0, len(batch_images), 32):
            chunk = preprocess(batch_images[start : start + 32], config.input_size)
            chunks.append(np.asarray(backbone(chunk, training=False)))
        return np.concatenate(chunks)

    progress("computing backbone features of the training images and their 8 orientations")
    train_x = features([view for item in train for view in _dihedral(_load(item.path))])
    train_y = np.repeat([index[i.label] for i in train], 8)

    counts = Counter(train_y.tolist())
    class_weight = {k: len(train_y) / (len(counts) * v) for k, v in counts.items()}
    head = keras.Sequential(
        [
            keras.layers.Input(shape=(train_x.shape[1],)),
            keras.layers.Dropout(0.3, seed=config.seed),
            keras.layers.Dense(len(config.classes), activation="softmax", name="classes"),
        ]
    )
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    progress(f"training the classification head for {config.epochs} epochs")
    history = head.fit(
        train_x, train_y, epochs=config.epochs, batch_size=32, class_weight=class_weight, shuffle=True, verbose=0
    )
    progress(f"final training loss {history.history['loss'][-1]:.4f}")

    inputs = keras.Input(shape=(config.input_size, config.input_size, 3), name="image")
    model = keras.Model(inputs, head(backbone(inputs, training=False)), name=config.name)

    metrics: dict[str, Any] = {"holdout_images": len(holdout)}
    if holdout:
        holdout_x = preprocess([_load(i.path) for i in holdout], config.input_size)
        predicted = np.asarray(model.predict(holdout_x, verbose=0)).argmax(axis=1)
        truth = np.array([index[i.label] for i in holdout])
        metrics["holdout_accuracy"] = round(float((predicted == truth).mean()), 4)
        metrics["holdout_per_class_accuracy"] = {
            name: round(float((predicted[truth == k] == k).mean()), 4)
            for name, k in index.items()
            if (truth == k).any()
        }
        confusion = np.zeros((len(config.classes),) * 2, dtype=int)
        for t, p in zip(truth, predicted, strict=True):
            confusion[t, p] += 1
        metrics["holdout_confusion"] = confusion.tolist()
        progress(f"hold-out accuracy {metrics['holdout_accuracy']:.4f} on {len(holdout)} images")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    sources = sorted({i.source for i in images})
    metadata = {
        "name": config.name,
        "version": config.version,
        "classes": list(config.classes),
        "input_size": config.input_size,
        "preprocessing": "mobilenet_v2",
        "um_per_px": 0.5,
        "architecture": f"MobileNetV2 alpha {config.alpha}, frozen ImageNet backbone, softmax head",
        "training": {
            "sources": {s: dict(Counter(i.label for i in images if i.source == s)) for s in sources},
            "train_images": len(train),
            "holdout_images": len(holdout),
            "holdout_files": sorted(f"{i.source}/{i.path.parent.name}/{i.path.name}" for i in holdout),
            "data_manifest_sha256": manifest_sha256(images),
            "weights": config.weights if config.weights == "imagenet" else Path(config.weights).name,
            "weights_sha256": None if config.weights == "imagenet" else file_sha256(config.weights),
            "augmentation": "8 dihedral orientations (90-degree rotations and flips)",
            "epochs": config.epochs,
            "seed": config.seed,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        "metrics": metrics,
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
