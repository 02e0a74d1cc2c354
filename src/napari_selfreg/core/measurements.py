"""Per-object measurements of an instance map: one row per object, for counting and sizing
nuclei or glands (what QuPath calls detection measurements).

numpy + scipy only. ``measure_objects`` reads the instance and class maps a band of rows at a
time, so a slide's memory map, zarr or dask array is measured in the memory of a band plus a
few numbers per object; it yields progress per band and honours a stop between bands.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import InputError
from .files import replace_keeping_mode
from .progress import StopRequest, drain, stop_requested

BAND_PIXELS = 4_000_000  # pixels read at once: scratch arrays of up to ~50 bytes per object pixel
MAX_CLASS_VALUES = 256  # distinct class ids inside objects: more means object ids were given as classes


@dataclass
class MeasureProgress:
    done: int  # bands of rows measured
    total: int


@dataclass
class ObjectTable:
    """One entry per object id present in the instance map, in increasing id order.

    ``bbox`` rows are (min_row, min_col, max_row, max_col) with the max exclusive, as numpy
    slices and skimage's ``regionprops`` have them. ``class_ids``: the class most of the object's
    pixels have in the class map (the smallest on a tie; 0 when no class map was given).
    ``spacing``: the pixel size (row, col) that the ``*_scaled`` values use, None for pixels;
    ``unit`` its unit where known (e.g. "um"), which then names those columns ("area_um2").
    ``intensity``: with the image, each object's mean per channel and, for an 8- or 16-bit RGB
    image, its mean hematoxylin and eosin optical density (colour deconvolution, as QuPath's
    nucleus measurements have them); the columns are ``intensity_names``.
    ``complete`` is False when a stop came first: the table then holds the rows read so far.
    """

    ids: np.ndarray  # int64
    class_ids: np.ndarray  # int64
    area: np.ndarray  # pixels, int64
    centroid: np.ndarray  # (n, 2) float64: row, col in pixels
    bbox: np.ndarray  # (n, 4) int64
    shape: tuple[int, int]
    spacing: tuple[float, float] | None = None
    complete: bool = True
    unit: str | None = None
    intensity: np.ndarray | None = None  # (n, len(intensity_names)) float64: means over each object
    intensity_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def equivalent_diameter(self) -> np.ndarray:
        """The diameter of the disc of the object's area, in pixels (skimage's ``equivalent_diameter_area``)."""
        return np.sqrt(4.0 * self.area / math.pi)

    @property
    def touches_edge(self) -> np.ndarray:
        """Objects cut by the image's edge: their true size is unknown, and counts often leave them out."""
        h, w = self.shape
        b = self.bbox
        return (b[:, 0] == 0) | (b[:, 1] == 0) | (b[:, 2] == h) | (b[:, 3] == w)

    @property
    def area_scaled(self) -> np.ndarray | None:
        """Area in the units of ``spacing`` squared; None without a pixel size."""
        if self.spacing is None:
            return None
        return self.area * float(self.spacing[0]) * float(self.spacing[1])

    @property
    def equivalent_diameter_scaled(self) -> np.ndarray | None:
        area = self.area_scaled
        return None if area is None else np.sqrt(4.0 * area / math.pi)

    def columns(self) -> dict[str, np.ndarray]:
        """The table as named columns, in the CSV's order (the widget makes napari's features of them)."""
        columns = {"id": self.ids, "class_id": self.class_ids, "area_px": self.area}
        area, length = (f"{self.unit}2", self.unit) if self.unit else ("scaled", "scaled")
        if self.spacing is not None:
            columns[f"area_{area}"] = self.area_scaled
        columns["equivalent_diameter_px"] = self.equivalent_diameter
        if self.spacing is not None:
            columns[f"equivalent_diameter_{length}"] = self.equivalent_diameter_scaled
        columns |= {
            "centroid_row": self.centroid[:, 0], "centroid_col": self.centroid[:, 1],
            "min_row": self.bbox[:, 0], "min_col": self.bbox[:, 1],
            "max_row": self.bbox[:, 2], "max_col": self.bbox[:, 3],
            "touches_edge": self.touches_edge,
        }
        if self.intensity is not None:
            columns |= {name: self.intensity[:, k] for k, name in enumerate(self.intensity_names)}
        return columns


@dataclass
class ClassSummary:
    """The objects of one class: how many, and how large (pixels); ``area_fraction`` of the image."""

    class_id: int
    count: int
    total_area: int
    mean_area: float
    median_area: float
    area_fraction: float


def class_summary(table: ObjectTable) -> dict[int, ClassSummary]:
    """One ``ClassSummary`` per class that has objects, by class id."""
    pixels = max(1, table.shape[0] * table.shape[1])
    summaries = {}
    for cls in np.unique(table.class_ids):
        area = table.area[table.class_ids == cls]
        summaries[int(cls)] = ClassSummary(
            int(cls), int(area.size), int(area.sum()), float(area.mean()), float(np.median(area)),
            float(area.sum()) / pixels,
        )
    return summaries


def measure_objects(
    instances,
    classes=None,
    spacing: tuple[float, float] | None = None,
    stop: StopRequest = None,
    band: int | None = None,
    unit: str | None = None,
    image=None,
) -> Generator[MeasureProgress, None, ObjectTable]:
    """Measure every object of ``instances`` (H, W; 0 = no object, ids need not be consecutive);
    yields progress per band of ``band`` rows (default: about ``BAND_PIXELS``, whole chunk rows
    of a zarr or dask array) and returns the ``ObjectTable``.

    ``classes``: the class map the objects came from (painting ids), same shape. ``spacing``:
    the pixel size (row, col), e.g. a layer's scale; a size of 1 is left out unless ``unit``
    names its unit (a pixel of 1 um is a size, a scale of 1 is pixels). Each band adds up
    its objects' pixels, coordinates and class votes with ``bincount``; the partial sums are
    merged at the end, so an object that spans bands is measured as a whole. ``image``: the
    picture the objects lie on, (H, W) or (H, W, C), read band by band too: adds the mean
    intensities (``ObjectTable.intensity``).
    """
    instances = _two_d(instances, "instances")
    h, w = (int(n) for n in instances.shape)
    if classes is not None:
        classes = _two_d(classes, "classes")
        if tuple(int(n) for n in classes.shape) != (h, w):
            raise InputError(f"the class map {tuple(classes.shape)} and the objects {(h, w)} differ in shape; "
                             "give the class map the objects were separated from")
    if np.dtype(instances.dtype).kind not in "biu":
        raise InputError(f"object ids must be integers, not {np.dtype(instances.dtype)}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing[-2:])
        if np.allclose(spacing, 1.0) and not unit:
            spacing = None
        if any(not math.isfinite(s) or s <= 0 for s in spacing or ()):
            raise InputError(f"a pixel size must be above 0, not {spacing}")
    unit = unit if spacing is not None else None
    names = _intensity_names(image, (h, w)) if image is not None else ()
    rows = _band_rows(instances, w, band)
    tops = range(0, h, rows)
    parts: list[tuple] = []
    complete = True
    for done, top in enumerate(tops):
        if stop_requested(stop):
            complete = False
            break
        part = _measure_band(instances, classes, top, min(h, top + rows), image if names else None)
        if part is not None:
            parts.append(part)
        yield MeasureProgress(done + 1, len(tops))
    table = _merge(parts, (h, w), spacing)
    table.complete = complete
    table.unit = unit
    if table.intensity is not None:
        table.intensity_names = names
    return table


def measure_to_end(*args, **kwargs) -> ObjectTable:
    """``measure_objects`` run to its result (scripts and tests)."""
    return drain(measure_objects(*args, **kwargs))


def _two_d(array, what: str):
    if not hasattr(array, "shape") or not hasattr(array, "__getitem__"):
        array = np.asarray(array)
    if len(array.shape) != 2:
        raise InputError(f"{what} must be one 2-D map (H, W), not shape {tuple(array.shape)}; measure a stack "
                         "slice by slice")
    return array


def _band_rows(array, width: int, band: int | None) -> int:
    """Rows per band; whole rows of chunks for a chunked array, each chunk then decompressed once."""
    if band is not None:
        return max(1, int(band))
    rows = max(1, BAND_PIXELS // max(1, width))
    chunks = getattr(array, "chunks", None)
    if chunks:
        first = chunks[0]
        height = int(first[0] if isinstance(first, tuple) else first)  # dask: sizes per chunk; zarr: one size
        if 0 < height:
            rows = max(1, rows // height) * height
    return rows


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, each value's index among them). A lookup table where the values
    span little more than there are of them (instance ids of a band usually do), which is
    several times faster than the sort in ``np.unique``."""
    low, high = int(values.min()), int(values.max())
    if high - low <= 4 * values.size + 65_536:
        offset = values.astype(np.int64) - low
        present = np.bincount(offset) > 0
        lookup = np.cumsum(present) - 1
        return np.flatnonzero(present) + low, lookup[offset]
    distinct, index = np.unique(values, return_inverse=True)
    return distinct.astype(np.int64), index.ravel()


def image_under(image, shape: tuple[int, int]):
    """``image`` where its pixels lie under objects of ``shape``, (H, W) or (H, W, C); else
    None (a one-slice volume, channels first): callers then measure without colours."""
    found = tuple(int(n) for n in image.shape)
    return image if found[:2] == tuple(shape) and len(found) in (2, 3) else None


def _intensity_names(image, shape: tuple[int, int]) -> tuple[str, ...]:
    """The intensity columns an image gives; its shape must be the objects'."""
    found = tuple(int(n) for n in image.shape)
    if image_under(image, shape) is None:
        raise InputError(f"the image {found} is not the picture of the objects {shape}; give the image they were "
                         "segmented from, (H, W) or (H, W, channels)")
    channels = 1 if len(found) == 2 else found[2]
    if channels == 1:
        return ("mean_intensity",)
    if channels in (3, 4):  # RGB, or RGBA whose alpha is left out (as training leaves it out)
        names = ("mean_red", "mean_green", "mean_blue")
        stains = np.dtype(image.dtype) in (np.dtype(np.uint8), np.dtype(np.uint16))
        return names + (("hematoxylin_od", "eosin_od") if stains else ())
    return tuple(f"mean_channel_{k + 1}" for k in range(channels))


def _intensity_sums(image, top: int, bottom: int, rows, cols, index, n: int) -> np.ndarray:
    """Per object of a band: the sums of its pixels' channels (and stain densities, for RGB)."""
    pixels = np.asarray(image[top:bottom])
    values = pixels[rows, cols].reshape(rows.size, -1)  # (object pixels, channels)
    if values.shape[1] == 4:
        values = values[:, :3]
    columns = [values[:, k].astype(np.float64) for k in range(values.shape[1])]
    if values.shape[1] == 3 and values.dtype in (np.uint8, np.uint16):
        from skimage.color import rgb2hed

        densities = rgb2hed(values[None])[0]
        columns += [densities[:, 0], densities[:, 1]]
    return np.stack([np.bincount(index, weights=c, minlength=n) for c in columns], axis=1)


def _measure_band(instances, classes, top: int, bottom: int, image=None):
    """Partial sums of the objects in rows ``top:bottom``: ids, area, row and column sums, the
    bounding box, class votes (distinct class ids, votes per object and class), and with
    ``image`` the sums of its intensities."""
    ids_map = np.asarray(instances[top:bottom])
    if ids_map.dtype.kind == "i" and ids_map.size and ids_map.min() < 0:
        raise InputError("object ids must be 0 (no object) or more; this map holds negative ids")
    rows, cols = np.nonzero(ids_map)
    if rows.size == 0:
        return None
    ids, index = _compact(ids_map[rows, cols])
    n = ids.size
    area = np.bincount(index, minlength=n)
    row_sum = np.bincount(index, weights=rows, minlength=n) + top * area
    col_sum = np.bincount(index, weights=cols, minlength=n)
    box = np.empty((n, 4), np.int64)
    box[:, :2] = np.iinfo(np.int64).max
    box[:, 2:] = -1
    for k, (op, coords) in enumerate(((np.minimum, rows), (np.minimum, cols), (np.maximum, rows), (np.maximum, cols))):
        column = box[:, k].copy()
        op.at(column, index, coords)
        box[:, k] = column
    box[:, [0, 2]] += top
    box[:, 2:] += 1  # exclusive ends
    if classes is None:
        values, votes = np.zeros(1, np.int64), area[:, None]
    else:
        class_map = np.asarray(classes[top:bottom])
        if class_map.dtype == bool:  # a mask: True = structure, as ids 2 (1 = background)
            class_map = class_map.astype(np.uint8) + 1
        values, rank = _compact(class_map[rows, cols])
        if values.size > MAX_CLASS_VALUES:
            raise InputError(f"the class map holds more than {MAX_CLASS_VALUES} ids under the objects: give the "
                             "map of classes (1 = background, 2.. = structures), not object ids")
        votes = np.bincount(index * values.size + rank, minlength=n * values.size).reshape(n, values.size)
    sums = None if image is None else _intensity_sums(image, top, bottom, rows, cols, index, n)
    return ids, area, row_sum, col_sum, box, values, votes, sums


def _merge(parts: list[tuple], shape: tuple[int, int], spacing) -> ObjectTable:
    """One row per id from the bands' partial sums."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return ObjectTable(empty, empty.copy(), empty.copy(), np.zeros((0, 2)), np.zeros((0, 4), np.int64),
                           shape, spacing)
    ids, index = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    index = index.ravel()
    n = ids.size
    area = np.bincount(index, weights=np.concatenate([p[1] for p in parts]), minlength=n).astype(np.int64)
    row_sum = np.bincount(index, weights=np.concatenate([p[2] for p in parts]), minlength=n)
    col_sum = np.bincount(index, weights=np.concatenate([p[3] for p in parts]), minlength=n)
    boxes = np.concatenate([p[4] for p in parts])
    bbox = np.empty((n, 4), np.int64)
    bbox[:, :2] = np.iinfo(np.int64).max
    bbox[:, 2:] = -1
    for k, op in enumerate((np.minimum, np.minimum, np.maximum, np.maximum)):
        column = bbox[:, k].copy()
        op.at(column, index, boxes[:, k])
        bbox[:, k] = column
    values = np.unique(np.concatenate([p[5] for p in parts]))
    votes = np.zeros((n, values.size), np.int64)
    start = 0
    for part in parts:
        rows = index[start : start + part[0].size]
        np.add.at(votes, (rows[:, None], np.searchsorted(values, part[5])[None, :]), part[6])
        start += part[0].size
    class_ids = values[np.argmax(votes, axis=1)].astype(np.int64)  # the first (smallest) class on a tie
    centroid = np.stack([row_sum / area, col_sum / area], axis=1)
    intensity = None
    if parts[0][7] is not None:  # each object's mean intensities, from the bands' sums
        sums = np.concatenate([p[7] for p in parts])
        intensity = np.stack([np.bincount(index, weights=c, minlength=n) for c in sums.T], axis=1) / area[:, None]
    return ObjectTable(ids.astype(np.int64), class_ids, area, centroid, bbox, shape, spacing, intensity=intensity)


def _texts(column: np.ndarray) -> list[str]:
    """A column as CSV text: True/False, integers as they are, floats to 10 significant digits."""
    if column.dtype == bool:
        return ["True" if v else "False" for v in column.tolist()]
    if column.dtype.kind == "f":
        return [format(v, ".10g") for v in column.tolist()]
    return [str(v) for v in column.tolist()]


def write_csv(table: ObjectTable, path: str | Path) -> Path:
    """One header row and one row per object, in ``columns()``'s order. Written under a
    temporary name and renamed, so a failed write leaves an existing table as it was."""
    path = Path(path)
    columns = table.columns()
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(zip(*(_texts(np.asarray(c)) for c in columns.values()), strict=True))
        replace_keeping_mode(partial, path)
    finally:
        if partial.exists():
            os.unlink(partial)
    return path
