"""How well ``separate_instances`` splits a class map into objects, given a perfect class map.

    python benchmarks/bench_instances.py                      # -> benchmarks/results/instances.json
    python benchmarks/bench_instances.py --limit 5 --out /tmp/instances.json   # a quick run

Each real instance mask (GlaS glands, all 90 images; the DSB 2018 fluorescence nuclei
image) is reduced to a class map (1 = background, 2 = any object), split again, and the
objects are matched one to one with the true ones at IoU > 0.5 (``core.metrics.object_scores``).
A perfect class map isolates the splitting: over-splitting a long gland or merging two
touching nuclei shows up directly. Needs ../shared/data (or $SELFREG_SHARED_DATA); exits 2
without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from napari_selfreg.core.instances import separate_instances
from napari_selfreg.core.metrics import object_scores

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("SELFREG_SHARED_DATA", HERE.parents[1] / "shared" / "data"))


def masks(limit: int | None) -> list[tuple[str, str, np.ndarray]]:
    """(set, name, instance ids) of every GlaS image and the DSB 2018 nuclei image."""
    import tifffile

    from napari_selfreg.bench.datasets import load_split

    split = load_split("glas", DATA)
    samples = (split.train + split.validation + split.test)[:limit]
    found = [("glas", s.name, s.instances()) for s in samples]
    dsb = DATA / "stardist_dsb2018" / "mask2d.tif"
    if dsb.is_file():
        found.append(("dsb2018", dsb.stem, tifffile.imread(dsb)))
    return found


def score(truth: np.ndarray) -> dict:
    labels = np.where(truth > 0, 2, 1).astype(np.uint8)
    started = time.perf_counter()
    split = separate_instances(labels)  # the defaults, as Segment and `predict --instances` run it
    seconds = time.perf_counter() - started
    return {**object_scores(split, truth).to_dict(), "seconds": seconds}


def summary(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["set"] for r in rows}):
        part = [r for r in rows if r["set"] == name]
        out[name] = {
            "images": len(part),
            **{k: float(np.mean([r[k] for r in part])) for k in ("f1", "mean_matched_iou", "panoptic_quality")},
            "objects_predicted_over_true": sum(r["predicted"] for r in part) / sum(r["true"] for r in part),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N GlaS images")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "instances.json")
    args = parser.parse_args(argv)
    try:
        found = masks(args.limit)
    except FileNotFoundError as missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 2
    rows = [{"set": kind, "image": name, **score(truth)} for kind, name, truth in found]
    doc = {"command": " ".join(["python", *sys.argv]), "summary": summary(rows), "images": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for name, s in doc["summary"].items():
        print(f"{name}: {s['images']} images, F1 {s['f1']:.3f}, SQ {s['mean_matched_iou']:.3f}, "
              f"PQ {s['panoptic_quality']:.3f}, objects found / true {s['objects_predicted_over_true']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
