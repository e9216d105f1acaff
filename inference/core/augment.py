"""Histology-appropriate augmentation for training (numpy + Pillow).

Each transform keeps the tissue's meaning: 90-degree rotations and flips (tissue has no
orientation), stain/colour jitter in haematoxylin-eosin-DAB optical-density space (labs and
scanners differ mostly in stain intensity and hue), scale jitter (magnifications differ), and
mild blur (focus differs).
"""

from __future__ import annotations

import io
import math

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


# --- Recipe v3: robustness to what differs between labs -------------------------------------------
#
# Every transform below models one way another hospital's patches differ from the training data:
# the stain (its hue and strength, per stain, in optical-density space), the scanner (colour
# response, focus, sharpening, sensor noise, JPEG compression) and the magnification (0.25 to
# 1.0 µm/px). Zooming out shows more tissue than one tile holds, so the extra field of view is
# filled with other tiles of the same class (a mosaic of real tissue), never with padding.

ZOOM_UM_PER_PX = (0.25, 1.0)  # scales a patch may come at (40x scans to 10x)
NEAR_NATIVE = (0.4, 0.63)  # a share of views stays near the model's scale, the usual case
_RESAMPLING = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


def stain_matrix_jitter(
    pixels: np.ndarray, rng: np.random.Generator, intensity: float = 0.25, rotation: float = 0.08, shift: float = 0.03
) -> np.ndarray:
    """Re-stain a patch with a random stain matrix and stain amounts (optical-density space).

    The patch is unmixed into haematoxylin, eosin and residual with the reference stain vectors,
    then mixed again with perturbed vectors (each H and E colour direction moved by about
    ``rotation`` radians) and each stain's amount scaled by a log-normal factor (sigma
    ``intensity``) plus a small shift: another lab's staining protocol and reagents.

    Args:
        pixels: uint8 RGB array (h, w, 3).

    Returns:
        uint8 RGB array of the same shape.
    """
    od = -np.log(np.maximum(pixels.astype(np.float32) / 255.0, 1e-6)).reshape(-1, 3)
    amounts = od @ HED_FROM_RGB
    matrix = RGB_FROM_HED.copy()
    for row in (0, 1):
        norm = float(np.linalg.norm(matrix[row]))
        moved = matrix[row] / norm + rng.normal(0.0, rotation, size=3).astype(np.float32)
        moved = np.maximum(moved, 0.02)  # stains absorb in every channel: no negative density
        matrix[row] = moved / np.linalg.norm(moved) * norm
    scale = np.exp(rng.normal(0.0, intensity, size=3)).astype(np.float32)
    scale[2] = 1.0  # the residual channel carries no stain
    offset = rng.uniform(-shift, shift, size=3).astype(np.float32)
    offset[2] = 0.0
    od = (amounts * scale + offset) @ matrix
    rgb = np.exp(-np.maximum(od, 0.0)) * 255.0
    return np.clip(rgb, 0, 255).reshape(pixels.shape).astype(np.uint8)


def zoom_view(
    image: Image.Image,
    um_per_px: float,
    target_um_per_px: float,
    size: int,
    rng: np.random.Generator,
    *,
    same_class=None,
) -> Image.Image:
    """The patch as a ``size`` px patch scanned at ``target_um_per_px`` would show it.

    Args:
        image: RGB source tile at ``um_per_px``.
        same_class: callable returning another (RGB tile, its µm/px) of the same class, used to
            fill a field of view larger than the tile; without it the view is the whole tile.

    Returns:
        RGB image of ``size`` x ``size`` px.
    """
    width, height = image.size
    window = size * target_um_per_px / um_per_px  # source pixels across the field of view
    if window > min(width, height) and same_class is not None:
        side = min(width, height)
        count = math.ceil(window / side)
        canvas = Image.new("RGB", (count * side, count * side))
        for row in range(count):
            for col in range(count):
                if row == col == 0:
                    tile, tile_scale = image, um_per_px
                else:
                    tile, tile_scale = same_class()
                    tile = _dihedral(tile, rng)
                tile_side = max(1, round(side * um_per_px / tile_scale))
                tile = _square(tile, tile_side, rng).resize((side, side), Image.Resampling.BILINEAR)
                canvas.paste(tile, (col * side, row * side))
        image, width, height = canvas, canvas.size[0], canvas.size[1]
    window = max(8, min(round(window), width, height))
    left = int(rng.integers(0, width - window + 1))
    top = int(rng.integers(0, height - window + 1))
    view = image.crop((left, top, left + window, top + window))
    return view.resize((size, size), _RESAMPLING[int(rng.integers(0, len(_RESAMPLING)))])


def _square(image: Image.Image, side: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop of ``side`` source-scale pixels (the whole tile when it is smaller)."""
    width, height = image.size
    side = min(side, width, height)
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return image.crop((left, top, left + side, top + side))


def _dihedral(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.rot90(np.asarray(image), int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(pixels))


def scanner_jitter(
    image: Image.Image, rng: np.random.Generator, jpeg_quality: tuple[int, int] = (30, 95)
) -> Image.Image:
    """Another scanner's rendering: colour response, focus or sharpening, noise, JPEG compression."""
    pixels = np.asarray(image).astype(np.float32) / 255.0
    gamma = rng.uniform(0.8, 1.25, size=3).astype(np.float32)  # per-channel colour response
    pixels = pixels**gamma
    grey = pixels.mean(axis=2, keepdims=True)
    saturation = np.float32(rng.uniform(0.7, 1.3))
    pixels = grey + (pixels - grey) * saturation
    pixels = pixels * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.uniform(-0.05, 0.05))
    if rng.random() < 0.3:
        pixels = pixels + rng.normal(0.0, rng.uniform(0.004, 0.025), size=pixels.shape).astype(np.float32)
    out = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    focus = rng.random()
    if focus < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.5))))
    elif focus < 0.45:
        out = out.filter(ImageFilter.UnsharpMask(radius=float(rng.uniform(1, 2)), percent=int(rng.integers(50, 150))))
    if rng.random() < 0.7:
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out = decoded.convert("RGB")
    return out


def augment_lab(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    um_per_px: float | None,
    model_um_per_px: float = 0.5,
    size: int = 224,
    same_class=None,
    zoom: tuple[float, float] = ZOOM_UM_PER_PX,
    stain_intensity: float = 0.25,
    jpeg_quality: tuple[int, int] = (30, 95),
) -> Image.Image:
    """One random training view as another lab would produce it (recipe v3).

    Args:
        image: RGB tile.
        um_per_px: the tile's scale (None: taken to be the model's).
        model_um_per_px: the scale the model is trained for (0.5: NCT-CRC-HE-100K).
        size: output side in pixels (the model input).
        same_class: see ``zoom_view``.
        zoom: range of scales (µm/px) the views are drawn from, log-uniformly; a third of the
            views stay near the model's scale.
        stain_intensity: log-normal sigma of each stain's amount.
        jpeg_quality: JPEG quality range (applied to 70% of views).
    """
    source = um_per_px or model_um_per_px
    low, high = NEAR_NATIVE if rng.random() < 0.3 else zoom
    ratio = model_um_per_px / 0.5
    target = float(np.exp(rng.uniform(np.log(low * ratio), np.log(high * ratio))))
    view = _dihedral(zoom_view(image, source, target, size, rng, same_class=same_class), rng)
    pixels = stain_matrix_jitter(np.asarray(view), rng, intensity=stain_intensity)
    return scanner_jitter(Image.fromarray(pixels), rng, jpeg_quality)
