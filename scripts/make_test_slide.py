"""Write the committed test slide, tests/fixtures/slides/mosaic-small.tiff, and its truth (.json).

A 16 x 11 mosaic of real H&E tiles from tests/fixtures/patches (CRC-VAL-HE-7K, NCT-CRC-HE-100K
and Kather 2016; see that folder's ATTRIBUTION.md) at 0.5 µm/px: empty glass around an oval of
normal mucosa (NORM tiles) with a tumour region (TUM tiles) in its upper right part. Each cell is
one model-grid tile (224 px at 0.5 µm/px), so the truth says which grid tiles are tumour.
Written as an Aperio-style tiled pyramidal TIFF with JPEG tiles (levels 1, 4, 16) that OpenSlide
opens. The output is the same on every run (seeded).

    .venv/bin/python scripts/make_test_slide.py [--out tests/fixtures/slides]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.core.synthetic_slide import mosaic_slide_write, source_tiles  # noqa: E402

ROWS, COLS = 11, 16
MPP = 0.5
SEED = 12


def layout() -> list[list[str | None]]:
    """Glass, an oval of NORM, and a TUM region (an oval too) in its upper right."""
    cells: list[list[str | None]] = []
    for r in range(ROWS):
        row: list[str | None] = []
        for c in range(COLS):
            tissue = ((c - 7.5) / 7.0) ** 2 + ((r - 5.0) / 4.6) ** 2 <= 1.0
            tumour = ((c - 10.0) / 2.6) ** 2 + ((r - 3.5) / 1.9) ** 2 <= 1.0
            row.append(("TUM" if tumour else "NORM") if tissue else None)
        cells.append(row)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "slides", help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tiles = source_tiles(ROOT / "tests" / "fixtures" / "patches", classes=("NORM", "TUM"))
    slide = args.out / "mosaic-small.tiff"
    truth = mosaic_slide_write(
        slide, layout=layout(), tiles_by_class=tiles, mpp=MPP, downsamples=(1, 4, 16), quality=80, seed=SEED
    )
    record = {
        "about": "Truth of mosaic-small.tiff, written by scripts/make_test_slide.py: one cell per model-grid "
        "tile (tile_px at grid_mpp); layout rows of class names, null for empty glass.",
        **truth.to_json(),
        "counts": {
            "tissue": int(truth.tissue.sum()),
            "TUM": int(truth.is_class("TUM").sum()),
            "NORM": int(truth.is_class("NORM").sum()),
        },
    }
    (args.out / "mosaic-small.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{slide}: {slide.stat().st_size:,} bytes, {truth.width} x {truth.height} px, {record['counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
