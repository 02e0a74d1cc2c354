"""Separate touching objects of a class map into instances (distance-transform watershed).

torch-free; the Segment widget runs it in a worker, ``predict --instances`` after the tiles.
It works on the whole map in memory, so images are limited to ``INSTANCE_PIXELS``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

INSTANCE_PIXELS = 64_000_000  # largest map split at once (a few GB of scratch arrays)


def separate_instances(
    labels: np.ndarray,
    classes: list[int] | None = None,
    height: float = 1.0,
    relative_height: float = 0.1,
    min_size: int = 16,
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
    many tiny "objects"); objects smaller than ``min_size`` pixels are dropped.
    """
    from skimage.segmentation import watershed

    labels = np.asarray(labels)
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c >= 2]
    out = np.zeros(labels.shape, np.int32)
    offset = 0
    for cls in classes:
        mask = labels == cls
        if not mask.any():
            continue
        mask = _remove_small(ndimage.binary_opening(mask, iterations=1), min_size)
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


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]
