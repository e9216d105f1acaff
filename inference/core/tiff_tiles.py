"""Reading a pyramid level of a tiled JPEG TIFF directly: the file's own JPEG tiles, each decoded
once (and, for a tile read at half its resolution, decoded at half size inside the JPEG decoder).

OpenSlide reads any region of any format through one general path (decode to premultiplied ARGB,
composite, convert), which on a 40x slide costs about four times a plain JPEG decode of the same
pixels, and a grid tile that straddles file tiles decodes those again for its neighbours. Most
slides that hospitals scan are tiled TIFFs of JPEG tiles (Aperio SVS, generic pyramidal TIFF), so
for them the slide path reads tiles here, and falls back to OpenSlide for everything else (JPEG
2000, other containers, a level that is not a plain tiled page, a resampling ratio other than
1, 2 or 4). The pixels are those of the same JPEG data, decoded by the same libjpeg(-turbo);
``tests/test_slides_core.py`` compares them with OpenSlide's.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

COMPRESSION_JPEG = 7
PHOTOMETRIC_RGB = 2
PHOTOMETRIC_YCBCR = 6
# An Adobe APP14 segment with transform 0: tells the JPEG decoder the components are R, G, B, as
# the TIFF's photometric tag says (which the decoder never sees; OpenSlide obeys the tag too).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
DEFAULT_CACHE_BYTES = 96 * 1024 * 1024  # decoded tiles kept: a few rows of a wide slide's file tiles


class JpegTiffLevel:
    """One pyramid level of a tiled JPEG TIFF, read tile by tile. Thread-safe.

    Use ``JpegTiffLevel.open(path, width, height)``; None when the level cannot be read this way.
    """

    def __init__(self, path: Path, page, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.across = -(-self.width // self.tile_w)
        self.offsets = [int(v) for v in page.dataoffsets]
        self.counts = [int(v) for v in page.databytecounts]
        tables = page.jpegtables
        self._tables = bytes(tables)[2:-2] if tables else b""  # between SOI and EOI
        self._adobe = _ADOBE_RGB if int(page.photometric) == PHOTOMETRIC_RGB else b""
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, width: int, height: int) -> JpegTiffLevel | None:
        """The reader of the tiled JPEG page of ``width`` x ``height`` pixels, or None."""
        import tifffile

        try:
            with tifffile.TiffFile(path) as tiff:
                for page in tiff.pages:
                    if (int(page.imagewidth), int(page.imagelength)) != (width, height):
                        continue
                    if (
                        page.is_tiled
                        and int(page.compression) == COMPRESSION_JPEG
                        and int(page.photometric) in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR)
                        and int(page.samplesperpixel) == 3
                        and int(page.planarconfig) == 1
                        and int(page.bitspersample) == 8
                        and page.tiledepth == 1
                        and len(page.dataoffsets) == -(-width // page.tilewidth) * -(-height // page.tilelength)
                    ):
                        return cls(Path(path), page)
                    return None
        except (tifffile.TiffFileError, OSError, ValueError, KeyError):
            return None
        return None

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - at interpreter exit the os module may be gone already
            pass

    def _tile(self, tx: int, ty: int, scale: int) -> np.ndarray:
        """File tile (tx, ty) as uint8 RGB, decoded at 1/scale of its size (a JPEG decoder's
        scaled IDCT: each output pixel from a scale x scale block)."""
        key = (tx, ty, scale)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        index = ty * self.across + tx
        raw = os.pread(self._fd, self.counts[index], self.offsets[index])
        body = raw[2:]
        if self._adobe and body[:2] == b"\xff\xe0" and body[4:9] == b"JFIF\x00":
            # A JFIF marker makes the decoder take the data as YCbCr whatever else it is told.
            body = body[2 + int.from_bytes(body[2:4], "big") :]
        raw = raw[:2] + self._tables + self._adobe + body
        with Image.open(io.BytesIO(raw), formats=["JPEG"]) as image:
            if scale > 1:
                image.draft("RGB", (self.tile_w // scale, self.tile_h // scale))
            tile = np.asarray(image.convert("RGB"))
        expected = (self.tile_h // scale, self.tile_w // scale)
        if tile.shape[:2] != expected:  # a decoder that did not scale as asked
            tile = np.asarray(Image.fromarray(tile).resize(expected[::-1], Image.Resampling.BOX))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached_bytes += tile.nbytes
                while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached_bytes -= old.nbytes
        return tile

    def region(self, x: int, y: int, width: int, height: int, scale: int = 1) -> np.ndarray:
        """uint8 RGB (height / scale, width / scale, 3) of the level's pixels [x, x + width) x
        [y, y + height), at 1/scale resolution (scale 1, 2 or 4, dividing x, y, width, height and
        the tile size). Pixels outside the level are white."""
        if scale not in (1, 2, 4) or any(v % scale for v in (x, y, width, height, self.tile_w, self.tile_h)):
            raise ValueError(f"scale {scale} does not divide the region and the tile size")
        out = np.full((height // scale, width // scale, 3), 255, dtype=np.uint8)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        for ty in range(max(y, 0) // self.tile_h, -(-y1 // self.tile_h)):
            for tx in range(max(x, 0) // self.tile_w, -(-x1 // self.tile_w)):
                tile = self._tile(tx, ty, scale)
                # The part of this file tile inside the region, in level pixels.
                left, top = max(x, tx * self.tile_w), max(y, ty * self.tile_h)
                right, bottom = min(x1, (tx + 1) * self.tile_w), min(y1, (ty + 1) * self.tile_h)
                if right <= left or bottom <= top:
                    continue
                out[(top - y) // scale : (bottom - y) // scale, (left - x) // scale : (right - x) // scale] = tile[
                    (top - ty * self.tile_h) // scale : (bottom - ty * self.tile_h) // scale,
                    (left - tx * self.tile_w) // scale : (right - tx * self.tile_w) // scale,
                ]
        return out
