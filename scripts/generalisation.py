"""How well does a training recipe generalise to a lab it has never seen? One command, two protocols.

For each recipe (default: v2, the recipe of demo model v2, and v3, the lab-robust recipe), on the
real samples in ../shared/data:

1. leave one dataset out: train on all sources but one, test on the one left out (another lab,
   scanner, stain and scale); NORM vs TUM figures pooled over every held-out source;
2. simulated other labs (``inference.core.otherlab``): the same held-out NORM and TUM tiles as four
   fixed lab profiles would deliver them (stain, 0.25-0.8 µm/px, focus, JPEG 30-80).

The figures are the NORM-vs-TUM readout of the 9-class model (scores restricted to NORM and TUM,
called tumour at 0.5): accuracy, tumour sensitivity, specificity and ROC AUC.

Usage: python scripts/generalisation.py [--recipe v2] [--recipe v3[:key=value,...]] [--json OUT]
       (about 5 minutes per recipe on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from inference.core.datasets import CANONICAL_CLASSES, DEMO_SOURCES, DEMO_WEIGHTS, scan_folder  # noqa: E402
from inference.core.training import TrainingConfig, leave_one_dataset_out, pooled_generalisation  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / DEMO_WEIGHTS


def recipe_config(spec: str) -> tuple[str, TrainingConfig]:
    """``v3`` or ``v3:fine_tune_epochs=0,stain_intensity=0.3`` -> (label, config)."""
    recipe, _, overrides = spec.partition(":")
    if recipe not in {"v2", "v3"}:
        raise SystemExit(f"unknown recipe {recipe!r}: v2 or v3")
    known = {f.name: f.type for f in fields(TrainingConfig)}
    values: dict = {}
    for item in filter(None, overrides.split(",")):
        key, _, raw = item.partition("=")
        if key not in known:
            raise SystemExit(f"unknown setting {key!r} in {spec!r}")
        values[key] = json.loads(raw) if raw[:1] in "[{0123456789-" else raw
        if isinstance(values[key], list):
            values[key] = tuple(values[key])
    return spec, TrainingConfig(classes=CANONICAL_CLASSES, weights=str(WEIGHTS), recipe=recipe, **values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", help="v2, v3, or v3:key=value,... (repeat; default v2 and v3)")
    parser.add_argument("--data", action="append", help="Dataset roots (default: the real samples in ../shared/data)")
    parser.add_argument("--json", default=str(ROOT / "var" / "generalisation.json"))
    args = parser.parse_args()
    roots = args.data or [str(SHARED / name) for name in DEMO_SOURCES]
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing or not WEIGHTS.is_file():
        print(
            f"missing: {', '.join(missing) or WEIGHTS} (this needs ../shared/data beside the checkout)", file=sys.stderr
        )
        return 2
    images = [image for root in roots for image in scan_folder(root, CANONICAL_CLASSES)]
    results = {}
    for spec in args.recipe or ["v2", "v3"]:
        label, config = recipe_config(spec)
        started = time.monotonic()
        lodo = leave_one_dataset_out(
            images, config, progress=lambda line, label=label: print(f"[{label}] {line}", flush=True)
        )
        results[label] = {
            "pooled": pooled_generalisation(lodo),
            "per_source": {
                source: {
                    "norm_vs_tum_images": row.get("norm_vs_tum_images"),
                    "norm_vs_tum_accuracy": row.get("norm_vs_tum_accuracy"),
                    "nine_class_accuracy": row["accuracy"],
                    "simulated_other_lab": row.get("simulated_other_lab"),
                }
                for source, row in lodo.items()
            },
            "seconds": round(time.monotonic() - started),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"{'recipe':<28} {'protocol':<22} {'n':>4} {'acc':>6} {'sens':>6} {'spec':>6} {'AUC':>6}")
    for label, result in results.items():
        for protocol, figures in result["pooled"].items():
            rows = [(protocol, figures)] + [(f"  {p}", f) for p, f in figures.get("per_profile", {}).items()]
            for name, f in rows:
                print(
                    f"{label:<28} {name:<22} {f['images']:>4} {f['accuracy']:>6.3f} {f['sensitivity']:>6.3f} "
                    f"{f['specificity']:>6.3f} {f.get('roc_auc', float('nan')):>6.3f}"
                )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
