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
