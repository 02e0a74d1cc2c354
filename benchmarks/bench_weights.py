"""Which trained weights and which prediction to hand the user, on MoNuSeg *train* images.

One training run per image (simulated strokes, a fixed number of steps, seed 0), then
Dice against the full mask for: the weights with the best held-out-stroke Dice
("best"), the last weights ("last"), the last weights predicting with flips, and the
last weights at other probability thresholds. ``--dense`` trains on the full mask
instead of strokes: how far a minute of training could go with perfect labels.
Training images only, so the test images of the interactive benchmark stay unseen.

    python benchmarks/bench_weights.py --images 0 7 14 21 --threads 1
    python benchmarks/bench_weights.py --images 0 7 14 21 --threads 1 --dense
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9)


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from napari_selfreg.bench.baselines import otsu_segment
    from napari_selfreg.bench.datasets import load_split
    from napari_selfreg.bench.interactive import stroke_seed
    from napari_selfreg.bench.strokes import simulate_strokes
    from napari_selfreg.core.config import ModelConfig, PredictConfig, TrainConfig
    from napari_selfreg.core.metrics import binary_dice
    from napari_selfreg.core.predict import predict
    from napari_selfreg.core.train import train_to_end

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[0, 7, 14, 21], help="MoNuSeg train indices")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense", action="store_true", help="train on the full mask (a ceiling), not strokes")
    parser.add_argument("--out", type=Path, help="JSON lines, one row per image (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def scored(labels: np.ndarray, truth: np.ndarray) -> dict:
        return {"dice": round(100 * binary_dice(labels, truth), 2), "area_ratio": round(labels.sum() / truth.sum(), 3)}

    split = load_split("monuseg")
    rows = []
    for index in args.images:
        sample = split.train[index]
        image, instances = sample.image(), sample.instances()
        truth = instances > 0
        strokes = simulate_strokes(instances, stroke_seed(sample.name, 0))
        painted = np.where(truth, 2, 1).astype(np.uint8) if args.dense else strokes
        result = train_to_end([image], [painted], TrainConfig(steps=args.steps, seed=0), ModelConfig())

        last = predict(result.last, image)
        flipped = predict(result.last, image, PredictConfig(flips=True), probabilities=False)
        row = {
            "image": sample.name, "steps": result.steps, "dense": args.dense,
            "best": scored(predict(result.best, image, probabilities=False).labels >= 2, truth),
            "last": scored(last.labels >= 2, truth),
            "last_flips": scored(flipped.labels >= 2, truth),
            "last_thresholds": {str(t): scored(last.probabilities[1] > t, truth)["dice"] for t in THRESHOLDS},
            "otsu": scored(otsu_segment(image, strokes) >= 2, truth),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    for key in ("best", "last", "last_flips", "otsu"):
        print(f"mean {key}: {np.mean([r[key]['dice'] for r in rows]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
