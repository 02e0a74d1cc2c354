"""The correction protocol: a second round of strokes on the mistakes, the way users work.

Round 1 is the interactive protocol (simulated strokes, a training budget, predict). The
simulated user then looks at the method's *own* prediction and paints up to
``CorrectionConfig.strokes`` strokes on its largest mistakes (``strokes.correction_strokes``).
Round 2: ``selfreg`` and ``unet`` continue training from their round-1 model on all strokes
for the same budget (the widget's "Use prediction as labels / Start again" loop, with
strokes instead of the whole edited prediction); ``rf`` is retrained on all strokes;
``otsu`` learns nothing from strokes but its polarity, which it keeps from round 1.
Dice against the full mask after every round, at native resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Sample, load_split
from .harness import RunKey, StateFile, Task, protocol_rows, run_tasks, write_protocol
from .interactive import (
    BASELINE_METHODS,
    NEURAL_METHODS,
    UNRECORDED,
    Budget,
    InteractiveConfig,
    _load,
    _scores,
    budget_label,
    budget_order,
    run_neural,
    run_settings,
    stroke_seed,
)
from .strokes import CorrectionConfig, correction_strokes, coverage, simulate_strokes

PROTOCOL = "correction"
METHODS = ("selfreg", "unet", "rf", "otsu")


@dataclass
class CorrectionProtocolConfig(InteractiveConfig):
    methods: list[str] = field(default_factory=lambda: ["selfreg", "unet", "rf", "otsu"])
    budgets: list[str] = field(default_factory=lambda: ["60s"])
    rounds: int = 2
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        self.budgets = [budget_label(b) for b in self.budgets]


def _round(method: str, image, strokes, config: CorrectionProtocolConfig, budget: str | None, seed: int,
           previous) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """One round of one method: (labels, state carried to the next round, facts)."""
    from .baselines import otsu_segment, random_forest_segment

    if method == "rf":
        return random_forest_segment(image, strokes, seed=seed), None, {}
    if method == "otsu":
        return otsu_segment(image, strokes), None, {}
    run = run_neural(image, strokes, config, Budget.parse(budget), seed, selfreg=method == "selfreg",
                     initial=previous)
    return run.labels, run.model, {"steps": run.facts["steps"], "train_s": run.facts["train_s"]}


def make_task(config: CorrectionProtocolConfig, dataset: str, sample: Sample, method: str, budget: str | None,
              seed: int) -> Task:
    key = RunKey(PROTOCOL, dataset, sample.name, method, budget or "none", seed)

    def run() -> dict[str, Any]:
        image, instances = _load(sample, config.crop)
        strokes = simulate_strokes(instances, stroke_seed(sample.name, seed), config.strokes)
        first = strokes
        rounds, carried, labels = [], None, None
        for index in range(config.rounds):
            if index:
                added = correction_strokes(labels >= 2, instances, stroke_seed(sample.name, seed) + index,
                                           config.correction)
                strokes = np.where(added > 0, added, strokes)
            # Otsu reads strokes only for its polarity; correction strokes sit on its mistakes by
            # construction (dark background, pale nuclei) and would flip it, so it keeps round 1's
            seen = first if method == "otsu" else strokes
            labels, carried, facts = _round(method, image, seen, config, budget, seed, carried)
            rounds.append({**_scores(labels, instances), **facts, "stroke_fraction": coverage(strokes)})
        return {
            **{k: rounds[-1][k] for k in ("dice", "iou", "predicted_fraction")},
            "rounds": rounds, "shape": list(image.shape[:2]),
        }

    settings = {**run_settings(config, method), "rounds": config.rounds, "correction": asdict(config.correction)}
    return Task(key, run, settings, UNRECORDED if method in NEURAL_METHODS else {})


def plan(config: CorrectionProtocolConfig) -> list[Task]:
    tasks = []
    for dataset in config.datasets:
        split = load_split(dataset, config.data_root)
        samples = split.test if config.images is None else split.test[: config.images]
        for seed in config.seeds:
            for sample in samples:
                for method in config.methods:
                    budgets = [None] if method in BASELINE_METHODS else config.budgets
                    tasks += [make_task(config, dataset, sample, method, b, seed) for b in budgets]
    return tasks


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean Dice per round for each dataset, method and budget (over the images that finished)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"], row["budget"]), []).append(row)
    means = []
    for (dataset, method, budget), items in sorted(groups.items(), key=lambda g: (*g[0][:2], budget_order(g[0][2]))):
        per_round = np.array([[r["dice"] for r in row["rounds"]] for row in items])
        fractions = np.array([[r["stroke_fraction"] for r in row["rounds"]] for row in items])
        means.append({
            "dataset": dataset, "method": method, "budget": budget, "n": len(items),
            "images": sorted(f"{r['image']}|{r['seed']}" for r in items),  # which, for comparing methods
            "dice_per_round": per_round.mean(0).tolist(), "dice_std_per_round": per_round.std(0).tolist(),
            "stroke_fraction_per_round": fractions.mean(0).tolist(),
        })
    return means


def run_correction(config: CorrectionProtocolConfig, out: str | Path, state: StateFile, progress: bool = True) -> dict:
    run_tasks(plan(config), state, progress=progress, description="correction")
    rows = protocol_rows(state, PROTOCOL)
    return write_protocol(out, PROTOCOL, "dice and iou are fractions in [0, 1]; times in seconds", config,
                          means=summarize(rows), rows=rows)
