"""Object-level scores of instance maps (matches at IoU > 0.5)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_selfreg.core.metrics import object_scores


def test_object_scores_match_hand_computed_values():
    truth = np.zeros((10, 10), np.int32)
    truth[0:4, 0:4] = 7  # 16 px
    truth[6:10, 6:10] = 3  # 16 px, missed
    predicted = np.zeros_like(truth)
    predicted[0:4, 0:3] = 1  # 12 px inside object 7: IoU 12/16
    predicted[0:2, 8:10] = 5  # 4 px, false positive
    scores = object_scores(predicted, truth)
    assert (scores.predicted, scores.true, scores.matched) == (2, 2, 1)
    assert scores.f1 == pytest.approx(2 * 1 / 4)
    assert scores.mean_matched_iou == pytest.approx(0.75)
    assert scores.panoptic_quality == pytest.approx(0.75 * 0.5)


def test_an_object_split_in_two_halves_matches_neither_half():
    truth = np.zeros((4, 8), np.int32)
    truth[:, :] = 1
    predicted = np.zeros_like(truth)
    predicted[:, :4], predicted[:, 4:] = 1, 2  # IoU 0.5 each: not above 0.5
    scores = object_scores(predicted, truth)
    assert scores.matched == 0 and scores.f1 == 0.0 and scores.panoptic_quality == 0.0
    assert object_scores(truth, truth).panoptic_quality == 1.0
    empty = np.zeros_like(truth)
    assert object_scores(empty, empty).f1 == 1.0


def test_boolean_masks_are_structure_and_painting_ids_keep_background_in_binary_scoring():
    from napari_selfreg.core.metrics import masks_kind, per_class_overlap

    prediction = np.full((8, 8), 2, np.uint8)
    inside = np.ones((8, 8), bool)  # a crop that lies wholly inside a nucleus
    assert per_class_overlap(prediction, inside)["2"].dice == 1.0
    ids = np.ones((8, 8), np.uint8)
    ids[:, 4:] = 2  # painting ids: 1 background, 2 nuclei
    binary = np.where(ids == 2, 255, 0).astype(np.uint8)
    assert masks_kind([ids, binary]) == "binary"
    # scored with a 0/255 mask, the ids mask still means what it says
    for mask in (ids, binary):
        assert per_class_overlap(ids, mask, "binary")["2"].dice == 1.0
        assert per_class_overlap(ids, mask, "binary")["1"].dice == 1.0
