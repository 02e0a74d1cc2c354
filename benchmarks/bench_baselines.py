"""The interactive protocol's classic baselines as configured here and as the issue names them.

    python benchmarks/bench_baselines.py     # all 14 MoNuSeg test images, about 4 minutes

Otsu here thresholds the hematoxylin channel after a 1-pixel Gaussian (``otsu_segment``), and
the random forest's ``multiscale_basic_features`` start at sigma 1 (``ForestConfig``). The
issue names plain Otsu and the features' defaults (sigma from 0.5). This scores all four on
the same strokes as ``napari-selfreg bench interactive`` (seed 0), so that the goal's margin
can be read against either. Needs ../shared/data; exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_selfreg.bench.baselines import ForestConfig, otsu_segment, random_forest_segment
from napari_selfreg.bench.datasets import load_split
from napari_selfreg.bench.interactive import _load, _scores, stroke_seed
from napari_selfreg.bench.strokes import StrokeConfig, simulate_strokes

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "otsu_smoothed": lambda image, strokes: otsu_segment(image, strokes),
    "otsu_plain": lambda image, strokes: otsu_segment(image, strokes, smooth_sigma=0),
    "rf_sigma_from_1": lambda image, strokes: random_forest_segment(image, strokes, seed=0),
    "rf_sigma_from_0.5": lambda image, strokes: random_forest_segment(
        image, strokes, seed=0, config=ForestConfig(sigma_min=0.5)
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="only the first N test images")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "baselines.json")
    args = parser.parse_args(argv)
    try:
        samples = load_split("monuseg", None).test[: args.images]
    except FileNotFoundError as missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 2
    rows = []
    for sample in samples:
        image, instances = _load(sample, None)
        strokes = simulate_strokes(instances, stroke_seed(sample.name, 0), StrokeConfig())
        rows.append({"image": sample.name} | {
            name: _scores(segment(image, strokes), instances)["dice"] for name, segment in VARIANTS.items()
        })
        print(rows[-1], flush=True)
    means = {name: float(np.mean([r[name] for r in rows])) for name in VARIANTS}
    doc = {"command": " ".join(["python", *sys.argv]), "dataset": "monuseg", "seed": 0, "dice": means, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(means))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
