"""Transfer learning of a MobileNetV2 tissue classifier on folder-per-class data.

Recipe (``train_classifier``):

1. Split by leakage group (slide from the file name, or identical dHash) into train,
   validation and test, stratified by class as far as the groups allow.
2. Phase 1: a 1x1-convolution class head on the frozen ImageNet backbone. Phase 2: fine-tune the
   top inverted-residual blocks at a low learning rate (batch-norm statistics stay frozen).
   Images stream from disk in batches with histology augmentation (``augment.augment``); classes
   are weighted by inverse frequency; each phase stops early on validation loss. The frozen
   backbone is a fixed function in phase 1, so each augmented view goes through it once:
   ``head_views`` views of every image are cached as feature maps (within ``feature_cache_mb``)
   and cycled over the head epochs; phase 2 runs end to end on new views every epoch.
3. Temperature scaling fitted on the validation split; metrics on the untouched test split.
4. Output directory: ``model.keras`` (outputs logits and the class-activation map),
   ``model.tflite`` (the LiteRT serving copy), ``metadata.json`` and ``MODEL_CARD.md``.

The head is linear on the last feature map and followed by global average pooling, so the
per-location class map *is* the class activation map: explanations cost no gradient pass.
"""

from __future__ import annotations

import math
import platform
import random
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.core import evaluation
from inference.core.augment import augment, augment_lab
from inference.core.datasets import LabelledImage, dataset_version, leakage_groups, manifest_sha256
from inference.core.model import MODEL_FILE, SERVING_FILE, file_sha256, write_metadata
from inference.core.preprocessing import preprocess
from inference.core.threads import thread_plan

MIN_CALIBRATION_ERRORS = 2
TEMPERATURE_RANGE = (0.5, 10.0)


@dataclass(frozen=True)
class TrainingConfig:
    classes: tuple[str, ...]
    weights: str  # path to a no-top weights file, or "imagenet" (downloads: needs internet)
    alpha: float = 0.35
    input_size: int = 224
    um_per_px: float = 0.5  # the scale the model is meant for (NCT-CRC-HE-100K: 224 px = 112 µm)
    head_epochs: int = 30
    fine_tune_epochs: int = 15
    fine_tune_from: str = "block_13"  # first backbone layer trained in phase 2
    head_learning_rate: float = 2e-3
    fine_tune_learning_rate: float = 1e-4
    batch_size: int = 32
    patience: int = 5
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    dropout: float = 0.2
    augment: bool = True
    # "v3": lab-robust views (augment.augment_lab: scale 0.25-1.0 µm/px with same-class mosaics,
    # stain-matrix jitter, scanner colour/focus/noise/JPEG); "v2": the demo model v2's recipe
    # (scale jitter, HED jitter, brightness/contrast, blur), kept to compare against.
    recipe: str = "v3"
    scale_jitter: tuple[float, float] = (0.8, 1.33)
    stain_sigma: float = 0.08
    zoom_um_per_px: tuple[float, float] = (0.25, 1.0)
    stain_intensity: float = 0.25
    jpeg_quality: tuple[int, int] = (30, 95)
    seed: int = 1
    attention_threshold: float = 0.7  # calibrated top probability below this: "needs attention"
    name: str = "tissue-mobilenetv2"
    version: str = "1"
    # Fine-tune an existing model version directory instead of starting from ImageNet weights
    # (its classes, input and architecture are kept; learning rates should be low).
    init_from: str | None = None
    # Phase 1 trains the head on backbone features computed once per augmented view: views
    # 0..head_views-1 of each image go through the frozen backbone once and epoch e trains on view
    # e mod head_views. head_views >= head_epochs gives every epoch a new view, as streaming does;
    # 0 streams (the backbone runs on every view of every epoch).
    head_views: int = 8
    feature_cache_mb: int = 2048  # most memory for cached features: fewer views, or streaming, beyond it
    feature_cache_dtype: str = "float16"  # MobileNetV2's features are ReLU6 outputs, 0..6
    loaders: int = 0  # data-loading threads; 0: threads.thread_plan() for this machine (not recorded)
    extra: dict[str, Any] = field(default_factory=dict)


def calibrate(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Temperature scaling on validation logits, with its ECE before and after.

    With fewer than MIN_CALIBRATION_ERRORS misclassified samples the likelihood keeps improving
    as T -> 0, and fitting would make every future prediction look certain: T stays 1 then.
    A fitted T is kept within TEMPERATURE_RANGE.
    """
    errors = int((logits.argmax(axis=1) != labels).sum()) if len(labels) else 0
    info: dict[str, Any] = {"fitted_on": "validation", "n": len(labels)}
    if errors >= MIN_CALIBRATION_ERRORS:
        temperature = float(np.clip(evaluation.fit_temperature(logits, labels), *TEMPERATURE_RANGE))
    else:
        temperature = 1.0
        info["note"] = f"{errors} validation error(s): too few to fit a temperature, left at 1"
    info["temperature"] = round(temperature, 5)
    if len(labels):
        info["ece_before"] = round(evaluation.expected_calibration_error(evaluation.softmax(logits), labels), 5)
        info["ece_after"] = round(
            evaluation.expected_calibration_error(evaluation.softmax(logits, temperature), labels), 5
        )
    return info


def split_by_group(
    images: list[LabelledImage], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage], list[LabelledImage]]:
    """(train, validation, test): whole leakage groups go to one side; stratified greedily.

    Groups are visited in a seeded random order; each goes to the held-out split whose
    per-class quota it fills best, or to training once the quotas are met.
    """
    groups = leakage_groups(images)
    members: dict[str, list[LabelledImage]] = defaultdict(list)
    for image, group in zip(images, groups, strict=True):
        members[group].append(image)
    totals = Counter(i.label for i in images)
    need = {
        "val": {c: val_fraction * n for c, n in totals.items()},
        "test": {c: test_fraction * n for c, n in totals.items()},
    }
    order = sorted(members)
    random.Random(seed).shuffle(order)  # noqa: S311 - a reproducible split, not security
    out: dict[str, list[LabelledImage]] = {"train": [], "val": [], "test": []}
    for group in order:
        counts = Counter(i.label for i in members[group])
        best, best_fill = "train", 0.0
        for split in ("test", "val"):
            fill = sum(min(n, need[split][c]) for c, n in counts.items())
            # Take the group only if at least half of it fills a quota: no class overshoots much.
            if fill >= 0.5 * sum(counts.values()) and fill > best_fill:
                best, best_fill = split, fill
        out[best].extend(members[group])
        if best != "train":
            for c, n in counts.items():
                need[best][c] = max(0.0, need[best][c] - n)
    return out["train"], out["val"], out["test"]


def _roots(images: list[LabelledImage]) -> dict[str, Path]:
    """{source name: dataset root folder} (the class folder's parent)."""
    return {i.source: i.path.parent.parent for i in images}


def _load(image: LabelledImage) -> Image.Image:
    with Image.open(image.path) as handle:
        return handle.convert("RGB")


class _Views:
    """Training views of ``items``: view ``v`` of the item at position ``p`` is a pure function of
    (seed, phase, v, p), whichever batch, epoch or thread makes it. So the head phase can run each
    view through the frozen backbone once and reuse the features, and get what streaming gets."""

    def __init__(self, items: list[LabelledImage], config: TrainingConfig, phase: int) -> None:
        self.items, self.config, self.phase = items, config, phase
        self.by_label: dict[str, list[LabelledImage]] = defaultdict(list)
        for item in items:
            self.by_label[item.label].append(item)

    def image(self, position: int, view: int) -> Image.Image:
        config, item = self.config, self.items[position]
        picture = _load(item)
        if not config.augment:
            return picture
        rng = np.random.default_rng([config.seed, self.phase, view, position])
        if config.recipe == "v2":
            return augment(picture, rng, config.scale_jitter, config.stain_sigma)
        mates = self.by_label[item.label]

        def same_class() -> tuple[Image.Image, float]:
            mate = mates[int(rng.integers(0, len(mates)))]
            return _load(mate), mate.um_per_px or config.um_per_px

        return augment_lab(
            picture,
            rng,
            um_per_px=item.um_per_px,
            model_um_per_px=config.um_per_px,
            size=config.input_size,
            same_class=same_class,
            zoom=config.zoom_um_per_px,
            stain_intensity=config.stain_intensity,
            jpeg_quality=config.jpeg_quality,
        )

    def batch(self, positions, view: int) -> np.ndarray:
        """Model input (n, size, size, 3) of view ``view`` of the items at ``positions``."""
        return preprocess([self.image(int(p), view) for p in positions], self.config.input_size)


def _batches(
    items: list[LabelledImage],
    index: dict[str, int],
    config: TrainingConfig,
    inputs: Callable[[np.ndarray, int], np.ndarray],
    *,
    train: bool,
    phase: int = 0,
    workers: int = 1,
):
    """A Keras PyDataset of (inputs, labels, weights) batches; (inputs, labels) when not ``train``.

    ``inputs(positions, epoch)`` makes the model inputs of the items at those positions: images
    streamed from disk, or cached backbone features. A training epoch visits the items in a seeded
    order of its own; classes are weighted by inverse frequency. ``workers`` threads make batches
    ahead of the model.
    """
    import keras

    counts = Counter(i.label for i in items)
    class_weight = {c: len(items) / (len(counts) * n) for c, n in counts.items()}
    labels = np.array([index[i.label] for i in items], dtype=np.int32)
    weights = np.array([class_weight[i.label] for i in items], dtype=np.float32)

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False)
            self.lock = threading.Lock()
            self.counting = False
            self.requests = [0] * len(self)  # how often each batch was asked for: its epoch
            self.orders: dict[int, np.ndarray] = {}

        def _order(self, epoch: int) -> np.ndarray:
            if not train:
                return np.arange(len(items))
            if epoch not in self.orders:
                self.orders[epoch] = np.random.default_rng([config.seed, phase, epoch]).permutation(len(items))
            return self.orders[epoch]

        def __len__(self) -> int:
            return math.ceil(len(items) / config.batch_size)

        def __getitem__(self, batch: int):
            # Keras asks for each batch once an epoch, but may prefetch the next epoch's first
            # batches before it calls on_epoch_end: the epoch is counted per batch instead.
            with self.lock:
                epoch = self.requests[batch]
                if self.counting:
                    self.requests[batch] += 1
                order = self._order(epoch)
            chosen = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            x = inputs(chosen, epoch)
            return (x, labels[chosen], weights[chosen]) if train else (x, labels[chosen])

        def on_epoch_begin(self) -> None:
            self.counting = True  # earlier requests were Keras sampling batches for their shapes

    return Batches()


def head_view_count(config: TrainingConfig, train_images: int, val_images: int, feature_bytes: int) -> int:
    """Augmented views per training image to cache for the head phase (0: stream instead).

    As many as ``config.head_views`` asks, no more than there are head epochs (one view per image
    is enough without augmentation), and no more than fit in ``config.feature_cache_mb`` together
    with the validation features.

    Args:
        feature_bytes: bytes of one image's cached feature map.
    """
    if config.head_views <= 0 or config.head_epochs <= 0 or not train_images:
        return 0
    wanted = min(config.head_views, config.head_epochs) if config.augment else 1
    room = config.feature_cache_mb * 2**20 - val_images * feature_bytes
    return max(0, min(wanted, room // (train_images * feature_bytes)))


def backbone_features(
    backbone,
    views: _Views,
    view_count: int,
    *,
    dtype: str,
    workers: int,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Feature maps of views 0..view_count-1 of every item, each through the backbone once.

    Batches are made by ``workers`` threads while the backbone runs (inference mode: batch-norm
    uses its stored statistics, so a view's features do not depend on its batch).

    Returns:
        Array (view_count, items, h, w, channels) of ``dtype``; for MobileNetV2 at 224 px
        h = w = 7, channels 1280.
    """
    count, size = len(views.items), views.config.batch_size
    shape = tuple(int(d) for d in backbone.output.shape[1:])
    out = np.empty((view_count, count, *shape), dtype=dtype)
    jobs = [(view, start) for view in range(view_count) for start in range(0, count, size)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="views") as pool:
        pending: deque = deque()

        def finish_one() -> None:
            (view, start), made = pending.popleft()
            batch = made.result()
            out[view, start : start + len(batch)] = backbone.predict_on_batch(batch)
            if progress and start + size >= count:
                progress(f"  features of view {view + 1}/{view_count} ({time.monotonic() - started:.0f} s)")

        for view, start in jobs:
            pending.append(((view, start), pool.submit(views.batch, range(start, min(start + size, count)), view)))
            if len(pending) > 2 * workers:  # a few batches ahead, not the whole set in memory
                finish_one()
        while pending:
            finish_one()
    return out


def build_networks(config: TrainingConfig):
    """(serving model with outputs {logits, class_map}, training model with logits, backbone)."""
    import keras

    size = config.input_size
    inputs = keras.Input(shape=(size, size, 3), name="image")
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=config.alpha, include_top=False, weights=config.weights
    )
    features = backbone(inputs)
    dropped = keras.layers.Dropout(config.dropout, seed=config.seed)(features)
    class_map = keras.layers.Conv2D(len(config.classes), 1, name="class_map")(dropped)
    logits = keras.layers.GlobalAveragePooling2D(name="logits")(class_map)
    serving = keras.Model(inputs, {"logits": logits, "class_map": class_map}, name=config.name)
    training = keras.Model(inputs, logits, name=f"{config.name}-training")
    return serving, training, backbone


def load_networks(directory: str | Path):
    """(serving model, training model with logits, backbone) of an existing model version, to fine-tune."""
    import keras

    serving = keras.saving.load_model(Path(directory) / MODEL_FILE, compile=False)
    if not isinstance(serving.output, dict) or "logits" not in serving.output:
        raise ValueError(f"{directory}: the model has no 'logits' output to fine-tune")
    training = keras.Model(serving.inputs, serving.output["logits"])
    backbones = [layer for layer in serving.layers if isinstance(layer, keras.Model)]
    if len(backbones) != 1:
        raise ValueError(f"{directory}: expected one backbone network inside the model, found {len(backbones)}")
    return serving, training, backbones[0]


def _head_network(training, backbone):
    """The layers after the backbone (dropout, class map, pooling) as a model on feature maps.

    It shares their weights with ``training``: fitting it on cached features trains the head of
    the full network.
    """
    import keras

    layers = training.layers
    after = layers[layers.index(backbone) + 1]
    if tuple(after.input.shape[1:]) != tuple(backbone.output.shape[1:]):
        raise ValueError("the head does not take the backbone's feature map")
    return keras.Model(after.input, training.output, name="head")


def _logits(model, items: list[LabelledImage], config: TrainingConfig) -> np.ndarray:
    if not items:
        return np.zeros((0, len(config.classes)), dtype=np.float32)
    chunks = []
    for start in range(0, len(items), config.batch_size):
        batch = preprocess([_load(i) for i in items[start : start + config.batch_size]], config.input_size)
        output = model(batch, training=False)
        chunks.append(np.asarray(output["logits"] if isinstance(output, dict) else output))
    return np.concatenate(chunks)


def fit(
    images: list[LabelledImage], config: TrainingConfig, progress: Callable[[str], None] = print
) -> tuple[Any, dict[str, Any]]:
    """Split, train both phases and calibrate. Returns (serving Keras model, facts for metadata)."""
    import keras

    keras.utils.set_random_seed(config.seed)
    images = [i for i in images if i.label in config.classes]
    missing = [c for c in config.classes if not any(i.label == c for i in images)]
    if missing and not config.init_from:
        raise ValueError(f"no training images for class(es): {', '.join(missing)}")
    if missing:
        # Fine-tuning keeps the parent's class map: classes absent here keep what it learnt
        # (add base data with another --data to keep them in practice too).
        progress(f"no images of {', '.join(missing)} in this data: those classes are not trained further")
    train, val, test = split_by_group(images, config.val_fraction, config.test_fraction, config.seed)
    if not train:
        raise ValueError("the split left no training images")
    progress(f"{len(train)} training, {len(val)} validation, {len(test)} test images; {len(config.classes)} classes")
    index = {name: i for i, name in enumerate(config.classes)}
    serving, training, backbone = load_networks(config.init_from) if config.init_from else build_networks(config)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, a line per epoch in logs
    monitor = "val_loss" if val else "loss"
    history: dict[str, list[float]] = {}

    workers = config.loaders or thread_plan().loaders

    def run_phase(label: str, model, epochs: int, learning_rate: float, *, train_data, val_data) -> None:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
        stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience, restore_best_weights=True)
        progress(f"{label}: up to {epochs} epochs at learning rate {learning_rate:g}")
        started = time.monotonic()
        result = model.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=[stop], verbose=verbose)
        for key, values in result.history.items():
            history[f"{label}_{key}"] = [round(float(v), 5) for v in values]
        progress(f"{label}: {len(result.history['loss'])} epochs in {time.monotonic() - started:.0f} s")

    val_views = _Views(val, replace(config, augment=False), phase=0)
    backbone.trainable = False
    head_features: dict[str, Any] = {"views": 0}
    if config.head_epochs > 0:
        views = _Views(train, config, phase=0)
        feature_shape = tuple(int(d) for d in backbone.output.shape[1:])
        feature_bytes = math.prod(feature_shape) * np.dtype(config.feature_cache_dtype).itemsize
        count = head_view_count(config, len(train), len(val), feature_bytes)
        if count:
            megabytes = round((count * len(train) + len(val)) * feature_bytes / 2**20)
            head_features = {"views": count, "dtype": config.feature_cache_dtype, "megabytes": megabytes}
            progress(
                f"head: backbone features of {count} view(s) of each training image, computed once "
                f"({megabytes} MB of {config.feature_cache_dtype} {'x'.join(map(str, feature_shape))} maps)"
            )
            started = time.monotonic()
            cached = backbone_features(
                backbone, views, count, dtype=config.feature_cache_dtype, workers=workers, progress=progress
            )
            cached_val = backbone_features(backbone, val_views, 1, dtype=config.feature_cache_dtype, workers=workers)[0]
            head_features["seconds"] = round(time.monotonic() - started, 1)
            run_phase(
                "head",
                _head_network(training, backbone),
                config.head_epochs,
                config.head_learning_rate,
                train_data=_batches(
                    train, index, config, lambda p, e: cached[e % count, p].astype(np.float32), train=True
                ),
                val_data=_batches(val, index, config, lambda p, e: cached_val[p].astype(np.float32), train=False)
                if val
                else None,
            )
            del cached, cached_val
        else:
            progress(f"head: features not cached (head_views {config.head_views}, limit {config.feature_cache_mb} MB)")
            run_phase(
                "head",
                training,
                config.head_epochs,
                config.head_learning_rate,
                train_data=_batches(train, index, config, views.batch, train=True, workers=workers),
                val_data=_batches(val, index, config, lambda p, e: val_views.batch(p, 0), train=False) if val else None,
            )
    backbone.trainable = True
    trainable = False
    for layer in backbone.layers:
        trainable = trainable or layer.name.startswith(config.fine_tune_from)
        # Batch-norm statistics stay as learnt on ImageNet: small batches would spoil them.
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)
    if config.fine_tune_epochs > 0:
        tune_views = _Views(train, config, phase=1)  # views of their own, not the head phase's again
        run_phase(
            "fine_tune",
            training,
            config.fine_tune_epochs,
            config.fine_tune_learning_rate,
            train_data=_batches(train, index, config, tune_views.batch, train=True, phase=1, workers=workers),
            val_data=_batches(val, index, config, lambda p, e: val_views.batch(p, 0), train=False) if val else None,
        )
    backbone.trainable = False

    val_logits = _logits(training, val, config)
    val_labels = np.array([index[i.label] for i in val], dtype=np.int64)
    calibration = calibrate(val_logits, val_labels)
    temperature = calibration["temperature"]
    before, after = calibration.get("ece_before"), calibration.get("ece_after")
    progress(f"temperature {temperature:.3f} (validation ECE {before} -> {after})")

    facts: dict[str, Any] = {
        "split": {"train": len(train), "validation": len(val), "test": len(test)},
        "test_files": sorted(f"{i.source}/{i.path.parent.name}/{i.path.name}" for i in test),
        "history": history,
        "head_features": head_features,
        "calibration": calibration,
    }
    if test:
        test_logits = _logits(training, test, config)
        probabilities = evaluation.softmax(test_logits, temperature)
        report = evaluation.evaluate(probabilities, [i.label for i in test], list(config.classes))
        labels = [i.label for i in test]
        report["ece_uncalibrated"] = evaluation.evaluate(evaluation.softmax(test_logits), labels, list(config.classes))[
            "ece"
        ]
        facts["test_metrics"] = report
        progress(f"test accuracy {report['accuracy']:.4f} on {len(test)} images (macro F1 {report['macro_f1']:.4f})")
    return serving, facts


def train_classifier(
    images: list[LabelledImage],
    config: TrainingConfig,
    out: str | Path,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, calibrate, evaluate and write a model version directory.

    Args:
        images: labelled images (see ``datasets.scan_folder``); labels outside ``config.classes``
            are ignored.
        config: what to train.
        out: directory to write into (created).
        progress: called with one line of progress text at a time.

    Returns:
        The metadata written to metadata.json.
    """
    import keras

    started = time.monotonic()
    serving, facts = fit(images, config, progress)
    images = [i for i in images if i.label in config.classes]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    serving.save(out / MODEL_FILE)
    serving.export(str(out / SERVING_FILE), format="litert", verbose=False)
    sources = sorted({i.source for i in images})
    metadata = {
        "name": config.name,
        "version": config.version,
        "classes": list(config.classes),
        "input_size": config.input_size,
        "preprocessing": "mobilenet_v2",
        "um_per_px": config.um_per_px,
        "outputs": {"logits": "class logits", "class_map": "per-location logits, 7x7 grid (class activation map)"},
        "readout": {"positive": "TUM", "negative": "NORM"} if {"TUM", "NORM"} <= set(config.classes) else None,
        "architecture": f"MobileNetV2 alpha {config.alpha} (ImageNet), 1x1-conv class map + global average pool",
        "calibration": {**facts["calibration"], "attention_threshold": config.attention_threshold},
        "training": {
            "sources": {
                s: {
                    "um_per_px": next(i.um_per_px for i in images if i.source == s),
                    "images": dict(sorted(Counter(i.label for i in images if i.source == s).items())),
                }
                for s in sources
            },
            "split": facts["split"],
            "test_files": facts["test_files"],
            "data_manifest_sha256": manifest_sha256(images),
            "dataset_versions": {
                s: v for s, v in ((s, dataset_version(r)) for s, r in _roots(images).items()) if v is not None
            },
            "weights": _weights_name(config),
            "weights_sha256": None if config.init_from or config.weights == "imagenet" else file_sha256(config.weights),
            "config": {k: v for k, v in asdict(config).items() if k not in {"classes", "weights", "extra", "loaders"}},
            "augmentation": augmentation_summary(config),
            "history": facts["history"],
            "head_features": facts["head_features"],
            "seconds": round(time.monotonic() - started, 1),
            "keras": keras.__version__,
            "python": platform.python_version(),
            **{k: v for k, v in config.extra.items() if k != "operating_point"},
        },
        "metrics": {"test": facts.get("test_metrics")},
    }
    if config.extra.get("operating_point"):
        metadata["operating_point"] = config.extra["operating_point"]
    write_metadata(out, metadata)
    return metadata


def _weights_name(config: TrainingConfig) -> str:
    if config.init_from:
        return f"fine-tuned from {Path(config.init_from).name}"
    return config.weights if config.weights == "imagenet" else Path(config.weights).name


def augmentation_summary(config: TrainingConfig) -> str:
    if not config.augment:
        return "none"
    if config.recipe == "v2":
        return (
            f"recipe v2: scale jitter {config.scale_jitter[0]}-{config.scale_jitter[1]}, 90-degree rotations and "
            f"flips, HED stain jitter (sigma {config.stain_sigma}), brightness/contrast, Gaussian blur (p 0.25)"
        )
    low, high = config.zoom_um_per_px
    return (
        f"recipe v3: views at {low}-{high} µm/px (log-uniform; 30% near the model's scale; zooming out fills the "
        f"field with same-class tiles), 90-degree rotations and flips, stain-matrix jitter in optical density "
        f"(stain amounts log-normal sigma {config.stain_intensity}, stain directions ~0.08 rad), per-channel "
        f"gamma 0.8-1.25, saturation 0.7-1.3, brightness/contrast, blur (p 0.3) or sharpening (p 0.15), "
        f"noise (p 0.3), JPEG quality {config.jpeg_quality[0]}-{config.jpeg_quality[1]} (p 0.7)"
    )


def binary_figures(tum: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """NORM-vs-TUM figures from the TUM share of the two-class scores (decision at 0.5).

    Args:
        tum: p(TUM) / (p(TUM) + p(NORM)) per image, 0..1.
        truth: True where the image is tumour.
    """
    called = tum >= 0.5
    positives, negatives = int(truth.sum()), int((~truth).sum())
    figures: dict[str, Any] = {
        "images": len(truth),
        "accuracy": round(float((called == truth).mean()), 4) if len(truth) else None,
        "sensitivity": round(float(called[truth].mean()), 4) if positives else None,
        "specificity": round(float((~called[~truth]).mean()), 4) if negatives else None,
        "tumour": positives,
        "normal": negatives,
    }
    if positives and negatives:
        figures["roc_auc"] = round(evaluation.roc_auc_binary(tum, truth), 4)
    return figures


def simulated_other_labs(
    model, held_out: list[LabelledImage], config: TrainingConfig, temperature: float
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(TUM share of the NORM/TUM scores, truth, lab profile, TUM probability over all classes) of the
    held-out NORM and TUM tiles as each of
    ``otherlab.PROFILES`` would deliver them (see ``inference.core.otherlab``)."""
    from inference.core import otherlab

    pair = [i for i in held_out if i.label in {"NORM", "TUM"}]
    if not pair or not {"NORM", "TUM"} <= set(config.classes):
        return np.zeros(0), np.zeros(0, dtype=bool), [], np.zeros(0)
    views, truth, names = [], [], []
    for k, image in enumerate(pair):
        mates = [m for m in pair if m.label == image.label and m is not image] or [image]
        for p, profile in enumerate(otherlab.PROFILES):
            order = iter(range(10**6))

            def same_class(mates=mates, order=order) -> tuple[Image.Image, float]:
                mate = mates[next(order) % len(mates)]
                return _load(mate), mate.um_per_px or config.um_per_px

            views.append(
                otherlab.as_lab(
                    _load(image),
                    profile,
                    um_per_px=image.um_per_px or config.um_per_px,
                    size=config.input_size,
                    seed=1000 * k + p,
                    same_class=same_class,
                )
            )
            truth.append(image.label == "TUM")
            names.append(profile.name)
    logits = np.concatenate(
        [
            np.asarray(
                _as_logits(model(preprocess(views[s : s + config.batch_size], config.input_size), training=False))
            )
            for s in range(0, len(views), config.batch_size)
        ]
    )
    probabilities = evaluation.softmax(logits, temperature)
    binary = evaluation.restrict_to_classes(probabilities, list(config.classes), ["NORM", "TUM"])
    full_tum = probabilities[:, list(config.classes).index("TUM")]
    return binary[:, 1], np.array(truth), names, full_tum


def _as_logits(output):
    return output["logits"] if isinstance(output, dict) else output


def leave_one_dataset_out(
    images: list[LabelledImage], config: TrainingConfig, progress: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Estimate generalisation to an unseen lab: for each source, train on the others, test on it.

    Scores are restricted to the classes present in the held-out source; NORM-vs-TUM accuracy is
    measured on its NORM and TUM images with the scores restricted to those two classes.
    """
    results: dict[str, dict[str, Any]] = {}
    sources = sorted({i.source for i in images if i.label in config.classes})
    for source in sources:
        held_out = [i for i in images if i.source == source and i.label in config.classes]
        rest = [i for i in images if i.source != source]
        absent = [c for c in config.classes if not any(i.label == c for i in rest)]
        if absent:
            progress(f"leave out {source}: skipped, the other sources lack {', '.join(absent)}")
            continue
        progress(f"leave out {source}: training on the other sources")
        model, facts = fit(rest, replace(config, test_fraction=0.0), progress)
        temperature = facts["calibration"]["temperature"]
        probabilities = evaluation.softmax(_logits(model, held_out, config), temperature)
        labels = [i.label for i in held_out]
        report = evaluation.evaluate(probabilities, labels, list(config.classes))
        row: dict[str, Any] = {"images": len(held_out), "accuracy": report["accuracy"], "report": report}
        pair = [k for k, i in enumerate(held_out) if i.label in {"NORM", "TUM"}]
        if pair and {"NORM", "TUM"} <= set(config.classes):
            binary = evaluation.restrict_to_classes(probabilities[pair], list(config.classes), ["NORM", "TUM"])
            truth = np.array([held_out[k].label == "TUM" for k in pair])
            row["norm_vs_tum_images"] = len(pair)
            row["norm_vs_tum_accuracy"] = round(float(((binary[:, 1] >= 0.5) == truth).mean()), 6)
            row["norm_vs_tum_scores"] = [
                [round(float(v), 5), bool(t)] for v, t in zip(binary[:, 1], truth, strict=True)
            ]
            simulated, simulated_truth, profiles, simulated_tum = simulated_other_labs(
                model, held_out, config, temperature
            )
            # TUM probability over all classes, as the platform judges it against a threshold.
            tum = probabilities[pair, list(config.classes).index("TUM")]
            row["tum_probabilities"] = [
                [round(float(v), 5), bool(t)]
                for v, t in zip(np.r_[tum, simulated_tum], np.r_[truth, simulated_truth], strict=True)
            ]
            row["simulated_other_lab_scores"] = [
                [round(float(v), 5), bool(t), name]
                for v, t, name in zip(simulated, simulated_truth, profiles, strict=True)
            ]
            row["simulated_other_lab"] = binary_figures(simulated, simulated_truth)
        results[source] = row
        progress(
            f"leave out {source}: accuracy {row['accuracy']:.3f} on {len(held_out)} images, "
            f"NORM-vs-TUM {row.get('norm_vs_tum_accuracy')}, simulated other labs {row.get('simulated_other_lab')}"
        )
    return results


def default_operating_point(lodo: dict[str, dict[str, Any]], target: float = 0.95) -> dict[str, Any] | None:
    """The model's own TUM threshold for sites that have not validated it yet.

    Chosen on tissue from labs the model did not see: the held-out sources of leave one dataset
    out and the same tiles as the simulated other labs, pooled; the highest TUM probability at
    which tumour sensitivity there reaches ``target``. A site's own validation replaces it.
    """
    rows = [pair for row in lodo.values() for pair in row.get("tum_probabilities", [])]
    if not any(t for _, t in rows):
        return None
    scores = np.array([r[0] for r in rows], dtype=np.float64)
    truth = np.array([r[1] for r in rows], dtype=bool)
    chosen = evaluation.threshold_for_sensitivity(scores, truth, target)
    return {
        "class": "TUM",
        "threshold": round(chosen["threshold"], 6),
        "target_sensitivity": target,
        "sensitivity": chosen["sensitivity"]["value"],
        "specificity": chosen["specificity"]["value"],
        "images": len(rows),
        "fitted_on": "leave-one-dataset-out held-out sources and the simulated other labs (NORM and TUM)",
    }


def pooled_generalisation(lodo: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """NORM-vs-TUM figures pooled over every held-out source: as is, and as the simulated other labs."""
    pooled: dict[str, Any] = {}
    for key, name in (
        ("norm_vs_tum_scores", "held_out_sources"),
        ("simulated_other_lab_scores", "simulated_other_labs"),
    ):
        rows = [pair for row in lodo.values() for pair in row.get(key, [])]
        if rows:
            scores = np.array([r[0] for r in rows], dtype=np.float64)
            truth = np.array([r[1] for r in rows], dtype=bool)
            pooled[name] = binary_figures(scores, truth)
            profiles = sorted({r[2] for r in rows if len(r) > 2})
            if profiles:
                pooled[name]["per_profile"] = {
                    profile: binary_figures(
                        np.array([r[0] for r in rows if r[2] == profile], dtype=np.float64),
                        np.array([r[1] for r in rows if r[2] == profile], dtype=bool),
                    )
                    for profile in profiles
                }
    return pooled
