"""Loading a model version directory and predicting class probabilities.

A model version is a directory holding ``model.keras`` and ``metadata.json``::

    {"name": ..., "version": ..., "classes": ["ADI", ...], "input_size": 224,
     "preprocessing": "mobilenet_v2", "um_per_px": 0.5, "training": {...}, "metrics": {...}}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
REQUIRED_METADATA = ("name", "version", "classes", "input_size", "preprocessing")


@dataclass(frozen=True)
class PatchPrediction:
    """Class probabilities for one patch.

    Attributes:
        scores: {class name: probability in 0..1}, summing to 1.
        label: the most probable class.
        seconds: wall time of the batch this patch was in, divided by the batch size.
    """

    scores: dict[str, float]
    label: str
    seconds: float


@dataclass
class LoadedModel:
    """A Keras model in memory with its metadata. Load once per process, reuse for every batch."""

    keras_model: Any
    metadata: dict[str, Any]
    directory: Path
    file_sha256: str
    classes: tuple[str, ...] = field(init=False)
    input_size: int = field(init=False)
    preprocessing: str = field(init=False)

    def __post_init__(self) -> None:
        self.classes = tuple(self.metadata["classes"])
        self.input_size = int(self.metadata["input_size"])
        self.preprocessing = str(self.metadata["preprocessing"])


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and check a model directory's metadata.json.

    Raises:
        FileNotFoundError: a required file is missing. ValueError: the metadata is incomplete.
    """
    directory = Path(directory)
    for name in (MODEL_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing")
    metadata = json.loads((directory / METADATA_FILE).read_text())
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{directory / METADATA_FILE} lacks {', '.join(missing)}")
    if not metadata["classes"] or len(set(metadata["classes"])) != len(metadata["classes"]):
        raise ValueError(f"{directory / METADATA_FILE}: classes must be a non-empty list of unique names")
    return metadata


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(directory: str | Path) -> LoadedModel:
    """Load a model version directory (Keras file + metadata). Imports TensorFlow on first use.

    Raises:
        FileNotFoundError, ValueError: the directory is not a complete model version, or the
        Keras model's output does not match the number of classes in the metadata.
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    import keras

    keras_model = keras.saving.load_model(directory / MODEL_FILE, compile=False)
    outputs = keras_model.output_shape[-1]
    if outputs != len(metadata["classes"]):
        raise ValueError(f"model has {outputs} outputs but metadata lists {len(metadata['classes'])} classes")
    return LoadedModel(keras_model, metadata, directory, file_sha256(directory / MODEL_FILE))


def predict(model: LoadedModel, batch: np.ndarray) -> list[PatchPrediction]:
    """Predict class probabilities for a preprocessed batch.

    Args:
        model: from ``load_model``.
        batch: float32 (n, input_size, input_size, 3), as returned by ``preprocess``.

    Returns:
        One PatchPrediction per row of the batch, in order.
    """
    if len(batch) == 0:
        return []
    started = time.perf_counter()
    probabilities = np.asarray(model.keras_model(batch, training=False), dtype=np.float64)
    per_patch = (time.perf_counter() - started) / len(batch)
    results = []
    for row in probabilities:
        scores = {name: float(p) for name, p in zip(model.classes, row, strict=True)}
        results.append(PatchPrediction(scores=scores, label=model.classes[int(row.argmax())], seconds=per_patch))
    return results
