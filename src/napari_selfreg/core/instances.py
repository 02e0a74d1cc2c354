"""Separate touching objects of a class map into instances (distance-transform watershed).

torch-free; the Segment widget runs it in a worker, ``predict --instances`` after the tiles.
``separate_instances`` works on a map in memory; ``split_instances`` runs it window by
window over a map of any size (a slide's memory map or zarr array) and gives the same objects.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .data import InputError
from .progress import StopRequest, stop_requested

INSTANCE_PIXELS = 64_000_000  # largest window split at once (a few GB of scratch arrays)
SPLIT_TILE = 2048  # each window's core: its objects are kept from this window
SPLIT_MARGIN = 256  # context around the core, grown where an object reaches the window's edge
SPLIT_WORKERS = 4  # threads splitting windows ahead: each holds a window's scratch arrays
# How far the split of one object depends on the map around it: the opening (2 pixels), the
# smoothing of the distances (4) and the distances of neighbours within that (4), with room
# for a neighbour cut by the window edge to stay larger than ``min_size``.
REACH = 16
HOLDING_TRIES = 3  # windows fitted to the groups a core's window cuts, before the widest is used
MIN_SIZE = 16  # objects of fewer pixels are dropped (slivers and specks)


@dataclass
class InstanceProgress:
    done: int  # windows (tile cores) finished
    total: int


@dataclass
class InstanceSplit:
    """``instances``: ids 1..count, 0 = no object. ``truncated``: groups of objects wider than
    the largest window (``INSTANCE_PIXELS``): split inside the widest window around where they
    start, their parts beyond it one object per tile core."""

    instances: np.ndarray
    count: int
    complete: bool = True
    truncated: int = 0
    per_class: dict[int, int] = field(default_factory=dict)  # class id -> objects of that class

    def __post_init__(self) -> None:
        self.per_class = {int(c): int(n) for c, n in sorted(self.per_class.items())}


def separate_instances(
    labels: np.ndarray,
    classes: list[int] | None = None,
    height: float = 1.0,
    relative_height: float = 0.1,
    min_size: int = MIN_SIZE,
) -> np.ndarray:
    """Instance ids (0 = background) for the structure classes of ``labels`` (ids >= 2).

    Each class is split on its own: the maxima of the smoothed distance to the class
    border seed a watershed, so two touching nuclei become two objects. A maximum is a
    connected plateau or ridge that stands at least ``height`` pixels above its
    surroundings (h-maxima), or ``relative_height`` of its object's deepest point where that
    is more: a long gland or a spindle-shaped nucleus has a ridge along its middle, which
    single-pixel peaks cut every few pixels, and a large gland has bays whose lobes would
    each keep a maximum of a pixel or two (BENCHMARKS.md, "Instances"). A small opening first
    removes slivers one or two pixels thin (edge artefacts would otherwise shatter into
    many tiny "objects"); objects smaller than ``min_size`` pixels are dropped. A boolean mask
    is one structure class (True).
    """
    from skimage.segmentation import watershed

    labels = _class_map(np.asarray(labels))
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c >= 2]
    out = np.zeros(labels.shape, np.int32)
    offset = 0
    for cls in classes:
        mask = labels == cls
        if not mask.any():
            continue
        mask = _objects_of(mask, min_size)
        distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(mask), 1.0)
        components, _ = ndimage.label(mask)
        markers, _ = ndimage.label(_seeds(distance, components, height, relative_height), np.ones((3, 3)))
        # components without a maximum (tiny or flat) keep one seed each
        seeded = np.unique(components[markers > 0])
        for index in np.setdiff1d(np.arange(1, components.max() + 1), seeded):
            y, x = np.argwhere(components == index)[0]
            markers[y, x] = markers.max() + 1
        instances = watershed(-distance, markers, mask=mask)
        out[instances > 0] = instances[instances > 0] + offset
        offset = int(out.max())
    return out


def _class_map(labels):
    """``labels`` as a 2-D class map: a boolean mask (True = structure) read as ids 1 and 2,
    since its True would be background (id 1) and give no objects at all."""
    if len(labels.shape) != 2:
        raise InputError(f"instances are split on one 2-D class map (H, W), not shape {tuple(labels.shape)}; "
                         "split a stack slice by slice")
    if labels.dtype == bool:
        if not isinstance(labels, np.ndarray):
            raise InputError("a lazy boolean mask cannot be read as a class map; give ids (mask + 1: 1 = background, "
                             "2 = structure)")
        return labels.astype(np.uint8) + 1
    return labels


def _seeds(distance: np.ndarray, components: np.ndarray, height: float, relative_height: float) -> np.ndarray:
    """The h-maxima of each object, in its own bounding box: the reconstruction behind
    them costs about a microsecond per pixel, and most pixels of a nuclei map are
    background (a 2000 x 2000 map with 3000 nuclei: the whole split 1.4-1.9 s, where the
    seeds alone took 5 s over the whole map)."""
    from skimage.morphology import local_maxima, reconstruction

    seeds = np.zeros(components.shape, bool)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)  # a rim of background
        own = components[box] == index
        values = np.where(own, distance[box], 0.0)
        # one height test for small and large objects: a large one's distances are scaled down
        values /= max(1.0, relative_height * values.max() / height)
        # the h-maxima: the plateaus of the distance lowered by ``height`` and rebuilt under it.
        # (skimage's ``h_maxima`` keeps only the top pixels of each, which a ridge at an angle
        # to the pixel grid repeats a pixel or two apart: 15 seeds in a rod at 30 degrees)
        lowered = reconstruction(values - height, values, method="dilation")
        seeds[box] |= local_maxima(lowered, connectivity=2) & own
    return seeds


def _objects_of(mask: np.ndarray, min_size: int, cut_sides: tuple[bool, ...] = (False,) * 4) -> np.ndarray:
    """The pixels of ``mask`` that can be objects: a small opening, then parts smaller than
    ``min_size`` dropped, except those at a side where the array is cut from a larger map
    (``cut_sides``: top, bottom, left, right), which may go on beyond it."""
    mask = ndimage.binary_opening(mask, iterations=1)
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    keep = np.bincount(components.ravel()) >= min_size
    sides = (components[0], components[-1], components[:, 0], components[:, -1])
    for side, cut in zip(sides, cut_sides, strict=True):
        if cut:
            keep[side] = True
    keep[0] = False
    return keep[components]


@dataclass
class IdCounts:
    """What tells a class map from a mask or object ids: the largest id, and how many pixels
    hold 0 and 1 (1 is background in a class map, an object in a mask of 0 = background)."""

    largest: int
    zeros: int
    ones: int

    @property
    def zero_background(self) -> bool:
        """0 covers more than 1 while 1 is used: a mask or object ids, unless named classes
        say otherwise (painted strokes on an unpainted image look the same)."""
        return 0 < self.ones < self.zeros


def id_counts(labels, band: int = SPLIT_TILE) -> IdCounts:
    """``IdCounts`` of a map, read a band of rows at a time: ``np.max`` of a lazy slide (dask,
    zarr) would compute or load all of it at once."""
    largest = zeros = ones = 0
    for top in range(0, int(labels.shape[0]), band):
        part = np.asarray(labels[top : top + band])
        if part.size:
            largest = max(largest, int(part.max()))
            zeros += int(np.count_nonzero(part == 0))
            ones += int(np.count_nonzero(part == 1))
    return IdCounts(largest, zeros, ones)


def split_instances(
    labels,
    out=None,
    tile: int = SPLIT_TILE,
    margin: int = SPLIT_MARGIN,
    max_window: int = INSTANCE_PIXELS,
    stop: StopRequest = None,
    workers: int | None = None,
    **options,
) -> Generator[InstanceProgress, None, InstanceSplit]:
    """``separate_instances`` over ``labels`` (H, W) of any size, a window at a time; yields
    progress per window and returns the ``InstanceSplit``.

    Memory stays at a window's scratch arrays plus ``out`` (an (H, W) int32 array, cleared
    here; or a zero-filled memory map or zarr array; allocated in memory when None). Each touching group of objects
    is split in a window that holds it whole with ``REACH`` pixels to spare, so it comes out as
    the whole-map split would have it, and is written by the one window whose core holds its
    first pixel (in row-major order). A group that reaches a window's edge is split again in a
    window fitted to it (``_holding_window``), up to ``max_window`` pixels. A stop request is
    honoured between windows (``complete`` is then False and the objects written so far stay).
    Where groups were wider than the widest window, a second pass over the cores gives their
    remaining pixels ids; it yields its own progress, from 0 again, and honours a stop too.

    ``workers`` threads (default: the CPUs, at most ``SPLIT_WORKERS``) split the next windows
    while this one is written: scipy and scikit-image release the GIL for most of a split.
    The writes stay in window order, so the result does not depend on ``workers``; memory
    grows by a window's scratch arrays per worker.
    """
    if not hasattr(labels, "shape") or not hasattr(labels, "__getitem__"):
        labels = np.asarray(labels)
    labels = _class_map(labels)
    h, w = (int(n) for n in labels.shape)
    if out is None:
        out = np.zeros((h, w), np.int32)
    if tuple(out.shape) != (h, w):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(h, w)}")
    if np.dtype(out.dtype).kind not in "iu" or np.dtype(out.dtype).itemsize < 4:
        raise ValueError(f"out must hold 32-bit object ids (int32), not {np.dtype(out.dtype)}")
    if type(out) is np.ndarray:  # in memory: cheap to clear; ids left there would pass for objects written
        out.fill(0)
    tile, margin = max(1, int(tile)), max(0, int(margin))
    cores = [(y, min(y + tile, h), x, min(x + tile, w)) for y in range(0, h, tile) for x in range(0, w, tile)]
    count = truncated = 0
    per_class: Counter[int] = Counter()
    workers = max(1, int(workers or min(os.cpu_count() or 1, SPLIT_WORKERS)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="split-instances")
    ahead: dict[int, Future] = {}  # each core's first window, split ahead of its turn

    def split_ahead(index: int) -> None:
        if index < len(cores) and index not in ahead:
            ahead[index] = pool.submit(_split_window, labels, _window(cores[index], margin, h, w), options)

    try:
        for done, core in enumerate(cores):
            if stop_requested(stop):
                return InstanceSplit(out, count, complete=False, truncated=truncated, per_class=per_class)
            for index in range(done, done + workers):
                split_ahead(index)
            window, widest = _window(core, margin, h, w), False
            for attempt in range(HOLDING_TRIES + 2):  # the first window, the fitted ones, the widest
                widest = widest or not _can_grow(window, h, w, max_window)
                region, instances, groups = (
                    ahead.pop(done).result() if attempt == 0 else _split_window(labels, window, options)
                )
                firsts, cut = _first_pixels(groups, window, h, w)
                y, x = np.divmod(firsts, w)
                owned = (y >= core[0]) & (y < core[1]) & (x >= core[2]) & (x < core[3])
                pending = owned & cut
                if pending.any():  # (reading ``out`` only then: a zarr window is decompressed)
                    pending &= ~_written_at(out, window, firsts, w)
                kept = owned if widest else owned & ~cut
                count = _write(out, window, instances, groups, kept, count, region, per_class)
                if widest:
                    truncated += int(np.count_nonzero(pending))
                    break
                if not pending.any():
                    break
                # the groups that reach the window's edge: split again in a window that holds them whole
                held = _holding_window(labels, window, groups, pending, h, w, max_window)
                if held is None or attempt == HOLDING_TRIES:
                    window, widest = _window(core, _widest_margin(core, h, w, max_window), h, w), True
                else:
                    window = held
            yield InstanceProgress(done + 1, len(cores))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a stop does not wait for windows split ahead
    if truncated:  # a second pass over the cores, shown and stoppable as the first
        count, filled = yield from _fill_beyond_windows(labels, out, cores, count, options, per_class, stop)
        if not filled:
            return InstanceSplit(out, count, complete=False, truncated=truncated, per_class=per_class)
    return InstanceSplit(out, count, truncated=truncated, per_class=per_class)


def _split_window(labels, window: tuple[slice, slice], options: dict):
    """(class map, instances, touching groups) of one window."""
    region = np.asarray(labels[window])
    instances = separate_instances(region, **options)
    groups, _ = ndimage.label(instances > 0)
    return region, instances, groups


def _window(core: tuple[int, int, int, int], margin: int, h: int, w: int) -> tuple[slice, slice]:
    y0, y1, x0, x1 = core
    return slice(max(0, y0 - margin), min(h, y1 + margin)), slice(max(0, x0 - margin), min(w, x1 + margin))


def _area(window: tuple[slice, slice]) -> int:
    return (window[0].stop - window[0].start) * (window[1].stop - window[1].start)


def _widest_margin(core, h: int, w: int, max_window: int) -> int:
    """The widest margin around ``core`` whose window holds at most ``max_window`` pixels (or
    covers the map)."""
    low, high = 0, max(h, w)
    if _area(_window(core, high, h, w)) <= max_window:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _area(_window(core, middle, h, w)) <= max_window else (low, middle)
    return low


def _can_grow(window: tuple[slice, slice], h: int, w: int, max_window: int) -> bool:
    """Whether a window can be made wider: it neither covers the map nor holds ``max_window`` pixels."""
    whole = (window[0].stop - window[0].start, window[1].stop - window[1].start) == (h, w)
    return not whole and _area(window) < max_window


def _holding_window(labels, window, groups: np.ndarray, pick: np.ndarray, h: int, w: int,
                    max_window: int) -> tuple[slice, slice] | None:
    """The smallest window that holds the ``pick``ed groups of ``window`` whole, with ``REACH``
    pixels to spare; None when it would hold more than ``max_window`` pixels.

    The structure pixels' connected pieces (labels >= 2) hold each group, and labelling them
    costs a hundredth of a split: they are labelled in ever wider windows until the pieces
    holding the groups stop at the labelled window's edge or the map's, so the one split
    that follows runs in the window the groups need. (Before, each wider window was split
    whole in turn: on a dense map of touching nuclei most of the time went there.)
    """
    seeds = np.isin(groups, np.flatnonzero(pick) + 1)
    looked, margin = window, 0
    while True:
        pieces, _ = ndimage.label(np.asarray(labels[looked]) >= 2)
        dy, dx = window[0].start - looked[0].start, window[1].start - looked[1].start
        ids = np.unique(pieces[dy : dy + seeds.shape[0], dx : dx + seeds.shape[1]][seeds])
        held = np.isin(pieces, ids[ids > 0])
        rows, cols = np.flatnonzero(held.any(1)), np.flatnonzero(held.any(0))
        y0, y1 = looked[0].start + rows[0], looked[0].start + rows[-1] + 1
        x0, x1 = looked[1].start + cols[0], looked[1].start + cols[-1] + 1
        at_edge = ((y0 == looked[0].start > 0) or (y1 == looked[0].stop < h)
                   or (x0 == looked[1].start > 0) or (x1 == looked[1].stop < w))
        if not at_edge:
            target = (slice(max(0, y0 - REACH), min(h, y1 + REACH)), slice(max(0, x0 - REACH), min(w, x1 + REACH)))
            return target if _area(target) <= max_window else None
        if not _can_grow(looked, h, w, max_window):
            return None
        margin = max(2 * margin, 256)
        looked = (slice(max(0, window[0].start - margin), min(h, window[0].stop + margin)),
                  slice(max(0, window[1].start - margin), min(w, window[1].stop + margin)))
        if _area(looked) > max_window:
            return None


def _written_at(out, window: tuple[slice, slice], firsts: np.ndarray, w: int) -> np.ndarray:
    """Whether each group's first pixel (flat indices into the map) already has an id in ``out``."""
    y, x = np.divmod(firsts, w)
    return np.asarray(out[window])[y - window[0].start, x - window[1].start] != 0


def _first_pixels(groups: np.ndarray, window: tuple[slice, slice], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's first pixel (row-major, as a flat index into the whole map), and whether it
    comes within ``REACH`` of a window edge that is not the map's edge (then it may go on
    beyond the window, or be split differently there)."""
    top, left = window[0].start, window[1].start
    bottom, right = window[0].stop, window[1].stop
    boxes = ndimage.find_objects(groups)
    firsts = np.empty(len(boxes), np.int64)
    cut = np.zeros(len(boxes), bool)
    for k, (rows, cols) in enumerate(boxes):
        column = cols.start + int(np.argmax(groups[rows.start, cols] == k + 1))
        firsts[k] = (top + rows.start) * w + left + column
        cut[k] = (
            (top > 0 and rows.start < REACH)
            or (left > 0 and cols.start < REACH)
            or (bottom < h and top + rows.stop > bottom - REACH)
            or (right < w and left + cols.stop > right - REACH)
        )
    return firsts, cut


def _write(out, window: tuple[slice, slice], instances: np.ndarray, groups: np.ndarray, keep: np.ndarray,
           count: int, classes: np.ndarray, per_class: Counter) -> int:
    """Write the kept groups' objects into ``out`` as ids after ``count``, counting them by
    their class in ``classes`` (the window's labels). Pixels written before stay: groups kept
    from a narrower window around the same core, and the parts of a truncated group that
    other windows wrote. Returns the new count."""
    if not keep.any():
        return count
    chosen = np.concatenate([[False], keep])[groups]
    written = np.array(out[window])
    chosen &= written == 0
    ids, first, order = np.unique(instances[chosen], return_index=True, return_inverse=True)
    per_class.update(int(c) for c in classes[chosen][first])
    written[chosen] = count + 1 + order.ravel()
    out[window] = written
    return count + len(ids)


def _fill_beyond_windows(labels, out, cores, count: int, options: dict, per_class: Counter, stop: StopRequest):
    """The parts of truncated groups that no window wrote: object pixels still without an id
    become one object per class, core and connected piece. Yields progress per core; returns
    the new count and whether every core was filled (a stop leaves the rest unfilled)."""
    h, w = (int(n) for n in labels.shape[:2])
    min_size = options.get("min_size", MIN_SIZE)
    for done, core in enumerate(cores):
        if stop_requested(stop):
            return count, False
        window = _window(core, REACH, h, w)
        inner = (slice(core[0] - window[0].start, core[1] - window[0].start),
                 slice(core[2] - window[1].start, core[3] - window[1].start))
        region = np.asarray(labels[window])
        cut_sides = (window[0].start > 0, window[0].stop < h, window[1].start > 0, window[1].stop < w)
        written = np.asarray(out[core[0] : core[1], core[2] : core[3]])
        classes = options.get("classes") or [int(c) for c in np.unique(region) if c >= 2]
        for cls in classes:
            missing = _objects_of(region == cls, min_size, cut_sides)[inner] & (written == 0)
            pieces, n = ndimage.label(missing)
            if n:
                written = np.where(missing, pieces + count, written).astype(written.dtype)
                out[core[0] : core[1], core[2] : core[3]] = written
                count += n
                per_class[cls] += n
        yield InstanceProgress(done + 1, len(cores))
    return count, True
