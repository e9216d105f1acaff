"""Decoding, quality control and preprocessing of H&E patches (numpy + Pillow only)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

# A patch whose pixels barely vary is blank glass or a flat fill, not tissue: its prediction
# would be meaningless. Grey-level standard deviation measured on the 165 real tiles in
# ../shared/data (PathMNIST excluded): tissue classes 11.7 and up (lowest: an NCT MUC tile);
# the 13 background tiles (BACK / 08_EMPTY) 0.58 to 13.4; flat fills 0. Below 2.0 only empty glass falls
# (the NCT BACK sample, 0.58), which is unassessable rather than a classification.
# Issue 3 refines QC (background fraction, focus, stain range).
MIN_GREY_STD = 2.0


@dataclass(frozen=True)
class QualityResult:
    """Outcome of the input quality check: ``ok`` False means unassessable, with ``reason``."""

    ok: bool
    reason: str = ""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB Pillow image.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc


def quality_check(image: Image.Image) -> QualityResult:
    """Reject inputs the classifier cannot assess (currently: blank or flat images)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    if float(grey.std()) < MIN_GREY_STD:
        return QualityResult(False, "blank or uniform image: no tissue texture to classify")
    return QualityResult(True)


def preprocess(images: list[Image.Image], input_size: int, scheme: str = "mobilenet_v2") -> np.ndarray:
    """Resize RGB images to the model input and scale pixel values.

    Args:
        images: RGB Pillow images of any size.
        input_size: model input side in pixels (square).
        scheme: ``mobilenet_v2`` scales 0..255 to -1..1.

    Returns:
        float32 array of shape (n, input_size, input_size, 3).
    """
    if scheme != "mobilenet_v2":
        raise ValueError(f"unknown preprocessing scheme: {scheme}")
    batch = np.empty((len(images), input_size, input_size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        resized = image
        if image.size != (input_size, input_size):
            resized = image.resize((input_size, input_size), Image.Resampling.BILINEAR)
        batch[i] = np.asarray(resized, dtype=np.float32)
    return batch / 127.5 - 1.0
