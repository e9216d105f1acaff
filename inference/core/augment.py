"""Histology-appropriate augmentation for training (numpy + Pillow).

Each transform keeps the tissue's meaning: 90-degree rotations and flips (tissue has no
orientation), stain/colour jitter in haematoxylin-eosin-DAB optical-density space (labs and
scanners differ mostly in stain intensity and hue), scale jitter (magnifications differ), and
mild blur (focus differs).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

# Ruifrok & Johnston stain vectors (as in scikit-image's rgb2hed): rows are H, E, DAB in RGB OD.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


def hed_jitter(pixels: np.ndarray, rng: np.random.Generator, sigma: float = 0.08) -> np.ndarray:
    """Scale and shift each stain channel in optical density (Tellez et al. 2018).

    Args:
        pixels: uint8 RGB array (h, w, 3).
        sigma: strength; each stain is multiplied by U(1-sigma, 1+sigma) and shifted by U(-sigma, sigma) / 4.

    Returns:
        uint8 RGB array of the same shape.
    """
    od = -np.log(np.maximum(pixels.astype(np.float32) / 255.0, 1e-6))
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3).astype(np.float32)
    beta = rng.uniform(-sigma, sigma, size=3).astype(np.float32) / 4
    od = (hed * alpha + beta) @ RGB_FROM_HED
    rgb = np.exp(-np.maximum(od, 0.0)) * 255.0
    return np.clip(rgb, 0, 255).reshape(pixels.shape).astype(np.uint8)


def scale_jitter(image: Image.Image, rng: np.random.Generator, low: float = 0.8, high: float = 1.33) -> Image.Image:
    """Zoom in (random crop) or out (reflect-pad) by a factor in [low, high], keeping the size."""
    zoom = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    width, height = image.size
    side = min(width, height)
    window = max(8, round(side / zoom))
    if window <= side:
        left = int(rng.integers(0, width - window + 1))
        top = int(rng.integers(0, height - window + 1))
        return image.crop((left, top, left + window, top + window)).resize((side, side), Image.Resampling.BILINEAR)
    pad = window - side
    pixels = np.asarray(image)
    before = int(rng.integers(0, pad + 1))
    padded = np.pad(pixels, ((before, pad - before), (before, pad - before), (0, 0)), mode="reflect")
    return Image.fromarray(padded).resize((side, side), Image.Resampling.BILINEAR)


def augment(
    image: Image.Image,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.8, 1.33),
    stain_sigma: float = 0.08,
) -> Image.Image:
    """One random training view of an RGB patch (same size out as in).

    Args:
        scale: zoom range (below 1 zooms out with reflected borders, above 1 crops in).
        stain_sigma: strength of the HED stain jitter.
    """
    image = scale_jitter(image, rng, *scale)
    pixels = np.asarray(image)
    pixels = np.rot90(pixels, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    pixels = hed_jitter(np.ascontiguousarray(pixels), rng, stain_sigma)
    # Brightness/contrast: scanners and section thickness differ.
    gain = rng.uniform(0.9, 1.1)
    bias = rng.uniform(-12, 12)
    pixels = np.clip(pixels.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    out = Image.fromarray(pixels)
    if rng.random() < 0.25:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    return out
