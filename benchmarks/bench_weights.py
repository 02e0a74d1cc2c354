"""Which trained weights and which prediction to hand the user, on MoNuSeg *train* images.

One training run per image (simulated strokes, a fixed number of steps, seed 0), then
Dice against the full mask for:
- "best": the weights with the best Dice on held-out strokes; "last": the last weights;
- "last_flips": the last weights predicting with flips (``PredictConfig.flips``);
- "last_bn": the last weights with BatchNorm statistics re-estimated over 64 batches of
  the training sampler (the running averages follow only the last ~10 batches of 4 patches);
- "pair": the mean probability of best and last; "snapshots": the mean probability of
  the weights at 50 %, 62.5 %, 75 %, 87.5 % and 100 % of the steps.
``--dense`` trains on the full mask instead of strokes: how far the same training could
go with perfect labels. Training images by default, so the choices made here never saw the
interactive test images; ``--split test`` measures the full-mask ceiling on those test
images (an oracle for the interactive goal, which chooses nothing).

    python benchmarks/bench_weights.py --images 0 7 14 21 --threads 1
    python benchmarks/bench_weights.py --images 0 7 --threads 1 --dense
    python benchmarks/bench_weights.py --split test --images 0 1 2 3 4 5 6 --threads 1 --dense
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from napari_selfreg.bench.baselines import otsu_segment
    from napari_selfreg.bench.datasets import SharedDataMissing, load_split
    from napari_selfreg.bench.interactive import protocol_strokes
    from napari_selfreg.core.config import ModelConfig, PredictConfig, TrainConfig
    from napari_selfreg.core.data import PatchSampler, PatchSet, intensity_range, normalize
    from napari_selfreg.core.metrics import binary_dice
    from napari_selfreg.core.predict import predict
    from napari_selfreg.core.train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[0, 7, 14, 21], help="MoNuSeg indices in --split")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense", action="store_true", help="train on the full mask (a ceiling), not strokes")
    parser.add_argument("--out", type=Path, help="JSON lines, one row per image (default: print only)")
    parser.add_argument("--data", type=Path, help="the folder holding monuseg/ (default: ../shared/data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def scored(labels: np.ndarray, truth: np.ndarray) -> dict:
        return {"dice": round(100 * binary_dice(labels, truth), 2), "area_ratio": round(labels.sum() / truth.sum(), 3)}

    def recalibrated(model, image: np.ndarray, painted: np.ndarray):
        """BatchNorm statistics averaged over 64 batches of the training distribution."""
        copy = model.clone()
        x = normalize(image, copy.info.normalization, intensity_range(image, copy.info.normalization))
        sampler = PatchSampler(PatchSet([x], [painted]), 128, np.random.default_rng(1))
        norms = [m for m in copy.network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        copy.network.train()
        with torch.no_grad():
            for _ in range(64):
                copy.network(torch.from_numpy(sampler.batch(4)[0]))
        for norm in norms:
            norm.momentum = 0.1
        copy.network.eval()
        return copy

    def probability(model, image: np.ndarray) -> np.ndarray:
        return predict(model, image).probabilities[1]

    try:
        split = load_split("monuseg", args.data)
    except SharedDataMissing as missing:
        print(f"skipped: {missing}; or pass --data", file=sys.stderr)
        return 2
    rows = []
    for index in args.images:
        sample = getattr(split, args.split)[index]
        image, instances, strokes = protocol_strokes(sample)
        truth = instances > 0
        painted = np.where(truth, 2, 1).astype(np.uint8) if args.dense else strokes
        marks = {int(args.steps * f) for f in (0.5, 0.625, 0.75, 0.875)}
        snapshots = []
        run = train([image], [painted], TrainConfig(steps=args.steps, seed=0), ModelConfig())
        try:
            while True:
                report = next(run)
                if report.step in marks:
                    snapshots.append(report.model.clone())
        except StopIteration as done:
            result = done.value
        snapshots.append(result.last)

        last, best = probability(result.last, image), probability(result.best, image)
        flipped = predict(result.last, image, PredictConfig(flips=True), probabilities=False)
        row = {
            "image": sample.name, "split": args.split, "steps": result.steps, "dense": args.dense,
            "best": scored(best > 0.5, truth),
            "last": scored(last > 0.5, truth),
            "last_flips": scored(flipped.labels >= 2, truth),
            "last_bn": scored(probability(recalibrated(result.last, image, painted), image) > 0.5, truth),
            "pair": scored((best + last) / 2 > 0.5, truth),
            "snapshots": scored(np.mean([probability(m, image) for m in snapshots], axis=0) > 0.5, truth),
            "otsu": scored(otsu_segment(image, strokes) >= 2, truth),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    for key in ("best", "last", "last_flips", "last_bn", "pair", "snapshots", "otsu"):
        print(f"mean {key}: {np.mean([r[key]['dice'] for r in rows]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
