"""npe2 sample-data contributions: synthetic images made by scripts/make_sample_data.py.

The H&E-like image comes with painted strokes, so "Train SelfReg UNet" works at once,
and with its ground truth, so a segmentation can be checked by eye or by Dice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .widgets.classes import class_colormap, class_features

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
HE_CLASSES = ("background", "nucleus")


def _read(name: str) -> np.ndarray:
    from .io import read_image

    return read_image(SAMPLE_DIR / name)


def he_arrays() -> dict[str, np.ndarray]:
    """The H&E-like sample as arrays: image (H, W, 3) uint8, strokes and truth (H, W) uint8."""
    return {
        "image": _read("he_tissue.png"),
        "strokes": _read("he_strokes.png"),
        "ground_truth": _read("he_ground_truth.png"),
    }


def fluorescence_arrays() -> dict[str, np.ndarray]:
    """The fluorescence sample: image (H, W) uint16 and instance ids (H, W) uint16."""
    return {"image": _read("fluorescence_nuclei.tif"), "ground_truth": _read("fluorescence_ground_truth.tif")}


def he_tissue() -> list[tuple]:
    """H&E-like tissue, example strokes (1 = background, 2 = nucleus) and the hidden ground truth."""
    arrays = he_arrays()
    features = class_features(HE_CLASSES)
    return [
        (arrays["image"], {"name": "H&E tissue", "rgb": True}, "image"),
        (
            arrays["ground_truth"],
            {"name": "ground truth", "visible": False, "features": features, "colormap": class_colormap(False)},
            "labels",
        ),
        (
            arrays["strokes"],
            {"name": "strokes", "features": features, "opacity": 1.0, "colormap": class_colormap()},
            "labels",
        ),
    ]


def fluorescence_nuclei() -> list[tuple]:
    """A 16-bit fluorescence nuclei image (gray) with its instance ground truth, hidden."""
    arrays = fluorescence_arrays()
    return [
        (arrays["image"], {"name": "fluorescence nuclei", "colormap": "gray"}, "image"),
        (arrays["ground_truth"], {"name": "fluorescence ground truth", "visible": False}, "labels"),
    ]
