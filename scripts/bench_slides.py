"""Whole-slide analysis speed and memory on this machine, every figure measured in one run, with the
Django-free core (inference/core/slides.py), on slides written from real tiles:

(a) per tile: the slide path (read the region, resample 0.25 -> 0.5 µm/px, quality check, model)
    against today's patch path (stored bytes -> decode -> quality check -> model) on the same tiles,
    one process, all cores; ratio (target >= 0.8); and the same for a 20x (0.5 µm/px) slide, read
    without resampling. The slide path reads tiles as the workers do (the direct JPEG tile reader
    of a tiled TIFF, ``inference/core/tiff_tiles.py``); the same through OpenSlide is beside it;
(b) one slide (four times the tissue of (a)) in chunks of 256 tiles by one process against two
    processes taking alternate chunks, one model thread each, model loading included (ratio;
    target >= 1.7);
(c) time to the first result (inspect, tissue detection, grid, first chunk) and peak memory of a
    process analysing a slide, for a slide and the same tissue on 16 times the glass (peak RSS must
    not grow with slide size).

These are the figures of the code the platform's slide job runs in each worker;
``scripts/bench_slide_workers.py`` measures the job itself across real Celery workers.
Usage: python scripts/bench_slides.py [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODEL = ROOT / "inference" / "demo_model"
SHARED = ROOT.parent / "shared" / "data" / "crc-val-he-7k-png"
MPP = 0.25  # a 40x scan: read at level 0 and resampled 2:1 to the model's 0.5 µm/px


def layout(cells: int, tissue: int) -> list[list[str | None]]:
    """``cells`` x ``cells`` of glass with a ``tissue`` x ``tissue`` block of NORM holding a TUM core."""
    rows: list[list[str | None]] = [[None] * cells for _ in range(cells)]
    top = (cells - tissue) // 2
    for r in range(tissue):
        for c in range(tissue):
            core = tissue // 3 <= r < 2 * tissue // 3 and tissue // 3 <= c < 2 * tissue // 3
            rows[top + r][top + c] = "TUM" if core else "NORM"
    return rows


def slide_write(path: Path, cells: int, tissue: int, mpp: float = MPP) -> None:
    from inference.core.synthetic_slide import mosaic_slide_write, source_tiles

    root = SHARED if SHARED.is_dir() else ROOT / "tests" / "fixtures" / "patches"
    tiles = source_tiles(root, classes=("NORM", "TUM"))
    mosaic_slide_write(path, layout=layout(cells, tissue), tiles_by_class=tiles, mpp=mpp, seed=1)


def _grid(path: Path, predictor):
    from inference.core import slides

    info = slides.slide_inspect(path)
    with slides.slide_open(path) as slide:
        mask = slides.tissue_detect(slide, info)
        grid = slides.tile_grid(info, mask, model_mpp=slides.model_mpp_of(predictor.metadata))
    return info, grid


def per_tile(path: Path) -> dict:
    """(a): the same tiles through the slide path and through the patch path."""
    from inference.core import pipeline, slides
    from inference.core.model import Predictor

    predictor = Predictor(MODEL)
    info, grid = _grid(path, predictor)
    with slides.slide_open(path) as slide:
        reader = _reader(path, info, grid, slide)
        chunk = slides.chunks(grid.coords, len(grid.coords))[0]
        slides.chunk_analyse(predictor, slide, grid, slides.chunks(grid.coords[:64], 64)[0])  # warm up
        started = time.perf_counter()
        slides.chunk_analyse(predictor, slide, grid, chunk)
        openslide_s = time.perf_counter() - started
        started = time.perf_counter()
        slides.chunk_analyse(predictor, slide, grid, chunk, reader=reader)
        slide_s = time.perf_counter() - started
        stored = []  # as the platform stores an upload: re-encoded losslessly (BMP)
        for col, row in grid.coords:
            buffer = io.BytesIO()
            slides.tile_image(slide, grid, int(col), int(row)).save(buffer, format="BMP")
            stored.append(buffer.getvalue())
    started = time.perf_counter()
    for start in range(0, len(stored), slides.DEFAULT_BATCH_SIZE):
        pipeline.analyse(predictor, stored[start : start + slides.DEFAULT_BATCH_SIZE])
    patch_s = time.perf_counter() - started
    n = len(grid.coords)
    return {"tiles": n, "direct_reader": reader is not None, "slide_tiles_per_s": round(n / slide_s, 1),
            "openslide_tiles_per_s": round(n / openslide_s, 1), "patch_tiles_per_s": round(n / patch_s, 1),
            "slide_vs_patch": round(patch_s / slide_s, 3),
            "openslide_vs_patch": round(patch_s / openslide_s, 3)}  # fmt: skip


def _reader(path: Path, info, grid, slide):
    """The direct JPEG tile reader the platform's workers use, where the slide allows it."""
    from inference.core import slides

    return slides.tile_reader(path, grid, level_size=info.levels[grid.level][:2], slide=slide)


def _worker(path: str, indices: list[int], started_at: float, out) -> None:
    from inference.core import slides
    from inference.core.model import Predictor

    predictor = Predictor(MODEL, num_threads=1)
    info, grid = _grid(Path(path), predictor)
    all_chunks = slides.chunks(grid.coords, slides.DEFAULT_CHUNK_SIZE)
    with slides.slide_open(path) as slide:
        reader = _reader(Path(path), info, grid, slide)
        for i in indices:
            slides.chunk_analyse(predictor, slide, grid, all_chunks[i], read_threads=1, reader=reader)
    out.put(time.perf_counter() - started_at)


def processes(path: Path, count: int, n_chunks: int) -> float:
    """(b): wall time for ``count`` processes taking alternate chunks (model loading included)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    started = time.perf_counter()
    workers = [
        context.Process(target=_worker, args=(str(path), list(range(i, n_chunks, count)), started, queue))
        for i in range(count)
    ]
    for worker in workers:
        worker.start()
    ends = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return max(ends)


def _whole(path: str, out) -> None:
    """(c) in a process of its own: time to the first chunk's result, total, peak RSS."""
    from inference.core import slides
    from inference.core.model import Predictor

    predictor = Predictor(MODEL)
    started = time.perf_counter()
    info, grid = _grid(Path(path), predictor)
    first = None
    with slides.slide_open(path) as slide:
        reader = _reader(Path(path), info, grid, slide)
        results = slides.results_new(grid, predictor.classes)
        for chunk in slides.chunks(grid.coords, slides.DEFAULT_CHUNK_SIZE):
            slides.results_add(results, slides.chunk_analyse(predictor, slide, grid, chunk, reader=reader))
            first = first or time.perf_counter() - started
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    out.put({"pixels": f"{info.width} x {info.height}", "tiles": len(grid.coords), "first_result_s": round(first, 2),
             "total_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_kb / 1024, 1)})  # fmt: skip


def whole(path: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_whole, args=(str(path), queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(ROOT / "var" / "bench_slides.json"))
    parser.add_argument("--tissue", type=int, default=24, help="side of the tissue block, in model tiles")
    args = parser.parse_args()
    from inference.core import slides

    work = Path(tempfile.mkdtemp(prefix="cloudiopsy-bench-slides-"))
    small, large = work / "small.svs", work / "large.svs"
    print("writing slides ...", flush=True)
    slide_write(small, cells=args.tissue + 8, tissue=args.tissue)
    slide_write(large, cells=4 * (args.tissue + 8), tissue=args.tissue)
    result: dict = {
        "cpus": len(os.sched_getaffinity(0)),
        "mpp": MPP,
        "source": str(SHARED) if SHARED.is_dir() else "tests/fixtures/patches",
    }
    print("(a) per tile, a 40x (0.25 µm/px) and a 20x (0.5 µm/px) slide ...", flush=True)
    result["per_tile"] = per_tile(small)
    twenty = work / "small-20x.svs"
    slide_write(twenty, cells=args.tissue + 8, tissue=args.tissue, mpp=0.5)
    result["per_tile_20x"] = per_tile(twenty)
    print("(b) one process against two ...", flush=True)
    from inference.core.model import Predictor

    # Enough chunks (9 at the default) that the last one's wait does not dominate the ratio.
    wide = work / "wide.svs"
    slide_write(wide, cells=2 * args.tissue + 8, tissue=2 * args.tissue)
    _, grid = _grid(wide, Predictor(MODEL))
    n_chunks = len(slides.chunks(grid.coords, slides.DEFAULT_CHUNK_SIZE))
    one, two = processes(wide, 1, n_chunks), processes(wide, 2, n_chunks)
    result["scaling"] = {
        "chunks": n_chunks,
        "one_s": round(one, 2),
        "two_s": round(two, 2),
        "two_vs_one": round(one / two, 2),
    }
    print("(c) a slide and 16 times the glass around the same tissue ...", flush=True)
    result["small"], result["large"] = whole(small), whole(large)
    result["large_vs_small_peak_rss"] = round(result["large"]["peak_rss_mb"] / result["small"]["peak_rss_mb"], 2)
    result["targets"] = {"slide_vs_patch": 0.8, "two_vs_one": 1.7, "large_vs_small_peak_rss": "about 1"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tile, scaling = result["per_tile"], result["scaling"]
    print(f"\n(a) {tile['tiles']} tiles: slide path {tile['slide_tiles_per_s']}/s, "
          f"patch path {tile['patch_tiles_per_s']}/s = {tile['slide_vs_patch']}x (>= 0.8); "
          f"through OpenSlide {tile['openslide_tiles_per_s']}/s = {tile['openslide_vs_patch']}x")  # fmt: skip
    tile20 = result["per_tile_20x"]
    print(f"    20x slide: slide path {tile20['slide_tiles_per_s']}/s, patch path {tile20['patch_tiles_per_s']}/s "
          f"= {tile20['slide_vs_patch']}x; through OpenSlide {tile20['openslide_vs_patch']}x")  # fmt: skip
    print(f"(b) {scaling['chunks']} chunks: one process {scaling['one_s']} s, two {scaling['two_s']} s "
          f"= {scaling['two_vs_one']}x (>= 1.7)")  # fmt: skip
    for name in ("small", "large"):
        r = result[name]
        print(f"(c) {name} {r['pixels']} px, {r['tiles']} tiles: first result {r['first_result_s']} s, "
              f"total {r['total_s']} s, peak RSS {r['peak_rss_mb']} MB")  # fmt: skip
    print(f"    peak RSS large / small: {result['large_vs_small_peak_rss']}\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
