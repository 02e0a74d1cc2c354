"""The paper protocol (UCTransNet line of work, METHOD.md §1): full masks, 224x224, full width.

Why a dedicated loop instead of ``core.train``: the engine is built for strokes. It
samples patches around painted pixels, jitters colour, uses AdamW with weight decay and
a one-cycle cosine, and picks the checkpoint by Dice on held-out *strokes*. The paper
protocol needs whole 224x224 images in epochs, rot90/flip only, Adam lr 1e-3 with
cosine warm restarts every 10 epochs (min 1e-4), batch 4, and the checkpoint chosen
by mean per-image Dice on the *validation images* with early stopping (patience 50
epochs). The loop reuses the engine's network (``SelfRegUNet``), loss
(``selfreg_total``: 0.4 CE + 0.6 Dice + 0.015 SCR + 0.015 IFD) and block roles, so the
model and the regulariser are exactly the plugin's.

Evaluation (best-on-validation weights; the test set never chooses anything):
- "224": prediction and mask both at 224x224 (mask resized with area averaging, then
  > 0.5), threshold 0.5 on the structure probability, Dice/IoU per image, averaged;
- "native": the 224x224 probability upsampled (bilinear) to the image's own size,
  threshold 0.5, against the original mask: what a user of this model sees.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Sample, center_crop, load_split
from .harness import RunKey, StateFile, Task, environment, note_progress, run_tasks, write_json

PROTOCOL = "paper"
MODELS = ("unet", "selfreg_unet")
GPU_MAX_EPOCHS = 1000  # with patience 50 the reference runs stop long before this


@dataclass
class PaperConfig:
    datasets: list[str] = field(default_factory=lambda: ["monuseg"])
    models: list[str] = field(default_factory=lambda: list(MODELS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    image_size: int = 224
    base_channels: int = 64
    batch_size: int = 4
    learning_rate: float = 1e-3
    restart_epochs: int = 10
    min_learning_rate: float = 1e-4
    patience: int = 50  # epochs without a better validation Dice
    epochs: int | None = None  # the schedule: None = GPU_MAX_EPOCHS on a GPU, cpu_epochs on a CPU
    steps: int | None = None
    time_budget: float | None = None  # seconds of training per run
    # the documented short CPU schedule when no limit is given: about 16-19 min a full-width run
    # in bfloat16 on 2 cores (BENCHMARKS.md), as long as 20 float32 epochs took
    cpu_epochs: int = 60
    device: str = "auto"
    precision: str = "auto"  # training autocast, as in core.train: auto | float32 | bfloat16 | float16
    data_root: str | None = None
    crop: int | None = None  # smoke runs: central crop of every image (native evaluation)
    limit_images: int | None = None  # smoke runs: this many images per split

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")


@dataclass
class Schedule:
    max_epochs: int
    max_steps: int | None
    time_budget: float | None
    device: str
    precision: str = "float32"  # what training runs in; evaluation is always float32

    def describe(self, config: PaperConfig) -> str:
        limits = [f"max {self.max_epochs} epochs"]
        if self.max_steps:
            limits.append(f"max {self.max_steps} steps")
        if self.time_budget:
            limits.append(f"max {self.time_budget:g} s")
        kind = "gpu" if self.device.startswith("cuda") else self.device
        if self.precision != "float32":
            kind += f", {self.precision} autocast"
        return (f"{kind}: {', '.join(limits)}, early stop patience {config.patience} epochs, batch "
                f"{config.batch_size}, Adam lr {config.learning_rate:g}, cosine warm restarts every "
                f"{config.restart_epochs} epochs (min {config.min_learning_rate:g})")

    def label(self) -> str:
        parts = [f"{self.max_epochs}ep"]
        if self.max_steps:
            parts.append(f"{self.max_steps}steps")
        if self.time_budget:
            parts.append(f"{self.time_budget:g}s")
        if self.precision != "float32":  # float32 runs keep the labels they were recorded under
            parts.append(_SHORT_PRECISION[self.precision])
        return "-".join(parts)


_SHORT_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def resolve_schedule(config: PaperConfig) -> Schedule:
    from ..core.device import autocast_dtype, resolve_device

    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    precision = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    explicit = config.epochs or config.steps or config.time_budget
    if config.epochs:
        epochs = config.epochs
    elif explicit:
        epochs = GPU_MAX_EPOCHS
    else:
        epochs = GPU_MAX_EPOCHS if device.type == "cuda" else config.cpu_epochs
    return Schedule(epochs, config.steps, config.time_budget, str(device), precision)


# ----------------------------------------------------------------------------- data


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(3, size, size) float32 in [0, 1], anti-aliased."""
    from skimage.transform import resize
    from skimage.util import img_as_float32

    small = resize(img_as_float32(image), (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return np.ascontiguousarray(np.moveaxis(small.astype(np.float32), -1, 0))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Area-averaged then > 0.5: neither grows nor shrinks objects on average."""
    from skimage.transform import resize

    return resize(mask.astype(np.float32), (size, size), order=1, anti_aliasing=True) > 0.5


@dataclass
class Prepared:
    images: np.ndarray  # N, 3, S, S float32
    masks: np.ndarray  # N, S, S bool
    native_masks: list[np.ndarray]
    names: list[str]


def prepare(samples: list[Sample], size: int, crop: int | None) -> Prepared:
    images, masks, native, names = [], [], [], []
    for sample in samples:
        image = center_crop(sample.image(), crop)
        mask = center_crop(sample.mask(), crop)
        images.append(resize_image(image, size))
        masks.append(resize_mask(mask, size))
        native.append(mask)
        names.append(sample.name)
    return Prepared(np.stack(images), np.stack(masks), native, names)


def augment_batch(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random rot90 and horizontal flip per image (labels follow)."""
    out_x, out_y = [], []
    for x, y in zip(images, masks, strict=True):
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        out_x.append(np.ascontiguousarray(x))
        out_y.append(np.ascontiguousarray(y))
    return np.stack(out_x), np.stack(out_y)


# ----------------------------------------------------------------------------- training


def structure_probability(network, images: np.ndarray, device, batch_size: int = 8) -> np.ndarray:
    """(N, S, S) softmax probability of the structure class."""
    import torch

    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).to(device)
            out.append(torch.softmax(network(x).float(), dim=1)[:, 1].cpu().numpy())
    network.train()
    return np.concatenate(out)


def _overlaps(probability: np.ndarray, masks) -> tuple[list[float], list[float]]:
    from ..core.metrics import overlap

    scores = [overlap(p > 0.5, m) for p, m in zip(probability, masks, strict=True)]
    return [s.dice for s in scores], [s.iou for s in scores]


def upsample(probability: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(probability)[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def train_and_evaluate(
    config: PaperConfig, schedule: Schedule, dataset: str, model_name: str, seed: int,
    data: dict[str, Prepared] | None = None,
) -> dict[str, Any]:
    """One run: train with validation-chosen checkpoint, then test at 224 and native resolution."""
    import torch

    from ..core.config import ModelConfig
    from ..core.selfreg import BlockRoles
    from ..core.train import apply_step, step_losses
    from ..core.unet import SelfRegUNet

    if data is None:
        data = load_prepared(config, dataset)
    train_set, val_set, test_set = data["train"], data["validation"], data["test"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(schedule.device)
    dtype = None if schedule.precision == "float32" else getattr(torch, schedule.precision)
    # as in core.train: channels-last is what makes bfloat16 convolutions fast on a CPU
    memory_format = torch.channels_last if device.type == "cpu" and dtype is not None else torch.contiguous_format
    model_config = ModelConfig(in_channels=3, num_classes=2, base_channels=config.base_channels, depth=4)
    network = SelfRegUNet(model_config).to(device).to(memory_format=memory_format)
    network.train()
    if device.type == "cuda":  # peak RSS says nothing about the GPU: record its own peak
        torch.cuda.reset_peak_memory_stats(device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    roles = BlockRoles.for_unet(model_config.depth) if model_name == "selfreg_unet" else None
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    n = len(train_set.images)
    steps_per_epoch = math.ceil(n / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.restart_epochs * steps_per_epoch, eta_min=config.min_learning_rate
    )

    best_dice, best_epoch, best_state = -1.0, 0, None
    history: list[dict[str, float]] = []
    step, epoch, stop_reason = 0, 0, "epochs"
    start = time.perf_counter()
    while epoch < schedule.max_epochs:
        order = rng.permutation(n)
        losses = []
        for first in range(0, n, config.batch_size):
            index = order[first : first + config.batch_size]
            x_np, y_np = augment_batch(train_set.images[index], train_set.masks[index], rng)
            x = torch.from_numpy(x_np).to(device).contiguous(memory_format=memory_format)
            y = torch.from_numpy(y_np.astype(np.int64) + 1).to(device)  # painting ids: 1 = bg, 2 = structure
            optimizer.zero_grad(set_to_none=True)
            terms = step_losses(network, x, y, roles, device, dtype, generator)
            apply_step(terms.total, optimizer, scaler)
            scheduler.step()
            losses.append(float(terms.total.detach()))
            step += 1
            if schedule.max_steps and step >= schedule.max_steps:
                break
        epoch += 1
        val_dice = float(np.mean(_overlaps(structure_probability(network, val_set.images, device), val_set.masks)[0]))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val_dice})
        if val_dice > best_dice:
            best_dice, best_epoch = val_dice, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}
        note_progress(f"epoch {epoch}/{schedule.max_epochs}, val Dice {val_dice:.3f} "
                      f"(best {best_dice:.3f} at {best_epoch})")
        if schedule.max_steps and step >= schedule.max_steps:
            stop_reason = "steps"
            break
        if schedule.time_budget and time.perf_counter() - start >= schedule.time_budget:
            stop_reason = "time"
            break
        if epoch - best_epoch >= config.patience:
            stop_reason = "early stop"
            break
    train_s = time.perf_counter() - start
    network.load_state_dict(best_state)

    probability = structure_probability(network, test_set.images, device)
    dice_224, iou_224 = _overlaps(probability, test_set.masks)
    native = [upsample(p, m.shape) for p, m in zip(probability, test_set.native_masks, strict=True)]
    dice_native, iou_native = _overlaps(native, test_set.native_masks)
    return {
        "dice_224": float(np.mean(dice_224)), "iou_224": float(np.mean(iou_224)),
        "dice_native": float(np.mean(dice_native)), "iou_native": float(np.mean(iou_native)),
        "per_image": {name: {"dice_224": d2, "iou_224": i2, "dice_native": dn, "iou_native": i_n}
                      for name, d2, i2, dn, i_n in zip(test_set.names, dice_224, iou_224, dice_native, iou_native,
                                                       strict=True)},
        "epochs": epoch, "steps": step, "best_epoch": best_epoch, "best_val_dice": best_dice,
        "stop_reason": stop_reason, "train_s": round(train_s, 3), "device": schedule.device,
        "precision": schedule.precision,
        "schedule": schedule.describe(config), "history": history,
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


_PREPARED: dict[tuple, dict[str, Prepared]] = {}


def load_prepared(config: PaperConfig, dataset: str) -> dict[str, Prepared]:
    """Resized splits, cached for the process (every seed and model reuses them)."""
    key = (dataset, config.image_size, config.crop, config.limit_images, config.data_root)
    if key not in _PREPARED:
        split = load_split(dataset, config.data_root)
        limit = config.limit_images
        _PREPARED[key] = {
            name: prepare(samples[:limit] if limit else samples, config.image_size, config.crop)
            for name, samples in (("train", split.train), ("validation", split.validation), ("test", split.test))
        }
    return _PREPARED[key]


def plan(config: PaperConfig) -> list[Task]:
    schedule = resolve_schedule(config)
    tasks = []
    for dataset in config.datasets:
        load_split(dataset, config.data_root)  # fail early when the data is missing
        for seed in config.seeds:
            for model in config.models:
                key = RunKey(PROTOCOL, dataset, "test-set", model, schedule.label(), seed)
                tasks.append(Task(key, _runner(config, schedule, dataset, model, seed),
                                  run_settings(config, schedule), UNRECORDED, PER_BUDGET))
    return tasks


SETTING_NAMES = ("image_size", "base_channels", "batch_size", "learning_rate", "restart_epochs", "min_learning_rate",
                 "patience", "crop", "limit_images")
# what the rows made before settings were recorded ran with (every committed paper row):
# PaperConfig's defaults; their device is a field of each row
UNRECORDED = {"image_size": 224, "base_channels": 64, "batch_size": 4, "learning_rate": 1e-3, "restart_epochs": 10,
              "min_learning_rate": 1e-4, "patience": 50, "crop": None, "limit_images": None, "device": None}


# a GPU's and a CPU's schedules share one file (paper_protocol.json); each budget keeps its device
PER_BUDGET = frozenset({"device"})


def run_settings(config: PaperConfig, schedule: Schedule | None = None) -> dict:
    """What a run's result depends on besides its key (whose budget names the schedule, but
    not the device: 60 bfloat16 epochs on a GPU and on a CPU share a label)."""
    settings = {name: getattr(config, name) for name in SETTING_NAMES}
    if schedule is not None:
        settings["device"] = device_kind(schedule.device)
    return settings


def device_kind(device: str) -> str:
    """"cuda" for "cuda:1": rows record the kind of device they ran on."""
    return str(device).split(":")[0]


def _runner(config, schedule, dataset, model, seed):
    return lambda: train_and_evaluate(config, schedule, dataset, model, seed)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (dataset, model, resolution, schedule)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:  # a GPU's and a CPU's runs of one schedule label are not pooled
        if "dice_224" in row:
            key = (row["dataset"], row["method"], row["budget"], device_kind(row["device"]))
            groups.setdefault(key, []).append(row)
    results = []
    for (dataset, model, budget, device), items in sorted(groups.items()):
        for resolution in ("224", "native"):
            dice = np.array([r[f"dice_{resolution}"] for r in items])
            iou = np.array([r[f"iou_{resolution}"] for r in items])
            results.append({
                "dataset": dataset, "model": model, "resolution": resolution,
                "dice": float(dice.mean()), "dice_std": float(dice.std()),
                "iou": float(iou.mean()), "iou_std": float(iou.std()),
                "seeds": len(items), "seed_list": sorted(r["seed"] for r in items),
                "schedule": items[0]["schedule"], "schedule_label": budget,
                "device": device, "cpu_schedule": not device.startswith("cuda"),
                "epochs": float(np.mean([r["epochs"] for r in items])),
                "train_s": float(np.mean([r["train_s"] for r in items])),
                "peak_rss_mb": float(np.max([r.get("peak_rss_mb", np.nan) for r in items])),
                "peak_gpu_mb": max((r["peak_gpu_mb"] for r in items if r.get("peak_gpu_mb")), default=None),
            })
    return results


def paper_document(config: PaperConfig, rows: list[dict[str, Any]], environment_info: dict[str, Any] | None = None,
                   note: str | None = None) -> dict[str, Any]:
    """The result file: per-seed runs and their mean ± std (the runs' histories stay in the state file)."""
    rows = sorted((r for r in rows if r["protocol"] == PROTOCOL),
                  key=lambda r: (r["dataset"], r["method"], r["budget"], r["seed"]))
    document = {
        "protocol": PROTOCOL,
        "units": "dice and iou are fractions in [0, 1] (published figures are percentages); std over seeds",
        "config": asdict(config),
        "environment": environment_info if environment_info is not None else environment(),
        "results": aggregate(rows),
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in rows],
    }
    if note:
        document["note"] = note
    return document


def _existing_note(out: str | Path) -> str | None:
    """A note on where imported runs came from survives a later run that adds rows."""
    try:
        return json.loads(Path(out).read_text()).get("note")
    except (OSError, ValueError, AttributeError):
        return None


def run_paper(config: PaperConfig, out: str | Path, state: StateFile, progress: bool = True) -> dict:
    run_tasks(plan(config), state, progress=progress, description="paper")
    document = paper_document(config, list(state.load().values()), note=_existing_note(out))
    write_json(out, document)
    return document
