"""The simulated user: sparse, inside the right region, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from napari_selfreg.bench.strokes import (
    CorrectionConfig,
    StrokeConfig,
    correction_strokes,
    coverage,
    instances_of,
    simulate_strokes,
)


def _blobs(shape=(300, 400), count=20, seed=1) -> np.ndarray:
    """An instance mask of round objects of a few sizes (like nuclei and small glands)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, np.int32)
    for i in range(1, count + 1):
        cy, cx = rng.integers(20, shape[0] - 20), rng.integers(20, shape[1] - 20)
        r = rng.integers(6, 18)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return mask


def test_strokes_are_sparse_and_on_the_right_side():
    mask = _blobs()
    labels = simulate_strokes(mask, seed=0)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert 0 < coverage(labels) < 0.01
    assert np.all(mask[labels == 2] > 0), "structure strokes leave the objects"
    assert np.all(mask[labels == 1] == 0), "background strokes enter an object"


@pytest.mark.parametrize(("width", "margin"), [(5, 0), (9, 1), (15, 1), (15, 0)])
def test_wide_brushes_and_no_margin_stay_on_their_side(width, margin):
    """The erosion counted the radius along rows and columns, which a round brush outreaches
    on its diagonals: at width 9 and up, or without a margin, strokes crossed the outline."""
    mask = _blobs(shape=(400, 500), count=25, seed=3)
    config = StrokeConfig(width=width, margin=margin, max_fraction=0.05)
    for seed in range(3):
        labels = simulate_strokes(mask, seed=seed, config=config)
        assert (labels == 2).any() and (labels == 1).any()
        assert np.all(mask[labels == 2] > 0) and np.all(mask[labels == 1] == 0)
    truth = np.zeros((300, 300), bool)
    truth[30:130, 30:130] = truth[170:280, 160:280] = True
    predicted = np.roll(truth, 40, axis=1)  # a band missed and a band too many beside each object
    strokes = correction_strokes(predicted, truth, seed=0, config=CorrectionConfig(width=width, margin=margin))
    assert (strokes > 0).any()
    assert truth[strokes == 2].all() and not predicted[strokes == 2].any()
    assert not truth[strokes == 1].any() and predicted[strokes == 1].all()


def test_the_default_strokes_are_those_the_committed_benchmarks_were_made_with():
    """The wide-brush fix leaves the default brushes' erosion as it was."""
    from napari_selfreg.bench.strokes import _disk_offsets, _safe_depth

    assert _safe_depth(_disk_offsets(2), 2, StrokeConfig().margin) == 2 + 1
    assert _safe_depth(_disk_offsets(1), 1, CorrectionConfig().margin) == 1 + 1
    assert CorrectionConfig().width == 3 and StrokeConfig().width == 5


def test_strokes_spread_over_many_objects():
    mask = _blobs(count=30)
    labels = simulate_strokes(mask, seed=3)
    touched = np.unique(mask[labels == 2])
    assert len(touched) >= 8


def test_binary_mask_works_like_instances():
    mask = _blobs() > 0
    labels = simulate_strokes(mask, seed=0)
    assert np.all(mask[labels == 2]) and not np.any(mask[labels == 1])
    assert instances_of(mask).max() >= 2


def test_reproducible_and_seed_dependent():
    mask = _blobs()
    a = simulate_strokes(mask, seed=5)
    b = simulate_strokes(mask, seed=5)
    c = simulate_strokes(mask, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_coverage_cap_holds_on_small_images():
    mask = _blobs(shape=(128, 128), count=6)
    labels = simulate_strokes(mask, seed=0, config=StrokeConfig(max_fraction=0.008))
    assert coverage(labels) < 0.01
    assert (labels == 1).any() and (labels == 2).any()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        simulate_strokes(np.zeros((4, 4, 4)), seed=0)
    with pytest.raises(ValueError):
        StrokeConfig(width=0)


@pytest.mark.data
@pytest.mark.parametrize("pair", ["monuseg_pair", "glas_pair"])
def test_real_masks(pair, request):
    _image, mask = request.getfixturevalue(pair)
    labels = simulate_strokes(mask, seed=0)
    assert 0 < coverage(labels) < 0.01
    assert np.all(mask[labels == 2]) and not np.any(mask[labels == 1])
    assert len(np.unique(instances_of(mask)[labels == 2])) >= 6


def test_correction_strokes_paint_the_largest_mistakes_with_the_right_class():
    truth = np.zeros((200, 200), bool)
    truth[20:60, 20:60] = True  # found
    truth[120:180, 120:180] = True  # missed entirely: the largest mistake
    truth[20:40, 150:170] = True  # missed, small
    predicted = truth.copy()
    predicted[120:180, 120:180] = False
    predicted[20:40, 150:170] = False
    predicted[100:130, 10:50] = True  # a false positive in the background
    predicted[19, 20:60] = True  # a one-pixel rim: too thin to paint inside
    strokes = correction_strokes(predicted, truth, seed=0)
    assert (strokes[strokes == 2] == 2).all() and truth[strokes == 2].all() and not predicted[strokes == 2].any()
    assert not truth[strokes == 1].any() and predicted[strokes == 1].all()
    for box in ((slice(120, 180), slice(120, 180)), (slice(20, 40), slice(150, 170)), (slice(100, 130), slice(10, 50))):
        assert (strokes[box] > 0).any()
    assert not (strokes[19] > 0).any()
    only_one = correction_strokes(predicted, truth, seed=0, config=CorrectionConfig(strokes=1))
    assert (only_one[120:180, 120:180] == 2).any() and (only_one > 0).sum() == (only_one[120:180, 120:180] > 0).sum()
    assert np.array_equal(correction_strokes(predicted, truth, seed=0), strokes)
    assert not correction_strokes(truth, truth).any()  # nothing to correct
