"""Rendering class-activation heatmaps as transparent overlays (numpy + Pillow)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def render_heatmap(grid: list[list[float]] | np.ndarray, size: int) -> Image.Image:
    """An RGBA overlay of a heatmap grid: red where the evidence is strong, clear where absent.

    Args:
        grid: local class probabilities, values 0..1 (e.g. 7x7 for a 224 px MobileNetV2 input).
        size: side of the square output in pixels.

    Returns:
        RGBA image; alpha grows with the value (0 -> transparent, 1 -> 75% opaque).
    """
    values = np.clip(np.asarray(grid, dtype=np.float32), 0.0, 1.0)
    if values.ndim != 2:
        raise ValueError(f"heatmap grid must be 2-D, got shape {values.shape}")
    smooth = Image.fromarray((values * 255).astype(np.uint8), mode="L").resize((size, size), Image.Resampling.BILINEAR)
    level = np.asarray(smooth, dtype=np.float32) / 255.0
    rgba = np.empty((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (220 * (1 - level)).astype(np.uint8)  # yellow (weak) to red (strong)
    rgba[..., 2] = 0
    rgba[..., 3] = (190 * level).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")
