"""Batch prediction from the command line: one ``predict`` run for many images against one
run per image (each of which starts Python, imports torch and loads the model again).

    python benchmarks/bench_batch.py                 # the 14 MoNuSeg test images -> benchmarks/results/batch.json
    python benchmarks/bench_batch.py --images 3 --out /tmp/batch.json   # a quick run

The model is the default architecture, untrained: its weights do not change the time.
Both ways write the same labels (checked byte for byte). Needs ../shared/data (or
$SELFREG_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("SELFREG_SHARED_DATA", HERE.parents[1] / "shared" / "data"))


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=14, help="how many MoNuSeg test images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "batch.json")
    args = parser.parse_args(argv)
    images = sorted((DATA / "monuseg" / "test" / "images").glob("*.tif"))[: args.images]
    if not images:
        print(f"no MoNuSeg test images under {DATA}; set SELFREG_SHARED_DATA", file=sys.stderr)
        return 1

    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    cli = [sys.executable, "-m", "napari_selfreg.cli", "predict"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_model(SegmentationModel.create(ModelInfo()), tmp / "model")
        for _ in range(args.repeats):
            batch_dir, single_dir = tmp / "batch", tmp / "single"
            one_run = timed([*cli, "--model", str(model), "--image", *map(str, images),
                             "--out", str(batch_dir / "{stem}.tif")])
            per_image = sum(
                timed([*cli, "--model", str(model), "--image", str(p), "--out", str(single_dir / f"{p.stem}.tif")])
                for p in images
            )
            same = all(filecmp.cmp(batch_dir / f"{p.stem}.tif", single_dir / f"{p.stem}.tif", shallow=False)
                       for p in images)
            runs.append({"one_run_s": one_run, "run_per_image_s": per_image, "ratio": per_image / one_run,
                         "same_labels": same})
            print(f"{len(images)} images: one run {one_run:.1f} s, a run per image {per_image:.1f} s "
                  f"({per_image / one_run:.1f}x); same labels: {same}")
    doc = {
        "command": " ".join(["python", *sys.argv]),
        "images": [p.name for p in images],
        "logical_cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
