"""A documented "simulated other lab" protocol: held-out tiles as four other labs would scan them.

The maintainers' external test set (another lab's scanner, stain, magnification and JPEG
compression) is hidden, so generalisation is estimated twice: leave one dataset out (a real other
source) and, on the same held-out tiles, these four fixed lab profiles. Each profile changes
stain, scale, focus and compression together, deterministically. The colour change is
per-RGB-channel in optical density (Reinhard-style mean/spread matching), deliberately *not*
the stain-matrix augmentation used in training, so the protocol does not simply replay the
training augmentation. Zooming out fills the wider field with other held-out tiles of the same
class (a mosaic of real tissue).

| profile | scale µm/px | colour (OD mean x, per R, G, B; spread x) | focus | JPEG q |
|---|---|---|---|---|
| pale-40x | 0.25 | 0.60, 0.80, 0.55; 0.8 | sharp | 80 |
| dark-blue-10x | 0.80 | 1.50, 1.15, 1.10; 1.2 | blur 0.8 px | 40 |
| eosin-sharp | 0.35 | 0.90, 1.40, 0.90; 1.1 | unsharp mask | 60 |
| faded-noisy | 0.65 | 0.70, 0.70, 0.70; 0.7 | noise sigma 4 | 30 |
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from inference.core.augment import zoom_view


@dataclass(frozen=True)
class LabProfile:
    name: str
    um_per_px: float
    od_mean: tuple[float, float, float]
    od_spread: float
    focus: str  # "sharp", "blur", "unsharp", "noise"
    jpeg_quality: int


PROFILES = (
    LabProfile("pale-40x", 0.25, (0.60, 0.80, 0.55), 0.8, "sharp", 80),
    LabProfile("dark-blue-10x", 0.80, (1.50, 1.15, 1.10), 1.2, "blur", 40),
    LabProfile("eosin-sharp", 0.35, (0.90, 1.40, 0.90), 1.1, "unsharp", 60),
    LabProfile("faded-noisy", 0.65, (0.70, 0.70, 0.70), 0.7, "noise", 30),
)


def restain(pixels: np.ndarray, od_mean: tuple[float, float, float], od_spread: float) -> np.ndarray:
    """Scale each RGB channel's optical density: mean by ``od_mean``, spread around it by ``od_spread``."""
    od = -np.log(np.maximum(pixels.astype(np.float32) / 255.0, 1e-3))
    mean = od.reshape(-1, 3).mean(axis=0)
    od = mean * np.asarray(od_mean, dtype=np.float32) + (od - mean) * np.float32(od_spread)
    return np.clip(np.exp(-np.maximum(od, 0.0)) * 255.0, 0, 255).astype(np.uint8)


def as_lab(
    image: Image.Image,
    profile: LabProfile,
    *,
    um_per_px: float,
    size: int = 224,
    seed: int = 0,
    same_class=None,
) -> Image.Image:
    """The tile as ``profile``'s lab would deliver it: a ``size`` px patch at the profile's scale.

    Args:
        image: RGB tile at ``um_per_px`` µm/px.
        same_class: callable returning another (tile, µm/px) of the same class for zooming out.
        seed: fixes the crop and noise, so the protocol gives the same images every run.
    """
    rng = np.random.default_rng(seed)
    view = zoom_view(image, um_per_px, profile.um_per_px, size, rng, same_class=same_class)
    pixels = restain(np.asarray(view), profile.od_mean, profile.od_spread)
    if profile.focus == "noise":
        pixels = np.clip(pixels + rng.normal(0, 4, size=pixels.shape), 0, 255).astype(np.uint8)
    out = Image.fromarray(pixels)
    if profile.focus == "blur":
        out = out.filter(ImageFilter.GaussianBlur(radius=0.8))
    elif profile.focus == "unsharp":
        out = out.filter(ImageFilter.UnsharpMask(radius=1.5, percent=120))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=profile.jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
