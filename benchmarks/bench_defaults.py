"""Why the training defaults: a fixed CPU time budget, a few settings, on MoNuSeg *train* images.

Tuning on training images keeps the test images of the interactive benchmark unseen.
For each image: the RF and Otsu baselines on the same simulated strokes, then the
SelfReg UNet trained for ``--seconds`` with each setting; Dice of the best (validation)
and of the last weights against the full mask.

    python benchmarks/bench_defaults.py --seconds 45 --images 0 7
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETTINGS = {
    "lr1e-3 (default)": {"learning_rate": 1e-3},
    "lr3e-3": {"learning_rate": 3e-3},
    "lr3e-3 patch96 batch8": {"learning_rate": 3e-3, "patch_size": 96, "batch_size": 8},
}


def main(argv: list[str] | None = None) -> int:
    from napari_selfreg.bench.baselines import otsu_segment, random_forest_segment
    from napari_selfreg.bench.datasets import SharedDataMissing, load_split
    from napari_selfreg.bench.interactive import protocol_strokes
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.core.metrics import binary_dice
    from napari_selfreg.core.predict import predict
    from napari_selfreg.core.train import train_to_end

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--images", type=int, nargs="+", default=[0, 7], help="indices into the MoNuSeg train split")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "defaults.json")
    parser.add_argument("--data", type=Path, help="the folder holding monuseg/ (default: ../shared/data)")
    args = parser.parse_args(argv)

    try:
        split = load_split("monuseg", args.data)
    except SharedDataMissing as missing:
        print(f"skipped: {missing}; or pass --data", file=sys.stderr)
        return 2
    rows = []
    for index in args.images:
        sample = split.train[index]
        image, instances, strokes = protocol_strokes(sample)
        truth = instances > 0
        row = {
            "image": sample.name,
            "rf": binary_dice(random_forest_segment(image, strokes, seed=0) >= 2, truth),
            "otsu": binary_dice(otsu_segment(image, strokes) >= 2, truth),
        }
        for name, overrides in SETTINGS.items():
            config = TrainConfig(steps=10**6, time_budget=args.seconds, seed=0, **overrides)
            result = train_to_end([image], [strokes], config, ModelConfig())
            row[name] = {
                "steps": result.steps,
                "dice_best": binary_dice(predict(result.best, image).labels >= 2, truth),
                "dice_last": binary_dice(predict(result.last, image).labels >= 2, truth),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": args.seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
