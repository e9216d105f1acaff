"""Whole-slide images, Django-free: validation, tissue detection, tiling, tile reading, results.

The path of one slide::

    slide_inspect(path)                    open with OpenSlide, check levels, µm/px, size; no pixels read
    tissue_detect(slide, info)             boolean mask on a low level (about 8 µm/px), read in blocks
    tile_grid(info, mask, model_mpp=0.5)   tissue tiles of 224 model pixels, (col, row), row-major
    chunks(grid.coords, 256)               the work units a worker claims, by index
    chunk_analyse(predictor, slide, grid, chunk)
                                           read -> quality check -> preprocess -> model: the patch path
    results_new / results_add              per-slide arrays (rows x cols x classes, float16)
    heatmap_png, tumour_fraction, suspicious_regions

Memory stays bounded by the block and chunk sizes, never by the slide: nothing reads a whole
level (OpenSlide's ``get_thumbnail`` would), tiles are read one at a time and handed on in
batches, and the per-slide arrays hold one value per tile, not per pixel.

Coordinates: ``x, y`` are level-0 pixels; ``col, row`` index the model grid, whose tile (col, row)
covers level-0 pixels ``[round(col * step), round((col + 1) * step))`` (and the same for rows),
``step = tile_px * model_mpp / slide_mpp``, so a grid at 0.5 µm/px on a 0.25 µm/px slide has
448 px tiles read at the right level and resampled to 224.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import openslide

    from inference.core.model import Predictor
    from inference.core.tiff_tiles import JpegTiffLevel

# A slide this large is refused (about 200,000 x 125,000 px at 0.25 µm/px: 5 x 3 cm of tissue).
DEFAULT_MAX_PIXELS = 25_000_000_000
MPP_MIN, MPP_MAX = 0.1, 2.0  # plausible scanner resolutions (µm/px) at level 0
MPP_TOLERANCE = 0.05  # mpp-x vs mpp-y, or a given mpp vs the file's, may differ this much (relative)
MASK_MPP = 8.0  # tissue detection works at about this resolution (µm per mask pixel)
MASK_BLOCK_PX = 1024  # pixels per side of a block read for tissue detection (4 MiB as RGBA)
# Saturation threshold bounds: empty glass stays below 0.07 (the synthetic glass: 0.02-0.04, real
# scans 0.01-0.05); H&E tissue averaged over 8 µm is above 0.15. Otsu picks within these bounds,
# so a slide that is all glass finds no tissue and one that is all tissue is not split in two.
MIN_SATURATION, MAX_SATURATION = 0.07, 0.15
DARK_MAX = 30  # a mask pixel whose brightest channel is below this is no-data or marker, not tissue
MORPHOLOGY_RADIUS = 2  # mask pixels: closing then opening with a 5 x 5 square (about 40 µm)
DEFAULT_TILE_PX = 224
DEFAULT_MIN_TISSUE = 0.25  # a grid tile is kept when at least this fraction of it is tissue
DEFAULT_CHUNK_SIZE = 256  # tiles per chunk: one worker task
DEFAULT_BATCH_SIZE = 64  # tiles per model call
DEFAULT_TOP_K = 12
LEVEL_TOLERANCE = 0.01  # a level at 0.505 µm/px still counts as 0.5 µm/px
MAX_COARSER = 1.1  # a slide coarser than the model by more than this factor cannot be analysed

# Per-tile status in SlideResults.status.
TILE_NONE, TILE_PENDING, TILE_DONE, TILE_UNASSESSABLE, TILE_FAILED = 0, 1, 2, 3, 4

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
}


class SlideError(ValueError):
    """A file that cannot be used as a slide; the message is meant for the person who gave it."""


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is, read from its header and directories (no pixel data).

    Attributes:
        width, height: level-0 size in pixels.
        levels: (width, height, downsample) per pyramid level, level 0 first.
        mpp: level-0 µm/px. mpp_source: ``file`` (the scanner's) or ``given`` (the uploader's).
        vendor: OpenSlide's format name (``aperio``, ``hamamatsu``, ``generic-tiff`` ...).
        container: ``TIFF``, ``BigTIFF`` or the file's suffix for other containers.
        tile_width, tile_height: the file's own tile size at level 0, when it says (a tile cache
            serving Deep Zoom tiles does best with tiles that are multiples of it).
        objective_power: the scanner's objective (20, 40), when the file says.
        quickhash: OpenSlide's quickhash-1 of the slide, for identity checks.
        size_bytes: the file's size.
    """

    width: int
    height: int
    levels: tuple[tuple[int, int, float], ...]
    mpp: float
    mpp_source: str
    vendor: str
    container: str
    tile_width: int | None = None
    tile_height: int | None = None
    objective_power: float | None = None
    quickhash: str = ""
    size_bytes: int = 0

    def level_mpp(self, level: int) -> float:
        """µm/px of a pyramid level."""
        return self.mpp * self.levels[level][2]

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "levels": [list(level) for level in self.levels],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "vendor": self.vendor,
            "container": self.container,
            "tile_width": self.tile_width,
            "tile_height": self.tile_height,
            "objective_power": self.objective_power,
            "quickhash": self.quickhash,
            "size_bytes": self.size_bytes,
        }


# ---------------------------------------------------------------------------------------------
# Opening and validation
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def slide_open(path: str | Path) -> Iterator[openslide.OpenSlide]:
    """Open a slide with OpenSlide for reading (closed on exit); errors become ``SlideError``."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(_unreadable_reason(Path(path))) from None
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"not a whole-slide image OpenSlide can read: {exc}") from None
    try:
        yield slide
    finally:
        slide.close()


def slide_inspect(path: str | Path, *, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> SlideInfo:
    """Validate a whole-slide image without reading its pixels, and describe it.

    Opens the file with OpenSlide (which reads the header and directories only); TIFF-based
    files also have their directories checked against the file's length, so a truncated upload
    is caught here and not half-way through an analysis.

    Args:
        path: the slide file.
        mpp: level-0 µm/px from the uploader, used when the file has none (a file's own value
            wins; a given value more than 5% away from it is an error).
        max_pixels: the largest level-0 width x height accepted (SLIDE_MAX_PIXELS).

    Returns:
        SlideInfo.

    Raises:
        SlideError: with a message for the uploader (empty, truncated, not a slide, one level
            only, no or implausible µm/px, too large).
    """
    import openslide

    path = Path(path)
    if not path.is_file():
        raise SlideError("the file does not exist")
    size = path.stat().st_size
    if size == 0:
        raise SlideError("the file is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(16)
    is_tiff = head[:4] in _TIFF_MAGIC
    if is_tiff:
        damage = _tiff_damage(path, size)
        if damage:
            raise SlideError(damage)
    with slide_open(path) as slide:
        props = slide.properties
        levels = tuple(
            (int(w), int(h), float(d))
            for (w, h), d in zip(slide.level_dimensions, slide.level_downsamples, strict=True)
        )
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
        file_mpp = _file_mpp(props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y))
        tile_w = _int_or_none(props.get("openslide.level[0].tile-width"))
        tile_h = _int_or_none(props.get("openslide.level[0].tile-height"))
        objective = _float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        quickhash = props.get(openslide.PROPERTY_NAME_QUICKHASH1) or ""
    width, height = levels[0][:2]
    if len(levels) < 2:
        raise SlideError(
            f"one level only: a slide must be pyramidal (a tiled image with reduced-resolution levels); "
            f"this {width} x {height} px image has no lower levels"
        )
    if width * height > max_pixels:
        raise SlideError(
            f"{width:,} x {height:,} px is larger than SLIDE_MAX_PIXELS ({max_pixels:,} pixels at level 0)"
        )
    if file_mpp is None and mpp is None:
        raise SlideError("no microns per pixel in the file: give mpp (the scanner's µm/px at full resolution)")
    if mpp is not None:
        _check_mpp(mpp, "the given mpp")
    if file_mpp is not None:
        _check_mpp(file_mpp, "the file's µm/px")
        if mpp is not None and abs(mpp - file_mpp) > MPP_TOLERANCE * file_mpp:
            raise SlideError(f"the file says {file_mpp:g} µm/px but {mpp:g} was given: leave mpp out or correct it")
    return SlideInfo(
        width=width,
        height=height,
        levels=levels,
        mpp=file_mpp if file_mpp is not None else float(mpp),  # type: ignore[arg-type]
        mpp_source="file" if file_mpp is not None else "given",
        vendor=vendor,
        container=("BigTIFF" if head[2] == 0x2B or head[3] == 0x2B else "TIFF") if is_tiff else path.suffix.lower(),
        tile_width=tile_w,
        tile_height=tile_h,
        objective_power=objective,
        quickhash=quickhash,
        size_bytes=size,
    )


def _check_mpp(value: float, what: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and MPP_MIN <= value <= MPP_MAX):
        raise SlideError(
            f"{what} ({value!r} µm/px) is not plausible: a slide scanner gives {MPP_MIN}-{MPP_MAX} µm/px "
            "(0.25 at 40x, 0.5 at 20x)"
        )


def _file_mpp(mpp_x: str | None, mpp_y: str | None) -> float | None:
    x, y = _float_or_none(mpp_x), _float_or_none(mpp_y)
    if x is None or x <= 0:
        return None
    if y is not None and y > 0 and abs(x - y) > MPP_TOLERANCE * x:
        raise SlideError(f"the file's pixels are not square ({x:g} x {y:g} µm): not supported")
    return x


def _float_or_none(value: str | None) -> float | None:
    try:
        result = float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None
    return result if result is not None and math.isfinite(result) else None


def _int_or_none(value: str | None) -> int | None:
    number = _float_or_none(value)
    return int(number) if number is not None else None


def _tiff_damage(path: Path, size: int) -> str | None:
    """Why a TIFF-based file is damaged (truncated: a directory or an image segment past its end),
    or None. Reads the directories only, never the image data."""
    import logging

    import tifffile

    # tifffile logs and stops at a directory offset past the end instead of raising: catch that.
    class _Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    collect = _Collect()
    logger.addHandler(collect)
    propagate, logger.propagate = logger.propagate, False
    try:
        with tifffile.TiffFile(path) as tiff:
            for page in tiff.pages:
                offsets, counts = page.dataoffsets, page.databytecounts  # type: ignore[union-attr]
                if offsets and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
                    return f"the file is truncated: its image data ends past byte {size:,}"
    except (tifffile.TiffFileError, struct.error, ValueError, IndexError, KeyError, EOFError, OSError) as exc:
        return f"the file is truncated or damaged: its TIFF structure cannot be read ({exc})"
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
    for message in collect.messages:
        if "offset" in message.lower() or "truncat" in message.lower() or "eof" in message.lower():
            return f"the file is truncated: a TIFF directory lies past its end ({message})"
    return None


def _unreadable_reason(path: Path) -> str:
    """The message for a file OpenSlide does not recognise, naming what it is when that is clear."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    for magic, what in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return (
                f"not a whole-slide image OpenSlide can read: the file is {what} "
                f"(whatever its name says); upload single images as patches"
            )
    if head[:4] in _TIFF_MAGIC:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tiff:
                pages = list(tiff.pages)
                tiled = any(getattr(p, "is_tiled", False) for p in pages)
        except Exception:  # any parse failure: the generic message below
            pages, tiled = [], True
        if len(pages) == 1 or not tiled:
            return (
                "one level only: a slide must be pyramidal (a tiled TIFF with reduced-resolution levels); "
                "this TIFF is a single image"
            )
    return (
        "not a whole-slide image OpenSlide can read (Aperio SVS, Hamamatsu NDPI, Leica SCN, MIRAX, "
        "Philips TIFF, Ventana BIF, Zeiss CZI, DICOM WSI or a tiled pyramidal TIFF)"
    )


# ---------------------------------------------------------------------------------------------
# Tissue detection
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over the whole slide at low resolution.

    Attributes:
        mask: bool (h, w); True where there is tissue.
        downsample: level-0 pixels per mask pixel (the same along x and y).
        mpp: µm per mask pixel.
        threshold: the saturation threshold used (0..1).
        level: the pyramid level it was computed from.
    """

    mask: np.ndarray
    downsample: float
    mpp: float
    threshold: float
    level: int

    @property
    def fraction(self) -> float:
        """Fraction of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _rgb_over_white(region: Image.Image) -> Image.Image:
    """RGB of an OpenSlide RGBA region, with transparent parts (no data, outside the slide) white."""
    alpha = region.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return region.convert("RGB")
    background = Image.new("RGB", region.size, (255, 255, 255))
    background.paste(region.convert("RGB"), mask=alpha)
    return background


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in 0..1 (the split that maximises between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = np.divide(sum0, weight0, out=np.zeros_like(sum0), where=weight0 > 0)
    mean1 = np.divide(sum0[-1] - sum0, weight1, out=np.zeros_like(sum0), where=weight1 > 0)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius, constant_values=False)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    # Outside the mask counts as tissue here, so tissue touching the slide's edge is not eaten.
    padded = np.pad(mask, radius, constant_values=True)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def mask_clean(mask: np.ndarray, radius: int = MORPHOLOGY_RADIUS) -> np.ndarray:
    """Fill small holes (closing) and then remove small specks (opening), with a square of side
    ``2 * radius + 1`` mask pixels; numpy only."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    closed = _erode(_dilate(mask, radius), radius)
    return _dilate(_erode(closed, radius), radius)


def tissue_detect(
    slide: openslide.OpenSlide,
    info: SlideInfo,
    *,
    target_mpp: float = MASK_MPP,
    block_px: int = MASK_BLOCK_PX,
) -> TissueMask:
    """Find the tissue on a low-resolution level, reading it in blocks.

    The level is the coarsest one at or finer than ``target_mpp``; its pixels are averaged in
    k x k squares (k = round(target_mpp / level mpp)) into mask pixels, whose saturation
    ``(max - min) / max`` of RGB is thresholded (Otsu, bounded to 0.07-0.15), dark pixels
    excluded; small holes are filled and specks removed (``mask_clean``).

    Args:
        slide: an open slide (``slide_open``); info: its ``slide_inspect`` result.
        target_mpp: about this many µm per mask pixel.
        block_px: side of the blocks read (level pixels); memory is about 4 x block_px² bytes.

    Returns:
        TissueMask.
    """
    level = 0
    for i in range(len(info.levels)):
        if info.level_mpp(i) <= target_mpp * (1 + LEVEL_TOLERANCE):
            level = i
    level_w, level_h, level_ds = info.levels[level]
    k = max(1, round(target_mpp / info.level_mpp(level)))
    mask_w, mask_h = math.ceil(level_w / k), math.ceil(level_h / k)
    # Saturation in 1/255 steps (uint8): a quarter of float32's memory, and Otsu bins by 1/256 anyway.
    saturation = np.zeros((mask_h, mask_w), dtype=np.uint8)
    dark = np.zeros((mask_h, mask_w), dtype=bool)
    step = max(1, block_px // k)  # mask pixels per block side
    for my in range(0, mask_h, step):
        for mx in range(0, mask_w, step):
            lx, ly = mx * k, my * k
            bw, bh = min(step * k, level_w - lx), min(step * k, level_h - ly)
            region = slide.read_region((round(lx * level_ds), round(ly * level_ds)), level, (bw, bh))
            rgb = _rgb_over_white(region)
            if k > 1:
                rgb = rgb.reduce(k)
            pixels = np.asarray(rgb)
            high, low = pixels.max(axis=2), pixels.min(axis=2)
            h, w = high.shape
            chroma = (high - low).astype(np.float32)
            chroma *= 255.0
            chroma /= np.maximum(high, 1)
            saturation[my : my + h, mx : mx + w] = np.round(chroma)
            dark[my : my + h, mx : mx + w] = high < DARK_MAX
    light = ~dark
    threshold = _otsu(saturation[light] / 255.0) if light.any() else 1.0
    threshold = min(max(threshold, MIN_SATURATION), MAX_SATURATION)
    mask = saturation >= math.ceil(threshold * 255 - 1e-9)
    mask &= light
    mask = mask_clean(mask)
    downsample = level_ds * k
    return TissueMask(mask=mask, downsample=downsample, mpp=info.mpp * downsample, threshold=threshold, level=level)


# ---------------------------------------------------------------------------------------------
# The tile grid
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping tiles at the model's µm/px over a slide, and which of them hold tissue.

    Attributes:
        cols, rows: the grid's shape (only whole tiles inside the slide).
        tile_px: model pixels per tile side. model_mpp: the model's µm/px.
        step: level-0 pixels per tile side (``tile_px * model_mpp / slide mpp``).
        level: the pyramid level tiles are read from; level_downsample: its downsample.
        coords: int32 (n, 2) of (col, row) of the tissue tiles, row-major.
        tissue_fraction: float32 (n,): fraction of each kept tile that is tissue (0..1).
    """

    cols: int
    rows: int
    tile_px: int
    model_mpp: float
    step: float
    level: int
    level_downsample: float
    coords: np.ndarray
    tissue_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)

    def boxes(self, coords: np.ndarray | None = None) -> np.ndarray:
        """int64 (n, 4) level-0 boxes (x0, y0, x1, y1) of tiles (default: the tissue tiles)."""
        coords = self.coords if coords is None else np.asarray(coords).reshape(-1, 2)
        x0 = np.round(coords[:, 0] * self.step)
        y0 = np.round(coords[:, 1] * self.step)
        x1 = np.round((coords[:, 0] + 1) * self.step)
        y1 = np.round((coords[:, 1] + 1) * self.step)
        return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def model_mpp_of(metadata: dict[str, Any], default: float | None = None) -> float:
    """The model's µm/px from its metadata (``um_per_px``), else ``default``.

    Raises:
        ValueError: neither says it.
    """
    value = metadata.get("um_per_px", default)
    if value is None:
        raise ValueError("the model's metadata has no um_per_px: give model_mpp")
    return float(value)


def read_level(info: SlideInfo, model_mpp: float) -> int:
    """The coarsest pyramid level whose resolution is still at least the model's (its µm/px at
    most ``model_mpp``); level 0 when even that is coarser (within ``MAX_COARSER``)."""
    best = 0
    for i in range(len(info.levels)):
        if info.level_mpp(i) <= model_mpp * (1 + LEVEL_TOLERANCE):
            best = i
    return best


def tile_grid(
    info: SlideInfo,
    mask: TissueMask,
    *,
    model_mpp: float,
    tile_px: int = DEFAULT_TILE_PX,
    min_tissue: float = DEFAULT_MIN_TISSUE,
) -> TileGrid:
    """The model's tile grid over the slide, keeping tiles with enough tissue.

    Args:
        info: the slide. mask: its tissue mask.
        model_mpp: the model's µm/px (``model_mpp_of(predictor.metadata)``; 0.5 for the demo model).
        tile_px: model input side in pixels.
        min_tissue: keep tiles whose tissue fraction is at least this (0..1).

    Returns:
        TileGrid with the kept tiles in row-major order.

    Raises:
        SlideError: the slide's resolution is too coarse for the model.
    """
    if info.mpp > model_mpp * MAX_COARSER:
        raise SlideError(
            f"the slide's {info.mpp:g} µm/px is coarser than the model's {model_mpp:g} µm/px: "
            "it cannot be analysed at the resolution the model was trained at"
        )
    step = tile_px * model_mpp / info.mpp
    cols, rows = int(info.width // step), int(info.height // step)
    fractions = _tile_fractions(mask, step, cols, rows)
    keep = fractions >= min_tissue
    rr, cc = np.nonzero(keep)  # row-major
    level = read_level(info, model_mpp)
    return TileGrid(
        cols=cols,
        rows=rows,
        tile_px=tile_px,
        model_mpp=float(model_mpp),
        step=float(step),
        level=level,
        level_downsample=info.levels[level][2],
        coords=np.stack([cc, rr], axis=1).astype(np.int32) if len(rr) else np.zeros((0, 2), np.int32),
        tissue_fraction=fractions[keep].astype(np.float32),
    )


def _tile_fractions(mask: TissueMask, step: float, cols: int, rows: int) -> np.ndarray:
    """Tissue fraction of every grid tile (rows, cols): the mask's exact area mean over each tile's
    footprint (mask pixels cut by a tile edge count by the part inside). One band of mask rows
    per grid row, so memory is that of a band, not of a slide-sized integral image."""
    m = mask.mask
    height, width = m.shape
    scale = mask.downsample
    xs = np.clip(np.round(np.arange(cols + 1) * step) / scale, 0, width)
    ys = np.clip(np.round(np.arange(rows + 1) * step) / scale, 0, height)
    # Integral of a piecewise-constant profile is piecewise linear: sample it at the tile edges.
    x_lo = np.minimum(np.floor(xs).astype(np.int64), max(width - 1, 0))
    ax = xs - x_lo
    fractions = np.zeros((rows, cols))
    for r in range(rows):
        y0, y1 = ys[r], ys[r + 1]
        first, last = math.floor(y0), min(math.ceil(y1), height)
        if last <= first or cols == 0:
            continue
        # Weight of each mask row: how much of it lies within [y0, y1).
        edges = np.arange(first, last + 1, dtype=np.float64)
        weights = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0.0, 1.0)
        profile = weights @ m[first:last].astype(np.float64)
        integral = np.concatenate([[0.0], np.cumsum(profile)])
        sampled = integral[x_lo] * (1 - ax) + integral[np.minimum(x_lo + 1, width)] * ax
        area = np.diff(xs) * (y1 - y0)
        fractions[r] = np.divide(np.diff(sampled), area, out=np.zeros(cols), where=area > 0)
    return np.clip(fractions, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Reading tiles
# ---------------------------------------------------------------------------------------------


# A direct reader must give OpenSlide's pixels: at most this mean absolute difference (0-255) on a
# tissue tile, checked when it is opened (a JPEG colour space the decoder took wrongly is ~50).
DIRECT_READ_TOLERANCE = 2.0


def tile_reader(
    path: str | Path, grid: TileGrid, *, level_size: Sequence[int], slide: openslide.OpenSlide | None = None
) -> JpegTiffLevel | None:
    """A direct reader of the grid's level when the slide is a tiled JPEG TIFF (Aperio SVS,
    generic pyramidal TIFF), for ``tile_image``; None otherwise (OpenSlide reads it).
    ``level_size``: (width, height) of ``grid.level`` (``info.levels[grid.level][:2]``).

    With ``slide``, the reader is first checked against OpenSlide on a tissue tile of the grid, and
    refused (None) if its pixels differ: a file whose JPEG data this reader misunderstands is
    read through OpenSlide, never analysed with wrong colours."""
    from inference.core.tiff_tiles import JpegTiffLevel

    reader = JpegTiffLevel.open(path, int(level_size[0]), int(level_size[1]))
    if reader is None or slide is None or not len(grid.coords):
        return reader
    col, row = (int(v) for v in grid.coords[len(grid.coords) // 2])
    try:
        direct = tile_image(slide, grid, col, row, reader)
    except (OSError, ValueError, SyntaxError):  # Pillow's errors for data it cannot decode
        reader.close()
        return None
    reference = tile_image(slide, grid, col, row)
    difference = np.abs(np.asarray(direct, np.int16) - np.asarray(reference, np.int16)).mean()
    if difference > DIRECT_READ_TOLERANCE:
        reader.close()
        return None
    return reader


def _direct(reader: JpegTiffLevel, grid: TileGrid, box: tuple[int, int, int, int]) -> Image.Image | None:
    """The tile from the file's own JPEG tiles, when its level box is whole pixels and 1, 2 or 4
    times the model's tile (decoded at that fraction); None when OpenSlide must read it."""
    ds = grid.level_downsample
    level_box = [v / ds for v in box]
    if any(abs(v - round(v)) > 1e-6 for v in level_box):
        return None
    lx0, ly0, lx1, ly1 = (round(v) for v in level_box)
    factor = (lx1 - lx0) / grid.tile_px
    if lx1 - lx0 != ly1 - ly0 or factor not in (1, 2, 4):
        return None
    scale = int(factor)
    if any(v % scale for v in (lx0, ly0, reader.tile_w, reader.tile_h)):
        return None
    return Image.fromarray(reader.region(lx0, ly0, lx1 - lx0, ly1 - ly0, scale=scale))


def tile_image(
    slide: openslide.OpenSlide, grid: TileGrid, col: int, row: int, reader: JpegTiffLevel | None = None
) -> Image.Image:
    """One grid tile as an RGB image of ``grid.tile_px`` square, read at ``grid.level`` and
    resampled (box filter for whole-number ratios, Lanczos otherwise).

    With ``reader`` (``tile_reader``), a tile whose box is 1, 2 or 4 times the model's tile at
    that level is decoded from the file's JPEG tiles directly, at that fraction of their size
    (the decoder's scaled IDCT instead of a box filter after a full decode); others, and every
    slide without a reader, are read through OpenSlide."""
    x0, y0, x1, y1 = (int(v) for v in grid.boxes(np.array([[col, row]]))[0])
    if reader is not None:
        image = _direct(reader, grid, (x0, y0, x1, y1))
        if image is not None:
            return image
    ds = grid.level_downsample
    size = (max(1, math.ceil((x1 - x0) / ds - 1e-6)), max(1, math.ceil((y1 - y0) / ds - 1e-6)))
    image = _rgb_over_white(slide.read_region((x0, y0), grid.level, size))
    if image.size == (grid.tile_px, grid.tile_px):
        return image
    factor = image.size[0] / grid.tile_px
    if image.size[0] == image.size[1] and factor == int(factor):
        return image.reduce(int(factor))
    return image.resize((grid.tile_px, grid.tile_px), Image.Resampling.LANCZOS)


def tile_read(slide: openslide.OpenSlide, grid: TileGrid, col: int, row: int) -> np.ndarray:
    """One grid tile as uint8 RGB (tile_px, tile_px, 3); see ``tile_image``."""
    return np.asarray(tile_image(slide, grid, col, row))


def tile_batches(
    slide: openslide.OpenSlide, grid: TileGrid, coords: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[np.ndarray]:
    """Tiles of ``coords`` ((n, 2) col, row) in order, as uint8 arrays (≤ batch_size, tile_px,
    tile_px, 3): memory is bounded by ``batch_size``, whatever the slide's size."""
    coords = np.asarray(coords).reshape(-1, 2)
    for start in range(0, len(coords), batch_size):
        part = coords[start : start + batch_size]
        batch = np.empty((len(part), grid.tile_px, grid.tile_px, 3), dtype=np.uint8)
        for i, (col, row) in enumerate(part):
            batch[i] = np.asarray(tile_image(slide, grid, int(col), int(row)))
        yield batch


# ---------------------------------------------------------------------------------------------
# Chunks of work and their analysis
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileChunk:
    """Tiles ``start:stop`` of a grid's coords: the unit a worker claims, by ``index``."""

    index: int
    start: int
    stop: int
    coords: np.ndarray

    def __len__(self) -> int:
        return self.stop - self.start


def chunks(coords: np.ndarray, size: int = DEFAULT_CHUNK_SIZE) -> list[TileChunk]:
    """Split the tile list into consecutive chunks of ``size`` (the last one shorter).

    Deterministic: the same coords and size give the same chunks, so chunk ``i`` means the same
    tiles to every worker.
    """
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    coords = np.asarray(coords).reshape(-1, 2)
    return [
        TileChunk(index=i, start=start, stop=min(start + size, len(coords)), coords=coords[start : start + size])
        for i, start in enumerate(range(0, len(coords), size))
    ]


@dataclass
class ChunkResult:
    """The analysis of one chunk.

    Attributes:
        index: the chunk's index. coords: int32 (n, 2) (col, row).
        probabilities: float32 (n, K) in the predictor's class order; NaN for tiles not assessed.
        status: uint8 (n,): TILE_DONE, TILE_UNASSESSABLE or TILE_FAILED.
        reasons: {tile position in the chunk: quality code or error} for tiles not done.
        seconds: wall time of the chunk.
    """

    index: int
    coords: np.ndarray
    probabilities: np.ndarray
    status: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


def chunk_analyse(
    predictor: Predictor,
    slide: openslide.OpenSlide,
    grid: TileGrid,
    chunk: TileChunk,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    read_threads: int | None = None,
    reader: JpegTiffLevel | None = None,
) -> ChunkResult:
    """Analyse one chunk's tiles through the served patch path: read -> quality check ->
    preprocess -> batched model (``pipeline.prepare_decoded`` / ``pipeline.infer``).

    Only ``batch_size`` tiles are in memory at once. A batch's tiles are read on ``read_threads``
    threads (default: one per core, at most 4): OpenSlide is thread-safe and decodes without the
    GIL, and decoding a 40x slide's JPEG tiles costs more than the model. ``reader``
    (``tile_reader``) reads a tiled JPEG TIFF's tiles directly (see ``tile_image``).
    """
    import time

    started = time.perf_counter()
    n = len(chunk.coords)
    probabilities = np.full((n, len(predictor.classes)), np.nan, dtype=np.float32)
    status = np.full(n, TILE_FAILED, dtype=np.uint8)
    reasons: dict[int, str] = {}
    threads = read_threads or min(4, len(os.sched_getaffinity(0)))

    def read(i: int) -> tuple[int, Image.Image | None, str]:
        col, row = (int(v) for v in chunk.coords[i])
        try:
            return i, tile_image(slide, grid, col, row, reader), ""
        except Exception as exc:  # OpenSlide raises its own errors for damaged tiles
            return i, None, f"tile cannot be read: {exc}"

    with ThreadPoolExecutor(threads, thread_name_prefix="slide-read") as pool:
        for start in range(0, n, batch_size):
            images: list[Image.Image] = []
            positions: list[int] = []
            for i, image, error in pool.map(read, range(start, min(start + batch_size, n))):
                if image is None:
                    reasons[i] = error
                else:
                    images.append(image)
                    positions.append(i)
            _batch_infer(predictor, images, positions, probabilities, status, reasons)
    return ChunkResult(
        index=chunk.index,
        coords=np.asarray(chunk.coords, dtype=np.int32),
        probabilities=probabilities,
        status=status,
        reasons=reasons,
        seconds=time.perf_counter() - started,
    )


def _batch_infer(predictor, images, positions, probabilities, status, reasons) -> None:  # noqa: PLR0917
    """Run one batch of read tiles through the patch path; write each tile's outcome at its position."""
    from inference.core.pipeline import DONE, UNASSESSABLE, infer, prepare_decoded

    outcomes = infer(predictor, *prepare_decoded(predictor, images))
    for i, outcome in zip(positions, outcomes, strict=True):
        if outcome.status == DONE and outcome.prediction is not None:
            status[i] = TILE_DONE
            probabilities[i] = [outcome.prediction.scores[c] for c in predictor.classes]
        elif outcome.status == UNASSESSABLE:
            status[i] = TILE_UNASSESSABLE
            reasons[i] = outcome.reason_code
        else:
            reasons[i] = outcome.reason


# ---------------------------------------------------------------------------------------------
# Per-slide results
# ---------------------------------------------------------------------------------------------


@dataclass
class SlideResults:
    """Per-slide arrays, one value per grid tile (compact: a 100,000-tile slide with 9 classes
    is under 2 MB).

    Attributes:
        classes: class names, in the order of the last axis of ``probabilities``.
        probabilities: float16 (rows, cols, K); NaN where not analysed.
        status: uint8 (rows, cols): TILE_NONE (no tissue), TILE_PENDING, TILE_DONE,
            TILE_UNASSESSABLE or TILE_FAILED.
        tissue: float16 (rows, cols): tissue fraction of each tile (0 outside the tissue tiles).
        step: level-0 pixels per tile side (to place tiles on the slide).
    """

    classes: tuple[str, ...]
    probabilities: np.ndarray
    status: np.ndarray
    tissue: np.ndarray
    step: float

    @property
    def total(self) -> int:
        """Tissue tiles to analyse."""
        return int(np.count_nonzero(self.status != TILE_NONE))

    @property
    def finished(self) -> int:
        """Tissue tiles with an outcome (done, unassessable or failed)."""
        return int(np.count_nonzero(self.status >= TILE_DONE))

    def class_map(self, name: str) -> np.ndarray:
        """float32 (rows, cols) probability of one class; NaN where not analysed."""
        return self.probabilities[..., self.classes.index(name)].astype(np.float32)


def results_new(grid: TileGrid, classes: Sequence[str]) -> SlideResults:
    """Empty results for a grid: every tissue tile pending."""
    status = np.zeros((grid.rows, grid.cols), dtype=np.uint8)
    tissue = np.zeros((grid.rows, grid.cols), dtype=np.float16)
    if len(grid.coords):
        status[grid.coords[:, 1], grid.coords[:, 0]] = TILE_PENDING
        tissue[grid.coords[:, 1], grid.coords[:, 0]] = grid.tissue_fraction
    return SlideResults(
        classes=tuple(classes),
        probabilities=np.full((grid.rows, grid.cols, len(classes)), np.nan, dtype=np.float16),
        status=status,
        tissue=tissue,
        step=grid.step,
    )


def results_add(results: SlideResults, chunk: ChunkResult) -> None:
    """Write one chunk's outcomes into the per-slide arrays (idempotent: a chunk added twice
    leaves the same arrays)."""
    cols, rows = chunk.coords[:, 0], chunk.coords[:, 1]
    results.probabilities[rows, cols] = chunk.probabilities.astype(np.float16)
    results.status[rows, cols] = chunk.status


def results_save(results: SlideResults) -> bytes:
    """The results as ``.npz`` bytes (compressed numpy arrays), for storage."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        classes=np.array(results.classes),
        probabilities=results.probabilities,
        status=results.status,
        tissue=results.tissue,
        step=np.array(results.step),
    )
    return buffer.getvalue()


def results_load(data: bytes) -> SlideResults:
    """Inverse of ``results_save``."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return SlideResults(
            classes=tuple(str(c) for c in arrays["classes"]),
            probabilities=arrays["probabilities"],
            status=arrays["status"],
            tissue=arrays["tissue"],
            step=float(arrays["step"]),
        )


# Colour ramp of the heatmap (probability 0 -> 1): blue, pale yellow, red (ColorBrewer RdYlBu).
_RAMP = np.array([[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67], [165, 0, 38]], dtype=np.float64)


def heatmap_rgba(results: SlideResults, class_name: str = "TUM") -> np.ndarray:
    """uint8 (rows, cols, 4): one pixel per tile, coloured by the class's probability (blue 0,
    yellow 0.5, red 1), opaque where analysed and transparent elsewhere (no tissue, pending,
    unassessable)."""
    values = results.class_map(class_name)
    analysed = (results.status == TILE_DONE) & np.isfinite(values)
    position = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(position.astype(np.int64), len(_RAMP) - 2)
    frac = (position - low)[..., None]
    rgb = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac
    rgba = np.zeros((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.round(rgb).astype(np.uint8)
    rgba[..., 3] = np.where(analysed, 255, 0)
    rgba[~analysed, :3] = 0
    return rgba


def heatmap_png(results: SlideResults, class_name: str = "TUM", *, scale: int = 1) -> bytes:
    """The heatmap (``heatmap_rgba``) as PNG bytes, each tile ``scale`` pixels square."""
    image = Image.fromarray(heatmap_rgba(results, class_name), mode="RGBA")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def tumour_fraction(results: SlideResults, *, class_name: str = "TUM", threshold: float = 0.5) -> float:
    """Fraction of the analysed tissue area whose tiles are tumour (probability >= threshold),
    each tile weighted by its tissue fraction; 0.0 when nothing was analysed.

    Args:
        threshold: the site's operating point for ``class_name`` (0..1).
    """
    done = results.status == TILE_DONE
    weights = results.tissue.astype(np.float64) * done
    total = weights.sum()
    if total <= 0:
        return 0.0
    tumour = np.nan_to_num(results.class_map(class_name)) >= threshold
    return float((weights * tumour).sum() / total)


@dataclass(frozen=True)
class Region:
    """A suspicious region: one grid tile, its level-0 box and its score (probability 0..1)."""

    col: int
    row: int
    x: int
    y: int
    width: int
    height: int
    score: float


def suspicious_regions(
    results: SlideResults,
    *,
    class_name: str = "TUM",
    k: int = DEFAULT_TOP_K,
    min_score: float = 0.0,
    separation: int = 1,
) -> list[Region]:
    """The ``k`` highest-scoring tiles, none within ``separation`` tiles of a better one
    (non-maximum suppression: with 1, no two are adjacent, diagonals included).

    Returns:
        Regions, best first; ties broken by row-major position (deterministic).
    """
    scores = results.class_map(class_name)
    valid = (results.status == TILE_DONE) & np.isfinite(scores) & (scores >= min_score)
    rr, cc = np.nonzero(valid)
    order = np.lexsort((cc, rr, -scores[rr, cc]))
    taken = np.zeros(scores.shape, dtype=bool)
    regions: list[Region] = []
    for i in order:
        if len(regions) >= k:
            break
        r, c = int(rr[i]), int(cc[i])
        r0, r1 = max(0, r - separation), r + separation + 1
        c0, c1 = max(0, c - separation), c + separation + 1
        if taken[r0:r1, c0:c1].any():
            continue
        taken[r, c] = True
        x0, y0 = round(c * results.step), round(r * results.step)
        x1, y1 = round((c + 1) * results.step), round((r + 1) * results.step)
        regions.append(Region(c, r, x0, y0, x1 - x0, y1 - y0, float(scores[r, c])))
    return regions


# ---------------------------------------------------------------------------------------------
# The whole slide in one process (tests, benchmarks, a notebook)
# ---------------------------------------------------------------------------------------------


def slide_analyse(
    predictor: Predictor,
    path: str | Path,
    *,
    mpp: float | None = None,
    model_mpp: float | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[SlideInfo, TissueMask, TileGrid, SlideResults]:
    """Inspect, detect tissue, tile and analyse every chunk of one slide here, in order.

    The platform spreads the chunks over workers instead; this runs the same functions.
    ``model_mpp`` defaults to the model's metadata (``um_per_px``).
    """
    info = slide_inspect(path, mpp=mpp, max_pixels=max_pixels)
    model_mpp = model_mpp if model_mpp is not None else model_mpp_of(predictor.metadata)
    with slide_open(path) as slide:
        mask = tissue_detect(slide, info)
        grid = tile_grid(info, mask, model_mpp=model_mpp, tile_px=predictor.input_size, min_tissue=min_tissue)
        results = results_new(grid, predictor.classes)
        reader = tile_reader(path, grid, level_size=info.levels[grid.level][:2], slide=slide)
        try:
            for chunk in chunks(grid.coords, chunk_size):
                results_add(results, chunk_analyse(predictor, slide, grid, chunk, batch_size=batch_size, reader=reader))
        finally:
            if reader is not None:
                reader.close()
    return info, mask, grid, results
