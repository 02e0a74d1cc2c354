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
    from skimage.morphology import h_maxima
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
        components, count = ndimage.label(mask)
        # each object's distances scaled so that one height test serves small and large objects
        deepest = np.asarray(ndimage.maximum(distance, components, np.arange(1, count + 1)), float).reshape(-1)
        scale = np.concatenate([[1.0], np.maximum(1.0, relative_height * deepest / height)])
        markers, _ = ndimage.label(h_maxima(distance / scale[components], height) & mask)
        # components without a maximum (tiny or flat) keep one seed each
        seeded = np.unique(components[markers > 0])
        for index in np.setdiff1d(np.arange(1, components.max() + 1), seeded):
            y, x = np.argwhere(components == index)[0]
            markers[y, x] = markers.max() + 1
        instances = watershed(-distance, markers, mask=mask)
        out[instances > 0] = instances[instances > 0] + offset
        offset = int(out.max())
    return out


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]
