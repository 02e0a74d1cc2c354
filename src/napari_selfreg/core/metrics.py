"""Dice and IoU per class, and binary scores for benchmark masks.

Empty ground truth with a non-empty prediction scores 0, not 1 (METHOD.md lists the
opposite as a weakness of the reference code); both empty scores 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Overlap:
    dice: float
    iou: float
    predicted_pixels: int
    true_pixels: int

    def to_dict(self) -> dict:
        return asdict(self)


def overlap(predicted: np.ndarray, truth: np.ndarray) -> Overlap:
    p = np.asarray(predicted, bool)
    g = np.asarray(truth, bool)
    inter = int(np.logical_and(p, g).sum())
    ps, gs = int(p.sum()), int(g.sum())
    union = ps + gs - inter
    if ps + gs == 0:
        return Overlap(1.0, 1.0, 0, 0)
    return Overlap(2.0 * inter / (ps + gs), inter / union, ps, gs)


def binary_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return overlap(predicted, truth).dice


MAX_PAINTING_ID = 64  # as ``data.MAX_CLASSES``; metrics stays free of the data module


def per_class_overlap(prediction: np.ndarray, mask: np.ndarray, kind: str | None = None) -> dict[str, Overlap]:
    """Compare painting-id labels with a ground-truth mask.

    A binary or instance mask (0/255, 0/1, instance ids) counts every non-zero pixel as
    structure: then class "2" is any predicted structure id >= 2 and "1" is background.
    A mask whose values are painting ids (1 = background, 2.. = classes, no 0) is compared
    class by class; a mask without 0 that has no 1 either (all 255 inside one nucleus) or ids
    no painting uses is binary. An all-1 mask stays ambiguous and is read as ids. ``kind``
    ("ids" or "binary") overrides that guess, for masks scored together (``masks_kind``).
    """
    prediction = np.asarray(prediction)
    mask = np.asarray(mask)
    if prediction.shape != mask.shape:
        raise ValueError(f"prediction {prediction.shape} and mask {mask.shape} differ in shape")
    if (kind or mask_kind(mask)) == "ids":
        classes = sorted((set(np.unique(mask)) | set(np.unique(prediction))) - {0})
        return {str(int(c)): overlap(prediction == c, mask == c) for c in classes}
    # painting ids read with binary masks (``masks_kind``): 1 is background there too
    truth = mask >= 2 if mask_kind(mask) == "ids" else mask > 0
    predicted = prediction >= 2
    scores = {"1": overlap(~predicted, ~truth), "2": overlap(predicted, truth)}
    # a class neither holds is not scored, as with ids: an image without structure would
    # otherwise add a Dice of 1 to the mean of binary masks and not to that of the same ids
    return {c: s for c, s in scores.items() if s.predicted_pixels + s.true_pixels}


def could_be_ids(mask: np.ndarray) -> bool:
    """No 0 and no id beyond what painting uses: painting ids, unless it is one object's crop."""
    mask = np.asarray(mask)
    if mask.dtype == bool:  # True is structure, whatever the pixels hold
        return False
    return bool(mask.min() >= 1 and mask.max() <= MAX_PAINTING_ID)


def mask_kind(mask: np.ndarray) -> str:
    """"ids" for painting ids (1 = background present), else "binary" (non-zero = structure)."""
    return "ids" if could_be_ids(mask) and bool((np.asarray(mask) == 1).any()) else "binary"


def masks_kind(masks) -> str:
    """One kind for a set of masks scored together, so that a mean compares like with like:
    painting ids when every mask could hold them and one shows background (1), else binary."""
    all_could, any_background = True, False
    for mask in masks:  # one at a time: a generator of masks read from files is not held
        all_could = all_could and could_be_ids(mask)
        any_background = any_background or mask_kind(mask) == "ids"
    return "ids" if all_could and any_background else "binary"


@dataclass
class ObjectScores:
    """Objects matched one to one at IoU > 0.5 (a match is then unique): detection F1,
    the mean IoU of the matches (SQ) and panoptic quality PQ = SQ x F1."""

    predicted: int
    true: int
    matched: int
    f1: float
    mean_matched_iou: float
    panoptic_quality: float

    def to_dict(self) -> dict:
        return asdict(self)


def object_scores(predicted: np.ndarray, truth: np.ndarray) -> ObjectScores:
    """Instance maps (0 = background, other ids = objects, any numbering) compared object by object."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction {predicted.shape} and truth {truth.shape} differ in shape")
    p_ids, p = np.unique(predicted, return_inverse=True)
    t_ids, t = np.unique(truth, return_inverse=True)
    p, t = p.reshape(-1), t.reshape(-1)
    p_sizes, t_sizes = np.bincount(p, minlength=len(p_ids)), np.bincount(t, minlength=len(t_ids))
    pairs, overlaps = np.unique(p.astype(np.int64) * len(t_ids) + t, return_counts=True)
    pi, ti = pairs // len(t_ids), pairs % len(t_ids)
    objects = (p_ids[pi] != 0) & (t_ids[ti] != 0)
    pi, ti, overlaps = pi[objects], ti[objects], overlaps[objects]
    iou = overlaps / (p_sizes[pi] + t_sizes[ti] - overlaps)
    matched = iou > 0.5
    n_pred, n_true, n_match = int((p_ids != 0).sum()), int((t_ids != 0).sum()), int(matched.sum())
    detections = n_pred + n_true
    f1 = 2.0 * n_match / detections if detections else 1.0
    sq = float(iou[matched].mean()) if n_match else (1.0 if not detections else 0.0)
    return ObjectScores(n_pred, n_true, n_match, f1, sq, sq * f1)


def mask_objects(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """The true objects of a mask, and how they were read: its own ids where it holds
    instance ids, else the connected pieces of its structure (a binary mask or painting ids
    cannot tell touching objects apart, so they count as one)."""
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask_kind(mask) == "ids":
        return ndimage.label(mask >= 2)[0], "connected pieces of the structure ids (>= 2)"
    values = np.unique(mask)
    if len(values[values != 0]) > 1:
        return mask, "instance ids"
    return ndimage.label(mask > 0)[0], "connected pieces of the non-zero pixels"
