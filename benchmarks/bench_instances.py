"""How well ``separate_instances`` splits a class map into objects, given a perfect class map.

    python benchmarks/bench_instances.py                      # -> benchmarks/results/instances.json
    python benchmarks/bench_instances.py --limit 5 --out /tmp/instances.json   # a quick run

Each real instance mask (GlaS glands, all 90 images; the DSB 2018 fluorescence nuclei
image) is reduced to a class map (1 = background, 2 = any object), split again, and the
objects are matched one to one with the true ones at IoU > 0.5 (``core.metrics.object_scores``).
A perfect class map isolates the splitting: over-splitting a long gland or merging two
touching nuclei shows up directly. Needs ../shared/data (or $SELFREG_SHARED_DATA); exits 2
without it.

    python benchmarks/bench_instances.py --slide 10000        # -> benchmarks/results/instances_slide.json
    python benchmarks/bench_instances.py --slide 6000 --check --out /tmp/slide.json

``--slide SIZE`` times ``split_instances`` (the window-by-window split that Segment and
``predict --instances`` run), then ``measure_objects`` (the objects' table) on a SIZE x SIZE
class map in a zarr store, made by repeating
the 14 MoNuSeg test masks side by side, and records the peak memory of the process that
splits it (a fresh one, whose outputs go to zarr too). ``--check`` also splits the whole map
at once and compares the objects (feasible up to about 8000 x 8000). ``--map LABELS.tif`` splits
the top left of a model's class map instead (``bench_slide.py --keep`` keeps one). ``--grow N`` widens every
nucleus by N pixels first: a denser map whose nuclei touch in long chains, as a one-minute
model's over-segmented nuclei do (28.5 % of the slide in `bench_slide.py`'s run, against 18 %
in the masks); the split then needs windows wider than the first. ``--measure-cli`` then
writes the objects and the class map as tiled TIFFs and times ``napari-selfreg measure`` on
them in a fresh process, with its peak memory (the files are read lazily, band by band).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_selfreg.core.instances import SPLIT_MARGIN, SPLIT_TILE, separate_instances, split_instances
from napari_selfreg.core.measurements import measure_to_end
from napari_selfreg.core.metrics import object_scores
from napari_selfreg.core.progress import drain

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


def slide_map(size: int, store: Path, grow: int = 0, source: Path | None = None) -> Path:
    """A size x size class map (zarr, chunks of 1024): the MoNuSeg test masks side by side, or
    the top left of ``source`` (a class map, as ``predict`` writes it); nuclei (2) widened by
    ``grow`` pixels."""
    import tifffile
    import zarr
    from scipy import ndimage

    from napari_selfreg.bench.datasets import load_split

    def classes(mask: np.ndarray) -> np.ndarray:
        nuclei = ndimage.binary_dilation(mask, iterations=grow) if grow else mask
        return np.where(nuclei, 2, 1).astype(np.uint8)

    path = store / "labels.zarr"
    labels = zarr.open_array(str(path), mode="w", shape=(size, size), chunks=(1024, 1024), dtype="u1", fill_value=1)
    if source is not None:
        found = tifffile.imread(source)  # the parent's memory, not the measured split's
        if min(found.shape[:2]) < size:
            raise ValueError(f"{source} is {found.shape[0]} x {found.shape[1]}, smaller than --slide {size}")
        found = found[:size, :size]
        labels[:] = np.where(classes(found == 2) == 2, 2, found).astype(np.uint8)
        return path
    masks = [classes(s.mask()) for s in load_split("monuseg", DATA).test]
    step = masks[0].shape[0]
    for index, top in enumerate(range(0, size, step)):
        band = np.concatenate([masks[(index + j) % len(masks)] for j in range(-(-size // step))], axis=1)
        labels[top : top + step] = band[: min(step, size - top), :size]
    return path


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec; ``ru_maxrss``
    keeps the parent's peak across it, which is the parent's map with ``--map``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def split_child(store: Path, tile: int, margin: int, workers: int | None) -> dict:
    """Runs in a fresh process: split the map window by window into a zarr array."""
    import zarr

    labels = zarr.open_array(str(store / "labels.zarr"), mode="r")
    out = zarr.open_array(str(store / "instances.zarr"), mode="w", shape=labels.shape, chunks=(1024, 1024),
                          dtype="i4", fill_value=0)
    before = peak_rss()
    started = time.perf_counter()
    windows = []
    threads = {"workers": workers} if workers else {}  # (code from before the threads takes none)
    split = drain(split_instances(labels, out, tile=tile, margin=margin, **threads), windows.append)
    seconds = time.perf_counter() - started
    row = {
        "seconds": seconds,
        "megapixels_per_s": labels.shape[0] * labels.shape[1] / seconds / 1e6,
        "windows": windows[-1].total,
        "objects": split.count,
        "truncated": split.truncated,
        "peak_rss_bytes": peak_rss(),
        "peak_rss_before_split_bytes": before,
    }
    started = time.perf_counter()  # then the objects' table, as Segment and predict --measurements make it
    table = measure_to_end(out, labels)
    row |= {"measure_seconds": time.perf_counter() - started, "measured_objects": len(table),
            "peak_rss_after_measure_bytes": peak_rss()}
    return row


def measure_files(store: Path) -> None:
    """The split's objects and the class map as tiled TIFFs, as a user's saved files would be."""
    import tifffile
    import zarr

    for name in ("instances", "labels"):
        data = np.asarray(zarr.open_array(str(store / f"{name}.zarr"), mode="r")[:])
        tifffile.imwrite(store / f"{name}.tif", data, tile=(512, 512), bigtiff=True)


def measure_child(store: Path) -> dict:
    """Runs in a fresh process: ``napari-selfreg measure`` on the TIFFs, its time and peak RSS."""
    from napari_selfreg.cli import main as cli

    started = time.perf_counter()
    code = cli(["measure", "--instances", str(store / "instances.tif"), "--labels", str(store / "labels.tif"),
                "--out", str(store / "objects.csv")])
    seconds = time.perf_counter() - started
    with open(store / "objects.csv") as handle:
        rows = sum(1 for _ in handle) - 1
    return {"cli_exit_code": code, "cli_measure_seconds": seconds, "cli_objects": rows,
            "cli_peak_rss_bytes": peak_rss()}


def whole_map_check(store: Path) -> dict:
    """The whole map split at once against the windows' split: the same objects?"""
    import zarr

    labels = np.asarray(zarr.open_array(str(store / "labels.zarr"), mode="r")[:])
    windows = np.asarray(zarr.open_array(str(store / "instances.zarr"), mode="r")[:])
    started = time.perf_counter()
    whole = separate_instances(labels)
    seconds = time.perf_counter() - started
    objects = whole > 0
    pairs = np.unique(np.stack([whole[objects], windows[objects]]), axis=1)
    same = bool(np.array_equal(objects, windows > 0) and pairs.shape[1] == whole.max() == windows.max())
    return {"whole_map_seconds": seconds, "whole_map_objects": int(whole.max()), "same_objects": same}


def slide(args) -> int:
    import zarr

    with tempfile.TemporaryDirectory(prefix="bench-instances-") as folder:
        store = Path(folder)
        try:
            slide_map(args.slide, store, args.grow, args.map)
        except FileNotFoundError as missing:
            print(f"skipped: {missing}", file=sys.stderr)
            return 2
        except ValueError as wrong:
            print(f"bench_instances: {wrong}", file=sys.stderr)
            return 2
        child = subprocess.run(
            [sys.executable, __file__, "--split-child", folder, "--tile", str(args.tile), "--margin", str(args.margin),
             *(["--workers", str(args.workers)] if args.workers else [])],
            capture_output=True, text=True, check=True,
        )
        nuclei = np.asarray(zarr.open_array(str(store / "labels.zarr"), mode="r")[:]) == 2
        row = {"size": args.slide, "tile": args.tile, "margin": args.margin, "grow": args.grow, "workers": args.workers,
               "nucleus_fraction": float(nuclei.mean()),
               **json.loads(child.stdout.strip().splitlines()[-1])}
        if args.check:
            row.update(whole_map_check(store))
        if args.measure_cli:
            measure_files(store)
            child = subprocess.run([sys.executable, __file__, "--measure-child", folder],
                                   capture_output=True, text=True, check=True)
            row.update(json.loads(child.stdout.strip().splitlines()[-1]))
    kind = f"the top left of {args.map}" if args.map else "MoNuSeg test masks (2 = nucleus) repeated"
    kind += f", nuclei widened by {args.grow} pixels" if args.grow else ""
    doc = {"command": " ".join(["python", *sys.argv]), "map": kind,
           "cpu_threads": os.cpu_count(), "result": row}
    out = args.out or HERE / "results" / "instances_slide.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(row, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N GlaS images")
    parser.add_argument("--slide", type=int, default=None, help="time the window-by-window split of a SIZE x SIZE map")
    parser.add_argument("--tile", type=int, default=SPLIT_TILE, help="with --slide: each window's core")
    parser.add_argument("--margin", type=int, default=SPLIT_MARGIN, help="with --slide: the windows' first margin")
    parser.add_argument("--map", type=Path, default=None,
                        help="with --slide: split the top left of this class map TIFF instead (bench_slide.py --keep)")
    parser.add_argument("--grow", type=int, default=0, help="with --slide: widen each nucleus by N pixels")
    parser.add_argument("--workers", type=int, default=None, help="with --slide: splitting threads")
    parser.add_argument("--check", action="store_true", help="with --slide: compare with the whole map's split")
    parser.add_argument("--measure-cli", action="store_true",
                        help="with --slide: also time napari-selfreg measure on the objects saved as TIFF")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--split-child", type=Path, default=None, help=argparse.SUPPRESS)  # the measured process
    parser.add_argument("--measure-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.split_child:
        print(json.dumps(split_child(args.split_child, args.tile, args.margin, args.workers)))
        return 0
    if args.measure_child:
        print(json.dumps(measure_child(args.measure_child)))
        return 0
    if args.slide:
        return slide(args)
    args.out = args.out or HERE / "results" / "instances.json"
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
