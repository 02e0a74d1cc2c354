"""Pack ../shared/data into a lossless copy small enough to carry to a lent GPU machine.

Why: the device tool carries at most 64 MiB a call, and the MoNuSeg and GlaS images take
167 MB as PNG and PackBits TIFF. Lossless WebP takes about three quarters of that, so each
dataset fits in one call. Pixels are checked equal after the round trip; the masks are
copied as they are; the manifest is rewritten to name the WebP files. The harness then
reads the copy unchanged through ``--data``. The copy goes to a folder that git ignores
(the data's licence forbids committing it) and is for the device only.

    python benchmarks/gpu/pack_device_data.py monuseg .devdata_monuseg
    # then carry .devdata_monuseg and run the bench with --data .devdata_monuseg
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _pack(job: tuple[Path, Path]) -> int:
    source, target = job
    with Image.open(source) as image:
        pixels = np.array(image.convert("RGB"))
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(target, "WEBP", lossless=True, quality=100, method=6)
    with Image.open(target) as image:
        if not np.array_equal(np.array(image.convert("RGB")), pixels):
            raise RuntimeError(f"{target} does not decode to the pixels of {source}")
    return target.stat().st_size


def pack(dataset: str, out: Path, source: Path = SOURCE, workers: int = 2) -> int:
    folder, target = source / dataset, out / dataset
    with (folder / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    jobs, kept = [], []
    for row in rows:
        if row.get("included", "1") != "1" or not (folder / row["image"]).is_file():
            continue
        webp = str(Path(row["image"]).with_suffix(".webp"))
        jobs.append((folder / row["image"], target / webp))
        (target / row["mask"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / row["mask"], target / row["mask"])
        kept.append({**row, "image": webp})
    with ProcessPoolExecutor(workers) as pool:
        size = sum(pool.map(_pack, jobs))
    with (target / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    masks = sum((target / r["mask"]).stat().st_size for r in kept)
    print(f"{dataset}: {len(kept)} images, {size / 2**20:.1f} MiB of WebP and {masks / 2**20:.1f} MiB of masks "
          f"in {target}")
    return size + masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["monuseg", "glas"])
    parser.add_argument("out", type=Path, help="a folder that git ignores, e.g. .devdata_monuseg")
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args(argv)
    pack(args.dataset, args.out, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
