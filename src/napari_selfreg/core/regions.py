"""Where the paint is: the windows of an image that training reads.

Training only ever samples patches near painted pixels, so a slide with a few strokes
needs only the windows around them in memory (normalised to float32, labels as int64),
not the whole slide. With a margin of at least a patch around the paint, every patch the
sampler can draw lies inside one window, so training on the windows draws exactly the
patches it would draw from the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .data import as_channels_last, check_pair

Window = tuple[slice, slice]


@dataclass
class PaintedCrop:
    """One window of a painted image: the raw image crop (H, W, C) and its checked labels."""

    image: np.ndarray
    labels: np.ndarray  # int64, 0 = not painted
    window: Window
    source: int  # which of the given images it was cut from


def _coarse_painted(painted: np.ndarray, block: int) -> np.ndarray:
    """Whether each block x block tile of the mask holds paint (one pass, no copy of the mask)."""
    h, w = painted.shape
    gh, gw = -(-h // block), -(-w // block)
    rows = np.zeros((gh, w), bool)
    for i in range(gh):
        rows[i] = painted[i * block : (i + 1) * block].any(axis=0)
    coarse = np.zeros((gh, gw), bool)
    for j in range(gw):
        coarse[:, j] = rows[:, j * block : (j + 1) * block].any(axis=1)
    return coarse


def _overlap(a: Window, b: Window) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b, strict=True))


def _union(a: Window, b: Window) -> Window:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


JOIN_BELOW = 4096 * 4096


def painted_windows(painted: np.ndarray, margin: int, join_below: int = JOIN_BELOW) -> list[Window]:
    """Disjoint windows that hold every painted pixel with ``margin`` pixels around it.

    Strokes closer than about two margins share a window; far-apart groups (two corners of
    a slide) get their own, so the windows stay small. When the box around all of them has
    fewer than ``join_below`` pixels it is the one window: memory is no concern there, and
    the sampler then draws the very patches (same random stream) as from the whole image.
    Ordered top to bottom, left to right.
    """
    painted = np.asarray(painted, bool)
    h, w = painted.shape
    block = max(1, margin)
    coarse = _coarse_painted(painted, block)
    groups, count = ndimage.label(ndimage.binary_dilation(coarse, np.ones((3, 3), bool)))
    windows: list[Window] = []
    for rows, cols in ndimage.find_objects(groups)[:count]:
        top, left = rows.start * block, cols.start * block
        part = painted[top : rows.stop * block, left : cols.stop * block]
        ys = np.flatnonzero(part.any(axis=1))
        xs = np.flatnonzero(part.any(axis=0))
        if len(ys) == 0:
            continue
        windows.append((
            slice(max(0, top + ys[0] - margin), min(h, top + ys[-1] + 1 + margin)),
            slice(max(0, left + xs[0] - margin), min(w, left + xs[-1] + 1 + margin)),
        ))
    if windows:
        whole = windows[0]
        for window in windows[1:]:
            whole = _union(whole, window)
        if (whole[0].stop - whole[0].start) * (whole[1].stop - whole[1].start) < join_below:
            return [whole]
    merged = True
    while merged:  # grown windows may overlap: join them until all are disjoint
        merged = False
        for i in range(len(windows)):
            for j in range(i + 1, len(windows)):
                if _overlap(windows[i], windows[j]):
                    windows[i] = _union(windows[i], windows.pop(j))
                    merged = True
                    break
            if merged:
                break
    return sorted(windows, key=lambda win: (win[0].start, win[1].start))


def painted_crops(images, labels, margin: int) -> list[PaintedCrop]:
    """Cut every (image, labels) pair to its painted windows and check the labels there.

    Images may be numpy, dask or zarr arrays: only the windows are read. Labels are checked
    (whole numbers, not negative) inside the windows, which hold every non-zero label.
    """
    crops = []
    for source, (image, lbl) in enumerate(zip(images, labels, strict=True)):
        image = as_channels_last(image)
        lbl = np.asarray(lbl)
        if lbl.ndim == 3 and lbl.shape[-1] == 1:
            lbl = lbl[..., 0]
        if lbl.shape != tuple(image.shape[:2]):
            check_pair(image, lbl)  # raises the one-line shape message
        for window in painted_windows(lbl != 0, margin):  # NaN != 0 too: bad values land in a window
            crop = np.asarray(image[window])
            crops.append(PaintedCrop(crop, check_pair(crop, lbl[window]), window, source))
    return crops
