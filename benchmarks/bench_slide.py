"""A slide from end to end on the command line: ``predict --instances`` of a SIZE x SIZE RGB TIFF.

    python benchmarks/bench_slide.py                      # 20000 x 20000 -> benchmarks/results/slide.json
    python benchmarks/bench_slide.py --size 2500 --train-seconds 10 --out /tmp/slide.json   # a quick run

The slide is the 14 MoNuSeg test images repeated side by side, written as a tiled TIFF, so
``predict`` reads it tile by tile and keeps its outputs in memory maps. The model is trained
first, from the command line, for ``--train-seconds`` on the simulated strokes of one MoNuSeg
training image (the interactive protocol's strokes), so the labels and objects are a real
model's. ``predict`` runs in a process of its own; its wall time and peak RSS are recorded
with the JSON line it prints. ``--keep DIR`` copies the labels and instances it wrote (and the
model) into DIR, e.g. for ``bench_instances.py --slide N --map DIR/labels.tif``. Needs
../shared/data (or $SELFREG_SHARED_DATA); exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("SELFREG_SHARED_DATA", HERE.parents[1] / "shared" / "data"))
TRAIN_IMAGE = "TCGA-21-5784-01Z-00-DX1"  # a training image, so the test images stay unseen

# the command line in a process that reports its own peak RSS (kilobytes on Linux) last
MEASURED = ("import json, resource, sys; from napari_selfreg.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'peak_rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True); "
            "sys.exit(rc)")


def cli(*args: str) -> tuple[list[str], float]:
    """Run ``napari-selfreg ARGS`` in a fresh process; its stdout lines and wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *args], check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines(), time.perf_counter() - started


def write_slide(path: Path, size: int) -> None:
    """The MoNuSeg test images side by side, size x size, as a TIFF of 512-pixel tiles."""
    import tifffile

    from napari_selfreg.bench.datasets import load_split
    from napari_selfreg.io import read_image

    images = [read_image(s.image_path)[..., :3] for s in load_split("monuseg", DATA).test]
    step = images[0].shape[0]
    slide = np.empty((size, size, 3), np.uint8)
    for row, top in enumerate(range(0, size, step)):
        for col, left in enumerate(range(0, size, step)):
            block = images[(row * 7 + col) % len(images)]
            slide[top : top + step, left : left + step] = block[: size - top, : size - left]
    tifffile.imwrite(path, slide, tile=(512, 512), photometric="rgb")


def train_model(folder: Path, seconds: float) -> Path:
    """A model trained from the command line on one training image's simulated strokes."""
    import tifffile

    from napari_selfreg.bench.datasets import load_split
    from napari_selfreg.bench.interactive import stroke_seed
    from napari_selfreg.bench.strokes import simulate_strokes
    from napari_selfreg.io import read_image

    sample = next(s for s in load_split("monuseg", DATA).train if s.name.startswith(TRAIN_IMAGE))
    tifffile.imwrite(folder / "train.tif", read_image(sample.image_path)[..., :3], photometric="rgb")
    tifffile.imwrite(folder / "strokes.tif", simulate_strokes(sample.instances(), stroke_seed(sample.name, 0)))
    cli("train", "--image", str(folder / "train.tif"), "--labels", str(folder / "strokes.tif"),
        "--out", str(folder / "model"), "--time-budget", str(seconds), "--seed", "0",
        "--class-names", "background,nucleus")
    return folder / "model.safetensors"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000, help="the slide's side in pixels")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "slide.json")
    parser.add_argument("--keep", type=Path, default=None, help="copy the outputs and the model into this folder")
    args = parser.parse_args(argv)
    if not (DATA / "monuseg").is_dir():
        print(f"skipped: {DATA / 'monuseg'} not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-slide-") as name:
        folder = Path(name)
        started = time.perf_counter()
        write_slide(folder / "slide.tif", args.size)
        written_s = time.perf_counter() - started
        model = train_model(folder, args.train_seconds)
        lines, seconds = cli("predict", "--model", str(model), "--image", str(folder / "slide.tif"),
                             "--out", str(folder / "out" / "labels.tif"),
                             "--instances", str(folder / "out" / "instances.tif"))
        summary, measured = json.loads(lines[-2]), json.loads(lines[-1])
        sizes = {p.name: p.stat().st_size for p in (folder / "out").iterdir()}
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for kept in [*(folder / "out").iterdir(), model]:
                shutil.copy2(kept, args.keep / kept.name)
    row = {
        "size": args.size,
        "slide_write_s": written_s,
        "predict_with_instances_s": seconds,
        "megapixels_per_s": args.size**2 / seconds / 1e6,
        "peak_rss_bytes": measured["peak_rss_kb"] * 1024,
        "instances": summary["instances"],
        "instances_per_label": summary["instances_per_label"],
        "pixels_per_label": summary["pixels_per_label"],
        "output_bytes": sizes,
    }
    doc = {"command": " ".join(["python", *sys.argv]), "cpu_threads": os.cpu_count(),
           "train_seconds": args.train_seconds, "train_image": TRAIN_IMAGE, "result": row}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(row, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
