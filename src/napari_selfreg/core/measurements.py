"""Per-object measurements of an instance map: one row per object, for counting and sizing
nuclei or glands (what QuPath calls detection measurements).

numpy only (scikit-image's colour deconvolution for the stains). ``measure_objects`` reads the
instance and class maps a band of rows at a time, so a slide's memory map, zarr or dask array
is measured in the memory of a band plus a few numbers per object and per object row (its
first and last column, for the convex hull); it yields progress per band, then once for the
hulls, and honours a stop between bands and between batches of hulls.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .data import InputError
from .files import replace_keeping_mode
from .progress import StopRequest, drain, stop_requested

BAND_PIXELS = 4_000_000  # pixels read at once: scratch arrays of up to ~50 bytes per object pixel
MAX_CLASS_VALUES = 256  # distinct class ids inside objects: more means object ids were given as classes


@dataclass
class MeasureProgress:
    done: int  # bands of rows measured, then 1 for the convex hulls
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
    nucleus measurements have them); the columns are ``intensity_names``. ``intensity_std``:
    their standard deviations over the object's pixels (how even its staining is).
    ``perimeter``: the outline's length in pixels, Crofton's estimate as ``regionprops`` gives it
    (``perimeter_crofton``); ``moments``: each object's row variance, column variance and
    row-column covariance in pixels squared, which give its ellipse (``ellipse_axes``);
    ``convex_area``: the pixels within its convex hull, as ``regionprops``' ``area_convex``.
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
    intensity_std: np.ndarray | None = None  # (n, len(intensity_names)) float64
    perimeter: np.ndarray | None = None  # (n,) float64, pixels
    convex_area: np.ndarray | None = None  # (n,) float64, pixels in the convex hull; NaN where a stop came first
    moments: np.ndarray | None = None  # (n, 3) float64: var(row), var(col), cov(row, col)

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

    @property
    def square_pixels(self) -> bool:
        """Whether a pixel's size is the same along rows and columns: lengths along an outline
        are then the pixels' lengths times one size (regionprops refuses them otherwise)."""
        return self.spacing is None or math.isclose(self.spacing[0], self.spacing[1], rel_tol=1e-6)

    @property
    def perimeter_scaled(self) -> np.ndarray | None:
        """The perimeter in the units of ``spacing``; None without a pixel size or with pixels
        that are not square (an outline's length then depends on its directions)."""
        if self.spacing is None or self.perimeter is None or not self.square_pixels:
            return None
        return self.perimeter * float(self.spacing[0])

    @property
    def circularity(self) -> np.ndarray | None:
        """4 pi area / perimeter^2: 1 for a disc, lower for elongated or ragged outlines. Capped at
        1, as ImageJ caps it: the outline of an object of a few pixels is estimated short (a
        lone pixel's, 2.68, gives 1.75)."""
        if self.perimeter is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = 4.0 * math.pi * self.area / np.square(self.perimeter)
        return np.where(self.perimeter > 0, np.minimum(ratio, 1.0), np.nan)

    def ellipse_axes(self, scaled: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """The major and minor axis lengths of the ellipse with the object's second moments
        (4 times the square roots of the inertia tensor's eigenvalues, as regionprops), in pixels,
        or with ``scaled`` in the units of ``spacing`` (None without one)."""
        if self.moments is None or (scaled and self.spacing is None):
            return None
        sr, sc = (float(self.spacing[0]), float(self.spacing[1])) if scaled else (1.0, 1.0)
        var_r, var_c, cov = self.moments[:, 0] * sr * sr, self.moments[:, 1] * sc * sc, self.moments[:, 2] * sr * sc
        mean, spread = (var_r + var_c) / 2.0, np.hypot((var_r - var_c) / 2.0, cov)
        return 4.0 * np.sqrt(np.maximum(mean + spread, 0.0)), 4.0 * np.sqrt(np.maximum(mean - spread, 0.0))

    @property
    def eccentricity(self) -> np.ndarray | None:
        """0 for a disc, towards 1 for a line: the ellipse's, in the pixel size's frame when there is one."""
        axes = self.ellipse_axes(scaled=self.spacing is not None)
        if axes is None:
            return None
        major, minor = axes
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(major > 0, np.sqrt(np.maximum(1.0 - np.square(minor / major), 0.0)), 0.0)

    @property
    def solidity(self) -> np.ndarray | None:
        """Area over convex area: 1 for a convex object, lower for notched or lobed outlines."""
        return None if self.convex_area is None else self.area / self.convex_area

    def columns(self) -> dict[str, np.ndarray]:
        """The table as named columns, in the CSV's order (the widget makes napari's features of them)."""
        columns = {"id": self.ids, "class_id": self.class_ids, "area_px": self.area}
        area, length = (f"{self.unit}2", self.unit) if self.unit else ("scaled", "scaled")
        if self.spacing is not None:
            columns[f"area_{area}"] = self.area_scaled
        columns["equivalent_diameter_px"] = self.equivalent_diameter
        if self.spacing is not None:
            columns[f"equivalent_diameter_{length}"] = self.equivalent_diameter_scaled
        if self.perimeter is not None:
            columns["perimeter_px"] = self.perimeter
            if self.perimeter_scaled is not None:
                columns[f"perimeter_{length}"] = self.perimeter_scaled
        if self.moments is not None:
            pixels, scaled = self.ellipse_axes(), self.ellipse_axes(scaled=True)
            for k, axis in enumerate(("major", "minor")):
                columns[f"{axis}_axis_length_px"] = pixels[k]
                if scaled is not None:
                    columns[f"{axis}_axis_length_{length}"] = scaled[k]
            columns["eccentricity"] = self.eccentricity
        if self.perimeter is not None:
            columns["circularity"] = self.circularity
        if self.convex_area is not None:
            columns["solidity"] = self.solidity
        columns |= {
            "centroid_row": self.centroid[:, 0], "centroid_col": self.centroid[:, 1],
            "min_row": self.bbox[:, 0], "min_col": self.bbox[:, 1],
            "max_row": self.bbox[:, 2], "max_col": self.bbox[:, 3],
            "touches_edge": self.touches_edge,
        }
        if self.intensity is not None:
            columns |= {name: self.intensity[:, k] for k, name in enumerate(self.intensity_names)}
        if self.intensity_std is not None:
            columns |= {_std_name(name): self.intensity_std[:, k] for k, name in enumerate(self.intensity_names)}
        return columns


@dataclass
class ClassSummary:
    """The objects of one class: how many, how large (pixels), ``area_fraction`` of the image,
    and how round and how convex the typical one is (medians; NaN where none has a value)."""

    class_id: int
    count: int
    total_area: int
    mean_area: float
    median_area: float
    area_fraction: float
    median_circularity: float = math.nan
    median_solidity: float = math.nan


def class_summary(table: ObjectTable) -> dict[int, ClassSummary]:
    """One ``ClassSummary`` per class that has objects, by class id."""
    pixels = max(1, table.shape[0] * table.shape[1])
    summaries = {}
    for cls in np.unique(table.class_ids):
        mine = table.class_ids == cls
        area = table.area[mine]
        shapes = [_median(values[mine]) if values is not None else math.nan
                  for values in (table.circularity, table.solidity)]
        summaries[int(cls)] = ClassSummary(
            int(cls), int(area.size), int(area.sum()), float(area.mean()), float(np.median(area)),
            float(area.sum()) / pixels, *shapes,
        )
    return summaries


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


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
    parts: list[_BandSums] = []
    outlines: list[tuple[np.ndarray, np.ndarray]] = []
    context = None  # the last row read, which the next band's outline lengths need
    complete = True
    for done, top in enumerate(tops):
        if stop_requested(stop):
            complete = False
            break
        bottom = min(h, top + rows)
        ids_map = np.asarray(instances[top:bottom])
        part = _measure_band(ids_map, classes, top, bottom, image if names else None)
        if part is not None:
            parts.append(part)
        outline, context = _outline_lengths(ids_map, context, last=bottom == h)
        if outline is not None:
            outlines.append(outline)
        yield MeasureProgress(done + 1, len(tops) + 1)  # and a last step: the convex hulls
    table = _merge(parts, outlines, (h, w), spacing)
    table.convex_area = np.full(len(table), np.nan)
    if complete and parts:  # a hull needs all of its object's rows
        table.convex_area = _convex_areas(table.ids, table.bbox, parts, stop)
        complete = not np.isnan(table.convex_area).any()
    if complete:
        yield MeasureProgress(len(tops) + 1, len(tops) + 1)
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


def _std_name(mean_name: str) -> str:
    """The column of a mean's spread: mean_red -> std_red, hematoxylin_od -> hematoxylin_od_std."""
    return f"std_{mean_name[5:]}" if mean_name.startswith("mean_") else f"{mean_name}_std"


def _intensity_sums(image, top: int, bottom: int, rows, cols, index, n: int) -> np.ndarray:
    """Per object of a band: the sums of its pixels' channels (and stain densities, for RGB),
    then the sums of their squares."""
    pixels = np.asarray(image[top:bottom])
    values = pixels[rows, cols].reshape(rows.size, -1)  # (object pixels, channels)
    if values.shape[1] == 4:
        values = values[:, :3]
    columns = [values[:, k].astype(np.float64) for k in range(values.shape[1])]
    if values.shape[1] == 3 and values.dtype in (np.uint8, np.uint16):
        from skimage.color import rgb2hed

        densities = rgb2hed(values[None])[0]
        columns += [densities[:, 0], densities[:, 1]]
    columns += [c * c for c in columns]
    return np.stack([np.bincount(index, weights=c, minlength=n) for c in columns], axis=1)


def _bounding_boxes(index: np.ndarray, n: int, corners) -> np.ndarray:
    """(n, 4) int64: per object (``index``) the least of ``corners[0]`` and ``corners[1]`` and the
    greatest of ``corners[2]`` and ``corners[3]`` (pixels' rows and columns, or bands' boxes)."""
    box = np.empty((n, 4), np.int64)
    box[:, :2] = np.iinfo(np.int64).max
    box[:, 2:] = -1
    for k, op in enumerate((np.minimum, np.minimum, np.maximum, np.maximum)):
        column = box[:, k].copy()  # ufunc.at on a contiguous copy, not the strided column
        op.at(column, index, corners[k])
        box[:, k] = column
    return box


class _BandSums(NamedTuple):
    """One band's partial sums per object, which ``_merge`` adds up by id."""

    ids: np.ndarray
    area: np.ndarray
    row_sum: np.ndarray
    col_sum: np.ndarray
    spread: np.ndarray  # (n, 3): sums of d_row^2, d_col^2 and d_row * d_col about the band's own means
    box: np.ndarray
    class_values: np.ndarray  # the distinct class ids under the band's objects
    votes: np.ndarray  # (n, class_values.size)
    intensity: np.ndarray | None
    extremes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # id, row, first and last column per object row


def _measure_band(ids_map: np.ndarray, classes, top: int, bottom: int, image=None) -> _BandSums | None:
    """Partial sums of the objects in rows ``top:bottom`` (``ids_map``): ids, area, coordinate
    sums, squared deviations from the band's means (not raw squares, whose difference from the
    squared mean loses a round disc's zero eccentricity to rounding), the bounding box, class
    votes, and with ``image`` the sums of its intensities."""
    if ids_map.dtype.kind == "i" and ids_map.size and ids_map.min() < 0:
        raise InputError("object ids must be 0 (no object) or more; this map holds negative ids")
    rows, cols = np.nonzero(ids_map)
    if rows.size == 0:
        return None
    ids, index = _compact(ids_map[rows, cols])
    n = ids.size
    area = np.bincount(index, minlength=n)
    grow, gcol = rows.astype(np.float64) + top, cols.astype(np.float64)
    row_sum = np.bincount(index, weights=grow, minlength=n)
    col_sum = np.bincount(index, weights=gcol, minlength=n)
    d_row, d_col = grow - (row_sum / area)[index], gcol - (col_sum / area)[index]
    products = (d_row * d_row, d_col * d_col, d_row * d_col)
    spread = np.stack([np.bincount(index, weights=v, minlength=n) for v in products], axis=1)
    box = _bounding_boxes(index, n, (rows, cols, rows, cols))
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
    return _BandSums(ids, area, row_sum, col_sum, spread, box, values, votes, sums,
                     _row_extremes(ids, index, rows, cols, top))


def _row_extremes(ids, index, rows, cols, top: int):
    """Each object row's first and last column: all a convex hull needs. From the ends of runs
    (pixels whose left or right neighbour is not theirs in ``np.nonzero``'s row-major order), so
    only those few are sorted."""
    n = rows.size
    starts = np.ones(n, bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1) | (index[1:] != index[:-1])
    ends = np.ones(n, bool)
    ends[:-1] = starts[1:]
    at = np.flatnonzero(starts | ends)
    keys, group = np.unique(rows[at].astype(np.int64) * ids.size + index[at], return_inverse=True)
    first = np.full(keys.size, np.iinfo(np.int64).max)
    last = np.full(keys.size, -1)
    np.minimum.at(first, group.ravel(), cols[at])
    np.maximum.at(last, group.ravel(), cols[at])
    return ids[keys % ids.size], keys // ids.size + top, first, last


HULL_CELLS = 2_000_000  # samples (objects x half rows) per batch of hulls: four arrays of 16 MB each


def _convex_areas(ids: np.ndarray, bbox: np.ndarray, parts: list[_BandSums], stop: StopRequest) -> np.ndarray:
    """Pixels of each object's convex hull, counted as skimage's ``convex_hull_image`` counts
    them: the hull of its pixels' edge midpoints, and every pixel centre inside it or on it.

    The hull's right side is the least concave majorant of the rightmost midpoints, sampled
    every half row (y = row - 0.5, row, row + 0.5: the last column, that + 0.5, the last
    column), its left side the same of the leftmost, mirrored; the pixel centres between the
    two sides at each row are counted. The majorants of many objects are built at once, a
    sample position at a time, with objects grouped by height (powers of 2) so that short
    nuclei do not wait on a tall gland, and a group cut into batches of at most
    ``HULL_CELLS`` samples, which bounds the memory; a stop is looked at between batches. NaN
    for the objects a stop left out.
    """
    owner = np.searchsorted(ids, np.concatenate([p.extremes[0] for p in parts]))
    rows, first, last = (np.concatenate([p.extremes[k] for p in parts]) for k in (1, 2, 3))
    heights = bbox[:, 2] - bbox[:, 0]
    groups = np.ceil(np.log2(2 * heights + 1)).astype(np.int64)
    areas = np.full(ids.size, np.nan)
    batches = []  # each group, in batches of at most HULL_CELLS samples (objects x half rows)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        size = max(1, HULL_CELLS // int(2 * heights[members].max() + 1))
        batches += [members[start : start + size] for start in range(0, members.size, size)]
    for members in batches:
        if stop_requested(stop):
            break
        slot = np.full(ids.size, -1)
        slot[members] = np.arange(members.size)
        mine = slot[owner] >= 0
        k, centre = slot[owner[mine]], 2 * (rows[mine] - bbox[owner[mine], 0]) + 1
        length = int(2 * heights[members].max() + 1)
        right = np.full((members.size, length), -np.inf)
        left = np.full((members.size, length), -np.inf)  # mirrored: the majorant of -column
        for offset, r_value, l_value in ((0, last[mine] + 0.5, 0.5 - first[mine]), (-1, last[mine], -first[mine]),
                                         (1, last[mine], -first[mine])):
            np.maximum.at(right, (k, centre + offset), r_value)
            np.maximum.at(left, (k, centre + offset), l_value)
        span = heights[members]
        targets = 2 * np.arange(int(span.max()))[None, :] + 1
        targets = np.where(targets < 2 * span[:, None], targets, -1)  # row centres, -1 past the object
        x_right, x_left = _concave_majorant(right, targets), -_concave_majorant(left, targets)
        inside = np.floor(x_right + 1e-9) - np.ceil(x_left - 1e-9) + 1.0
        areas[members] = np.where(targets >= 0, np.maximum(inside, 0.0), 0.0).sum(axis=1)
    return areas


def _concave_majorant(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row's least concave majorant of its finite ``values`` (samples at 0, 1, ..., -inf
    where none), at the positions ``targets`` (-1: none, NaN out). Andrew's monotone chain,
    run for every row at once: a sample position at a time, each row's stack dropping its
    last vertex while that lies on or below the chord to the new sample."""
    n, length = values.shape
    stack = np.zeros((n, length), np.int64)
    top = np.zeros(n, np.int64)
    for j in range(length):
        new = values[:, j]
        active = np.flatnonzero(np.isfinite(new))
        while True:
            rows = active[top[active] >= 2]
            if rows.size == 0:
                break
            b, a = stack[rows, top[rows] - 1], stack[rows, top[rows] - 2]
            vb, va = values[rows, b], values[rows, a]
            drop = (vb - va) * (j - b) <= (new[rows] - vb) * (b - a)
            if not drop.any():
                break
            top[rows[drop]] -= 1
        stack[active, top[active]] = j
        top[active] += 1
    # each position's last vertex at or before it, then the chord from there to the next vertex
    owner = np.repeat(np.arange(n), top)
    rank = np.arange(owner.size) - np.repeat(np.cumsum(top) - top, top)
    last_vertex = np.full((n, length), -1)
    last_vertex[owner, stack[owner, rank]] = rank
    last_vertex = np.maximum.accumulate(last_vertex, axis=1)
    at = np.maximum(targets, 0)
    k = np.maximum(np.take_along_axis(last_vertex, at, axis=1), 0)
    j0 = np.take_along_axis(stack, k, axis=1)
    j1 = np.take_along_axis(stack, np.minimum(k + 1, np.maximum(top, 1)[:, None] - 1), axis=1)
    v0, v1 = np.take_along_axis(values, j0, axis=1), np.take_along_axis(values, j1, axis=1)
    step = np.where(j1 > j0, (at - j0) / np.maximum(j1 - j0, 1), 0.0)
    return np.where(targets >= 0, v0 + step * (v1 - v0), np.nan)


# Crofton's perimeter estimate, as skimage's ``perimeter_crofton`` (4 directions) makes it: each
# 2 x 2 window contributes by which of its pixels, coded 1 (bottom right) + 2 (top right) + 4
# (bottom left) + 8 (top left), belong to the object. It counts how often lines in 4
# directions cross the outline; unlike a sum of steps between border pixels' centres, it puts
# a digital disc's circularity within about 5 % of 1 from a radius of 3 pixels up.
_CROFTON_WEIGHTS = np.array([
    0, math.pi / 4 * (1 + 1 / math.sqrt(2)), math.pi / (4 * math.sqrt(2)), math.pi / (2 * math.sqrt(2)),
    0, math.pi / 4 * (1 + 1 / math.sqrt(2)), 0, math.pi / (4 * math.sqrt(2)),
    math.pi / 4, math.pi / 2, math.pi / (4 * math.sqrt(2)), math.pi / (4 * math.sqrt(2)),
    math.pi / 4, math.pi / 2, 0, 0,
])


def _outline_lengths(ids_map: np.ndarray, context: np.ndarray | None, last: bool):
    """Outline lengths (ids, lengths) from the 2 x 2 windows whose lower row lies in ``ids_map``
    (and, for the ``last`` band, the window row below the image), and the row the next band's
    windows need above them.

    Outside the image counts as no object, as skimage's padding has it. Each object is weighed
    on its own: in a window it is coded by which pixels hold its id, so objects that touch are
    each outlined whole, as ``regionprops`` outlines them.
    """
    width = ids_map.shape[1]
    above = np.zeros((1, width), ids_map.dtype) if context is None else context  # the row above the image
    parts = [above, ids_map] + ([np.zeros((1, width), ids_map.dtype)] if last else [])
    window = np.pad(np.concatenate(parts), ((0, 0), (1, 1)))  # a column of no object either side
    following = ids_map[-1:]
    corners = (window[1:, 1:], window[:-1, 1:], window[1:, :-1], window[:-1, :-1])  # bits 1, 2, 4, 8
    bottom_right, top_right, bottom_left, top_left = corners
    mixed = np.flatnonzero((bottom_right != top_right) | (bottom_right != bottom_left) | (bottom_right != top_left))
    if mixed.size == 0:
        return None, following
    pixels = [corner.ravel()[mixed] for corner in corners]
    ids_parts, length_parts = [], []
    for k, own in enumerate(pixels):
        counted = own != 0
        for earlier in pixels[:k]:  # a window's object is weighed once, at its first corner
            counted &= earlier != own
        own = own[counted]
        code = sum((1 << bit) * (pixel[counted] == own) for bit, pixel in enumerate(pixels))
        ids_parts.append(own)
        length_parts.append(_CROFTON_WEIGHTS[code])
    ids, index = _compact(np.concatenate(ids_parts))
    return (ids, np.bincount(index, weights=np.concatenate(length_parts), minlength=ids.size)), following


def _merge(parts: list[_BandSums], outlines: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int],
           spacing) -> ObjectTable:
    """One row per id from the bands' partial sums."""
    if not parts:
        empty = np.zeros(0, np.int64)
        return ObjectTable(empty, empty.copy(), empty.copy(), np.zeros((0, 2)), np.zeros((0, 4), np.int64),
                           shape, spacing, perimeter=np.zeros(0), moments=np.zeros((0, 3)))
    ids, index = np.unique(np.concatenate([p.ids for p in parts]), return_inverse=True)
    index = index.ravel()
    n = ids.size

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=values, minlength=n)

    part_area = np.concatenate([p.area for p in parts])
    part_sums = np.stack([np.concatenate([p.row_sum for p in parts]), np.concatenate([p.col_sum for p in parts])], 1)
    area = total(part_area).astype(np.int64)
    centroid = np.stack([total(part_sums[:, 0]), total(part_sums[:, 1])], axis=1) / area[:, None]
    shift = part_sums / part_area[:, None] - centroid[index]  # each band's means from the object's
    spread = np.concatenate([p.spread for p in parts])
    spread[:, 0] += part_area * shift[:, 0] * shift[:, 0]  # the parallel axis theorem
    spread[:, 1] += part_area * shift[:, 1] * shift[:, 1]
    spread[:, 2] += part_area * shift[:, 0] * shift[:, 1]
    moments = np.stack([total(spread[:, k]) for k in range(3)], axis=1) / area[:, None]
    boxes = np.concatenate([p.box for p in parts])
    bbox = _bounding_boxes(index, n, boxes.T)
    values = np.unique(np.concatenate([p.class_values for p in parts]))
    votes = np.zeros((n, values.size), np.int64)
    start = 0
    for part in parts:
        rows = index[start : start + part.ids.size]
        np.add.at(votes, (rows[:, None], np.searchsorted(values, part.class_values)[None, :]), part.votes)
        start += part.ids.size
    class_ids = values[np.argmax(votes, axis=1)].astype(np.int64)  # the first (smallest) class on a tie
    perimeter = np.zeros(n)
    for outline_ids, lengths in outlines:  # a stop may leave the last rows' ids without an object row
        at = np.searchsorted(ids, outline_ids)
        known = (at < n) & (ids[np.minimum(at, n - 1)] == outline_ids)
        np.add.at(perimeter, at[known], lengths[known])
    intensity = intensity_std = None
    if parts[0].intensity is not None:  # each object's mean intensities, from the bands' sums
        sums = np.concatenate([p.intensity for p in parts])
        means = np.stack([total(c) for c in sums.T], axis=1) / area[:, None]
        k = means.shape[1] // 2
        intensity = means[:, :k]
        intensity_std = np.sqrt(np.maximum(means[:, k:] - intensity * intensity, 0.0))
    return ObjectTable(ids.astype(np.int64), class_ids, area, centroid, bbox, shape, spacing, intensity=intensity,
                       intensity_std=intensity_std,
                       perimeter=perimeter, moments=moments)


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
