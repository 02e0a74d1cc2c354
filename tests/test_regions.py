"""Training reads only the painted windows: equal results on small images, bounded memory on slides."""

import tracemalloc

import numpy as np
import pytest
import torch

from napari_selfreg.core.config import ModelConfig, TrainConfig
from napari_selfreg.core.data import InputError, split_strokes, split_strokes_jointly
from napari_selfreg.core.regions import painted_crops, painted_windows
from napari_selfreg.core.train import train_to_end

SMALL = ModelConfig(base_channels=4, depth=2)


def _covered_once(painted, windows):
    count = np.zeros(painted.shape, np.int32)
    for window in windows:
        count[window] += 1
    return count


def test_far_apart_strokes_get_their_own_small_windows():
    painted = np.zeros((5000, 6000), bool)
    painted[100:110, 200:400] = True  # a stroke near the top-left corner
    painted[4800:4900, 5900:5905] = True  # one near the bottom-right corner
    windows = painted_windows(painted, margin=64, join_below=0)
    assert windows == [(slice(36, 174), slice(136, 464)), (slice(4736, 4964), slice(5836, 5969))]
    single = painted_windows(painted, margin=64)  # their joint box (29 MP) is too big to be one window
    assert single == windows


def test_small_images_keep_one_window_around_all_the_paint():
    painted = np.zeros((1000, 1000), bool)
    painted[100:105, 100:300] = True
    painted[900:920, 700:702] = True
    assert painted_windows(painted, margin=128) == [(slice(0, 1000), slice(0, 830))]


def test_windows_are_disjoint_and_hold_every_painted_pixel_with_its_margin():
    rng = np.random.default_rng(3)
    painted = np.zeros((3000, 3000), bool)
    for _ in range(40):  # short strokes, some close enough for their windows to overlap
        y, x = rng.integers(0, 2990, 2)
        painted[y : y + rng.integers(1, 10), x : x + rng.integers(1, 60)] = True
    windows = painted_windows(painted, margin=100, join_below=0)
    count = _covered_once(painted, windows)
    assert count.max() == 1, "windows overlap"
    grown = np.zeros_like(painted)
    ys, xs = np.nonzero(painted)
    for y, x in zip(ys[::50], xs[::50], strict=True):
        grown[max(0, y - 100) : y + 101, max(0, x - 100) : x + 101] = True
    assert (count[grown] == 1).all(), "some painted pixel lacks its margin"
    assert 1 < len(windows) < 40
    assert count.sum() < painted.size  # the point: less than the whole image


def test_joint_split_of_one_image_is_the_plain_split_and_counts_strokes_across_windows():
    rng = np.random.default_rng(0)
    labels = np.zeros((200, 200), np.int64)
    for i in range(10):
        labels[10 + 18 * i : 14 + 18 * i, 20:60] = 1
        labels[10 + 18 * i : 14 + 18 * i, 120:160] = 2
    plain = split_strokes(labels, 0.3, np.random.default_rng(5))
    (train,), (val,) = split_strokes_jointly([labels], 0.3, np.random.default_rng(5))
    assert np.array_equal(plain[0], train) and np.array_equal(plain[1], val)
    left, right = labels[:, :100], labels[:, 100:]  # class 1 only left, class 2 only right
    trains, vals = split_strokes_jointly([left, right], 0.3, rng)
    for part, tr, va in zip((left, right), trains, vals, strict=True):
        assert np.array_equal(tr + va, part)
    held = [len(np.unique(np.nonzero(va)[0] // 18)) for va in vals]
    assert held == [3, 3]  # 30 % of 10 strokes per class, wherever they lie


def test_training_on_a_crop_around_the_paint_equals_training_on_the_whole_image():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    image[300:420, 350:560] //= 2
    labels = np.zeros((700, 900), np.uint8)
    labels[330:340, 380:440] = 2
    labels[360:364, 470:520] = 2
    labels[300:303, 600:650] = 1
    labels[400:404, 330:345] = 1
    labels[410:414, 420:460] = 1
    config = TrainConfig(steps=4, patch_size=64, batch_size=2, seed=0, validation_every=2)
    whole = train_to_end([image], [labels], config, SMALL)
    box = (slice(300 - 100, 414 + 100), slice(330 - 100, 650 + 100))
    cropped = train_to_end([image[box]], [labels[box]], config, SMALL)
    for a, b in zip(whole.last.network.state_dict().values(), cropped.last.network.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert [r.val_dice for r in whole.history] == [r.val_dice for r in cropped.history]


def test_a_large_lazy_slide_is_read_only_around_the_strokes():
    da = pytest.importorskip("dask.array")
    size = 12000
    reads = []

    def tile(block, block_info=None):
        reads.append(block_info[None]["chunk-location"])
        return np.full(block.shape, 200, np.uint8)

    image = da.zeros((size, size, 3), dtype=np.uint8, chunks=(1000, 1000, 3)).map_blocks(tile, dtype=np.uint8)
    labels = np.zeros((size, size), np.uint8)
    labels[500:510, 500:700] = 1
    labels[520:530, 500:700] = 2
    labels[11000:11010, 11200:11400] = 2
    labels[11030:11040, 11200:11400] = 1
    config = TrainConfig(steps=2, patch_size=64, batch_size=2, seed=0)
    tracemalloc.start()
    try:
        result = train_to_end([image], [labels], config, SMALL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.steps == 2
    # the whole slide as float32 would be 1.7 GB and the labels as int64 1.2 GB
    assert peak < 400e6, f"peak traced memory {peak / 1e6:.0f} MB"
    assert len({tuple(r) for r in reads}) <= 4  # the chunks under the two windows, not 144


def test_labels_are_checked_where_they_are_painted():
    image = np.zeros((300, 300, 3), np.uint8)
    labels = np.zeros((300, 300), np.int64)
    labels[10:20, 10:20] = 1
    labels[200, 200] = -3
    with pytest.raises(InputError, match="negative"):
        painted_crops([image], [labels], 64)
    with pytest.raises(InputError, match="shape"):
        painted_crops([image], [labels[:100]], 64)
    assert painted_crops([image], [np.zeros((300, 300), np.uint8)], 64) == []


class _CountingArray:
    """A zarr array that counts the pixels read from it (zarr itself has no numpy dispatch)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim, self.chunks = (
            array, array.shape, array.dtype, array.ndim, array.chunks
        )
        self.pixels = 0

    def __getitem__(self, key):
        out = self.array[key]
        self.pixels += out.size
        return out

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)


def test_a_channel_first_rgba_zarr_slide_is_read_only_around_the_strokes():
    pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    size = 3000
    store = zarr.zeros((4, size, size), chunks=(4, 500, 500), dtype=np.uint8)
    store[:3] = 180
    store[3] = 255  # alpha, dropped
    image = _CountingArray(store)
    labels = np.zeros((size, size), np.uint8)
    labels[100:110, 100:300] = 1
    labels[120:130, 100:300] = 2
    result = train_to_end([image], [labels], TrainConfig(steps=2, patch_size=64, batch_size=2, seed=0), SMALL)
    assert result.steps == 2 and result.model.config.in_channels == 3
    assert image.pixels <= 4 * 500 * 500 * 4  # the chunks under the window, not the 36 M pixels of the slide
