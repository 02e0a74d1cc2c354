"""Turn benchmarks/results/{paper_protocol,interactive,correction}.json into benchmarks/sections/accuracy.md,
then assemble BENCHMARKS.md from benchmarks/sections/*.md.

    python benchmarks/make_tables.py [--results benchmarks/results] [--out benchmarks/sections/accuracy.md]
        [--interactive FILE] [--paper FILE]

The tables put our measurements beside the published figures (METHOD.md) and say on
which device and schedule each figure was measured, because a CPU schedule is not the
paper's schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (dataset, model) -> (Dice %, IoU %) as published; None where the paper gives no figure.
PUBLISHED = {
    ("monuseg", "unet"): (76.45, 62.86, "UNet, UCTransNet protocol"),
    ("monuseg", "selfreg_unet"): (80.0, 67.07, "SelfReg-UNet (Dice about 80; ablation best 80.2)"),
    ("glas", "unet"): (None, None, ""),
    ("glas", "selfreg_unet"): (91.62, None, "SelfReg-UNet (ablation best 90.9)"),
}
MODEL_NAMES = {"unet": "UNet", "selfreg_unet": "SelfReg-UNet"}
METHOD_NAMES = {
    "selfreg": "SelfReg-UNet (from scratch)",
    "unet": "UNet without SelfReg",
    "transfer": "SelfReg-UNet fine-tuned from the other dataset",
    "rf": "Random forest (multiscale features)",
    "otsu": "Otsu on hematoxylin",
}


def _pct(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.{digits}f}"
    return f"{text} ± {100 * std:.{digits}f}" if std is not None else text


def _published(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def selfreg_effect(document: dict) -> list[str]:
    """SelfReg-UNet minus UNet, paired by seed: the seeds share data order and initial draws,
    so the paired spread says more about SelfReg than the two means' stds do."""
    runs: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for r in document.get("runs", []):
        if "dice_224" in r:
            runs.setdefault((r["dataset"], r["budget"]), {}).setdefault(r["method"], {})[r["seed"]] = r["dice_224"]
    lines = []
    for (dataset, label), by_model in sorted(runs.items()):
        seeds = sorted(set(by_model.get("unet", {})) & set(by_model.get("selfreg_unet", {})))
        if len(seeds) < 2:
            continue
        diff = [100 * (by_model["selfreg_unet"][s] - by_model["unet"][s]) for s in seeds]
        mean = sum(diff) / len(diff)
        se = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff)) ** 0.5
        ahead = sum(d > 0 for d in diff)
        lines.append(f"- SelfReg-UNet − UNet on {dataset}, `{label}`, Dice at 224 paired by seed: {mean:+.2f} "
                     f"(standard error {se:.2f}; ahead on {ahead} of {len(seeds)} seeds)")
    return lines


def paper_table(document: dict, title: str = "Paper protocol (full masks, 224x224 training, full width)"
                ) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "Mean ± std over seeds of the per-seed mean over test images; checkpoint chosen on validation Dice.",
        "\"224\" scores prediction and mask at 224x224; \"native\" upsamples the 224x224 probability to the",
        "image's own size and scores against the original mask.",
        "",
        *([f"> {document['note']}", ""] if document.get("note") else []),
        "| dataset | model | resolution | Dice % | IoU % | published Dice % | published IoU % | seeds | schedule "
        "| device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    schedules = {}
    for r in document.get("results", []):
        dice, iou, _note = PUBLISHED.get((r["dataset"], r["model"]), (None, None, ""))
        show = r["resolution"] == "224"
        device = r["device"] + (" (CPU schedule)" if r.get("cpu_schedule") else "")
        lines.append(
            f"| {r['dataset']} | {MODEL_NAMES.get(r['model'], r['model'])} | {r['resolution']} | "
            f"{_pct(r['dice'], r['dice_std'])} | {_pct(r['iou'], r['iou_std'])} | "
            f"{_published(dice) if show else '–'} | {_published(iou) if show else '–'} | {r['seeds']} | "
            f"{r.get('schedule_label', '')} | {device} |"
        )
        schedules[r.get("schedule_label", "")] = r.get("schedule", "")
    lines.append("")
    for label, text in schedules.items():
        lines.append(f"- schedule `{label}`: {text}")
    gpu = [r for r in document.get("results", []) if r.get("peak_gpu_mb") and r["resolution"] == "224"]
    if gpu:
        lines.append("- peak GPU memory of a run (`torch.cuda.max_memory_allocated`): " + ", ".join(
            f"{r['dataset']} {MODEL_NAMES.get(r['model'], r['model'])} {r['peak_gpu_mb']:.0f} MiB" for r in gpu))
    lines += selfreg_effect(document)
    lines += [
        "- published: UNet on MoNuSeg 76.45 Dice / 62.86 IoU (UCTransNet protocol); SelfReg-UNet on MoNuSeg",
        "  IoU 67.07 (Dice about 80), on GlaS Dice 91.62 (ablation best about 80.2 and 90.9 Dice).",
        "  Published figures are at 224x224; our GlaS train split has only 24 of the 85 official train images,",
        "  and our GlaS test set is test A (60 images): ../shared/data has no test B (UCTransNet's GlaS test",
        "  set, behind the published figures, is A and B, 80 images). MoNuSeg: the 14 official test images.",
        "",
    ]
    return lines


HELD_OUT_TITLE = "Interactive protocol (simulated strokes, fixed CPU training budget)"
ALL_STROKES_TITLE = "Interactive protocol, every stroke for the networks (the benchmark's default since 2026-11-24)"
# the runs with every stroke, one results file each: (file, title)
EVERY_STROKE = (
    ("interactive_all_strokes.json", ALL_STROKES_TITLE),
    ("interactive_glas_all_strokes.json", "Interactive protocol on GlaS, every stroke for the networks"),
)


def interactive_table(document: dict, title: str = HELD_OUT_TITLE) -> list[str]:
    # runs from before the setting was recorded held out the plugin's 0.2
    held = document.get("config", {}).get("validation_fraction", 0.2)
    lines = [
        f"### {title}",
        "",
        (f"The networks trained on {100 - 100 * held:.0f} % of the strokes ({100 * held:.0f} % of the stroke "
         "regions held out for a validation Dice); the baselines on all of them." if held else
         "The networks trained on every stroke, as the baselines did."),
        "",
        "Per test image: about 12 strokes in structures and 12 in the background (< 1 % of the pixels),",
        "then each method; Dice and IoU against the full mask at native resolution, averaged over images.",
        "The baselines have no training budget (\"none\").",
        "",
        *([f"> {document['note']}", ""] if document.get("note") else []),
        "Dice % and IoU %: the weights training hands over (the last step's, `TrainConfig.keep`). \"with flips\":",
        "the same weights predicting with `PredictConfig(flips=True)` (the mean of the four flipped views;",
        "4x the prediction time). \"best held-out\": the same run's weights with the best Dice on held-out strokes.",
        "",
        "| dataset | method | budget | Dice % | with flips | best held-out | IoU % | images | mean steps "
        "| mean wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in document.get("means", []):
        steps = f"{m['steps']:.0f}" if m.get("steps") is not None else "–"
        flips = _pct(m["dice_flips"], m["dice_flips_std"], 1) if "dice_flips" in m else "–"
        best = _pct(m["dice_best"], m["dice_best_std"], 1) if "dice_best" in m else "–"
        lines.append(
            f"| {m['dataset']} | {METHOD_NAMES.get(m['method'], m['method'])} | {m['budget']} | "
            f"{_pct(m['dice'], m['dice_std'], 1)} | {flips} | {best} | {_pct(m['iou'], m['iou_std'], 1)} | {m['n']} | "
            f"{steps} | {m['wall_s']:.1f} | {m['peak_rss_mb']:.0f} |"
        )
    goals = document.get("goal", [])
    if goals:
        lines += [
            "",
            "Goal: SelfReg-UNet's mean Dice at least 5 points above the better baseline (same images).",
            "",
            "| dataset | budget | images | SelfReg-UNet Dice % | better baseline | its Dice % | margin "
            "| margin with flips | met |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in goals:
            flips = f"{100 * g['margin_flips']:+.1f}" if "margin_flips" in g else "–"
            # as the JSON and the CLI judge it: by the plain prediction; flips are said apart
            met = "yes" if g["met"] else "with flips only" if g.get("margin_flips", -1.0) >= g["goal_margin"] else "no"
            lines.append(
                f"| {g['dataset']} | {g['budget']} | {g['images']} | {_pct(g['selfreg_dice'], digits=1)} | "
                f"{g['best_baseline']} | {_pct(g['best_baseline_dice'], digits=1)} | "
                f"{100 * g['margin']:+.1f} | {flips} | {met} |"
            )
    env = document.get("environment", {})
    if env:
        lines += ["", f"Machine: {env.get('processor')}, {env.get('cpu_count')} CPUs, "
                      f"torch {env.get('torch')} with {env.get('torch_threads')} threads."]
    lines.append("")
    return lines


def correction_table(document: dict) -> list[str]:
    lines = [
        "### Correction protocol (a second round of strokes on each method's own mistakes)",
        "",
        "Round 1 is the interactive protocol. The simulated user then adds up to "
        f"{document['config']['correction']['strokes']} strokes (brush "
        f"{document['config']['correction']['width']} px) on the largest mistakes of that method's own prediction:",
        "background strokes in false positives, structure strokes in missed regions. Round 2: the neural methods",
        "continue from their round-1 model on all strokes for the same budget; the random forest is retrained;",
        "Otsu keeps its round-1 polarity (it learns nothing else from strokes).",
        "",
        "| dataset | method | budget | images | Dice % by round | painted % by round |",
        "|---|---|---|---|---|---|",
    ]
    for m in document["means"]:
        dice = " → ".join(f"{100 * d:.1f}" for d in m["dice_per_round"])
        painted = " → ".join(f"{100 * f:.2f}" for f in m["stroke_fraction_per_round"])
        lines.append(f"| {m['dataset']} | {METHOD_NAMES.get(m['method'], m['method'])} | {m['budget']} | "
                     f"{m['n']} | {dice} | {painted} |")
    for m in document["means"]:
        if m["method"] != "selfreg":
            continue
        # means over the same images only (documents from before "images" was kept: the same count)
        rivals = [b for b in document["means"] if b["dataset"] == m["dataset"] and b["method"] in ("rf", "otsu")
                  and b.get("images", b["n"]) == m.get("images", m["n"])]
        if rivals:
            last = len(m["dice_per_round"]) - 1
            best = max(rivals, key=lambda b: b["dice_per_round"][last])
            lines.append(f"\n{m['dataset']}, {m['budget']}, after round {last + 1}: SelfReg-UNet "
                         f"{100 * m['dice_per_round'][last]:.1f} against {best['method']} "
                         f"{100 * best['dice_per_round'][last]:.1f}: margin "
                         f"{100 * (m['dice_per_round'][last] - best['dice_per_round'][last]):+.1f} points.")
    env = document.get("environment", {})
    lines += ["", f"Machine: {env.get('processor')}, {env.get('cpu_count')} CPUs, "
                  f"torch {env.get('torch')} with {env.get('torch_threads')} threads.", ""]
    return lines


def build(paper: Path, interactive: Path, correction: Path | None = None) -> str:
    lines = ["## Accuracy", "", "Generated by `python benchmarks/make_tables.py` from benchmarks/results/*.json.", ""]
    found = False
    tables = [(paper, paper_table)]
    seeds = paper.with_name("paper_protocol_8seeds.json")
    if seeds.is_file():
        tables.append((seeds, lambda document: paper_table(
            document, "Paper protocol, 8 seeds on a GPU (is SelfReg's effect larger than the seeds' spread?)")))
    tables.append((interactive, interactive_table))
    for name, title in EVERY_STROKE:
        path = interactive.with_name(name)
        if path.is_file():
            tables.append((path, lambda document, title=title: interactive_table(document, title)))
    if correction is not None and correction.is_file():
        tables.append((correction, correction_table))
    for path, table in tables:
        if path.is_file():
            lines += [*table(json.loads(path.read_text())), f"Source: `{path.name}`.", ""]
            found = True
        else:
            lines += [f"_{path.name} not found: run `python -m napari_selfreg.bench` first._", ""]
    if not found:
        print(f"no results found ({paper}, {interactive})", file=sys.stderr)
    return "\n".join(lines)


SECTIONS = ("overview", "defaults", "accuracy", "speed", "usability", "redundancy", "pending")


def assemble(sections: Path, out: Path, accuracy: Path | None = None) -> None:
    """BENCHMARKS.md = the sections in reading order (each is edited or generated on its own);
    ``accuracy`` stands in for the folder's accuracy section when it was written elsewhere."""
    files = [sections / f"{name}.md" for name in SECTIONS]
    if accuracy is not None:
        files = [accuracy if f.name == "accuracy.md" else f for f in files]
    out.write_text("\n\n".join(f.read_text().strip() for f in files if f.is_file()) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "sections" / "accuracy.md")
    parser.add_argument("--interactive", type=Path, default=None, help="default: RESULTS/interactive.json")
    parser.add_argument("--paper", type=Path, default=None, help="default: RESULTS/paper_protocol.json")
    parser.add_argument("--benchmarks-md", type=Path, default=HERE.parent / "BENCHMARKS.md",
                        help="assembled from benchmarks/sections/*.md, with --out as its accuracy section")
    args = parser.parse_args(argv)
    text = build(args.paper or args.results / "paper_protocol.json",
                 args.interactive or args.results / "interactive.json", args.results / "correction.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    assemble(HERE / "sections", args.benchmarks_md, accuracy=args.out)
    print(f"wrote {args.benchmarks_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
