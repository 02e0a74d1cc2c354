"""Speed of training and prediction on the CPU, each beside a plain float32 PyTorch loop.

    python benchmarks/bench_speed.py            # full run (the 20000 x 20000 part takes minutes)
    python benchmarks/bench_speed.py --quick    # smoke run, a few seconds (CI); writes no JSON without --out

Every comparison runs its variants interleaved, in the same process, and reports
medians (and ratios of medians), because the machine may be shared. Prediction also
takes turns with a plain loop in a pristine worker process (below). Writes
benchmarks/results/speed.json (or --out) and prints a table.

OpenMP waiting: by default OpenMP's own policy (spin-waiting), which is what the CLI and
napari run with. On a quiet 2-core machine it trains 1.1-1.5x faster at 2 threads than
passive waiting (BENCHMARKS.md). On a shared or busy CPU, spinning threads make every
parallel region wait for descheduled threads (5-10x slower on an earlier, busy machine):
there, --passive sets OMP_WAIT_POLICY=PASSIVE before torch is imported. An
OMP_WAIT_POLICY already in the environment is kept. The policy used is recorded in the JSON.

Memory: the pipeline raises glibc's malloc thresholds (``core.allocator``) while it runs,
process-wide. This script holds that setting for the whole run, so the in-process plain
loops run with it too and their speed-ups are conservative. The pristine worker measures
the plain prediction loop as a plain PyTorch process runs it, with glibc's defaults
(``speedup_median_vs_pristine``). ``NAPARI_SELFREG_KEEP_MEMORY=0`` measures both in-process
sides without the setting. Whether it was on is recorded in the JSON.
"""

from __future__ import annotations

import os
import sys

if "--passive" in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_selfreg.core.allocator import freed_memory_kept
from napari_selfreg.core.config import ModelConfig, ModelInfo, PredictConfig, TrainConfig
from napari_selfreg.core.data import PatchSampler, PatchSet, normalize
from napari_selfreg.core.losses import selfreg_total
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.core.predict import allocate_outputs, inference_network, predict
from napari_selfreg.core.selfreg import BlockRoles
from napari_selfreg.core.train import train

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, the variants taking turns so load drifts hit all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "n": len(times)}


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random blobs in uint8 RGB: structure at several scales, like tissue, no data needed."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    small = rng.random((h // 8 + 2, w // 8 + 2, 3))
    big = ndimage.zoom(ndimage.gaussian_filter(small, (1.5, 1.5, 0)), (8, 8, 1), order=1)[:h, :w]
    big = (big - big.min()) / (np.ptp(big) + 1e-9)
    return (big * 255).astype(np.uint8)


def synthetic_strokes(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Sparse 'painting': short horizontal strokes on dark (2) and bright (1) pixels."""
    rng = np.random.default_rng(seed)
    gray = image.mean(-1)
    labels = np.zeros(gray.shape, np.int64)
    h, w = gray.shape
    for _ in range(60):
        y, x = int(rng.integers(5, h - 5)), int(rng.integers(5, w - 30))
        labels[y - 2 : y + 3, x : x + 25] = 2 if gray[y, x] < np.median(gray) else 1
    return labels


def real_pair():
    """A real MoNuSeg image with simulated strokes when ../shared/data is there, else None."""
    try:
        from PIL import Image

        from napari_selfreg.bench.strokes import simulate_strokes

        root = Path(os.environ.get("SELFREG_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
        stem = "TCGA-A7-A13E-01Z-00-DX1"
        with Image.open(root / "monuseg" / "train" / "images" / f"{stem}.png") as img:
            image = np.array(img.convert("RGB"))
        with Image.open(root / "monuseg" / "train" / "masks" / f"{stem}.png") as m:
            mask = np.array(m) > 0
        return image, simulate_strokes(mask, seed=0).astype(np.int64), "MoNuSeg " + stem
    except Exception:
        return None


def environment(keeps_freed_memory: bool) -> dict:
    from napari_selfreg.core.device import cpu_has_fast_bfloat16

    model_name = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model_name or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bfloat16": cpu_has_fast_bfloat16(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(library default: spin)"),
        "keeps_freed_memory": keeps_freed_memory,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- matmul peak


def matmul_peak(size: int, repeats: int) -> dict:
    """GFLOP/s of a square matmul in float32 and bfloat16 (the ceiling the network is compared with)."""
    a32, b32 = torch.randn(size, size), torch.randn(size, size)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    times = interleaved({"float32": lambda: a32 @ b32, "bfloat16": lambda: a16 @ b16}, repeats, warmup=2)
    flops = 2 * size**3
    return {
        name: {**summary(t), "gflops_median": flops / np.median(t) / 1e9, "gflops_best": flops / np.min(t) / 1e9}
        for name, t in times.items()
    } | {"size": size}


# ----------------------------------------------------------------------------- prediction


def calibrated_model(config: ModelConfig, seed: int = 0) -> SegmentationModel:
    """Random weights, BatchNorm statistics from random inputs: same cost as a trained model."""
    torch.manual_seed(seed)
    model = SegmentationModel.create(ModelInfo(model=config))
    with torch.no_grad():
        model.network.train()
        for _ in range(3):
            model.network(torch.rand(2, config.in_channels, 64, 64))
    model.network.eval()
    return model


class PristinePlainLoop:
    """The plain float32 forward in a fresh process that never touches the allocator setting.

    The setting is process-wide while it is held, so the in-process plain loop gains from
    it too (1.2-1.3 -> 0.66-0.74 s at 2 threads, BENCHMARKS.md). A plain PyTorch user's
    process has glibc's defaults; this worker measures that, taking turns with the others.
    """

    SCRIPT = """
import sys, time
import numpy as np, torch
from napari_selfreg.core.config import ModelConfig
from napari_selfreg.core.unet import SelfRegUNet
torch.set_num_threads(int(sys.argv[1]))
net = SelfRegUNet(ModelConfig.from_json(open(sys.argv[2]).read()))
net.load_state_dict(torch.load(sys.argv[3], weights_only=True))
net.eval()
x = torch.from_numpy(np.load(sys.argv[4]))
for _ in sys.stdin:
    start = time.perf_counter()
    with torch.no_grad():
        torch.softmax(net(x), dim=1)
    print(time.perf_counter() - start, flush=True)
"""

    def __init__(self, network: torch.nn.Module, config: ModelConfig, x: torch.Tensor) -> None:
        self.folder = tempfile.TemporaryDirectory()
        folder = Path(self.folder.name)
        (folder / "config.json").write_text(config.to_json())
        torch.save(network.state_dict(), folder / "weights.pt")
        np.save(folder / "x.npy", x.numpy())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        command = [sys.executable, "-c", self.SCRIPT, str(torch.get_num_threads())]
        command += [str(folder / name) for name in ("config.json", "weights.pt", "x.npy")]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.seconds: list[float] = []

    def __call__(self) -> None:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        self.seconds.append(float(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.folder.cleanup()


def bench_prediction(model: SegmentationModel, image: np.ndarray, repeats: int) -> dict:
    """The full predict() path (normalise, tile, network, blend, labels) against a plain fp32
    forward, in this process (sharing the allocator setting) and in a pristine one."""
    h, w = image.shape[:2]
    plain_net = copy.deepcopy(model.network).eval()
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(normalize(image, model.info.normalization), -1, 0)))[None]

    def plain():
        with torch.no_grad():
            return torch.softmax(plain_net(x), dim=1)

    config = PredictConfig(device="cpu")
    pristine = PristinePlainLoop(plain_net, model.config, x)
    try:
        variants = {"plain_float32": plain, "fast": lambda: predict(model, image, config), "pristine": pristine}
        times = interleaved(variants, repeats)
    finally:
        pristine.close()
    pristine_s = pristine.seconds[-repeats:]  # as the worker timed them, without the pipe
    reference = plain()[0].numpy()
    fast = predict(model, image, config)
    delta = np.abs(fast.probabilities - reference)
    fast32 = predict(model, image, PredictConfig(device="cpu", precision="float32"))
    delta32 = np.abs(fast32.probabilities - reference)
    plain_s, fast_s = np.median(times["plain_float32"]), np.median(times["fast"])
    return {
        "image": f"{h} x {w} RGB uint8",
        "config": config.to_dict(),
        "plain_float32": summary(times["plain_float32"]),
        "fast": summary(times["fast"]),
        "speedup_median": float(plain_s / fast_s),
        "plain_float32_pristine_process": summary(pristine_s),
        "speedup_median_vs_pristine": float(np.median(pristine_s) / fast_s),
        "agreement_vs_plain": {
            "label_agreement": float((fast.labels == reference.argmax(0) + 1).mean()),
            "mean_abs_dp": float(delta.mean()),
            "max_abs_dp": float(delta.max()),
            "float32_fast_path_mean_abs_dp": float(delta32.mean()),
            "float32_fast_path_max_abs_dp": float(delta32.max()),
        },
    }


def bench_network_efficiency(model: SegmentationModel, side: int, repeats: int, peak: dict) -> dict:
    """FLOPs of one forward (FlopCounterMode) over the time of the fast forward: share of the matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode

    d = model.config.divisor
    side = int(np.ceil(side / d) * d)
    x = torch.rand(1, model.config.in_channels, side, side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.network.eval()(x)
    flops = counter.get_total_flops()
    fused = inference_network(model.network, torch.device("cpu"), torch.bfloat16)
    xc = x.contiguous(memory_format=torch.channels_last)

    def fast():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fused(xc)

    times = interleaved({"fast_forward": fast}, repeats)
    gflops = flops / np.median(times["fast_forward"]) / 1e9
    return {
        "input": f"1 x {model.config.in_channels} x {side} x {side}",
        "gflop_per_forward": flops / 1e9,
        "fast_forward": summary(times["fast_forward"]),
        "achieved_gflops_median": gflops,
        "fraction_of_bf16_matmul_peak": gflops / peak["bfloat16"]["gflops_median"],
        "fraction_of_bf16_matmul_best": flops / np.min(times["fast_forward"]) / 1e9 / peak["bfloat16"]["gflops_best"],
    }


# ----------------------------------------------------------------------------- training


class PlainLoop:
    """The same network, losses, sampler and optimiser in float32, contiguous layout, no tricks."""

    def __init__(self, model: SegmentationModel, sampler: PatchSampler, config: TrainConfig) -> None:
        self.network = copy.deepcopy(model.network).train()
        self.sampler = sampler
        self.config = config
        self.roles = BlockRoles.for_unet(model.config.depth) if config.selfreg else None
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.learning_rate)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> float:
        x_np, y_np = self.sampler.batch(self.config.batch_size)
        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
        self.optimizer.zero_grad()
        if self.roles is not None:
            logits, blocks = self.network.forward_blocks(x)
        else:
            logits, blocks = self.network(x), None
        terms = selfreg_total(
            logits, y, blocks, self.roles, scr_pairing=self.config.scr_pairing, generator=self.generator
        )
        terms.total.backward()
        self.optimizer.step()
        return float(terms.total.detach())


def _generator_step(gen):
    return lambda: next(gen)


def bench_training(image: np.ndarray, labels: np.ndarray, config: TrainConfig, repeats: int, steps_per_sample: int):
    """Steps/s of ``train()`` (the product) beside the plain loop, and with/without SelfReg."""
    from napari_selfreg.core.data import normalization_for

    long = TrainConfig(**{**config.to_dict(), "steps": 10**6, "validation_fraction": 0.0})
    without = TrainConfig(**{**long.to_dict(), "selfreg": False})
    fast = train([image], [labels], long)
    fast_nosr = train([image], [labels], without)
    norm = normalization_for(image)
    x = normalize(image, norm)
    sampler = PatchSampler(PatchSet([x], [labels]), config.patch_size, np.random.default_rng(1), augment=config.augment)
    info = ModelInfo(model=ModelConfig(num_classes=int(labels.max())), normalization=norm)
    torch.manual_seed(0)
    plain = PlainLoop(SegmentationModel.create(info), sampler, long)
    flops = step_flops(plain)

    def several(fn):
        def run():
            for _ in range(steps_per_sample):
                fn()

        return run

    times = interleaved(
        {
            "plain_float32": several(plain.step),
            "fast": several(_generator_step(fast)),
            "fast_without_selfreg": several(_generator_step(fast_nosr)),
        },
        repeats,
    )
    per_step = {k: [t / steps_per_sample for t in v] for k, v in times.items()}
    med = {k: float(np.median(v)) for k, v in per_step.items()}
    low = {k: float(np.min(v)) for k, v in per_step.items()}
    return {
        "config": {k: getattr(config, k) for k in ("patch_size", "batch_size", "selfreg", "precision", "augment")},
        "model": ModelConfig().to_dict(),
        "steps_per_sample": steps_per_sample,
        **{k: {**summary(v), "steps_per_s": 1.0 / med[k]} for k, v in per_step.items()},
        "speedup_median": med["plain_float32"] / med["fast"],
        "selfreg_overhead_ratio": med["fast"] / med["fast_without_selfreg"],
        # on a shared machine the fastest round is the least disturbed one: both are reported
        "speedup_of_minimums": low["plain_float32"] / low["fast"],
        "selfreg_overhead_ratio_of_minimums": low["fast"] / low["fast_without_selfreg"],
        "gflop_per_step": flops / 1e9,
    }


def step_flops(plain: PlainLoop) -> float:
    """FLOPs of one training step (convolutions and matmuls, forward and backward, SelfReg's
    included), counted by FlopCounterMode on one step of the plain loop."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        plain.step()
    return float(counter.get_total_flops())


def training_ceiling(training: dict, peak: dict) -> dict:
    """Why a speed-up has a ceiling: a step's FLOPs, each run at the bfloat16 matmul peak measured
    in the same run, with every other pass (BatchNorm, pooling, copies, optimiser) free, would
    still take ``floor_s``; no bfloat16 step can beat the plain loop by more than ``plain / floor``."""
    flops = training["gflop_per_step"] * 1e9
    floor = flops / (peak["bfloat16"]["gflops_median"] * 1e9)
    return {
        "floor_at_bf16_matmul_peak_s": floor,
        "speedup_ceiling": training["plain_float32"]["median_s"] / floor,
        "plain_float32_gflops": flops / training["plain_float32"]["median_s"] / 1e9,
        "fast_gflops": flops / training["fast"]["median_s"] / 1e9,
        "plain_fraction_of_fp32_matmul_peak": flops / training["plain_float32"]["median_s"]
        / (peak["float32"]["gflops_median"] * 1e9),
        "fast_fraction_of_bf16_matmul_peak": floor / training["fast"]["median_s"],
    }


def bench_training_agreement(image: np.ndarray, labels: np.ndarray, config: TrainConfig) -> dict:
    """One step's loss and gradient in bf16 autocast + channels-last against plain float32, same weights/batch."""
    from napari_selfreg.core.data import normalization_for

    norm = normalization_for(image)
    sampler = PatchSampler(PatchSet([normalize(image, norm)], [labels]), config.patch_size, np.random.default_rng(2))
    x_np, y_np = sampler.batch(config.batch_size)
    torch.manual_seed(0)
    model = SegmentationModel.create(ModelInfo(model=ModelConfig(num_classes=int(labels.max())), normalization=norm))
    roles = BlockRoles.for_unet(model.config.depth)
    results = {}
    for name in ("float32", "bfloat16"):
        net = copy.deepcopy(model.network).train()
        x = torch.from_numpy(x_np)
        if name == "bfloat16":
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bfloat16"):
            logits, blocks = net.forward_blocks(x)
            terms = selfreg_total(logits, torch.from_numpy(y_np), blocks, roles, scr_pairing="mean")
        terms.total.backward()
        grad = torch.cat([p.grad.flatten().float() for p in net.parameters()])
        results[name] = (float(terms.total.detach()), grad)
    (l32, g32), (l16, g16) = results["float32"], results["bfloat16"]
    return {
        "loss_float32": l32,
        "loss_bfloat16": l16,
        "loss_relative_difference": abs(l16 - l32) / abs(l32),
        "gradient_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
        "note": "SCR with the deterministic 'mean' pairing so both runs see the same loss",
    }


# ----------------------------------------------------------------------------- huge image


def large_child(size: int, store: Path) -> dict:
    """Runs in a subprocess: predict a size x size uint8 zarr image into zarr outputs; report peak RSS."""
    import zarr

    def rss() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
        return 0

    chunk = 1024
    image = zarr.open_array(str(store / "image.zarr"), mode="w", shape=(size, size, 3), chunks=(chunk, chunk, 3),
                            dtype="u1")
    pattern = synthetic_image(chunk, chunk)
    for top in range(0, size, chunk):
        for left in range(0, size, chunk):
            block = np.roll(pattern, (top // 7 + left // 5), axis=1)
            image[top : top + chunk, left : left + chunk] = block[: min(chunk, size - top), : min(chunk, size - left)]
    model = calibrated_model(ModelConfig())
    labels, probs = allocate_outputs((size, size), 2, store=store / "prediction.zarr", kind="zarr")
    before = rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = predict(model, image, PredictConfig(device="cpu"), out_labels=labels, out_probabilities=probs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "image": f"{size} x {size} RGB uint8 zarr (chunks {chunk})",
        "outputs": "zarr labels uint8 + probabilities float32 (2 classes)",
        "seconds": seconds,
        "megapixels_per_s": size * size / seconds / 1e6,
        "rss_before_predict_bytes": before,
        "peak_rss_bytes": peak,
        "peak_rss_before_predict_bytes": peak_before,
        "complete": result.complete,
        "torch_threads": torch.get_num_threads(),
        "labels_checksum": int(np.asarray(labels[:: max(1, size // 100), :: max(1, size // 100)]).sum()),
    }


def bench_large(size: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--large-child", str(size), "--store", tmp, "--threads", str(threads)],
            capture_output=True, text=True, check=False,
        )
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def table(doc: dict) -> str:
    rows = []
    p, t = doc.get("prediction"), doc.get("training")
    if p:
        rows.append(("predict " + p["image"] + " plain fp32", f"{p['plain_float32']['median_s']:.3f} s", ""))
        speedup = f"x{p['speedup_median']:.2f}"
        rows.append(("predict " + p["image"] + " fast", f"{p['fast']['median_s']:.3f} s", speedup))
        if "plain_float32_pristine_process" in p:
            pristine = p["plain_float32_pristine_process"]["median_s"]
            speedup = f"x{p['speedup_median_vs_pristine']:.2f}"
            rows.append(("  plain fp32 in a pristine process", f"{pristine:.3f} s", speedup))
        a = p["agreement_vs_plain"]
        rows.append(("  labels agree / mean |dp| / max |dp|",
                     f"{a['label_agreement']:.5f} / {a['mean_abs_dp']:.1e} / {a['max_abs_dp']:.3f}", ""))
    if t:
        rows.append(("train plain fp32", f"{t['plain_float32']['steps_per_s']:.2f} steps/s", ""))
        rows.append(("train fast", f"{t['fast']['steps_per_s']:.2f} steps/s", f"x{t['speedup_median']:.2f}"))
        rows.append(("train fast without SelfReg", f"{t['fast_without_selfreg']['steps_per_s']:.2f} steps/s",
                     f"SelfReg overhead x{t['selfreg_overhead_ratio']:.3f}"
                     + (f" (of the fastest rounds x{t['selfreg_overhead_ratio_of_minimums']:.3f})"
                        if "selfreg_overhead_ratio_of_minimums" in t else "")))
        if "ceiling" in t:
            c = t["ceiling"]
            rows.append((f"  a step's {t['gflop_per_step']:.1f} GFLOP at the bf16 matmul peak",
                         f"{1000 * c['floor_at_bf16_matmul_peak_s']:.1f} ms",
                         f"speed-up ceiling x{c['speedup_ceiling']:.2f}"))
            rates = f"{c['plain_float32_gflops']:.0f} / {c['fast_gflops']:.0f} GFLOP/s"
            rows.append(("  plain fp32 / fast step", rates,
                         f"{100 * c['plain_fraction_of_fp32_matmul_peak']:.0f} % of fp32 / "
                         f"{100 * c['fast_fraction_of_bf16_matmul_peak']:.0f} % of bf16 matmul"))
    if doc.get("training_agreement"):
        a = doc["training_agreement"]
        rows.append(("  one step bf16 vs fp32: rel. loss diff / grad cosine",
                     f"{a['loss_relative_difference']:.1e} / {a['gradient_cosine']:.4f}", ""))
    if doc.get("matmul"):
        m = doc["matmul"]
        rows.append((f"matmul {m['size']}^2 fp32 / bf16", f"{m['float32']['gflops_median']:.0f} / "
                     f"{m['bfloat16']['gflops_median']:.0f} GFLOP/s", ""))
    if doc.get("network_efficiency"):
        e = doc["network_efficiency"]
        rows.append(("network fast forward " + e["input"], f"{e['achieved_gflops_median']:.0f} GFLOP/s",
                     f"{100 * e['fraction_of_bf16_matmul_peak']:.0f} % of bf16 matmul"))
    if doc.get("large"):
        g = doc["large"]
        if "error" in g:
            rows.append(("large image", "error", g["error"][-200:]))
        else:
            peak = f"peak RSS {g['peak_rss_bytes'] / 2**30:.2f} GiB"
            rows.append(("predict " + g["image"], f"{g['seconds']:.0f} s", peak))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b:>28}  {c}" for a, b, c in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default: benchmarks/results/speed.json; --quick writes none unless given)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--large-size", type=int, default=20000, help="side of the huge-image run (0 skips it)")
    parser.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=None,
                        help="torch thread counts to measure, e.g. 1,2 (default: 1 and the machine's cores)")
    parser.add_argument("--only-large", action="store_true", help="run only the huge-image part")
    parser.add_argument("--large-threads", type=int, default=1, help="torch threads of the huge-image run")
    parser.add_argument("--passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE (for a shared or busy CPU; default: OpenMP's spin-waiting)")
    parser.add_argument("--synthetic", action="store_true", help="do not use ../shared/data even when present")
    parser.add_argument("--large-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with freed_memory_kept() as kept:  # process-wide: the plain loops measured below share it
        return measure(args, kept)


def measure(args: argparse.Namespace, keeps_freed_memory: bool) -> int:
    if args.large_child:
        torch.set_num_threads(args.threads[0] if args.threads else torch.get_num_threads())
        print(json.dumps(large_child(args.large_child, args.store)))
        return 0

    quick = args.quick
    if args.threads is None:
        args.threads = sorted({1, torch.get_num_threads()}) if not quick else [torch.get_num_threads()]
    repeats = args.repeats or (2 if quick else 9)
    environment_now = environment(keeps_freed_memory)
    doc: dict = {"command": " ".join(["python", *sys.argv]), "environment": environment_now, "quick": quick}
    pair = None if (quick or args.synthetic) else real_pair()
    if pair is None:
        image = synthetic_image(160 if quick else 1000, 160 if quick else 1000)
        labels, source = synthetic_strokes(image), "synthetic"
    else:
        image, labels, source = pair
    doc["image_source"] = source

    train_config = TrainConfig(patch_size=64 if quick else 128, batch_size=2 if quick else 4)
    model = calibrated_model(ModelConfig())
    doc["runs"] = []
    if len(args.threads) > 1 and not args.only_large:
        # one process per thread count: changing torch's thread count inside a process
        # left the later (2-thread) bfloat16 training 2-3x slower than in a fresh process
        for threads in args.threads:
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / "part.json"
                command = [sys.executable, __file__, "--threads", str(threads), "--large-size", "0", "--out", str(part)]
                command += ["--quick"] * quick + ["--synthetic"] * args.synthetic + ["--passive"] * args.passive
                subprocess.run(command, check=True)
                sub = json.loads(part.read_text())
            doc["runs"] += sub["runs"]
            doc.setdefault("training_agreement", sub.get("training_agreement"))
        args.threads = []
    for threads in [] if args.only_large else args.threads:
        torch.set_num_threads(threads)
        run: dict = {"torch_threads": threads}
        run["matmul"] = matmul_peak(256 if quick else 2048, repeats)
        run["prediction"] = bench_prediction(model, image, repeats)
        run["network_efficiency"] = bench_network_efficiency(model, 128 if quick else 1000, repeats, run["matmul"])
        run["training"] = bench_training(image, labels, train_config, repeats, steps_per_sample=1 if quick else 4)
        run["training"]["ceiling"] = training_ceiling(run["training"], run["matmul"])
        doc["runs"].append(run)
        print(f"--- torch threads: {threads}")
        print(table(run), flush=True)
    if not args.only_large and "training_agreement" not in doc:
        doc["training_agreement"] = bench_training_agreement(image, labels, train_config)
        print(table({"training_agreement": doc["training_agreement"]}))
    if not quick and args.large_size:
        doc["large"] = bench_large(args.large_size, args.large_threads)
        print(table({"large": doc["large"]}))
    doc["load_average_at_end"] = os.getloadavg()

    if args.out is None and quick:
        return 0  # a smoke run must not replace the committed figures
    args.out = args.out or ROOT / "results" / "speed.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
