"""Benchmark of the analysis path on real patches, all rates measured in one run.

(a) naive: one Keras ``model.predict`` call per image, as a per-request handler would do;
(b) served: the worker's path (bytes -> decode -> quality check -> preprocess -> batched LiteRT
    inference -> calibrated results with heatmaps), ``inference.core.pipeline.analyse``;
(c) kernel: LiteRT inference alone on preprocessed batches (the ceiling for (b));
plus single-patch latency of the served path and the resident memory of a worker-like process.

Usage: python scripts/bench.py [--model DIR] [--data DIR]... [--patches N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from inference.core import pipeline  # noqa: E402
from inference.core.datasets import scan_folder  # noqa: E402
from inference.core.model import MODEL_FILE, Predictor  # noqa: E402
from inference.core.preprocessing import decode_rgb, encode_for_storage, preprocess  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_DATA = ["crc-val-he-7k-png", "nct-crc-he-100k-samples", "kather2016-tfds-224", "kather2016-tiles-150"]
WORKER_RSS = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from inference.core import pipeline
from inference.core.model import Predictor
predictor = Predictor({model!r})
from inference.core.preprocessing import decode_rgb, encode_for_storage
payloads = [encode_for_storage(decode_rgb(Path(p).read_bytes())) for p in {files!r}]
for _ in range(3):
    pipeline.analyse(predictor, payloads)
# VmHWM: this process's peak resident memory (ru_maxrss would include the parent's before exec).
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "inference" / "demo_model"))
    parser.add_argument("--data", action="append", help="Dataset roots (default: the real samples in ../shared/data).")
    parser.add_argument("--patches", type=int, default=640, help="Patches through the served path and the kernel.")
    parser.add_argument("--naive", type=int, default=48, help="Images through the naive per-image path.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=str(ROOT / "var" / "bench.json"))
    args = parser.parse_args()

    roots = args.data or [str(SHARED / name) for name in DEFAULT_DATA if (SHARED / name).is_dir()]
    if not roots:
        roots = [str(ROOT / "tests" / "fixtures" / "patches")]
        print("../shared/data not found: benchmarking on the committed fixture patches", file=sys.stderr)
    files = [image.path for root in roots for image in scan_folder(root)]
    uploads = [path.read_bytes() for path in files]
    # The worker reads patches as the upload stored them (re-encoded in the storage format).
    payloads = [encode_for_storage(decode_rgb(data)) for data in uploads]
    corpus = [payloads[i % len(payloads)] for i in range(args.patches)]
    print(f"{len(files)} real patches from {len(roots)} folder(s), cycled to {len(corpus)}", flush=True)

    predictor = Predictor(args.model)  # LiteRT serving copy, as the worker loads it
    size = predictor.input_size

    # (c) the kernel: LiteRT on tensors already decoded and preprocessed.
    tensors = preprocess([decode_rgb(p) for p in corpus], size)
    predictor.raw(tensors[: args.batch])  # warm-up, allocates the batch
    started = time.perf_counter()
    for start in range(0, len(tensors), args.batch):
        chunk = tensors[start : start + args.batch]
        if len(chunk) == args.batch:
            predictor.raw(chunk)
    kernel_rate = rate(len(tensors) // args.batch * args.batch, time.perf_counter() - started)

    # (b) the served path, exactly as the worker runs it.
    pipeline.analyse(predictor, corpus[: args.batch])
    started = time.perf_counter()
    outcomes = []
    for start in range(0, len(corpus), args.batch):
        outcomes += pipeline.analyse(predictor, corpus[start : start + args.batch])
    served_rate = rate(len(corpus), time.perf_counter() - started)
    unassessable = sum(o.status != pipeline.DONE for o in outcomes)

    # Single-patch latency of the served path (one patch per call; the batch of 1 is allocated once).
    pipeline.analyse(predictor, corpus[:1])
    latencies = []
    for payload in corpus[:200]:
        started = time.perf_counter()
        pipeline.analyse(predictor, [payload])
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]

    # (a) the naive design: Keras model, one predict() per image.
    import keras

    model = keras.saving.load_model(Path(args.model) / MODEL_FILE, compile=False)
    model.predict(tensors[:1], verbose=0)
    started = time.perf_counter()
    for payload in corpus[: args.naive]:
        model.predict(preprocess([decode_rgb(payload)], size), verbose=0)
    naive_rate = rate(args.naive, time.perf_counter() - started)

    worker_script = WORKER_RSS.format(root=str(ROOT), model=args.model, files=list(map(str, files[:64])))
    worker_rss = float(
        subprocess.run(
            [sys.executable, "-c", worker_script],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()},
        "model": str(args.model),
        "patches": len(corpus),
        "distinct_patches": len(files),
        "batch": args.batch,
        "naive_per_image_predict_per_s": round(naive_rate, 1),
        "served_path_per_s": round(served_rate, 1),
        "kernel_per_s": round(kernel_rate, 1),
        "served_vs_naive": round(served_rate / naive_rate, 1),
        "served_vs_kernel": round(served_rate / kernel_rate, 3),
        "latency_ms_p50": round(p50, 2),
        "latency_ms_p95": round(p95, 2),
        "unassessable_in_served_run": unassessable,
        "worker_max_rss_mb": round(worker_rss, 1),
        "targets": {"served_vs_naive": 30, "served_vs_kernel": 0.6},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("(a) naive: Keras predict per image", f"{naive_rate:9.1f} patches/s"),
        ("(b) served path (worker)", f"{served_rate:9.1f} patches/s"),
        ("(c) LiteRT kernel (ceiling)", f"{kernel_rate:9.1f} patches/s"),
        ("served / naive", f"{served_rate / naive_rate:9.1f} x    (target >= 30)"),
        ("served / kernel", f"{100 * served_rate / kernel_rate:9.1f} %    (target >= 60)"),
        ("single-patch latency p50 / p95", f"{p50:.2f} / {p95:.2f} ms"),
        ("worker resident memory (max)", f"{worker_rss:9.1f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
