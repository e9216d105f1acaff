"""How many of a hospital's reviewed patches does local fine-tuning need? Measured, not assumed.

A "hospital" is simulated from one real source the parent model never saw: its NORM and TUM tiles
as one lab profile of ``inference.core.otherlab`` delivers them (stain, scale, focus, JPEG). Its
tiles are split by slide / near-duplicate group into a pool of "reviewed" patches and a test set
(other tiles). Then:

1. the parent is trained with recipe v3 on every other source (as the shipped model is, minus
   this source);
2. for each N in --sizes: the parent is fine-tuned (``train_model --init-from``'s recipe: low
   learning rates, base data mixed in) on N reviewed patches, and every model is scored on the
   test set: NORM-vs-TUM accuracy, tumour sensitivity, specificity, ROC AUC.

Usage: python scripts/local_finetune.py [--source kather2016-tfds-224] [--profile dark-blue-10x]
       [--sizes 0,16,32,64] [--views 4] [--json var/local_finetune.json]   (about 10 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from inference.core import evaluation, otherlab  # noqa: E402
from inference.core.datasets import CANONICAL_CLASSES, DEMO_SOURCES, DEMO_WEIGHTS, scan_folder  # noqa: E402
from inference.core.model import Predictor  # noqa: E402
from inference.core.preprocessing import preprocess  # noqa: E402
from inference.core.training import TrainingConfig, binary_figures, split_by_group, train_classifier  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / DEMO_WEIGHTS


def lab_views(tiles, profile, views: int, out: Path, seed: int) -> list[Path]:
    """Write ``views`` views of each tile as the profile's lab delivers them, folder per class."""
    by_class = defaultdict(list)
    for tile in tiles:
        by_class[tile.label].append(tile)
    written = []
    for k, tile in enumerate(tiles):
        mates = [m for m in by_class[tile.label] if m is not tile] or [tile]
        for v in range(views):
            order = iter(range(10**6))

            def same_class(mates=mates, order=order):
                mate = mates[next(order) % len(mates)]
                with Image.open(mate.path) as image:
                    return image.convert("RGB"), mate.um_per_px or 0.5

            with Image.open(tile.path) as image:
                view = otherlab.as_lab(
                    image.convert("RGB"), profile, um_per_px=tile.um_per_px or 0.5,
                    seed=seed + 100 * k + v, same_class=same_class,
                )  # fmt: skip
            path = out / tile.label / f"{tile.path.stem}-v{v}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            view.save(path, quality=95)
            written.append(path)
    (out / "dataset.json").write_text(json.dumps({"um_per_px": profile.um_per_px}))
    return written


def score(model_dir: Path, test) -> dict:
    predictor = Predictor(model_dir)
    scores, truth = [], []
    for start in range(0, len(test), 32):
        chunk = test[start : start + 32]
        images = []
        for item in chunk:
            with Image.open(item.path) as image:
                images.append(image.convert("RGB"))
        for item, prediction in zip(chunk, predictor.predict(preprocess(images, predictor.input_size)), strict=True):
            pair = np.array([[prediction.scores["NORM"], prediction.scores["TUM"]]])
            scores.append(float(evaluation.restrict_to_classes(pair, ["NORM", "TUM"], ["NORM", "TUM"])[0, 1]))
            truth.append(item.label == "TUM")
    return binary_figures(np.array(scores), np.array(truth))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="kather2016-tfds-224", help="The real source that plays the hospital.")
    parser.add_argument("--profile", default="dark-blue-10x", choices=[p.name for p in otherlab.PROFILES])
    parser.add_argument("--sizes", default="0,16,32,64", help="Numbers of reviewed patches to fine-tune on.")
    parser.add_argument("--views", type=int, default=4, help="Views per reviewed tile (different crops and noise).")
    parser.add_argument("--json", default=str(ROOT / "var" / "local_finetune.json"))
    args = parser.parse_args()
    if not SHARED.is_dir() or not WEIGHTS.is_file():
        print(f"{SHARED} is missing: this needs ../shared/data beside the checkout", file=sys.stderr)
        return 2
    profile = next(p for p in otherlab.PROFILES if p.name == args.profile)
    sizes = sorted({int(n) for n in args.sizes.split(",")})
    images = [i for name in DEMO_SOURCES for i in scan_folder(SHARED / name, CANONICAL_CLASSES)]
    base = [i for i in images if i.source != args.source]
    hospital = [i for i in images if i.source == args.source and i.label in {"NORM", "TUM"}]
    pool_tiles, _, test_tiles = split_by_group(hospital, 0.0, 0.4, seed=1)
    config = TrainingConfig(classes=CANONICAL_CLASSES, weights=str(WEIGHTS), test_fraction=0.0, name="parent")
    result = {
        "source": args.source,
        "profile": profile.name,
        "pool_tiles": len(pool_tiles),
        "test_tiles": len(test_tiles),
    }
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        lab_views(test_tiles, profile, args.views, tmp / "test", seed=50_000)
        lab_views(pool_tiles, profile, args.views, tmp / "reviews", seed=0)
        test = scan_folder(tmp / "test")
        pool = scan_folder(tmp / "reviews")
        rng = np.random.default_rng(1)
        by_class = {c: [pool[i] for i in rng.permutation(len(pool)) if pool[i].label == c] for c in ("NORM", "TUM")}
        # Stratified: the first n reviewed patches keep the hospital's NORM:TUM ratio.
        ordered = []
        while any(by_class.values()):
            for c in ("TUM", "NORM"):
                if by_class[c]:
                    ordered.append(by_class[c].pop())
        started = time.monotonic()
        train_classifier(base, config, tmp / "parent", progress=lambda line: print(f"[parent] {line}", flush=True))
        rows = {}
        for n in sizes:
            if n == 0:
                rows[0] = score(tmp / "parent", test)
            elif n <= len(ordered):
                tuned = replace(
                    config, init_from=str(tmp / "parent"), head_epochs=10, fine_tune_epochs=5,
                    head_learning_rate=2e-4, fine_tune_learning_rate=2e-5, name=f"tuned-{n}",
                )  # fmt: skip
                train_classifier(
                    base + ordered[:n],
                    tuned,
                    tmp / f"tuned-{n}",
                    progress=lambda line, n=n: print(f"[{n}] {line}", flush=True),
                )
                rows[n] = score(tmp / f"tuned-{n}", test)
            else:
                continue
            print(f"reviewed patches {n}: {rows[n]}", flush=True)
        result["by_reviewed_patches"] = rows
        result["seconds"] = round(time.monotonic() - started)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.source} as {profile.name}: {len(pool_tiles)} tiles to review, {len(test_tiles)} test tiles")
    print(f"{'reviewed':>8} {'acc':>6} {'sens':>6} {'spec':>6} {'AUC':>6}")
    for n, f in rows.items():
        auc = f.get("roc_auc", float("nan"))
        print(f"{n:>8} {f['accuracy']:>6.3f} {f['sensitivity']:>6.3f} {f['specificity']:>6.3f} {auc:>6.3f}")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
