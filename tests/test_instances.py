"""Instances: touching objects of a class map split by a distance-transform watershed."""

from __future__ import annotations

import numpy as np

from napari_selfreg.sample_data import he_arrays


def test_separate_instances_splits_touching_nuclei():
    from napari_selfreg.core.instances import separate_instances

    yy, xx = np.mgrid[:60, :80]
    labels = np.ones((60, 80), np.uint8)
    labels[(yy - 30) ** 2 + (xx - 25) ** 2 <= 100] = 2  # two discs that touch
    labels[(yy - 30) ** 2 + (xx - 43) ** 2 <= 100] = 2
    labels[0, :] = 2  # a one-pixel sliver along the edge is no nucleus
    instances = separate_instances(labels)
    assert instances.max() == 2
    assert instances[30, 25] != instances[30, 43] and instances[0].max() == 0
    truth = he_arrays()["ground_truth"]
    assert separate_instances(truth).max() == 55  # the sample's nuclei, touching ones included


def test_elongated_objects_stay_whole():
    # a ridge of equal distance along a rod or a spindle-shaped nucleus is one maximum, not many
    from napari_selfreg.core.instances import separate_instances

    rod = np.ones((40, 260), np.uint8)
    rod[15:25, 30:230] = 2
    yy, xx = np.mgrid[:120, :120] - 60
    spindle = np.ones((120, 120), np.uint8)
    spindle[(yy / 5) ** 2 + (xx / 25) ** 2 <= 1] = 2
    block = np.ones((400, 500), np.uint8)
    block[100:250, 100:400] = 2
    yy, xx = np.mgrid[:300, :300] - 150
    along, across = xx * np.cos(np.pi / 6) + yy * np.sin(np.pi / 6), yy * np.cos(np.pi / 6) - xx * np.sin(np.pi / 6)
    tilted = np.ones((300, 300), np.uint8)
    tilted[(np.abs(along) < 100) & (np.abs(across) < 5)] = 2  # its ridge repeats its top pixel every few pixels
    assert [separate_instances(m).max() for m in (rod, spindle, block, tilted)] == [1, 1, 1, 1]


def test_real_glands_are_not_cut_at_the_bays_of_their_outline(shared_data):
    from PIL import Image

    from napari_selfreg.core.instances import separate_instances
    from napari_selfreg.core.metrics import object_scores

    with Image.open(shared_data / "glas" / "test" / "masks" / "testA_20_anno.png") as m:
        truth = np.array(m)  # 5 glands, instance ids
    split = separate_instances(np.where(truth > 0, 2, 1).astype(np.uint8))
    scores = object_scores(split, truth)
    assert scores.predicted == scores.true == 5  # 12 pieces with seeds of one absolute height
    assert scores.panoptic_quality > 0.95
