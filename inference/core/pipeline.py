"""The served path, as the worker runs it: bytes -> decode -> quality check -> preprocess ->
batched inference -> results. Django-free, so the benchmark measures exactly this code."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from inference.core.model import PatchPrediction, Predictor
from inference.core.preprocessing import decode_rgb, to_pixels
from inference.core.quality import assess

DONE, FAILED, UNASSESSABLE = "done", "failed", "unassessable"


@dataclass
class PatchOutcome:
    """What became of one patch: ``status`` is done, failed or unassessable (with ``reason``)."""

    status: str
    reason: str = ""
    prediction: PatchPrediction | None = None
    reason_code: str = ""  # the quality check that failed (blank, background, out_of_focus, not_he)
    measures: dict[str, float] = field(default_factory=dict)  # quality.measure: focus, stain OD


def prepare(predictor: Predictor, images: list[bytes]) -> tuple[list[PatchOutcome], np.ndarray | None]:
    """Decode, quality-check and resize one batch: (outcomes, uint8 model input for the DONE ones)."""
    outcomes: list[PatchOutcome] = []
    decoded = []
    for data in images:
        try:
            image = decode_rgb(data)
        except ValueError as exc:
            outcomes.append(PatchOutcome(FAILED, f"stored image cannot be read: {exc}"))
            continue
        _quality_gate(image, outcomes, decoded)
    # uint8 at the input size: the predictor scales them straight into the runtime's input buffer.
    pixels = to_pixels(decoded, predictor.input_size) if decoded else None
    return outcomes, pixels


def prepare_decoded(predictor: Predictor, images: list[Image.Image]) -> tuple[list[PatchOutcome], np.ndarray | None]:
    """``prepare`` for images already decoded to RGB (tiles read from a whole-slide image): the
    same quality check and resize, so a slide's tile takes the same path as an uploaded patch."""
    outcomes: list[PatchOutcome] = []
    passed: list[Image.Image] = []
    for image in images:
        _quality_gate(image if image.mode == "RGB" else image.convert("RGB"), outcomes, passed)
    pixels = to_pixels(passed, predictor.input_size) if passed else None
    return outcomes, pixels


def _quality_gate(image: Image.Image, outcomes: list[PatchOutcome], passed: list[Image.Image]) -> None:
    """Quality-check one decoded image: its outcome is appended, and the image too when it passed."""
    quality = assess(image)
    if not quality.ok:
        outcomes.append(PatchOutcome(UNASSESSABLE, quality.reason, reason_code=quality.code, measures=quality.measures))
        return
    outcomes.append(PatchOutcome(DONE, measures=quality.measures))
    passed.append(image)


def infer(predictor: Predictor, outcomes: list[PatchOutcome], batch: np.ndarray | None) -> list[PatchOutcome]:
    """Run the model on a prepared batch (uint8 pixels) and attach each prediction to its outcome."""
    if batch is not None:
        ready = (o for o in outcomes if o.status == DONE)
        for outcome, prediction in zip(ready, predictor.predict_pixels(batch), strict=True):
            outcome.prediction = prediction
    return outcomes


def analyse(predictor: Predictor, images: list[bytes]) -> list[PatchOutcome]:
    """Analyse encoded images (PNG/JPEG/TIFF bytes) as one batch; one outcome per image, in order.

    A patch that cannot be decoded fails; one that fails the quality check is unassessable
    with the reason; the rest are predicted together in a single model call.
    """
    return infer(predictor, *prepare(predictor, images))
