"""The engine's CUDA paths on a real image, against the CPU float32 reference.

    python benchmarks/gpu/cuda_check.py [--data DIR] [--dataset monuseg] [--out cuda_check.json]

Why a script and not a test: CI has no GPU. It checks what only a GPU can: device "auto"
picks CUDA; training from simulated strokes (the default model, 300 steps) under each
precision (bfloat16 autocast, float16 with a gradient scaler, float32) keeps finite losses
and learns; CUDA prediction labels agree with the CPU float32 ones; a model trained on the
GPU saves and loads on the CPU unchanged; and how long a 1000 x 1000 and an 8000 x 8000
prediction take, with the GPU's peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_selfreg.bench.datasets import load_split
from napari_selfreg.bench.strokes import simulate_strokes
from napari_selfreg.core.checkpoint import load_model, save_model
from napari_selfreg.core.config import PredictConfig, TrainConfig
from napari_selfreg.core.device import resolve_device
from napari_selfreg.core.metrics import overlap
from napari_selfreg.core.predict import predict
from napari_selfreg.core.train import train_to_end


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start


def check(image: np.ndarray, mask: np.ndarray, steps: int = 300) -> dict:
    report: dict = {"device_auto": str(resolve_device("auto")), "gpu": torch.cuda.get_device_name(0)}
    strokes = simulate_strokes(mask, seed=0)
    on_gpu = PredictConfig(device="cuda")
    reference = PredictConfig(device="cpu", precision="float32")
    for precision in ("auto", "float16", "float32"):
        config = TrainConfig(steps=steps, device="cuda", precision=precision, seed=0)
        result, wall = _timed(lambda: train_to_end([image], [strokes], config))  # noqa: B023
        losses = np.array([r.loss for r in result.history])
        labels = predict(result.model, image, on_gpu).labels
        cpu_labels = predict(result.model, image, reference).labels
        report[precision] = {
            # wall time over steps: validation included, and CUDA's start-up in the first (auto) run
            "wall_s": round(wall, 2), "steps": result.steps, "s_per_step": round(wall / result.steps, 4),
            "first_loss": float(losses[0]), "last_20_loss": float(losses[-20:].mean()),
            "finite": bool(np.isfinite(losses).all()), "dice": overlap(labels == 2, mask).dice,
            "label_agreement_with_cpu_float32": float((labels == cpu_labels).mean()),
        }
        print(precision, report[precision], flush=True)
        if precision == "auto":
            with tempfile.TemporaryDirectory() as folder:
                back = load_model(save_model(result.model, Path(folder) / "gpu.selfreg"), device="cpu")
                report["saved_and_loaded_on_cpu_equal"] = bool(
                    (predict(back, image, reference).labels == cpu_labels).all())
            big = np.tile(image, (8, 8, 1))
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):  # the first is the warm-up
                big_s = _timed(lambda: predict(result.model, big, on_gpu))[1]  # noqa: B023
            report["predict_8000_s"] = round(big_s, 2)
            report["predict_8000_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            report["predict_1000_s"] = round(_timed(lambda: predict(result.model, image, on_gpu))[1], 3)  # noqa: B023
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the folder holding monuseg/ and glas/ (default: ../shared/data)")
    parser.add_argument("--dataset", default="monuseg", choices=["monuseg", "glas"])
    parser.add_argument("--out", type=Path, default=Path("cuda_check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 2
    sample = load_split(args.dataset, args.data).test[0]
    report = check(sample.image(), sample.mask())
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
