"""The interactive protocol: what a user gets from a few strokes and a fixed CPU budget.

For every test image: simulated strokes (seeded), then
- ``selfreg``: the plugin's SelfReg UNet trained from scratch on the strokes for
  ``budget`` seconds (``core.train`` with ``time_budget``), then tiled prediction; a
  budget such as "200steps" fixes the number of steps instead (machine-independent);
- ``unet``: the same without the SelfReg terms;
- ``transfer``: the SelfReg UNet fine-tuned from a model pretrained on the *other*
  dataset's train split (full masks as dense labels, a fixed step budget), same budget;
  compare with ``selfreg`` (from scratch);
- ``rf``: a random forest on multiscale features, trained on the same strokes;
- ``otsu``: Otsu on hematoxylin (polarity from the strokes).
Dice and IoU are measured against the full mask at native resolution. The training
budget excludes prediction time (recorded separately as ``predict_s``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Sample, center_crop, load_split
from .harness import KEY_FIELDS, RunKey, StateFile, Task, protocol_rows, run_tasks, write_protocol
from .strokes import StrokeConfig, coverage, simulate_strokes

PROTOCOL = "interactive"
NEURAL_METHODS = ("selfreg", "unet", "transfer")
BASELINE_METHODS = ("rf", "otsu")
METHODS = NEURAL_METHODS + BASELINE_METHODS
OTHER = {"monuseg": "glas", "glas": "monuseg"}
NO_BUDGET = "none"  # the baselines have no training budget


@dataclass
class InteractiveConfig:
    datasets: list[str] = field(default_factory=lambda: ["monuseg"])
    budgets: list[str] = field(default_factory=lambda: ["30s", "60s", "120s"])  # or "200steps"
    methods: list[str] = field(default_factory=lambda: ["selfreg", "unet", "rf", "otsu"])
    images: int | None = None  # None = every test image
    seeds: list[int] = field(default_factory=lambda: [0])
    base_channels: int = 16
    patch_size: int = 128
    batch_size: int = 4
    learning_rate: float = 1e-3
    max_steps: int = 100_000  # the time budget is what stops training
    # strokes held out of the networks' training for a validation Dice: 0 trains on every
    # stroke, as the baselines get them (the rows measured before 2026-11-24 held out 0.2)
    validation_fraction: float = 0.0
    transfer_steps: int = 1000
    transfer_patch_size: int = 128
    transfer_images: int | None = None  # None = the whole train split of the other dataset
    crop: int | None = None  # smoke runs: central crop of every image
    device: str = "cpu"
    data_root: str | None = None
    cache_dir: str = "benchmarks/runs/cache"
    strokes: StrokeConfig = field(default_factory=StrokeConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        self.budgets = [budget_label(b) for b in self.budgets]


@dataclass(frozen=True)
class Budget:
    """A training budget: seconds of training, or a number of steps."""

    seconds: float | None = None
    steps: int | None = None

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        value = str(text).strip().lower()
        try:
            if value.endswith("steps"):
                budget = cls(steps=int(value[: -len("steps")]))
            else:
                budget = cls(seconds=float(value.removesuffix("s")))
        except ValueError:
            raise ValueError(f"budget {text!r} is neither seconds (60, 60s) nor steps (200steps)") from None
        if (budget.seconds or budget.steps or 0) <= 0:
            raise ValueError(f"budget {text!r} must be positive")
        return budget

    @property
    def label(self) -> str:
        return f"{self.steps}steps" if self.steps else f"{self.seconds:g}s"


def budget_label(value: str | float) -> str:
    return Budget.parse(value).label


def budget_order(label: str) -> tuple[int, float, int]:
    """Sort key for budget labels: "none" first, then seconds, then steps, each by size (not as text)."""
    if label == NO_BUDGET:
        return (0, 0.0, 0)
    budget = Budget.parse(label)
    return (1, 0.0, budget.steps) if budget.steps else (2, budget.seconds or 0.0, 0)


def stroke_seed(name: str, seed: int) -> int:
    """A per-image stroke seed: the same image and seed always get the same strokes."""
    return (zlib.crc32(name.encode()) + 7919 * seed) % 2**31


def protocol_strokes(sample: Sample, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, instances, strokes): a sample as the interactive protocol paints it, for the
    benchmark scripts that train on the same strokes outside it."""
    instances = sample.instances()
    return sample.image(), instances, simulate_strokes(instances, stroke_seed(sample.name, seed))


def _load(sample: Sample, crop: int | None) -> tuple[np.ndarray, np.ndarray]:
    return center_crop(sample.image(), crop), center_crop(sample.instances(), crop)


def _scores(predicted_labels: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    from ..core.metrics import overlap

    result = overlap(predicted_labels >= 2, truth > 0)
    return {"dice": result.dice, "iou": result.iou, "predicted_fraction": float((predicted_labels >= 2).mean())}


def _pretrained_path(config: InteractiveConfig, source: str, seed: int) -> Path:
    """The cached model of exactly these pretraining settings: the readable ones in the name,
    all of them (learning rate, batch and patch size too) in its checksum."""
    crop = f"_crop{config.crop}" if config.crop else ""
    count = f"_{config.transfer_images}img" if config.transfer_images else ""
    settings = (source, seed, config.transfer_steps, config.transfer_patch_size, config.batch_size,
                config.learning_rate, config.base_channels, config.crop, config.transfer_images, config.data_root)
    digest = f"{zlib.crc32(repr(settings).encode()):08x}"
    name = f"pretrained_{source}_{config.transfer_steps}steps_b{config.base_channels}_seed{seed}{crop}{count}_{digest}"
    return Path(config.cache_dir) / f"{name}.safetensors"


def ensure_pretrained(config: InteractiveConfig, source: str, seed: int) -> tuple[Path, dict[str, Any]]:
    """Train (once) a SelfReg UNet on ``source``'s train split with dense labels; cache it."""
    import time

    from ..core.checkpoint import save_model
    from ..core.config import ModelConfig, TrainConfig
    from ..core.train import train_to_end

    path = _pretrained_path(config, source, seed)
    if path.is_file():
        return path, {"pretrained": str(path), "cached": True}
    split = load_split(source, config.data_root)
    images, labels = [], []
    for sample in split.train[: config.transfer_images]:
        image, instances = _load(sample, config.crop)
        images.append(image)
        labels.append((instances > 0).astype(np.uint8) + 1)  # dense: 1 = background, 2 = structure
    train_config = TrainConfig(
        steps=config.transfer_steps, patch_size=config.transfer_patch_size, batch_size=config.batch_size,
        learning_rate=config.learning_rate, selfreg=True, validation_fraction=0.0, seed=seed, device=config.device,
    )
    start = time.perf_counter()
    result = train_to_end(images, labels, train_config, ModelConfig(base_channels=config.base_channels))
    save_model(result.last, path)
    return path, {
        "pretrained": str(path), "cached": False, "train_s": time.perf_counter() - start, "steps": result.steps,
        "train_images": len(images), "final_loss": result.history[-1].loss if result.history else None,
    }


@dataclass
class NeuralRun:
    """One neural training run and its predictions.

    ``variants`` come from the same run: "flips" (the kept weights with ``PredictConfig.flips``)
    and "best" or "last" (the weights not kept); they are scored beside ``labels``.
    """

    labels: np.ndarray
    facts: dict[str, Any]
    variants: dict[str, np.ndarray]
    model: Any  # the kept SegmentationModel: a correction round continues from it


def run_neural(
    image: np.ndarray, strokes: np.ndarray, config: InteractiveConfig, budget: Budget, seed: int,
    selfreg: bool, initial=None,
) -> NeuralRun:
    """Train for ``budget`` (from ``initial`` when given), then predict the whole image."""
    import time

    from ..core.config import ModelConfig, PredictConfig, TrainConfig
    from ..core.predict import predict
    from ..core.train import train_to_end

    train_config = TrainConfig(
        steps=budget.steps or config.max_steps, time_budget=budget.seconds,
        patch_size=config.patch_size, batch_size=config.batch_size,
        learning_rate=config.learning_rate, selfreg=selfreg, seed=seed, device=config.device,
        validation_fraction=config.validation_fraction,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train_to_end([image], [strokes], train_config, ModelConfig(base_channels=config.base_channels),
                          initial=initial)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    prediction = predict(result.model, image, PredictConfig(device=config.device), probabilities=False)
    predict_s = time.perf_counter() - start
    start = time.perf_counter()
    flipped = predict(result.model, image, PredictConfig(device=config.device, flips=True), probabilities=False)
    predict_flips_s = time.perf_counter() - start
    other_name, other = ("best", result.best) if result.keep == "last" else ("last", result.last)
    variants = {"flips": flipped.labels}
    if other is not result.model:  # without held-out strokes the best weights are the last
        variants[other_name] = predict(other, image, PredictConfig(device=config.device), probabilities=False).labels
    last = result.history[-1] if result.history else None
    facts = {
        "steps": result.steps, "train_s": round(train_s, 3), "train_cpu_s": round(train_cpu_s, 3),
        "predict_s": round(predict_s, 3), "predict_flips_s": round(predict_flips_s, 3),
        "best_val_dice": last.best_val_dice if last else None, "kept": result.keep, "other_weights": other_name,
        "validation_fraction": config.validation_fraction,
    }
    return NeuralRun(prediction.labels, facts, variants, result.model)


def make_task(config: InteractiveConfig, dataset: str, sample: Sample, method: str, budget: str | None,
              seed: int) -> Task:
    key = RunKey(PROTOCOL, dataset, sample.name, method,
                 budget_label(budget) if budget is not None else NO_BUDGET, seed)

    def run() -> dict[str, Any]:
        import time

        from .baselines import otsu_segment, random_forest_segment

        image, instances = _load(sample, config.crop)
        strokes = simulate_strokes(instances, stroke_seed(sample.name, seed), config.strokes)
        extra: dict[str, Any] = {}
        variants: dict[str, np.ndarray] = {}
        start = time.perf_counter()
        if method == "rf":
            predicted = random_forest_segment(image, strokes, seed=seed)
        elif method == "otsu":
            predicted = otsu_segment(image, strokes)
        elif method in ("selfreg", "unet"):
            run = run_neural(image, strokes, config, Budget.parse(budget), seed, selfreg=method == "selfreg")
            predicted, extra, variants = run.labels, run.facts, run.variants
        elif method == "transfer":
            from ..core.checkpoint import load_model

            path, _ = ensure_pretrained(config, OTHER[dataset], seed)
            initial = load_model(path)
            run = run_neural(image, strokes, config, Budget.parse(budget), seed, selfreg=True, initial=initial)
            predicted, extra, variants = run.labels, run.facts, run.variants
            extra["pretrained_on"] = OTHER[dataset]
        else:  # pragma: no cover - validated in the config
            raise ValueError(method)
        elapsed = time.perf_counter() - start
        for name, labels in variants.items():  # dice_flips, dice_best, ...
            extra.update({f"{k}_{name}": v for k, v in _scores(labels, instances).items()})
        return {
            **_scores(predicted, instances), **extra, "method_s": round(elapsed, 3),
            "stroke_fraction": coverage(strokes), "shape": list(image.shape[:2]),
        }

    return Task(key, run, run_settings(config, method), UNRECORDED if method in NEURAL_METHODS else {})


# The networks' rows made before 9db77b1 do not record validation_fraction: they held out TrainConfig's 0.2.
UNRECORDED = {"validation_fraction": 0.2}


def run_settings(config: InteractiveConfig, method: str) -> dict[str, Any]:
    """What a run's result depends on besides its key: the strokes, and the networks' settings."""
    settings: dict[str, Any] = {"crop": config.crop, "strokes": asdict(config.strokes)}
    if method in NEURAL_METHODS:
        settings.update(
            base_channels=config.base_channels, patch_size=config.patch_size, batch_size=config.batch_size,
            learning_rate=config.learning_rate, max_steps=config.max_steps, device=config.device,
            validation_fraction=config.validation_fraction,
        )
    if method == "transfer":
        settings.update(transfer_steps=config.transfer_steps, transfer_patch_size=config.transfer_patch_size,
                        transfer_images=config.transfer_images)
    return settings


def pretrain_task(config: InteractiveConfig, source: str, seed: int) -> Task:
    key = RunKey(PROTOCOL, source, "train-split", "pretrain", f"{config.transfer_steps}steps", seed)
    return Task(key, lambda: ensure_pretrained(config, source, seed)[1])


def plan(config: InteractiveConfig) -> list[Task]:
    """Every run of the protocol, cheapest first so that a partial run already says something."""
    tasks: list[Task] = []
    for dataset in config.datasets:
        split = load_split(dataset, config.data_root)
        samples = split.test if config.images is None else split.test[: config.images]
        for seed in config.seeds:
            if "transfer" in config.methods:
                tasks.append(pretrain_task(config, OTHER[dataset], seed))
            for sample in samples:
                for method in config.methods:
                    if method in BASELINE_METHODS:
                        tasks.append(make_task(config, dataset, sample, method, None, seed))
                for budget in config.budgets:
                    for method in config.methods:
                        if method in NEURAL_METHODS:
                            tasks.append(make_task(config, dataset, sample, method, budget, seed))
    return tasks


def summarize(rows: Sequence[dict[str, Any]], failed: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Means per (dataset, method, budget), and the issue's goal per (dataset, budget).

    Goal: SelfReg-UNet's mean Dice minus the better of the RF's and Otsu's mean Dice
    (on the same images), to be at least 0.05. ``failed`` are the runs that ended in an
    error: an image one of the compared methods failed on is named, and the goal is then
    not met, whatever the images that did finish say.
    """
    scored = [r for r in rows if "dice" in r and r["method"] != "pretrain"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in scored:
        groups.setdefault((row["dataset"], row["method"], row["budget"]), []).append(row)
    means = []
    for (dataset, method, budget), items in sorted(groups.items(), key=lambda g: (*g[0][:2], budget_order(g[0][2]))):
        dice = np.array([r["dice"] for r in items])
        iou = np.array([r["iou"] for r in items])
        entry = {
            "dataset": dataset, "method": method, "budget": budget, "n": len(items),
            "dice": float(dice.mean()), "dice_std": float(dice.std()), "iou": float(iou.mean()),
            "iou_std": float(iou.std()), "wall_s": float(np.mean([r.get("wall_s", np.nan) for r in items])),
            "peak_rss_mb": float(np.max([r.get("peak_rss_mb", np.nan) for r in items])),
        }
        steps = [r["steps"] for r in items if r.get("steps") is not None]
        if steps:
            entry["steps"] = float(np.mean(steps))
        for variant in ("flips", "best"):
            if all(f"dice_{variant}" in r for r in items):
                entry[f"dice_{variant}"] = float(np.mean([r[f"dice_{variant}"] for r in items]))
                entry[f"dice_{variant}_std"] = float(np.std([r[f"dice_{variant}"] for r in items]))
        means.append(entry)
    goal = []
    for dataset in sorted({r["dataset"] for r in scored}):
        baseline = {m: {(r["image"], r["seed"]): r["dice"] for r in scored
                        if r["dataset"] == dataset and r["method"] == m} for m in BASELINE_METHODS}
        budgets = {r["budget"] for r in scored if r["dataset"] == dataset and r["method"] == "selfreg"}
        for budget in sorted(budgets, key=budget_order):
            ours_rows = [r for r in scored
                         if r["dataset"] == dataset and r["method"] == "selfreg" and r["budget"] == budget]
            ours = {(r["image"], r["seed"]): r["dice"] for r in ours_rows}
            ours_flips = {(r["image"], r["seed"]): r["dice_flips"] for r in ours_rows if "dice_flips" in r}
            common = sorted(set(ours).intersection(*[set(b) for b in baseline.values() if b]))
            if not common or not any(baseline.values()):
                continue
            base_means = {m: float(np.mean([b[k] for k in common])) for m, b in baseline.items() if b}
            best_method = max(base_means, key=base_means.get)
            selfreg_mean = float(np.mean([ours[k] for k in common]))
            margin = selfreg_mean - base_means[best_method]
            entry = {
                "dataset": dataset, "budget": budget, "images": len(common), "selfreg_dice": selfreg_mean,
                "best_baseline": best_method, "best_baseline_dice": base_means[best_method],
                "margin": margin, "goal_margin": 0.05, "met": bool(margin >= 0.05),
            }
            lost = sorted({f["image"] for f in failed if f["dataset"] == dataset and (
                f["method"] in BASELINE_METHODS or (f["method"] == "selfreg" and f["budget"] == budget))})
            if lost:
                entry.update(failed_images=lost, met=False)
            if all(k in ours_flips for k in common):
                flips_mean = float(np.mean([ours_flips[k] for k in common]))
                entry.update(selfreg_dice_flips=flips_mean, margin_flips=flips_mean - base_means[best_method])
            goal.append(entry)
    return {"means": means, "goal": goal}


def run_interactive(config: InteractiveConfig, out: str | Path, state: StateFile, progress: bool = True) -> dict:
    tasks = plan(config)
    ran = run_tasks(tasks, state, progress=progress, description="interactive")
    failed = [{**{f: r[f] for f in KEY_FIELDS}, "error": r["error"]} for r in ran if "error" in r]
    rows = protocol_rows(state, PROTOCOL)
    units = "dice and iou are fractions in [0, 1]; times in seconds; memory in MiB"
    return write_protocol(out, PROTOCOL, units, config, **summarize(rows, failed), rows=rows, failed=failed)
