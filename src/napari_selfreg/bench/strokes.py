"""Simulated brush strokes: what a user paints before pressing Train, made reproducible.

A benchmark of an interactive tool needs the same "user" for every method: short,
curvy strokes well inside a dozen objects and a dozen strokes in the background,
covering far less than 1 % of the image. The strokes are random walks kept inside the
mask eroded by the brush radius plus a margin, then drawn with a round brush, so a
stroke never crosses an object's outline (a careful user, not a sloppy one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class StrokeConfig:
    """How the simulated user paints.

    ``width`` is the brush diameter in pixels (odd); ``length`` the longest walk in
    pixels (background strokes; strokes in small objects end at the object's edge).
    ``max_fraction`` caps the painted share of the image: walks are shortened so that
    the expected coverage stays below it.
    """

    structure_strokes: int = 12
    background_strokes: int = 12
    width: int = 5
    length: int = 60
    margin: int = 1  # extra pixels kept free between a stroke and an outline (along rows and columns)
    turn: float = 0.25  # standard deviation of the heading change per pixel (radians)
    max_fraction: float = 0.008

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError("brush width must be at least 1 pixel")
        if self.length < 1:
            raise ValueError("stroke length must be at least 1 pixel")
        if not 0 < self.max_fraction < 1:
            raise ValueError("max_fraction must be in (0, 1)")


def _safe_depth(offsets: np.ndarray, radius: int, margin: int) -> int:
    """How many 4-connected erosion steps keep a brush centred in what is left wholly inside.

    Erosion with the cross clears city-block distances, and the round brush reaches further
    than its radius along them (3 at radius 2, about 1.4 x the radius when wide): the radius
    plus the margin, as the defaults are drawn, but never less than that reach, or a wide
    brush (or no margin) crossed the outline.
    """
    reach = int(np.abs(offsets).sum(axis=1).max())
    return max(radius + margin, reach)


def _disk_offsets(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    keep = yy**2 + xx**2 <= radius**2 + radius  # a round brush that still covers width pixels
    return np.stack([yy[keep], xx[keep]], axis=1)


def _walk(
    allowed: np.ndarray, start: tuple[int, int], length: int, turn: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth random walk of up to ``length`` pixels that stays in ``allowed``."""
    h, w = allowed.shape
    y, x = float(start[0]), float(start[1])
    heading = rng.uniform(0, 2 * np.pi)
    path = [(int(start[0]), int(start[1]))]
    for _ in range(length - 1):
        for attempt in range(6):
            angle = heading + rng.normal(0.0, turn) + (np.pi * 0.5 * attempt * (-1) ** attempt if attempt else 0.0)
            ny, nx = y + np.sin(angle), x + np.cos(angle)
            iy, ix = int(round(ny)), int(round(nx))
            if 0 <= iy < h and 0 <= ix < w and allowed[iy, ix]:
                heading, y, x = angle, ny, nx
                if path[-1] != (iy, ix):
                    path.append((iy, ix))
                break
        else:
            break  # boxed in: the stroke ends here
    return np.array(path, np.int64)


def _draw(labels: np.ndarray, path: np.ndarray, offsets: np.ndarray, value: int) -> None:
    points = (path[:, None, :] + offsets[None]).reshape(-1, 2)
    h, w = labels.shape
    points = points[(points[:, 0] >= 0) & (points[:, 0] < h) & (points[:, 1] >= 0) & (points[:, 1] < w)]
    labels[points[:, 0], points[:, 1]] = value


def instances_of(mask: np.ndarray) -> np.ndarray:
    """Instance ids of a mask: kept when it already has several ids, else connected components."""
    mask = np.asarray(mask)
    if mask.dtype != bool and len(np.unique(mask[mask > 0])) > 1:
        return mask.astype(np.int64)
    components, _ = ndimage.label(mask > 0)
    return components


def simulate_strokes(mask: np.ndarray, seed: int = 0, config: StrokeConfig | None = None) -> np.ndarray:
    """Painted labels for a binary or instance ``mask``: 0 = unpainted, 1 = background, 2 = structure.

    Deterministic for a given seed. Structure strokes go into up to
    ``structure_strokes`` different objects (chosen at random among those large enough
    to hold the brush; several strokes per object when there are fewer objects).
    """
    config = config or StrokeConfig()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rng = np.random.default_rng(seed)
    radius = config.width // 2
    offsets = _disk_offsets(radius)
    h, w = mask.shape
    budget = config.max_fraction * h * w * 0.8  # pixels; headroom for rounding and diagonal steps
    n_structure, n_background = config.structure_strokes, config.background_strokes
    affordable = int(budget // (len(offsets) + 2 * config.width))  # strokes of at least ~3 pixels
    if n_structure + n_background > affordable:  # small images get fewer strokes, not a denser paint
        scale = affordable / (n_structure + n_background)
        n_structure = max(1, int(n_structure * scale)) if n_structure else 0
        n_background = max(1, int(n_background * scale)) if n_background else 0
    n_strokes = n_structure + n_background
    per_stroke = budget / max(n_strokes, 1) - len(offsets)  # the brush's round end caps
    length = int(min(config.length, max(1, per_stroke / config.width)))

    foreground = mask > 0
    erode = ndimage.generate_binary_structure(2, 1)
    depth = _safe_depth(offsets, radius, config.margin)
    inner = ndimage.binary_erosion(foreground, erode, iterations=depth) if depth else foreground
    outer = ndimage.binary_erosion(~foreground, erode, iterations=depth, border_value=1) if depth else ~foreground
    instances = instances_of(mask)

    labels = np.zeros((h, w), np.uint8)
    # structure: one object per stroke, distinct objects first
    inside_ids = instances[inner]
    inside_coords = np.argwhere(inner)
    objects = np.unique(inside_ids)
    if len(objects) and n_structure:
        order = rng.permutation(objects)
        chosen = np.resize(order, n_structure)
        for obj in chosen:
            where = inside_coords[inside_ids == obj]
            start = where[rng.integers(len(where))]
            lo = np.maximum(where.min(0) - 1, 0)
            hi = where.max(0) + 2
            allowed = inner[lo[0] : hi[0], lo[1] : hi[1]] & (instances[lo[0] : hi[0], lo[1] : hi[1]] == obj)
            path = _walk(allowed, (start[0] - lo[0], start[1] - lo[1]), length, config.turn, rng) + lo
            _draw(labels, path, offsets, 2)
    # background: strokes anywhere in the eroded background
    background_coords = np.argwhere(outer)
    if len(background_coords):
        for _ in range(n_background):
            start = background_coords[rng.integers(len(background_coords))]
            path = _walk(outer, (int(start[0]), int(start[1])), length, config.turn, rng)
            _draw(labels, path, offsets, 1)
    return labels


def coverage(labels: np.ndarray) -> float:
    """Share of painted pixels."""
    labels = np.asarray(labels)
    return float((labels > 0).mean())


@dataclass
class CorrectionConfig:
    """How the simulated user corrects a prediction: ``strokes`` strokes with a finer brush
    (``width``) on the largest mistakes, each up to ``length`` pixels."""

    strokes: int = 12
    width: int = 3
    length: int = 40
    margin: int = 1
    turn: float = 0.25

    def __post_init__(self) -> None:
        if self.strokes < 1 or self.width < 1 or self.length < 1:
            raise ValueError("correction strokes, width and length must be at least 1")


def correction_strokes(
    predicted: np.ndarray, mask: np.ndarray, seed: int = 0, config: CorrectionConfig | None = None
) -> np.ndarray:
    """Strokes a careful user adds after seeing ``predicted`` (True = structure) against the truth.

    Background strokes (1) go into false-positive regions, structure strokes (2) into missed
    ones, one stroke per mistake, largest mistakes first (by the area a brush can reach
    inside them). Mistakes thinner than the brush (a rim one or two pixels wide) get no
    stroke: a user cannot paint inside them without crossing the outline.
    """
    config = config or CorrectionConfig()
    predicted = np.asarray(predicted, bool)
    truth = np.asarray(mask) > 0
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction {predicted.shape} and mask {truth.shape} differ in shape")
    rng = np.random.default_rng(seed)
    radius = config.width // 2
    offsets = _disk_offsets(radius)
    erode = ndimage.generate_binary_structure(2, 1)
    depth = _safe_depth(offsets, radius, config.margin)
    candidates = []  # (reachable area, value, component mask id, labelled reachable map)
    for value, error in ((1, predicted & ~truth), (2, truth & ~predicted)):
        reachable = ndimage.binary_erosion(error, erode, iterations=depth) if depth else error
        components, count = ndimage.label(reachable)
        if not count:
            continue
        areas = ndimage.sum_labels(reachable, components, np.arange(1, count + 1))
        candidates += [(float(a), value, i + 1, components) for i, a in enumerate(areas)]
    candidates.sort(key=lambda c: -c[0])
    labels = np.zeros(truth.shape, np.uint8)
    for _, value, index, components in candidates[: config.strokes]:
        where = np.argwhere(components == index)
        start = where[rng.integers(len(where))]
        lo = np.maximum(where.min(0) - 1, 0)
        hi = where.max(0) + 2
        allowed = components[lo[0] : hi[0], lo[1] : hi[1]] == index
        path = _walk(allowed, (start[0] - lo[0], start[1] - lo[1]), config.length, config.turn, rng) + lo
        _draw(labels, path, offsets, value)
    return labels
