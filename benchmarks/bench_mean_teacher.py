"""Would UG-MCL's mean teacher help? Uncertainty-guided consistency on the unpainted pixels.

A trial of METHOD.md's second method, not a plugin option. The student is the default
SelfReg-UNet trained on the interactive protocol's simulated strokes (every stroke, seed 0,
a fixed number of steps). The teacher is an exponential moving average of its weights (decay
up to 0.99, BatchNorm statistics copied). Each step the teacher sees the batch ``--passes``
times under Gaussian noise (std ``--noise``, clipped at twice that) and averages its softmax.
The student's softmax is pulled towards that average by a squared error on the unpainted pixels
whose predictive entropy lies under a threshold that rises from 0.75 to 1 of log K, with a
weight ramped up as exp(-5 (1 - t)^2) over the run. UG-MCL's second head (a signed-distance
map) is left out: strokes give no object outline to regress.

It wraps ``core.train.step_losses`` for the run; ``--weight 0`` is the plain training, for the
paired comparison. Dice against the full mask for the student's last weights and the teacher's.

    python benchmarks/bench_mean_teacher.py --weight 0 --out benchmarks/results/mean_teacher.jsonl
    python benchmarks/bench_mean_teacher.py --weight 1 --out benchmarks/results/mean_teacher.jsonl
    python benchmarks/bench_mean_teacher.py --weight 5 --out benchmarks/results/mean_teacher.jsonl
    python benchmarks/bench_mean_teacher.py --weight 1 --noise 0.3 --out benchmarks/results/mean_teacher.jsonl

Needs ../shared/data (exits 2 without it). One thread per run (``--threads``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import napari_selfreg.core.train as core_train
    from napari_selfreg.bench.baselines import otsu_segment
    from napari_selfreg.bench.datasets import SharedDataMissing, load_split
    from napari_selfreg.bench.interactive import protocol_strokes
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.core.device import autocast
    from napari_selfreg.core.losses import selfreg_total
    from napari_selfreg.core.metrics import binary_dice
    from napari_selfreg.core.predict import predict

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[0, 7, 14, 21, 3, 10, 17],
                        help="MoNuSeg indices in --split (default: the seven of bench_weights.py)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--weight", type=float, default=1.0, help="consistency weight (0: plain training)")
    parser.add_argument("--passes", type=int, default=2, help="teacher passes per step, each with its own noise")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the teacher's input noise ([0, 1] input)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON lines, one row per image (appended)")
    parser.add_argument("--data", type=Path, help="the folder holding monuseg/ (default: ../shared/data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    run: dict = {}  # the current image's teacher and step count

    def step_losses(network, x, y, roles, device, dtype, generator, **weights):
        """The plugin's step, plus the consistency term when ``--weight`` is not 0."""
        run["step"] = run.get("step", 0) + 1
        if args.weight and "teacher" not in run:
            run["teacher"] = copy.deepcopy(network).requires_grad_(False)
            run["noise"] = torch.Generator().manual_seed(0)  # the same draws in every run
        elif args.weight:  # the teacher follows the weights of the step before
            decay = min(1 - 1 / run["step"], 0.99)
            with torch.no_grad():
                for t, s in zip(run["teacher"].parameters(), network.parameters(), strict=True):
                    t.mul_(decay).add_(s.detach(), alpha=1 - decay)
                for t, s in zip(run["teacher"].buffers(), network.buffers(), strict=True):
                    t.copy_(s)
        with autocast(device, dtype):
            if roles is not None:
                logits, blocks = network.forward_blocks(x)
            else:
                logits, blocks = network(x), None
            terms = selfreg_total(logits, y, blocks, roles, generator=generator, **weights)
            if not args.weight:
                return terms
            with torch.no_grad():
                views = x.repeat(args.passes, 1, 1, 1)
                noise = torch.randn(views.shape, generator=run["noise"]).to(views) * args.noise
                views = views + noise.clamp(-2 * args.noise, 2 * args.noise)
                target = F.softmax(run["teacher"](views).float(), 1).view(args.passes, *logits.shape).mean(0)
                entropy = -(target * torch.log(target + 1e-6)).sum(1)
                ramp = math.exp(-5 * (1 - min(1.0, run["step"] / args.steps)) ** 2)
                threshold = (0.75 + 0.25 * ramp) * math.log(target.shape[1])
                mask = ((entropy < threshold) & (y == 0)).float()
            student = F.softmax(logits.float(), 1)
            consistency = (((student - target) ** 2).sum(1) * mask).sum() / (mask.sum() + 1e-6)
            terms.total = terms.total + args.weight * ramp * consistency
        return terms

    core_train.step_losses = step_losses
    try:
        split = load_split("monuseg", args.data)
    except SharedDataMissing as missing:
        print(f"skipped: {missing}; or pass --data", file=sys.stderr)
        return 2

    def scored(labels, truth) -> dict:
        return {"dice": round(100 * binary_dice(labels, truth), 2), "area": round(labels.sum() / truth.sum(), 3)}

    rows = []
    for index in args.images:
        sample = getattr(split, args.split)[index]
        image, instances, strokes = protocol_strokes(sample)
        truth = instances > 0
        run.clear()
        result = core_train.train_to_end(
            [image], [strokes], TrainConfig(steps=args.steps, seed=0, validation_fraction=0.0), ModelConfig()
        )
        row = {"image": sample.name, "split": args.split, "steps": args.steps, "weight": args.weight,
               "passes": args.passes, "noise": args.noise,
               "student": scored(predict(result.last, image, probabilities=False).labels >= 2, truth)}
        if args.weight:
            teacher = result.last.clone()
            teacher.network.load_state_dict(run["teacher"].state_dict())
            teacher.network.eval()
            row["teacher"] = scored(predict(teacher, image, probabilities=False).labels >= 2, truth)
        row["otsu"] = scored(otsu_segment(image, strokes) >= 2, truth)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    for key in ("student", "teacher", "otsu"):
        if key in rows[0]:
            print(f"mean {key}: {np.mean([r[key]['dice'] for r in rows]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
