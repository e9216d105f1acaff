"""Real-format whole-slide images built from real H&E tiles, for tests and benchmarks (Django-free).

No public slide can be downloaded here, so slides are assembled: a 2-D ``layout`` of class names
(or None for empty glass) becomes a mosaic in which every cell is one real tile of that class
(rotated or flipped), resampled from the tile's own scale to the slide's µm/px, and written as a
tiled, pyramidal, JPEG-compressed TIFF with an Aperio-style image description (``MPP = 0.5``),
which OpenSlide opens as an Aperio slide with its levels and ``openslide.mpp-x``.

A cell covers ``tile_px`` pixels at ``grid_mpp`` (224 px at 0.5 µm/px: 112 µm, one tile of the
model's grid), so the returned ``MosaicTruth`` says which model-grid tiles hold which class: the
ground truth for tissue detection, tiling and the heatmap. The cell boundaries in level-0 pixels
are ``round(i * cell_px)``, the same rounding as ``slides.TileGrid``.

Writing streams: tiles are rendered and JPEG-encoded one TIFF tile at a time and handed to
tifffile as an iterator, so memory is bounded by the source tiles and one TIFF tile, not by the
slide's size. Tiles of empty glass reuse a few pre-encoded variants, so a mostly empty 40,000 px
square slide is written in seconds.

JPEG encoding: this environment has no ``imagecodecs`` (tifffile's codec package), so tiles are
encoded with Pillow (YCbCr, 4:2:0, as Aperio scanners write them), written as pre-encoded
segments, and the Compression (JPEG) and Photometric (YCbCr) tags are set afterwards with
tifffile's in-place tag overwrite.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.core.datasets import _KATHER2016_SLIDE, kather2016_um_per_px, scan_folder

# Near-white glass, slightly blue-grey as scanned glass is; well inside quality.py's background
# (grey >= 200, saturation <= 0.10) and far below any H&E tissue's saturation.
GLASS_RGB = (238, 237, 241)
GLASS_NOISE = 2.0  # standard deviation of the grey grain, 0..255 levels
TIFF_TILE = 256
_COMPRESSION_JPEG = 7
_PHOTOMETRIC_YCBCR = 6
_YCBCR_SUBSAMPLING = 530
_BACKGROUND_VARIANTS = 4
_ORIENTATIONS = 8  # 4 rotations x (flipped or not)


@dataclass(frozen=True)
class SourceTile:
    """One real tile: ``pixels`` uint8 RGB (h, w, 3) at ``mpp`` µm/px; ``name`` for the record."""

    pixels: np.ndarray
    mpp: float
    name: str = ""


@dataclass(frozen=True)
class MosaicTruth:
    """What a mosaic slide holds, cell by cell (one cell = one model-grid tile at ``grid_mpp``).

    Attributes:
        layout: rows of class names, None for empty glass.
        picks: (rows, cols, 2) int: index of the source tile in its class list and orientation
            (0-3: quarter turns counter-clockwise, 4-7: the same after a left-right flip); -1 for glass.
        sources: {class: [source tile names]}, in the order ``picks`` indexes.
        mpp: the slide's level-0 µm/px. grid_mpp, tile_px: the grid a cell covers.
        cell_px: level-0 pixels per cell side (``tile_px * grid_mpp / mpp``).
        width, height: level-0 size in pixels. downsamples: the pyramid levels written.
    """

    layout: tuple[tuple[str | None, ...], ...]
    picks: np.ndarray
    sources: dict[str, list[str]]
    mpp: float
    grid_mpp: float
    tile_px: int
    cell_px: float
    width: int
    height: int
    downsamples: tuple[int, ...]

    def is_class(self, name: str) -> np.ndarray:
        """Boolean (rows, cols): the cells of class ``name``."""
        return np.array([[cell == name for cell in row] for row in self.layout], dtype=bool)

    @property
    def tissue(self) -> np.ndarray:
        """Boolean (rows, cols): the cells holding tissue (any class)."""
        return np.array([[cell is not None for cell in row] for row in self.layout], dtype=bool)

    def to_json(self) -> dict[str, Any]:
        return {
            "layout": [list(row) for row in self.layout],
            "picks": self.picks.tolist(),
            "sources": self.sources,
            "mpp": self.mpp,
            "grid_mpp": self.grid_mpp,
            "tile_px": self.tile_px,
            "cell_px": self.cell_px,
            "width": self.width,
            "height": self.height,
            "downsamples": list(self.downsamples),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MosaicTruth:
        return cls(
            layout=tuple(tuple(row) for row in data["layout"]),
            picks=np.asarray(data["picks"], dtype=np.int64),
            sources={k: list(v) for k, v in data["sources"].items()},
            mpp=float(data["mpp"]),
            grid_mpp=float(data["grid_mpp"]),
            tile_px=int(data["tile_px"]),
            cell_px=float(data["cell_px"]),
            width=int(data["width"]),
            height=int(data["height"]),
            downsamples=tuple(int(d) for d in data["downsamples"]),
        )


def source_tiles(root: str | Path, classes: Sequence[str] | None = None) -> dict[str, list[SourceTile]]:
    """Load the real tiles of a folder-per-class dataset (``datasets.scan_folder``) with their scale.

    Kather 2016 tiles (file names with ``CRC-Prim-HE-``) keep their own scale, 0.495 µm/px at
    150 px, also when they sit in a folder of 0.5 µm/px NCT tiles (tests/fixtures/patches).

    Returns:
        {canonical class: [SourceTile]}, sorted by path.
    """
    found: dict[str, list[SourceTile]] = {}
    for image in scan_folder(root, tuple(classes) if classes else None):
        mpp = image.um_per_px
        if _KATHER2016_SLIDE.search(image.path.name):
            mpp = kather2016_um_per_px(image.path)
        if mpp is None:
            raise ValueError(f"{image.path}: the dataset does not say its µm/px")
        with Image.open(image.path) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        found.setdefault(image.label, []).append(SourceTile(pixels, float(mpp), image.path.name))
    return found


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """A view of ``pixels`` turned ``orientation % 4`` quarter turns, after a left-right flip when >= 4."""
    if orientation >= 4:
        pixels = pixels[:, ::-1]
    return np.rot90(pixels, orientation % 4)


def _fit(pixels: np.ndarray, size: int) -> np.ndarray:
    """Crop or mirror-extend (right and bottom) to ``size`` square, keeping pixel (0, 0) in place:
    a smaller tile (Kather 2016: 74 µm for a 112 µm cell) continues as its own mirror image, real
    texture at the right scale instead of a stretched or blank cell."""
    h, w = pixels.shape[:2]
    pixels = pixels[:size, :size]
    if h < size or w < size:
        pixels = np.pad(pixels, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="symmetric")
    return pixels


def _glass(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    grain = rng.normal(0.0, GLASS_NOISE, size=(height, width, 1)).astype(np.float32)
    return np.clip(np.asarray(GLASS_RGB, dtype=np.float32) + grain, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def default_downsamples(width: int, height: int, smallest: int = 1024) -> tuple[int, ...]:
    """Levels 1, 4, 16 ... until the smallest level's longer side is at most ``smallest`` px; at
    least two levels, since a slide must be pyramidal."""
    downsamples = [1, 4]
    while max(width, height) / downsamples[-1] > smallest:
        downsamples.append(downsamples[-1] * 4)
    return tuple(downsamples)


def mosaic_slide_write(
    path: str | Path,
    *,
    layout: Sequence[Sequence[str | None]] | np.ndarray,
    tiles_by_class: Mapping[str, Sequence[SourceTile]],
    mpp: float,
    tile_px: int = 224,
    grid_mpp: float = 0.5,
    downsamples: Sequence[int] | None = None,
    quality: int = 80,
    seed: int = 0,
    write_mpp: bool = True,
) -> MosaicTruth:
    """Write a tiled pyramidal TIFF (Aperio-style description, JPEG tiles) from real tiles.

    Args:
        path: the file to write (``.svs`` or ``.tiff``; OpenSlide reads both by content).
        layout: rows x cols of class names (keys of ``tiles_by_class``) or None (empty glass).
        tiles_by_class: the real tiles per class; each cell gets one at random (seeded), in one of
            8 orientations, resampled from its own µm/px to ``mpp`` with Lanczos.
        mpp: the slide's level-0 µm/px (0.1-2.0).
        tile_px, grid_mpp: one cell covers ``tile_px`` px at ``grid_mpp`` µm/px (the model grid).
        downsamples: pyramid levels as integer downsamples starting with 1 (default: 1, 4, 16 ...
            down to 1024 px or less).
        quality: JPEG quality of the tiles (1-95).
        seed: the random choices (tiles, orientations, glass grain) follow from it.
        write_mpp: False leaves ``MPP`` out of the description (a slide without µm/px, for tests).

    Returns:
        The truth: which cell holds which class and which source tile.
    """
    cells = np.empty(np.shape(layout)[:2], dtype=object)
    for r, row in enumerate(layout):
        for c, value in enumerate(row):
            cells[r, c] = None if value is None or value == "" else str(value)
    if cells.ndim != 2 or cells.size == 0:
        raise ValueError("layout must be a non-empty 2-D grid of class names")
    missing = {v for v in cells.flat if v is not None} - {k for k, v in tiles_by_class.items() if len(v)}
    if missing:
        raise ValueError(f"no source tiles for {', '.join(sorted(missing))}")
    if not 0.1 <= mpp <= 2.0:
        raise ValueError(f"mpp {mpp} is outside 0.1-2.0 µm/px")
    rows, cols = cells.shape
    cell_px = tile_px * grid_mpp / mpp
    width, height = round(cols * cell_px), round(rows * cell_px)
    downsamples = tuple(int(d) for d in (downsamples or default_downsamples(width, height)))
    if downsamples[0] != 1 or any(b <= a for a, b in itertools.pairwise(downsamples)):
        raise ValueError(f"downsamples must start at 1 and increase: {downsamples}")

    rng = np.random.default_rng(seed)
    picks = np.full((rows, cols, 2), -1, dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            if cells[r, c] is not None:
                picks[r, c] = (rng.integers(len(tiles_by_class[cells[r, c]])), rng.integers(_ORIENTATIONS))
    truth = MosaicTruth(
        layout=tuple(tuple(row) for row in cells.tolist()),
        picks=picks,
        sources={name: [t.name for t in tiles] for name, tiles in tiles_by_class.items() if name in set(cells.flat)},
        mpp=float(mpp),
        grid_mpp=float(grid_mpp),
        tile_px=int(tile_px),
        cell_px=float(cell_px),
        width=width,
        height=height,
        downsamples=downsamples,
    )

    import tifffile

    path = Path(path)
    # BigTIFF past 2 GiB of uncompressed pixels: the JPEG data stays well under it below that.
    bigtiff = width * height * 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        for level, d in enumerate(downsamples):
            shape = (math.ceil(height / d), math.ceil(width / d), 3)
            writer.write(
                _level_tiles(truth, cells, tiles_by_class, d, shape, quality, seed + 1 + level),
                shape=shape,
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression=None,
                description=_description(truth, shape, quality, write_mpp) if level == 0 else None,
                metadata=None,
                software=False,
                subfiletype=0 if level == 0 else 1,
                extratags=[(_YCBCR_SUBSAMPLING, "H", 2, (2, 2), True)],
            )
    # The segments are JPEG (YCbCr 4:2:0): say so in every level's tags.
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        for page in tiff.pages:
            page.tags["Compression"].overwrite(_COMPRESSION_JPEG)
            page.tags["PhotometricInterpretation"].overwrite(_PHOTOMETRIC_YCBCR)
    return truth


def _description(truth: MosaicTruth, shape: tuple[int, ...], quality: int, write_mpp: bool) -> str:
    # OpenSlide takes a TIFF whose description starts with "Aperio" as an Aperio slide and reads
    # the "|key = value" pairs; MPP becomes openslide.mpp-x/-y.
    h, w = shape[:2]
    fields = [
        f"Aperio Image Format (synthetic mosaic of real tiles, written by Cloudiopsy)\r\n"
        f"{w}x{h} [0,0 {w}x{h}] ({TIFF_TILE}x{TIFF_TILE}) JPEG/YCbCr Q={quality}",
        "Filename = synthetic-mosaic",
    ]
    if write_mpp:
        fields.append(f"MPP = {truth.mpp:.4f}")
    return "|".join(fields)


def _level_tiles(  # noqa: PLR0917 - private, called once
    truth: MosaicTruth,
    cells: np.ndarray,
    tiles_by_class: Mapping[str, Sequence[SourceTile]],
    d: int,
    shape: tuple[int, ...],
    quality: int,
    seed: int,
) -> Iterator[bytes]:
    """JPEG bytes of every TIFF tile of one level, row by row (tifffile's tile order)."""
    rng = np.random.default_rng(seed)
    height, width = shape[:2]
    rows, cols = cells.shape
    tissue = np.array([[v is not None for v in row] for row in cells], dtype=bool)
    # Cell boundaries at this level, rounded as the slide's level-0 grid is.
    col_edges = np.round(np.arange(cols + 1) * truth.cell_px / d).astype(np.int64)
    row_edges = np.round(np.arange(rows + 1) * truth.cell_px / d).astype(np.int64)
    cell_side = math.ceil(truth.cell_px / d) + 1
    glass = [_jpeg(_glass(rng, TIFF_TILE, TIFF_TILE), quality) for _ in range(_BACKGROUND_VARIANTS)]
    resized: dict[tuple[str, int], np.ndarray] = {}  # (class, source index) -> tile at this level's scale

    def scaled(name: str, index: int) -> np.ndarray:
        key = (name, index)
        if key not in resized:
            source = tiles_by_class[name][index]
            h, w = source.pixels.shape[:2]
            factor = source.mpp / (truth.mpp * d)
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            image = Image.fromarray(source.pixels)
            resized[key] = np.asarray(image.resize(size, Image.Resampling.LANCZOS) if size != (w, h) else image)
        return resized[key]

    for ty in range(math.ceil(height / TIFF_TILE)):
        y0 = ty * TIFF_TILE
        r_lo = max(0, int(np.searchsorted(row_edges, y0, "right")) - 1)
        r_hi = min(rows, int(np.searchsorted(row_edges, y0 + TIFF_TILE, "left")))
        for tx in range(math.ceil(width / TIFF_TILE)):
            x0 = tx * TIFF_TILE
            c_lo = max(0, int(np.searchsorted(col_edges, x0, "right")) - 1)
            c_hi = min(cols, int(np.searchsorted(col_edges, x0 + TIFF_TILE, "left")))
            if r_lo >= r_hi or c_lo >= c_hi or not tissue[r_lo:r_hi, c_lo:c_hi].any():
                yield glass[(tx * 7919 + ty * 104729) % _BACKGROUND_VARIANTS]
                continue
            canvas = _glass(rng, TIFF_TILE, TIFF_TILE)
            for r in range(r_lo, r_hi):
                for c in range(c_lo, c_hi):
                    if not tissue[r, c]:
                        continue
                    index, orientation = truth.picks[r, c]
                    patch = _fit(orient(scaled(cells[r, c], int(index)), int(orientation)), cell_side)
                    # The cell's part of this TIFF tile, clipped to the level's image.
                    cx0, cx1 = col_edges[c], min(col_edges[c + 1], width)
                    cy0, cy1 = row_edges[r], min(row_edges[r + 1], height)
                    ix0, ix1 = max(cx0, x0), min(cx1, x0 + TIFF_TILE)
                    iy0, iy1 = max(cy0, y0), min(cy1, y0 + TIFF_TILE)
                    if ix0 >= ix1 or iy0 >= iy1:
                        continue
                    canvas[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = patch[
                        iy0 - cy0 : iy1 - cy0, ix0 - cx0 : ix1 - cx0
                    ]
            yield _jpeg(canvas, quality)
