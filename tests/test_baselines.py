"""Random forest and Otsu baselines: right output format, sensible on an easy image, polarity from strokes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_selfreg.bench.baselines import ForestConfig, otsu_polarity, otsu_segment, random_forest_segment
from napari_selfreg.bench.strokes import simulate_strokes
from napari_selfreg.core.metrics import binary_dice


def _stained(invert: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E-like image: purple (hematoxylin) disks on pink, or the inverse."""
    rng = np.random.default_rng(seed)
    h, w = 160, 200
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.int32)
    for i in range(1, 16):
        cy, cx, r = rng.integers(15, h - 15), rng.integers(15, w - 15), rng.integers(7, 13)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    purple, pink = np.array([90, 60, 150]), np.array([235, 180, 210])
    inside, outside = (pink, purple) if invert else (purple, pink)
    image = np.where(mask[..., None] > 0, inside, outside).astype(np.float64)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def test_otsu_finds_hematoxylin_rich_objects():
    image, mask = _stained()
    strokes = simulate_strokes(mask, seed=0)
    labels = otsu_segment(image, strokes)
    assert set(np.unique(labels)) <= {1, 2}
    assert binary_dice(labels == 2, mask > 0) > 0.9


def test_otsu_polarity_follows_the_strokes():
    image, mask = _stained(invert=True)
    strokes = simulate_strokes(mask, seed=0)
    assert binary_dice(otsu_segment(image, strokes) == 2, mask > 0) > 0.9
    assert binary_dice(otsu_segment(image, None) == 2, mask > 0) < 0.2  # the default side is wrong here
    assert otsu_polarity(np.zeros((2, 2)), None) == 1


def test_random_forest_learns_from_strokes_and_is_seeded():
    pytest.importorskip("sklearn")
    image, mask = _stained()
    strokes = simulate_strokes(mask, seed=0)
    config = ForestConfig(n_estimators=20, n_jobs=1, sigma_max=4)
    a = random_forest_segment(image, strokes, seed=0, config=config)
    b = random_forest_segment(image, strokes, seed=0, config=config)
    assert a.shape == mask.shape and a.dtype == np.uint8 and set(np.unique(a)) <= {1, 2}
    np.testing.assert_array_equal(a, b)
    assert binary_dice(a == 2, mask > 0) > 0.85


def test_random_forest_needs_both_classes():
    pytest.importorskip("sklearn")
    image, mask = _stained()
    strokes = simulate_strokes(mask, seed=0)
    strokes[strokes == 2] = 0
    with pytest.raises(ValueError, match="background"):
        random_forest_segment(image, strokes, config=ForestConfig(n_estimators=5, n_jobs=1))


@pytest.mark.data
def test_otsu_on_real_nuclei(monuseg_pair):
    image, mask = monuseg_pair
    labels = otsu_segment(image, simulate_strokes(mask, seed=0))
    assert binary_dice(labels == 2, mask) > 0.5
