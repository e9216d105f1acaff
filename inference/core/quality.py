"""Input quality control for H&E patches, run before classification (numpy + Pillow only).

A patch the classifier cannot assess must end "unassessable" with a reason, not with a confident
wrong class. ``assess`` applies four checks in order and stops at the first that fails:

1. ``blank``: the image barely varies (flat fill, empty frame).
2. ``background``: nearly all of it is empty glass (bright and unsaturated pixels).
3. ``out_of_focus``: the tissue lacks fine detail (mean squared Laplacian over tissue pixels).
4. ``not_he``: the tissue colours are not those of an H&E stain (greyscale, photographs, other stains).

Every measure is computed on one fixed-scale copy of the image, ``WORK_SIZE`` pixels square, taken
by nearest-neighbour sampling (no smoothing, so blur in the input is not hidden or added; cheap).
A 150 px tile and the same tile upsampled to 224 px therefore give nearly the same numbers.

The thresholds were measured on the 165 real tiles in ``../shared/data`` (crc-val-he-7k-png,
nct-crc-he-100k-samples, kather2016-tfds-224, kather2016-tiles-150), on Gaussian-blurred copies
of the 152 tissue tiles, on greyscale copies, on matplotlib's ``grace_hopper.jpg`` and on flat fills;
``scripts/measure_quality.py`` reproduces the numbers and ``docs/quality-thresholds.md`` has the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from inference.core.augment import HED_FROM_RGB as _HED_FROM_RGB

# Side of the square working copy every measure is computed on. 224 px inputs are sampled every
# second pixel, 150 px inputs every 1.34 pixels.
WORK_SIZE = 112

# (1) Blank: standard deviation of the grey level (0..255) of the working copy.
# Measured: flat fills 0.0; the NCT BACK tile (empty glass) 0.72; real tissue tiles min 11.8
# (NCT MUC-AAQTMGMA, pale mucus), median 39.7. 2.0 stays 5.9x below the palest tissue.
MIN_GREY_STD = 2.0

# (2) Background: a pixel is empty glass when it is bright (grey >= 200) and unsaturated
# ((max - min) / max of its RGB <= 0.10). The real background tiles show no dark or black areas,
# so dark pixels are not background (dense lymphocyte tiles have up to half their pixels below
# grey 30). Background fraction measured: real tissue tiles max 0.970 (Kather 2016 07_ADIPOSE
# image_38: one fat-cell membrane across glass, 3.0% tissue), then 0.956 and 0.945; median 0.047;
# greyscale copies max 0.974. Background tiles: 8 of 13 at 0.989 or more (<= 1.1% tissue); the
# other 5 at 0.912 or less (dull grey 08_EMPTY tiles with JPEG colour blotches; they fail not_he).
# 0.985 (1.5% tissue): the thinnest real tissue tile has twice the tissue the limit asks for.
BACKGROUND_MIN_GREY = 200
BACKGROUND_MAX_SATURATION = 0.10
MAX_BACKGROUND_FRACTION = 0.985

# (3) Focus: mean squared 4-neighbour Laplacian of the grey level over tissue (non-background)
# pixels of the working copy, so glass around sparse tissue (fat, mucus) does not dilute it.
# Measured on sharp real tissue tiles: min 217 (Kather 2016 04_LYMPHO image_23, dense dark
# lymphocytes upsampled from 150 px), then 261 and 282 (07_ADIPOSE); median 1,214.
# Gaussian blur at 224 px: radius 2 max 615 (104 of 152 below 150), radius 3 max 147
# (CRC-VAL LYM-TCGA-FTVCYFDV; all 152 below 150), radius 5 max 24.9.
# 150 keeps the least sharp real tile 1.45x above the limit; radius-3 blur is only just below it.
MIN_SHARPNESS = 150.0

# (4) Stain: optical density OD = -log10((v + 1) / 256) per channel. The OD chroma (its part
# orthogonal to grey (1, 1, 1)) has a hue angle: haematoxylin ~96 deg, eosin ~152 deg, erythrocytes
# ~190 deg; cyan ~30, green ~330, yellow ~270 and orange/skin ~240 deg lie outside [80, 230] deg.
# A tissue pixel is H&E-like when its OD hue is in [80, 230] deg and its chroma is at least 0.05 of
# its total OD (grey has none). Fraction of H&E-like tissue pixels measured: real tissue tiles min
# 0.916 (07_ADIPOSE image_38), median 1.0; grace_hopper.jpg 0.294; greyscale tissue copies 0.0;
# the 5 dull 08_EMPTY tiles 0.06 to 0.24. 0.6 is 1.5x below the tissue minimum, 2x above the photo.
HE_HUE_MIN_DEG = 80.0
HE_HUE_MAX_DEG = 230.0
HE_MIN_RELATIVE_CHROMA = 0.05
MIN_HE_FRACTION = 0.6

_F32 = np.float32
_LEVELS = np.arange(256, dtype=np.float64)
_LEVELS_SQ = _LEVELS * _LEVELS
_OD = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def _unit(deg: float) -> tuple[float, float]:
    return math.cos(math.radians(deg)), math.sin(math.radians(deg))


_HUE_LO = _unit(HE_HUE_MIN_DEG)
_HUE_HI = _unit(HE_HUE_MAX_DEG)


@dataclass(frozen=True)
class QualityResult:
    """Outcome of the input quality check.

    Attributes:
        ok: True when the patch can be classified.
        reason: human-readable explanation for a clinician; empty when ``ok``.
        code: ``blank``, ``background``, ``out_of_focus`` or ``not_he``; empty when ``ok``.
        measures: the numbers behind the verdict (plain floats).
    """

    ok: bool
    reason: str = ""
    code: str = ""
    measures: dict[str, float] = field(default_factory=dict)


def measure(image: Image.Image) -> dict[str, float]:
    """Compute every quality measure of an image (any size, any mode) on its fixed-scale copy.

    Returns:
        ``grey_std``, ``background_fraction``, ``sharpness`` and ``he_fraction`` as plain floats
        (``sharpness`` and ``he_fraction`` are 0.0 when there are no tissue pixels), and, when there
        are tissue pixels, ``od_h`` and ``od_e``: the mean optical density of haematoxylin and eosin.
    """
    # Speed: every temporary array stays well under 128 KB (larger ones are fresh mmap'd pages,
    # which cost more to fault in than the arithmetic on them).
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.NEAREST)
    luma = image.convert("L")  # ITU-R 601-2 grey, 0..255
    r, g, b = np.asarray(image).transpose(2, 0, 1).copy()  # contiguous uint8 planes
    grey_u8 = np.asarray(luma)

    hist = np.asarray(luma.histogram(), dtype=np.float64)
    n_pixels = grey_u8.size
    mean = float(hist @ _LEVELS) / n_pixels
    grey_std = math.sqrt(max(float(hist @ _LEVELS_SQ) / n_pixels - mean * mean, 0.0))

    # Background: bright and unsaturated; (max - min) / max <= s written without a division.
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    unsaturated = (high - low).astype(np.float32) <= high * _F32(BACKGROUND_MAX_SATURATION)
    background = (grey_u8 >= BACKGROUND_MIN_GREY) & unsaturated
    n_tissue = n_pixels - int(np.count_nonzero(background))

    measures = {
        "grey_std": grey_std,
        "background_fraction": 1.0 - n_tissue / n_pixels,
        "sharpness": 0.0,
        "he_fraction": 0.0,
    }
    if n_tissue == 0:
        return measures

    # Focus: 4-neighbour Laplacian, squared, averaged over interior tissue pixels.
    grey = grey_u8.astype(np.float32)
    lap = grey[1:-1, 1:-1] * _F32(4)
    lap -= grey[:-2, 1:-1]
    lap -= grey[2:, 1:-1]
    lap -= grey[1:-1, :-2]
    lap -= grey[1:-1, 2:]
    lap *= lap
    inner_tissue = ~background[1:-1, 1:-1].ravel()
    n_inner = int(np.count_nonzero(inner_tissue))
    if n_inner:
        measures["sharpness"] = float(np.dot(lap.ravel(), inner_tissue.astype(np.float32))) / n_inner

    # Stain: OD hue and relative chroma of tissue pixels, on every second pixel (56 x 56 samples).
    tissue = ~background[::2, ::2]
    n_sampled = int(np.count_nonzero(tissue))
    if n_sampled:
        od_r = _OD.take(r[::2, ::2])
        od_g = _OD.take(g[::2, ::2])
        od_b = _OD.take(b[::2, ::2])
        # Chroma: the OD vector's projection on the plane orthogonal to grey (1, 1, 1).
        x = (od_r - od_g) * _F32(1 / math.sqrt(2))
        y = (od_r + od_g - 2 * od_b) * _F32(1 / math.sqrt(6))
        total = od_r + od_g + od_b
        coloured = x * x + y * y >= np.square(total * _F32(HE_MIN_RELATIVE_CHROMA))
        # Hue within [min, max] (a span under 180 deg): counter-clockwise of min and clockwise of max.
        in_range = (y * _F32(_HUE_LO[0]) >= x * _F32(_HUE_LO[1])) & (x * _F32(_HUE_HI[1]) >= y * _F32(_HUE_HI[0]))
        measures["he_fraction"] = int(np.count_nonzero(coloured & in_range & tissue)) / n_sampled
        # Mean optical density of each stain over tissue (colour deconvolution, Ruifrok & Johnston):
        # the input statistics that drift monitoring compares week by week.
        weights = tissue.ravel().astype(np.float32) * _F32(1 / n_sampled)
        od_mean = np.array([np.dot(channel.ravel(), weights) for channel in (od_r, od_g, od_b)])
        stains = od_mean @ _HED_FROM_RGB[:, :2]
        measures["od_h"] = float(stains[0])
        measures["od_e"] = float(stains[1])
    return measures


def assess(image: Image.Image) -> QualityResult:
    """Decide whether a patch can be classified; the first failing check gives the reason.

    Args:
        image: RGB Pillow image of any size (other modes are converted).
    """
    m = measure(image)
    if m["grey_std"] < MIN_GREY_STD:
        return QualityResult(
            False,
            "The image is blank or uniform: there is no tissue texture to classify.",
            "blank",
            m,
        )
    if m["background_fraction"] > MAX_BACKGROUND_FRACTION:
        return QualityResult(
            False,
            f"The patch is almost entirely empty glass ({m['background_fraction']:.1%} background): "
            "too little tissue to classify.",
            "background",
            m,
        )
    if m["sharpness"] < MIN_SHARPNESS:
        return QualityResult(
            False,
            "The tissue is out of focus (too little fine detail): the patch should be rescanned.",
            "out_of_focus",
            m,
        )
    if m["he_fraction"] < MIN_HE_FRACTION:
        return QualityResult(
            False,
            f"The colours are not those of an H&E stain (only {m['he_fraction']:.0%} of the tissue is "
            "H&E-coloured): greyscale, another stain or not a histology image.",
            "not_he",
            m,
        )
    return QualityResult(True, measures=m)
