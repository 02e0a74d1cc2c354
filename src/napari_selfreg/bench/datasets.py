"""Loaders for the real MoNuSeg and GlaS copies in ../shared/data (never copied into the repository).

Splits follow the protocol of the UCTransNet line of work where the copy allows it:
- MoNuSeg: the 30 official training images split 24 train / 6 validation by the
  manifest's ``uctransnet_folder`` column; the 14 official test images.
- GlaS: only 30 of the 85 training images are available; the last 3 benign and the last
  3 malignant (by manifest order) are held out for validation, so both grades are
  validated on. Test = the 60 test A images.
Masks are binary (``mask > 0``); GlaS instance ids are kept available for the stroke
simulator, which wants one stroke per object.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("monuseg", "glas")
ENV_VAR = "SELFREG_SHARED_DATA"
GLAS_VALIDATION_PER_GRADE = 3


class SharedDataMissing(FileNotFoundError):
    """The benchmark data folder is absent: benchmarks and data tests should skip, not fail."""


def find_shared_data(root: str | Path | None = None) -> Path:
    """The shared data folder: ``root``, else $SELFREG_SHARED_DATA, else ../shared/data beside the repository."""
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    elif os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    else:
        repo = Path(__file__).resolve().parents[3]  # src/napari_selfreg/bench/datasets.py -> repository root
        candidates += [repo / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"]
    for path in candidates:
        if (path / "monuseg").is_dir() or (path / "glas").is_dir():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise SharedDataMissing(
        f"benchmark data not found (looked in {tried}); put MoNuSeg/GlaS under ../shared/data "
        f"or set {ENV_VAR} to the folder that holds monuseg/ and glas/"
    )


@dataclass(frozen=True)
class Sample:
    """One image and its mask, loaded lazily (the test sets are ~100 MB decoded)."""

    dataset: str
    name: str
    image_path: Path
    mask_path: Path

    def image(self) -> np.ndarray:
        return read_rgb(self.image_path)

    def instances(self) -> np.ndarray:
        """The mask as stored: 0/255 for MoNuSeg, instance ids for GlaS."""
        return read_mask(self.mask_path)

    def mask(self) -> np.ndarray:
        return self.instances() > 0


@dataclass
class DatasetSplit:
    name: str
    train: list[Sample] = field(default_factory=list)
    validation: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img)


def _manifest(folder: Path) -> list[dict[str, str]]:
    path = folder / "manifest.csv"
    if not path.is_file():
        raise SharedDataMissing(f"{path} is missing; the data folder is incomplete")
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("included", "1") == "1"]
    return [r for r in rows if (folder / r["image"]).is_file() and (folder / r["mask"]).is_file()]


def _sample(dataset: str, folder: Path, row: dict[str, str]) -> Sample:
    return Sample(dataset, Path(row["image"]).stem, folder / row["image"], folder / row["mask"])


def load_split(dataset: str, root: str | Path | None = None) -> DatasetSplit:
    """The train / validation / test samples of ``dataset`` ("monuseg" or "glas")."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = find_shared_data(root) / dataset
    if not folder.is_dir():
        raise SharedDataMissing(f"{folder} is missing")
    rows = _manifest(folder)
    split = DatasetSplit(dataset)
    if dataset == "monuseg":
        for row in rows:
            sample = _sample(dataset, folder, row)
            if row["split"] == "test":
                split.test.append(sample)
            elif row.get("uctransnet_folder") == "Val_Folder":
                split.validation.append(sample)
            else:
                split.train.append(sample)
    else:
        train_rows = [r for r in rows if r["split"] == "train"]
        held: set[str] = set()
        for grade in ("benign", "malignant"):
            of_grade = [r["image"] for r in train_rows if r.get("grade_glas") == grade]
            held.update(of_grade[-GLAS_VALIDATION_PER_GRADE:])
        for row in rows:
            sample = _sample(dataset, folder, row)
            if row["split"] == "test":
                if row.get("subset", "testA") == "testA":
                    split.test.append(sample)
            elif row["image"] in held:
                split.validation.append(sample)
            else:
                split.train.append(sample)
    if not split.test:
        raise SharedDataMissing(f"no test images found under {folder}")
    return split


def center_crop(array: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size`` x ``size`` window (smoke runs use small crops to stay fast)."""
    if not size:
        return array
    h, w = array.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return array[top : top + size, left : left + size]
