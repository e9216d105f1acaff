"""Model version directories: loading, checking and predicting.

A model version is a directory::

    model.keras      Keras model, outputs {"logits": (n, K), "class_map": (n, 7, 7, K)}
    model.tflite     the same network compiled for LiteRT (the serving copy)
    metadata.json    {"name", "version", "classes", "input_size", "preprocessing", "um_per_px",
                      "calibration": {"temperature", "attention_threshold", ...}, "files": {name: sha256},
                      "training": {...}, "metrics": {...}}
    MODEL_CARD.md    human-readable summary

``Predictor`` serves it: the LiteRT copy by default (fast on CPU), the Keras model on request
(evaluation of parity, training). Both give calibrated probabilities, an uncertainty, a
"needs attention" flag and per-location class maps (the heatmaps), from one forward pass.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.core.preprocessing import scale_pixels

MODEL_FILE = "model.keras"
SERVING_FILE = "model.tflite"
METADATA_FILE = "metadata.json"
CARD_FILE = "MODEL_CARD.md"
REQUIRED_METADATA = ("name", "version", "classes", "input_size", "preprocessing")
SUPPORTED_PREPROCESSING = ("mobilenet_v2",)
HEATMAP_CLASS = "TUM"  # besides the predicted class, evidence for tumour is always mapped


@dataclass(frozen=True)
class PatchPrediction:
    """The model's result for one patch.

    Attributes:
        scores: {class: calibrated probability 0..1}, summing to 1.
        label: the most probable class.
        uncertainty: normalised entropy of ``scores``, 0 (certain) .. 1 (uniform).
        needs_attention: True when the top probability is below the model's attention threshold.
        heatmaps: {class: rows of a grid (7x7 for 224 px) of local probabilities 0..1} for the
            predicted class and TUM: where in the patch the evidence for that class lies.
        seconds: model time of the batch divided by its size.
    """

    scores: dict[str, float]
    label: str
    uncertainty: float
    needs_attention: bool
    heatmaps: dict[str, list[list[float]]]
    seconds: float


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_metadata(directory: str | Path, metadata: dict[str, Any]) -> None:
    """Write metadata.json, recording the SHA-256 of the model files beside it, and the model card."""
    from inference.core.card import model_card

    directory = Path(directory)
    metadata["files"] = {
        name: file_sha256(directory / name) for name in (MODEL_FILE, SERVING_FILE) if (directory / name).is_file()
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    (directory / CARD_FILE).write_text(model_card(metadata))


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and check a model directory's metadata.json.

    Raises:
        FileNotFoundError: a required file is missing. ValueError: the metadata is incomplete or
        describes a model the platform cannot serve.
    """
    directory = Path(directory)
    for name in (MODEL_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing")
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / METADATA_FILE} is not valid JSON: {exc}") from None
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"{directory / METADATA_FILE} lacks {', '.join(missing)}")
    classes = metadata["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"{directory / METADATA_FILE}: classes must be a list of at least two unique names")
    if metadata["preprocessing"] not in SUPPORTED_PREPROCESSING:
        raise ValueError(f"unsupported preprocessing {metadata['preprocessing']!r}")
    if not isinstance(metadata["input_size"], int) or not 32 <= metadata["input_size"] <= 1024:
        raise ValueError(f"unsupported input size {metadata['input_size']!r}")
    return metadata


def verify_files(directory: str | Path, metadata: dict[str, Any]) -> None:
    """Check every file listed in metadata["files"] against its SHA-256.

    Raises:
        ValueError: a file differs from the hash recorded when the model was written.
    """
    for name, expected in metadata.get("files", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ValueError(f"{path} has SHA-256 {actual}, but the model's metadata records {expected}")


class Predictor:
    """A model version in memory. Load once per process and reuse it for every batch.

    Args:
        directory: the model version directory.
        backend: ``"litert"`` (the serving copy; falls back to Keras when the directory has none)
            or ``"keras"``.
        num_threads: LiteRT threads (default: all cores).
    """

    def __init__(self, directory: str | Path, backend: str = "litert", num_threads: int | None = None):
        self.directory = Path(directory)
        self.metadata = read_metadata(self.directory)
        verify_files(self.directory, self.metadata)
        self.classes: tuple[str, ...] = tuple(self.metadata["classes"])
        self.input_size = int(self.metadata["input_size"])
        self.preprocessing = str(self.metadata["preprocessing"])
        calibration = self.metadata.get("calibration") or {}
        self.temperature = float(calibration.get("temperature", 1.0))
        self.attention_threshold = float(calibration.get("attention_threshold", 0.7))
        self.file_sha256 = file_sha256(self.directory / MODEL_FILE)
        self.backend = backend if (self.directory / SERVING_FILE).is_file() else "keras"
        self._lock = threading.Lock()  # a LiteRT interpreter is not re-entrant
        if self.backend == "litert":
            self._load_litert(num_threads)
        else:
            self._load_keras()

    def _load_keras(self) -> None:
        import keras

        self._keras = keras.saving.load_model(self.directory / MODEL_FILE, compile=False)
        shapes = self._keras.output_shape
        shapes = list(shapes.values()) if isinstance(shapes, dict) else shapes
        logits = [tuple(s) for s in shapes if len(s) == 2]
        if len(logits) != 1 or logits[0][-1] != len(self.classes):
            raise ValueError(f"model outputs {shapes} do not match the {len(self.classes)} classes in metadata")

    def _load_litert(self, num_threads: int | None) -> None:
        import os

        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(
            model_path=str(self.directory / SERVING_FILE), num_threads=num_threads or os.cpu_count() or 1
        )
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._batch = 0
        by_rank = {len(o["shape_signature"]): o["index"] for o in self._interpreter.get_output_details()}
        if set(by_rank) != {2, 4}:
            raise ValueError(f"{SERVING_FILE} must have a logits and a class-map output")
        self._logits_out, self._map_out = by_rank[2], by_rank[4]
        classes = self._interpreter.get_output_details()
        if any(o["shape_signature"][-1] != len(self.classes) for o in classes):
            raise ValueError(f"{SERVING_FILE} outputs do not match the {len(self.classes)} classes in metadata")

    def raw(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (n, K) and class maps (n, h, w, K) for a preprocessed float32 batch."""
        if self.backend == "keras":
            outputs = self._keras(batch, training=False)
            return np.asarray(outputs["logits"]), np.asarray(outputs["class_map"])
        return self._invoke(batch, lambda rows: np.copyto(rows, batch))

    def raw_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like ``raw`` for uint8 pixels at the input size (``preprocessing.to_pixels``): they are
        scaled straight into LiteRT's input buffer, with no intermediate float batch."""
        if self.backend == "keras":
            return self.raw(scale_pixels(pixels, self.preprocessing))
        return self._invoke(pixels, lambda rows: scale_pixels(pixels, self.preprocessing, out=rows))

    def _invoke(self, batch: np.ndarray, fill) -> tuple[np.ndarray, np.ndarray]:
        """Run LiteRT on ``len(batch)`` inputs that ``fill(rows)`` writes into its input buffer."""
        n = batch.shape[0]
        with self._lock:
            if n > self._batch or 2 * n <= self._batch:
                self._interpreter.resize_tensor_input(self._input, [n, *batch.shape[1:]])
                self._interpreter.allocate_tensors()
                self._batch = n
            # Written in place: a batch shorter than the allocated one (quality control rejected a
            # patch) is padded with zeros instead of re-allocating the interpreter, and no fresh
            # float batch is allocated and copied again.
            buffer = self._interpreter.tensor(self._input)()
            fill(buffer[:n])
            if n < self._batch:
                buffer[n:] = 0.0
            del buffer  # LiteRT refuses to run while a view of its buffers is alive
            self._interpreter.invoke()
            return (
                self._interpreter.get_tensor(self._logits_out)[:n].copy(),
                self._interpreter.get_tensor(self._map_out)[:n].copy(),
            )

    def predict(self, batch: np.ndarray) -> list[PatchPrediction]:
        """Predict a preprocessed batch (float32, (n, input_size, input_size, 3), from ``preprocess``)."""
        if len(batch) == 0:
            return []
        started = time.perf_counter()
        logits, maps = self.raw(batch)
        per_patch = (time.perf_counter() - started) / len(batch)
        return self.results(logits, maps, per_patch)

    def predict_pixels(self, pixels: np.ndarray) -> list[PatchPrediction]:
        """Predict uint8 pixels at the input size (``preprocessing.to_pixels``); the served path."""
        if len(pixels) == 0:
            return []
        started = time.perf_counter()
        logits, maps = self.raw_pixels(pixels)
        per_patch = (time.perf_counter() - started) / len(pixels)
        return self.results(logits, maps, per_patch)

    def results(self, logits: np.ndarray, maps: np.ndarray, seconds: float = 0.0) -> list[PatchPrediction]:
        """Turn raw outputs into calibrated PatchPredictions."""
        probabilities = _softmax(logits.astype(np.float64) / self.temperature)
        local = _softmax(maps.astype(np.float64) / self.temperature)  # per-location class probabilities
        k = len(self.classes)
        entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, 1.0))).sum(axis=1) / np.log(k)
        results = []
        for row, grid, h in zip(probabilities, local, entropy, strict=True):
            top = int(row.argmax())
            label = self.classes[top]
            mapped = {label} | ({HEATMAP_CLASS} if HEATMAP_CLASS in self.classes else set())
            heatmaps = {name: np.round(grid[:, :, self.classes.index(name)], 4).tolist() for name in sorted(mapped)}
            results.append(
                PatchPrediction(
                    scores={name: float(p) for name, p in zip(self.classes, row, strict=True)},
                    label=label,
                    uncertainty=round(float(h), 6),
                    needs_attention=bool(row[top] < self.attention_threshold),
                    heatmaps=heatmaps,
                    seconds=seconds,
                )
            )
        return results


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def load_model(directory: str | Path, backend: str = "litert") -> Predictor:
    """Load a model version directory for prediction (see ``Predictor``)."""
    return Predictor(directory, backend=backend)


def predict(model: Predictor, batch: np.ndarray) -> list[PatchPrediction]:
    """Predict a preprocessed batch with a loaded model (see ``Predictor.predict``)."""
    return model.predict(batch)
