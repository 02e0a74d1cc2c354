"""``python -m napari_selfreg.bench`` / ``napari-selfreg bench``: the benchmark protocols.

    python -m napari_selfreg.bench interactive --dataset monuseg --budgets 60 --images all \\
        --methods selfreg,unet,rf,otsu --out benchmarks/results/interactive.json
    python -m napari_selfreg.bench paper --dataset glas --seeds 0 1 2 --epochs 60 \\
        --out benchmarks/results/paper_protocol.json     # bfloat16 autocast where the CPU has it
    python -m napari_selfreg.bench correction --dataset monuseg --budgets 60 --images all \
        --out benchmarks/results/correction.json   # a second round of strokes on each method's mistakes
    python -m napari_selfreg.bench interactive --smoke    # two cropped images, tiny budgets

Runs resume: finished runs are kept in a state file (``--state``; by default
benchmarks/runs/<out name>.state.jsonl) and skipped when the command is repeated. Without
a state file (a fresh clone) the finished runs in the ``--out`` file start it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .datasets import DATASETS, SharedDataMissing
from .harness import StateFile, default_state_path, seed_state_from_results

SMOKE_CROP = 256


def _datasets(value: str) -> list[str]:
    names = list(DATASETS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dataset(s) {unknown}; choose from {', '.join(DATASETS)} or all")
    return names


def _budget(value: str) -> str:
    from .interactive import budget_label

    try:
        return budget_label(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _images(value: str) -> int | None:
    if value == "all":
        return None
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError("--images must be 'all' or a positive number")
    return count


def _methods(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _strokes_arguments(parser, budgets: list[str], methods: list[str], choices: str) -> None:
    parser.add_argument("--budgets", nargs="+", type=_budget, default=budgets,
                        help="training budgets: seconds (60 or 60s) or steps (200steps)")
    parser.add_argument("--images", type=_images, default=None, help="'all' or the first N test images")
    parser.add_argument("--methods", type=_methods, default=methods, help=f"comma list of {choices}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=None, help="central crop of every image (pixels)")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="share of the strokes the networks hold out for a validation Dice (0: they train on "
                             "every stroke, as the baselines do)")


def build_parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n\n")[0].replace("``", "")  # plain text in --help
    parser = argparse.ArgumentParser(prog="napari-selfreg bench", description=summary)
    sub = parser.add_subparsers(dest="protocol", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", type=_datasets, default=["monuseg"], help="monuseg, glas, a comma list or all")
    common.add_argument("--out", type=Path, default=None, help="result JSON")
    common.add_argument("--state", type=Path, default=None, help="resume file (JSON lines)")
    common.add_argument("--data", type=Path, default=None, help="shared data folder (default: ../shared/data)")
    common.add_argument("--device", default=None, help="auto, cpu, cuda")
    common.add_argument("--smoke", action="store_true", help="two cropped images, a few steps, output in a temp dir")
    common.add_argument("--no-progress", action="store_true")

    inter = sub.add_parser("interactive", parents=[common], help="strokes + fixed CPU budget per test image")
    _strokes_arguments(inter, ["30s", "60s", "120s"], ["selfreg", "unet", "rf", "otsu"],
                       "selfreg, unet, transfer, rf, otsu")
    inter.add_argument("--transfer-steps", type=int, default=1000, help="pretraining steps on the other dataset")

    fix = sub.add_parser("correction", parents=[common],
                         help="interactive, then correction strokes on each method's own mistakes and a second round")
    _strokes_arguments(fix, ["60s"], ["selfreg", "unet", "rf", "otsu"], "selfreg, unet, rf, otsu")
    fix.add_argument("--rounds", type=int, default=2, help="rounds of strokes (1 = the interactive protocol)")
    fix.add_argument("--correction-strokes", type=int, default=12, help="strokes added per round")

    paper = sub.add_parser("paper", parents=[common], help="UNet vs SelfReg-UNet, full masks, 224x224, 3 seeds")
    paper.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    paper.add_argument("--models", type=_methods, default=["unet", "selfreg_unet"])
    schedule = paper.add_argument_group("schedule (default: up to 1000 epochs on a GPU, 60 epochs on a CPU)")
    schedule.add_argument("--epochs", type=int, default=None)
    schedule.add_argument("--steps", type=int, default=None)
    schedule.add_argument("--time-budget", type=float, default=None, help="seconds of training per run")
    paper.add_argument("--patience", type=int, default=50, help="early stopping, in epochs")
    paper.add_argument("--precision", default="auto",
                       help="training autocast: auto (bfloat16 on a CPU that has it, bfloat16/float16 on CUDA), "
                            "float32, bfloat16, float16; evaluation is float32")
    paper.add_argument("--base-channels", type=int, default=64)
    paper.add_argument("--image-size", type=int, default=224)
    return parser


def _out_paths(args, default_name: str) -> tuple[Path, Path]:
    if args.smoke and args.out is None:
        folder = Path(tempfile.mkdtemp(prefix="selfreg-bench-smoke-"))
        out = folder / default_name
    else:
        out = args.out or Path("benchmarks/results") / default_name
    state = args.state or default_state_path(out)
    for path, option in ((out, "--out"), (state, "--state")):
        if Path(path).is_dir():
            raise ValueError(f"{option} {path} is a folder; give a file path (e.g. {Path(path) / default_name})")
    if not args.smoke:
        seeded = seed_state_from_results(StateFile(state), out)
        if seeded:
            print(f"no state file: {seeded} finished runs taken over from {out} into {state}")
    return out, state


def _stroke_protocol_settings(args, state: Path) -> dict:
    return dict(
        datasets=args.dataset, budgets=args.budgets, methods=args.methods, images=args.images, seeds=args.seeds,
        base_channels=args.base_channels, patch_size=args.patch_size, learning_rate=args.learning_rate,
        crop=args.crop, device=args.device or "cpu", validation_fraction=args.validation_fraction,
        data_root=str(args.data) if args.data else None, cache_dir=str(state.parent / "cache"),
    )


def _shrink_for_smoke(config, args) -> None:
    config.images = min(config.images or 2, 2)
    config.budgets = ["2s"]
    config.crop = args.crop or SMOKE_CROP
    config.base_channels = min(args.base_channels, 8)
    config.patch_size = min(args.patch_size, 64)


def _interactive(args) -> int:
    from .interactive import InteractiveConfig, run_interactive

    out, state = _out_paths(args, "interactive.json")
    config = InteractiveConfig(**_stroke_protocol_settings(args, state), transfer_steps=args.transfer_steps)
    if args.smoke:
        _shrink_for_smoke(config, args)
        config.transfer_steps = min(args.transfer_steps, 3)
        config.transfer_images = 2
    document = run_interactive(config, out, StateFile(state), progress=not args.no_progress)
    _print_interactive(document)
    print(f"wrote {out} (state: {state})")
    return 0


def _correction(args) -> int:
    from .correction import CorrectionProtocolConfig, run_correction
    from .strokes import CorrectionConfig

    out, state = _out_paths(args, "correction.json")
    config = CorrectionProtocolConfig(**_stroke_protocol_settings(args, state), rounds=args.rounds,
                                      correction=CorrectionConfig(strokes=args.correction_strokes))
    if args.smoke:
        _shrink_for_smoke(config, args)
    document = run_correction(config, out, StateFile(state), progress=not args.no_progress)
    for entry in document["means"]:
        rounds = " -> ".join(f"{100 * d:5.1f}" for d in entry["dice_per_round"])
        print(f"{entry['dataset']:8s} {entry['method']:7s} {entry['budget']:>6s}  Dice by round {rounds}  "
              f"(n={entry['n']})")
    print(f"wrote {out} (state: {state})")
    return 0


def _print_interactive(document: dict) -> None:
    for entry in document["means"]:
        print(f"{entry['dataset']:8s} {entry['method']:9s} {entry['budget']:>6s}  "
              f"Dice {100 * entry['dice']:5.1f} ± {100 * entry['dice_std']:4.1f}  (n={entry['n']})")
    for goal in document["goal"]:
        verdict = "met" if goal["met"] else "NOT met"
        failed = goal.get("failed_images", [])
        lost = f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""
        print(f"goal {goal['dataset']} {goal['budget']} on {goal['images']} images: selfreg "
              f"{100 * goal['selfreg_dice']:.1f} vs {goal['best_baseline']} {100 * goal['best_baseline_dice']:.1f} "
              f"-> margin {100 * goal['margin']:+.1f} points ({verdict}; needs +5.0{lost})")


def _paper(args) -> int:
    from .paper_protocol import PaperConfig, run_paper

    out, state = _out_paths(args, "paper_protocol.json")
    config = PaperConfig(
        datasets=args.dataset, models=args.models, seeds=args.seeds, image_size=args.image_size,
        base_channels=args.base_channels, patience=args.patience, epochs=args.epochs, steps=args.steps,
        time_budget=args.time_budget, device=args.device or "auto", precision=args.precision,
        data_root=str(args.data) if args.data else None,
    )
    if args.smoke:
        config.seeds = config.seeds[:1]
        config.steps = min(args.steps or 2, 2)
        config.epochs = 1
        config.base_channels = min(args.base_channels, 8)
        config.image_size = min(args.image_size, 64)
        config.limit_images = 2
        config.crop = SMOKE_CROP
    document = run_paper(config, out, StateFile(state), progress=not args.no_progress)
    for r in document["results"]:
        print(f"{r['dataset']:8s} {r['model']:13s} {r['resolution']:>6s}  Dice {100 * r['dice']:5.2f} ± "
              f"{100 * r['dice_std']:4.2f}  IoU {100 * r['iou']:5.2f} ± {100 * r['iou_std']:4.2f}  "
              f"({r['seeds']} seeds, {r['device']})")
    print(f"wrote {out} (state: {state})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``napari-selfreg bench ARGS...``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.device is not None:  # refused once here, not in each run of a protocol
            from ..core.device import resolve_device

            resolve_device(args.device)
        if args.protocol == "interactive":
            return _interactive(args)
        if args.protocol == "correction":
            return _correction(args)
        return _paper(args)
    except SharedDataMissing as error:
        print(f"skipped: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # bad settings or paths: the user's to fix
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
