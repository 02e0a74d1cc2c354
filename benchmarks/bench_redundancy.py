"""Does SelfReg lower per-block feature redundancy? Train with and without it, compare.

For each image (MoNuSeg and GlaS, from ../shared/data) and seed, strokes are simulated from
the ground-truth mask (a small seeded simulator local to this script), and two models are
trained on the same strokes with the same seed: plain (CE + Dice) and SelfReg (+ SCR + IFD).
Both are then inspected on the whole image: the redundancy index per block
(``napari_selfreg.core.redundancy``), and, for context, the foreground Dice of the
segmentation against the full mask.

    python benchmarks/bench_redundancy.py --quick          # a smoke run, about a minute
    python benchmarks/bench_redundancy.py                   # 2 images x 2 datasets x 2 seeds x 2 variants

Writes benchmarks/results/redundancy.json and benchmarks/sections/redundancy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SELFREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

DATASETS = {
    # first images of the official training splits, in a fixed order
    "monuseg": ("monuseg/train/images", "monuseg/train/masks", "{stem}.png"),
    "glas": ("glas/train/images", "glas/train/masks", "{stem}_anno.png"),
}


def read_pair(data: Path, dataset: str, index: int) -> tuple[str, np.ndarray, np.ndarray]:
    from PIL import Image

    images, masks, mask_name = DATASETS[dataset]
    paths = sorted((data / images).glob("*.png"), key=lambda p: (len(p.stem), p.stem))
    path = paths[index]
    with Image.open(path) as img:
        image = np.array(img.convert("RGB"))
    with Image.open(data / masks / mask_name.format(stem=path.stem)) as m:
        mask = np.array(m) > 0
    return path.stem, image, mask


def simulate_strokes(mask: np.ndarray, seed: int, strokes_per_class: int = 12, length: int = 40,
                     radius: int = 2) -> np.ndarray:
    """Short straight strokes inside each class, kept off its borders; 1 = background, 2 = structure.

    The class region is eroded first so that strokes stay where an annotator would paint
    confidently; each stroke starts at a random pixel of the eroded region, runs in a random
    direction and keeps only its pixels inside the region.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = np.zeros(mask.shape, np.uint8)
    disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    for value, region in ((1, ~mask), (2, mask)):
        inner = ndimage.binary_erosion(region, iterations=radius + 3)
        if not inner.any():
            inner = region
        coords = np.argwhere(inner)
        painted = np.zeros(mask.shape, bool)
        for _ in range(strokes_per_class):
            y, x = coords[rng.integers(len(coords))]
            angle = rng.uniform(0, np.pi)
            t = np.arange(-length // 2, length // 2 + 1)
            ys = np.clip(np.rint(y + t * np.sin(angle)).astype(int), 0, mask.shape[0] - 1)
            xs = np.clip(np.rint(x + t * np.cos(angle)).astype(int), 0, mask.shape[1] - 1)
            painted[ys, xs] = True
        painted = ndimage.binary_dilation(painted, structure=disk) & inner
        labels[painted] = value
    return labels


def foreground_dice(predicted: np.ndarray, mask: np.ndarray) -> float:
    p = predicted == 2
    denominator = p.sum() + mask.sum()
    return float(2 * (p & mask).sum() / denominator) if denominator else 1.0


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run(args, checkpoint=None) -> dict:
    """Train and inspect every (dataset, image, seed, variant); ``checkpoint(runs)`` after each."""
    import torch

    from napari_selfreg.core.config import ModelConfig, PredictConfig, TrainConfig
    from napari_selfreg.core.predict import predict
    from napari_selfreg.core.redundancy import RedundancyConfig, redundancy_report
    from napari_selfreg.core.train import train_to_end

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    started = time.perf_counter()
    for dataset in args.datasets:
        for index in range(args.images):
            stem, image, mask = read_pair(args.data, dataset, index)
            if args.crop:
                image, mask = image[: args.crop, : args.crop], mask[: args.crop, : args.crop]
            for seed in args.seeds:
                strokes = simulate_strokes(mask, seed)
                for variant in ("plain", "selfreg"):
                    t0 = time.perf_counter()
                    # no held-out strokes: the last weights are compared, so validation would only cost time
                    config = TrainConfig(steps=args.steps, selfreg=variant == "selfreg", seed=seed, device="cpu",
                                         validation_fraction=0.0)
                    result = train_to_end([image], [strokes], config, ModelConfig(base_channels=args.base_channels))
                    train_seconds = time.perf_counter() - t0
                    model = result.last
                    prediction = predict(model, image, PredictConfig(tile_size=1024, device="cpu"),
                                         probabilities=False)
                    entry = {
                        "dataset": dataset, "image": stem, "seed": seed, "variant": variant,
                        "shape": list(image.shape[:2]), "painted_pixels": int((strokes > 0).sum()),
                        "steps": result.steps, "train_seconds": round(train_seconds, 1),
                        "dice": foreground_dice(prediction.labels, mask),
                    }
                    for similarity in args.similarities:
                        t1 = time.perf_counter()
                        report = redundancy_report(model, image, RedundancyConfig(similarity=similarity, device="cpu"))
                        entry[similarity] = {b.name: round(b.redundancy_index, 5) for b in report.blocks}
                        entry[f"{similarity}_seconds"] = round(time.perf_counter() - t1, 1)
                        if similarity == args.similarities[0]:
                            entry["dead_channels"] = {b.name: b.dead_channels for b in report.blocks}
                            entry["scr_mean"] = {b.name: float(f"{b.scr_mean:.4g}") for b in report.blocks}
                            entry["ifd_mean"] = {b.name: float(f"{b.ifd_mean:.4g}") for b in report.blocks}
                            entry["roles"] = {b.name: b.role for b in report.blocks}
                    runs.append(entry)
                    if checkpoint is not None:
                        checkpoint(runs)
                    print(f"{dataset} {stem} seed {seed} {variant}: dice {entry['dice']:.3f}, "
                          f"{args.similarities[0]} " + " ".join(f"{k} {v:.3f}" for k, v in
                                                                entry[args.similarities[0]].items()),
                          f"({train_seconds:.0f} s train)", flush=True)
    return {"runs": runs, "seconds": round(time.perf_counter() - started, 1)}


def summarise(runs: list[dict], similarity: str) -> dict:
    """Per dataset and block: mean index of each variant, mean paired difference (SelfReg - plain),
    and in how many of the paired runs SelfReg was lower."""
    summary: dict = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        pairs = {}
        for r in runs:
            if r["dataset"] == dataset and similarity in r:
                pairs.setdefault((r["image"], r["seed"]), {})[r["variant"]] = r
        pairs = [p for p in pairs.values() if len(p) == 2]
        if not pairs:
            continue
        blocks = list(pairs[0]["plain"][similarity])
        table = {}
        for block in blocks:
            plain = np.array([p["plain"][similarity][block] for p in pairs])
            selfreg = np.array([p["selfreg"][similarity][block] for p in pairs])
            table[block] = {
                "plain": float(plain.mean()), "selfreg": float(selfreg.mean()),
                "difference": float((selfreg - plain).mean()),
                "difference_sd": float((selfreg - plain).std(ddof=1)) if len(pairs) > 1 else 0.0,
                "selfreg_lower": int((selfreg < plain).sum()), "pairs": len(pairs),
                "role": pairs[0]["plain"].get("roles", {}).get(block, ""),
            }
        dice_plain = float(np.mean([p["plain"]["dice"] for p in pairs]))
        dice_selfreg = float(np.mean([p["selfreg"]["dice"] for p in pairs]))
        summary[dataset] = {"blocks": table, "dice_plain": dice_plain, "dice_selfreg": dice_selfreg}
    return summary


FINDINGS_MARK = "<!-- findings: written by hand; regenerating the tables above keeps them -->"


def with_kept_findings(generated: str, section: Path) -> str:
    """The generated tables, then the hand-written findings of the section file, if it has any."""
    old = section.read_text() if section.is_file() else ""
    if FINDINGS_MARK not in old:
        return generated
    return generated.rstrip("\n") + "\n\n" + FINDINGS_MARK + old.split(FINDINGS_MARK, 1)[1]


def markdown(document: dict) -> str:
    cfg, info = document["config"], document["machine"]
    lines = ["## Feature redundancy with and without SelfReg", ""]
    crop = f" (top-left {cfg['crop']} px)" if cfg["crop"] else ""
    lines += [
        f"Per-block redundancy index (mean |channel similarity| off the diagonal; 0 = orthogonal channels, "
        f"1 = identical) of models trained on the same simulated strokes with and without SelfReg "
        f"(SCR + IFD, lambda 0.015 each). {cfg['images']} image(s) per dataset x seeds {cfg['seeds']} x 2 variants, "
        f"{cfg['steps']} steps each, base width {cfg['base_channels']}, patch 128, batch 4; index over the whole "
        f"image{crop}; last weights. "
        "Δ = SelfReg − plain, averaged over paired runs (same image, strokes and seed); "
        "'lower' = paired runs in which SelfReg's index was lower.",
        "",
    ]
    for similarity in cfg["similarities"]:
        summary = document["summary"].get(similarity, {})
        if not summary:
            continue
        datasets = list(summary)
        header = "| block | role | " + " | ".join(
            f"{d} plain | {d} SelfReg | {d} Δ (sd) | lower" for d in datasets) + " |"
        lines += [f"### {similarity.capitalize()} similarity", "", header,
                  "|" + "---|" * (2 + 4 * len(datasets))]
        blocks = list(summary[datasets[0]]["blocks"])
        for block in blocks:
            cells = [block, summary[datasets[0]]["blocks"][block]["role"]]
            for d in datasets:
                b = summary[d]["blocks"][block]
                cells += [f"{b['plain']:.3f}", f"{b['selfreg']:.3f}",
                          f"{b['difference']:+.3f} ({b['difference_sd']:.3f})", f"{b['selfreg_lower']}/{b['pairs']}"]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["Dice (fg, whole image)", ""]
        for d in datasets:
            cells += [f"{summary[d]['dice_plain']:.3f}", f"{summary[d]['dice_selfreg']:.3f}",
                      f"{summary[d]['dice_selfreg'] - summary[d]['dice_plain']:+.3f}", ""]
        lines += ["| " + " | ".join(cells) + " |", ""]
    lines += [
        "Command:", "", "```", document["command"], "```", "",
        f"Machine: {info['cpu']}, {info['cores']} cores (shared with other jobs), torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}. Total {document['seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--images", type=int, default=2, help="images per dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--similarities", nargs="+", default=["cosine", "pearson"], choices=["cosine", "pearson"])
    parser.add_argument("--crop", type=int, default=0, help="use only the top-left CROP x CROP pixels (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 image, 1 seed, 20 steps, 256 px crops")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "redundancy.json")
    parser.add_argument("--section", type=Path, default=ROOT / "benchmarks" / "sections" / "redundancy.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.seeds, args.steps, args.crop = 1, [0], 20, 256
    if not (args.data / "monuseg").is_dir():
        print(f"no data at {args.data}; pass --data", file=sys.stderr)
        return 2
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "section")}
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *(argv or sys.argv[1:])])
    started = time.perf_counter()

    def write(runs: list[dict], complete: bool = False) -> None:
        document = {
            "config": config, "machine": machine(), "command": command, "complete": complete,
            "runs": runs, "seconds": round(time.perf_counter() - started, 1),
            "summary": {s: summarise(runs, s) for s in args.similarities},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2))
        args.section.parent.mkdir(parents=True, exist_ok=True)
        args.section.write_text(with_kept_findings(markdown(document), args.section))

    results = run(args, checkpoint=write)  # partial results are on disk after every model
    write(results["runs"], complete=True)
    print(f"wrote {args.out} and {args.section}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
