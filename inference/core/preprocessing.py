"""Decoding, storage encoding and preprocessing of H&E patches (numpy + Pillow only)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Stored patches are uncompressed 24-bit BMP: lossless like PNG, and decoded in about 0.08 ms
# instead of 1.25 ms (PNG) or 0.17 ms (uncompressed TIFF) for a 224 px patch, measured here on the
# shared samples. The worker decodes every stored patch on its hot path, while storage is cheap
# (147 KB instead of 72 KB as PNG for 224 px).
STORAGE_FORMAT = "BMP"
STORAGE_SUFFIX = ".bmp"


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB Pillow image.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc


def encode_for_storage(image: Image.Image) -> bytes:
    """Lossless bytes of an RGB image in the platform's storage format."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=STORAGE_FORMAT)
    return buffer.getvalue()


def to_pixels(images: list[Image.Image], input_size: int) -> np.ndarray:
    """RGB images resized to the model input: uint8 array of shape (n, input_size, input_size, 3)."""
    pixels = np.empty((len(images), input_size, input_size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        if image.size != (input_size, input_size):
            image = image.resize((input_size, input_size), Image.Resampling.BILINEAR)  # noqa: PLW2901
        pixels[i] = np.asarray(image)
    return pixels


def scale_pixels(pixels: np.ndarray, scheme: str = "mobilenet_v2", out: np.ndarray | None = None) -> np.ndarray:
    """Scale uint8 pixels to the model's value range (``mobilenet_v2``: 0..255 to -1..1).

    Args:
        out: a float32 array of the same shape to write into (e.g. the serving runtime's input
            buffer); a new one when None.
    """
    if scheme != "mobilenet_v2":
        raise ValueError(f"unknown preprocessing scheme: {scheme}")
    if out is None:
        out = pixels.astype(np.float32)
    else:
        np.copyto(out, pixels, casting="unsafe")
    # Scaled in place: fresh large arrays cost more than the arithmetic.
    out *= np.float32(1 / 127.5)
    out -= np.float32(1.0)
    return out


def preprocess(images: list[Image.Image], input_size: int, scheme: str = "mobilenet_v2") -> np.ndarray:
    """Resize RGB images to the model input and scale pixel values.

    Args:
        images: RGB Pillow images of any size.
        input_size: model input side in pixels (square).
        scheme: ``mobilenet_v2`` scales 0..255 to -1..1.

    Returns:
        float32 array of shape (n, input_size, input_size, 3).
    """
    return scale_pixels(to_pixels(images, input_size), scheme)
