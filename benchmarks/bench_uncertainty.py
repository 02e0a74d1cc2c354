"""Does the uncertainty map point at the prediction's mistakes? ("where the model is unsure is
where to paint next")

For every test image: the interactive protocol's simulated strokes (same seeding), the default
SelfReg-UNet trained on them for a fixed number of steps with the protocol's settings
(``bench.interactive.run_neural``; steps, not seconds, so the result does not depend on the
machine's load), then ``predict(..., uncertainty=True)``. Against the full mask (structure =
any non-zero) it records how well the map separates wrong pixels from right ones: the AUROC,
the share of all wrong pixels inside the 10 % / 20 % most uncertain pixels (10 % / 20 % for a
random choice; ties shared out as a random tie-break would), the error rate inside the top
10 % against the rest, how confident the wrong pixels are, and the same capture for the
simplest rival map, "distance to the predicted outline".

``--second-round-steps N`` (default 0: none) then adds one round of strokes and trains on for that
many steps, from the same model, in four arms: no new strokes (extra training only), strokes
started at the most uncertain paintable places, strokes started at random paintable places
(both labelled from the truth, as a user paints what they see), and the correction protocol's
user, who paints the largest mistakes (``bench.strokes.correction_strokes``). Every arm gets
the same brush, stroke length and count (``CorrectionConfig``).

    python benchmarks/bench_uncertainty.py --dataset monuseg --threads 1 \
        --out benchmarks/results/uncertainty_monuseg.json
    python benchmarks/bench_uncertainty.py --dataset glas --images 12 --threads 1 \
        --out benchmarks/results/uncertainty_glas.json
    python benchmarks/bench_uncertainty.py --dataset monuseg --images 1 --second-round-steps 200 --out FILE

On a busy machine prefix ``OMP_WAIT_POLICY=PASSIVE`` (the JSON records it): spin-waiting threads
then slow each other down several times. Needs ../shared/data or $SELFREG_SHARED_DATA (exits 2
without it). The JSON is rewritten after
every image, so a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

HERE = Path(__file__).resolve().parent
CONFIDENT = 0.5  # uncertainty below this: the larger of two class probabilities is above 0.89


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for telling ``positive`` pixels from the rest
    (Mann-Whitney with average ranks, so ties count a half); None without both kinds."""
    score, positive = np.ravel(score), np.ravel(positive).astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_share(score: np.ndarray, wrong: np.ndarray, share: float) -> dict[str, float]:
    """The ``share`` of pixels with the highest ``score``: the part of all wrong pixels inside it,
    and the error rate inside and outside it. Pixels tied at the threshold count in proportion,
    the expectation of a random tie-break (a rival map such as a distance has many ties)."""
    score, wrong = np.ravel(score), np.ravel(wrong).astype(bool)
    k = share * score.size
    threshold = np.partition(score, score.size - int(np.ceil(k)))[score.size - int(np.ceil(k))]
    above, tied = score > threshold, score == threshold
    weight = (k - above.sum()) / tied.sum()
    caught = wrong[above].sum() + weight * wrong[tied].sum()
    total = wrong.sum()
    return {"captured": float(caught / total) if total else float("nan"),
            "error_rate_in": float(caught / k), "error_rate_out": float((total - caught) / (score.size - k))}


def outline_distance(predicted: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the predicted outline (the rival map: errors hug outlines)."""
    return np.where(predicted, ndimage.distance_transform_edt(predicted), ndimage.distance_transform_edt(~predicted))


def map_scores(uncertainty: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    wrong = predicted != truth
    near_outline = outline_distance(truth) <= 3  # within 3 px of the true outline
    confident_wrong = wrong & (uncertainty < CONFIDENT)
    rival = -outline_distance(predicted)
    def part(of: np.ndarray, among: np.ndarray) -> float:
        return float((of & among).sum() / max(among.sum(), 1))

    row: dict[str, float | None] = {
        "error_fraction": float(wrong.mean()), "auroc": auroc(uncertainty, wrong),
        "auroc_outline_distance": auroc(rival, wrong),
        "mean_uncertainty_wrong": float(uncertainty[wrong].mean()) if wrong.any() else None,
        "mean_uncertainty_right": float(uncertainty[~wrong].mean()),
        "wrong_confident_share": part(confident_wrong, wrong),
        "wrong_false_positive_share": part(predicted, wrong),
        "wrong_near_outline_share": part(near_outline, wrong),
        "confident_wrong_false_positive_share": part(predicted, confident_wrong),
        "confident_wrong_near_outline_share": part(near_outline, confident_wrong),
    }
    for share in (0.1, 0.2):
        pct = int(round(100 * share))
        top = top_share(uncertainty, wrong, share)
        row |= {f"captured_top{pct}": top["captured"], f"error_rate_top{pct}": top["error_rate_in"],
                f"error_rate_rest{pct}": top["error_rate_out"],
                f"captured_top{pct}_outline_distance": top_share(rival, wrong, share)["captured"]}
    return row


def placed_strokes(truth: np.ndarray, priority: np.ndarray | None, seed: int, config) -> np.ndarray:
    """``config.strokes`` strokes labelled from the truth (1 background, 2 structure), each a walk
    inside one class that keeps the brush off the true outline, as ``simulate_strokes`` paints.
    Starts: the paintable pixels of highest ``priority`` (None: at random), each at least a stroke's
    length from the strokes before it, so they spread over several places."""
    from napari_selfreg.bench.strokes import _disk_offsets, _draw, _safe_depth, _walk

    rng = np.random.default_rng(seed)
    offsets = _disk_offsets(config.width // 2)
    depth = _safe_depth(offsets, config.width // 2, config.margin)
    cross = ndimage.generate_binary_structure(2, 1)
    inner = ndimage.binary_erosion(truth, cross, iterations=depth)
    outer = ndimage.binary_erosion(~truth, cross, iterations=depth, border_value=1)
    candidates = np.flatnonzero(inner | outer)
    candidates = rng.permutation(candidates) if priority is None else candidates[
        np.argsort(-priority.ravel()[candidates], kind="stable")]
    labels = np.zeros(truth.shape, np.uint8)
    blocked = np.zeros(truth.shape, bool)
    w = truth.shape[1]
    drawn = 0
    for flat in candidates:
        y, x = divmod(int(flat), w)
        if blocked[y, x]:
            continue
        structure = bool(truth[y, x])
        path = _walk(inner if structure else outer, (y, x), config.length, config.turn, rng)
        _draw(labels, path, offsets, 2 if structure else 1)
        (top, left), (bottom, right) = path.min(0) - config.length, path.max(0) + config.length
        blocked[max(top, 0): bottom + 1, max(left, 0): right + 1] = True
        drawn += 1
        if drawn == config.strokes:
            break
    return labels


def second_round(image, strokes, instances, prediction, uncertainty, model, settings, steps, seed, stroke_seed):
    from napari_selfreg.bench.interactive import Budget, _scores, run_neural
    from napari_selfreg.bench.strokes import CorrectionConfig, correction_strokes

    correction = CorrectionConfig()
    truth = instances > 0
    smoothed = ndimage.uniform_filter(uncertainty, 2 * correction.width + 1)  # hot areas, not single pixels
    added = {
        "extra_steps_only": np.zeros_like(strokes),
        "uncertain": placed_strokes(truth, smoothed, stroke_seed + 1, correction),
        "random": placed_strokes(truth, None, stroke_seed + 1, correction),
        "on_mistakes": correction_strokes(prediction >= 2, instances, stroke_seed + 1, correction),
    }
    arms = {}
    for arm, new in added.items():
        run = run_neural(image, np.where(new > 0, new, strokes), settings, Budget(steps=steps), seed, selfreg=True,
                         initial=model)
        arms[arm] = {"dice": _scores(run.labels, instances)["dice"], "train_s": run.facts["train_s"],
                     "painted_pixels": int((new > 0).sum()),
                     "painted_on_wrong_share": float(((new > 0) & ((prediction >= 2) != truth)).sum()
                                                          / max((new > 0).sum(), 1))}
    return arms


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """mean, std (numpy's, over n), median, min and max over images of every numeric figure."""
    flat = [{k: v for k, v in r.items() if isinstance(v, float | int) and not isinstance(v, bool)}
            | {f"{arm}_{k}": v for arm, d in r.get("second_round", {}).items() for k, v in d.items()}
            | {f"{arm}_dice_gain": d["dice"] - r["dice"] for arm, d in r.get("second_round", {}).items()}
            for r in rows]
    out = {}
    for key in flat[0]:
        values = np.array([f[key] for f in flat if f.get(key) is not None], float)
        out[key] = {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
                    "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("monuseg", "glas"), default="monuseg")
    parser.add_argument("--images", type=int, help="only the first N test images (default: all)")
    parser.add_argument("--steps", type=int, default=400, help="training steps on the strokes")
    parser.add_argument("--second-round-steps", type=int, default=0, help="e.g. 200 (default 0: no second round)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crop", type=int, help="central crop of every image (smoke runs)")
    parser.add_argument("--data", type=Path, help="the folder holding monuseg/ and glas/")
    parser.add_argument("--out", type=Path, default=None, help="default: results/uncertainty_DATASET.json")
    args = parser.parse_args(argv)

    import torch

    from napari_selfreg.bench.datasets import SharedDataMissing, load_split
    from napari_selfreg.bench.harness import environment, write_json
    from napari_selfreg.bench.interactive import Budget, InteractiveConfig, _load, _scores, run_neural, stroke_seed
    from napari_selfreg.bench.strokes import CorrectionConfig, coverage, simulate_strokes
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.core.predict import predict

    torch.set_num_threads(args.threads)
    try:
        split = load_split(args.dataset, args.data)
    except SharedDataMissing as missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 2
    out = args.out or HERE / "results" / f"uncertainty_{args.dataset}.json"
    settings = InteractiveConfig(datasets=[args.dataset], crop=args.crop, data_root=args.data and str(args.data))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    doc = {
        "command": " ".join(["python", "benchmarks/bench_uncertainty.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit.strip(), "started": time.strftime("%Y-%m-%d %H:%M"),
        "config": {"steps": args.steps, "second_round_steps": args.second_round_steps, "seed": args.seed,
                   "threads": args.threads,
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
                   "confident_below": CONFIDENT, "interactive": asdict(settings),
                   "second_round_strokes": asdict(CorrectionConfig())},
        "machine": {**environment(), "model_name": next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                                                         if line.startswith("Model name")), None)},
        "units": "fractions in [0, 1]; times in seconds",
        "rows": [],
    }
    for sample in split.test[: args.images]:
        image, instances = _load(sample, args.crop)
        seed = stroke_seed(sample.name, args.seed)
        strokes = simulate_strokes(instances, seed, settings.strokes)
        run = run_neural(image, strokes, settings, Budget(steps=args.steps), args.seed, selfreg=True)
        start = time.perf_counter()
        plain = predict(run.model, image, PredictConfig(device=settings.device), probabilities=False, uncertainty=True)
        predict_s = time.perf_counter() - start
        flips = predict(run.model, image, PredictConfig(device=settings.device, flips=True), probabilities=False,
                        uncertainty=True)
        truth = instances > 0
        row = {"image": sample.name, "shape": list(image.shape[:2]), "steps": run.facts["steps"],
               "train_s": run.facts["train_s"], "predict_uncertainty_s": round(predict_s, 3),
               "stroke_fraction": coverage(strokes), "labels_as_run": bool(np.array_equal(plain.labels, run.labels)),
               **_scores(plain.labels, instances), **map_scores(plain.uncertainty, plain.labels >= 2, truth),
               "auroc_flips": auroc(flips.uncertainty, (flips.labels >= 2) != truth)}
        if args.second_round_steps:
            row["second_round"] = second_round(image, strokes, instances, plain.labels, plain.uncertainty, run.model,
                                               settings, args.second_round_steps, args.seed, seed)
        doc["rows"].append(row)
        doc["summary"] = summary(doc["rows"])
        write_json(out, doc)
        print(sample.name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                            if k in ("train_s", "dice", "auroc", "captured_top10", "wrong_confident_share")},
              {arm: round(d["dice"], 3) for arm, d in row.get("second_round", {}).items()}, flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
