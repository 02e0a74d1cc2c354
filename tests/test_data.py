"""Input handling: every user mistake is an InputError with a message that says what to do."""

from concurrent.futures import CancelledError

import numpy as np
import pytest

from napari_selfreg.core.config import TrainConfig
from napari_selfreg.core.data import (
    BatchPrefetcher,
    InputError,
    PatchSampler,
    PatchSet,
    as_channels_last,
    intensity_range,
    normalization_for,
    normalize,
    painted_ids,
    split_strokes,
)
from napari_selfreg.core.train import train_to_end

TINY = dict(steps=2, patch_size=32, batch_size=2, validation_every=1, seed=0)


def _painted(shape=(40, 48)):
    labels = np.zeros(shape, np.uint8)
    labels[5:8, 5:20] = 1
    labels[25:28, 10:30] = 2
    return labels


def _train(image, labels, **kw):
    from napari_selfreg.core.config import ModelConfig

    return train_to_end([image], [labels], TrainConfig(**{**TINY, **kw}), ModelConfig(base_channels=4, depth=2))


def test_channels_last_conversions():
    assert as_channels_last(np.zeros((5, 6))).shape == (5, 6, 1)
    assert as_channels_last(np.zeros((5, 6, 4))).shape == (5, 6, 3)  # alpha dropped
    assert as_channels_last(np.zeros((3, 50, 60))).shape == (50, 60, 3)  # channel-first
    with pytest.raises(InputError, match="3-D stack"):
        as_channels_last(np.zeros((12, 50, 60)))
    with pytest.raises(InputError, match="2-D slices"):
        as_channels_last(np.zeros((2, 3, 50, 60)))
    for two in ((50, 60, 2), (2, 50, 60)):  # not "a 3-D stack"
        with pytest.raises(InputError, match="has 2 channels"):
            as_channels_last(np.zeros(two))
    for empty in ((0, 60, 3), (50, 0)):
        with pytest.raises(InputError, match="empty"):
            as_channels_last(np.zeros(empty))


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8),
        np.random.default_rng(0).integers(0, 255, (40, 48, 4), dtype=np.uint8),
        np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8),
        np.random.default_rng(0).integers(0, 4000, (40, 48), dtype=np.uint16),
        np.random.default_rng(0).normal(100, 20, (40, 48, 3)).astype(np.float32),
    ],
    ids=["rgb8", "rgba8", "gray8", "gray16", "float"],
)
def test_every_input_kind_trains(image):
    result = _train(image, _painted())
    assert result.steps == 2
    norm = result.last.info.normalization
    assert norm.mode == ("uint8" if image.dtype == np.uint8 else "percentile")
    assert norm.channels == (1 if image.ndim == 2 else 3)


def _weights_equal(a, b):
    import torch

    sa, sb = a.network.state_dict(), b.network.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


_RGBA8 = np.random.default_rng(11).integers(0, 256, (40, 48, 4), dtype=np.uint8)  # random alpha
_RGBA16 = np.random.default_rng(12).integers(0, 4096, (40, 48, 4), dtype=np.uint16)
_GRAY8 = np.random.default_rng(13).integers(0, 256, (40, 48), dtype=np.uint8)


@pytest.mark.parametrize(
    ("image", "same"),
    [
        (_RGBA8, np.ascontiguousarray(_RGBA8[..., :3])),
        (_RGBA16, np.ascontiguousarray(_RGBA16[..., :3])),
        (np.moveaxis(_RGBA8, -1, 0), np.ascontiguousarray(_RGBA8[..., :3])),  # channel-first RGBA
        (_GRAY8, _GRAY8[..., None]),
    ],
    ids=["rgba8", "rgba16", "rgba8-channel-first", "gray8"],
)
def test_rgba_trains_as_its_rgb_and_gray_as_its_one_channel_image(image, same):
    """Alpha (random here) is dropped, not read as a colour: R, G, B are what the network sees."""
    np.testing.assert_array_equal(as_channels_last(image), same)
    norm = normalization_for(image)
    assert norm == normalization_for(same)
    np.testing.assert_array_equal(normalize(image, norm), normalize(same, norm))
    exact = dict(steps=3, device="cpu", precision="float32")
    a, b = _train(image, _painted(), **exact), _train(same, _painted(), **exact)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert _weights_equal(a.last, b.last)


def test_normalization_is_the_same_for_a_tile_given_the_image_range():
    from napari_selfreg.core.data import intensity_range

    image = np.random.default_rng(1).integers(0, 60000, (64, 64), dtype=np.uint16)
    norm = normalization_for(image)
    whole = normalize(image, norm)
    tile = normalize(image[10:30, 5:40], norm, intensity_range(image, norm))
    np.testing.assert_allclose(tile, whole[10:30, 5:40])
    u8 = normalize(np.full((2, 2, 3), 255, np.uint8), normalization_for(np.zeros((2, 2, 3), np.uint8)))
    assert u8.max() == 1.0


def test_an_8_bit_model_sees_the_same_picture_in_another_container():
    """A 16-bit, 12-bit or float copy of an image reaches an 8-bit model as the 8-bit image
    does (not divided by 255, which saturated it); what has no white level gets percentiles."""
    eight_bit = normalization_for(np.zeros((2, 2, 3), np.uint8))
    rgb8 = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = normalize(rgb8, eight_bit)
    np.testing.assert_allclose(expected, rgb8 / 255.0, rtol=1e-6)
    for copy in (rgb8.astype(np.uint16) * 257, rgb8.astype(np.float32) / 255, rgb8.astype(np.float64),
                 (rgb8.astype(np.uint16) * 16).clip(0, 4095)):
        np.testing.assert_allclose(normalize(copy, eight_bit), expected, atol=0.01)
    # no container level fits: the image's own percentiles, as a model trained on it would use
    signed = rgb8.astype(np.float32) - 128
    percentile = normalization_for(signed)
    np.testing.assert_allclose(normalize(signed, eight_bit), normalize(signed, percentile))
    gray16 = np.random.default_rng(3).integers(1000, 60000, (64, 64), dtype=np.uint16)
    np.testing.assert_allclose(normalize(gray16, eight_bit)[..., 0], gray16 / 65535.0, rtol=1e-5)


def test_a_few_outlying_pixels_do_not_change_the_white_level():
    """One hot pixel, or a float overshoot to 1.0001, used to scale the whole image by the
    next level up (4x or 255x darker for the network)."""
    eight_bit = normalization_for(np.zeros((2, 2, 3), np.uint8))
    rgb8 = np.random.default_rng(5).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    expected = normalize(rgb8, eight_bit)
    hot16 = rgb8.astype(np.uint16)
    hot16[0, 0, 0] = 256
    over = rgb8.astype(np.float32) / 255
    over[0, 0, 0], over[1, 1, 1] = 1.0001, -1e-4
    for copy in (hot16, over):
        inside = np.ones(rgb8.shape, bool)
        inside[:2, :2] = False  # the outliers themselves are clipped
        np.testing.assert_allclose(normalize(copy, eight_bit)[inside], expected[inside], atol=1e-4)
    # bright structures are not outliers: 12-bit data with 0.05 % of its pixels above 255 stays 12-bit
    sparse = np.random.default_rng(6).integers(0, 200, (400, 400), dtype=np.uint16)
    sparse.reshape(-1)[::2000] = 3000
    assert intensity_range(sparse, normalization_for(np.zeros((2, 2), np.uint8)))[1][0] == 4095


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((40, 48), np.uint8), "nothing is painted"),
        (np.where(_painted() == 2, 0, _painted()), "only background"),
        (np.where(_painted() == 1, 0, _painted()), "no background"),
        (np.zeros((41, 48), np.uint8), "shape"),
        (np.full((40, 48), -1, np.int32), "negative"),
        (np.full((40, 48), 1.5, np.float32), "whole numbers"),
        (np.where(_painted() == 2, 40, _painted()), "only 2 of them"),
        (np.where(_painted() == 2, 255, _painted()), "at most 64"),  # a 0/255 mask with background 1
        (np.where(_painted() == 2, np.uint16(300), _painted().astype(np.uint16)), "at most 64"),
        (np.where(_painted() == 2, np.uint64(2**63), _painted().astype(np.uint64)), "hold the id 9223372036854775808"),
    ],
    ids=["nothing", "only-background", "no-background", "shape", "negative", "fractional", "gaps", "0-255-mask",
         "ids-over-255", "uint64-over-int64"],
)
def test_label_mistakes_give_clear_errors(labels, message):
    image = np.zeros((40, 48, 3), np.uint8)
    with pytest.raises(InputError, match=message):
        _train(image, labels)


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.uint32(3_000_000_000), "label 3000000000 is painted.*at most 64"),
     (np.int64(2**62), "at most 64"),
     (np.float32(np.nan), "whole numbers"),
     (np.float32(np.inf), "whole numbers")],
    ids=["uint32-id", "int64-id", "nan", "inf"],
)
def test_painted_ids_refuse_huge_and_non_finite_ids_before_counting_them(value, message):
    # np.bincount up to 3e9 would allocate 22 GiB; a NaN cast to int64 became a "negative id"
    labels = _painted().astype(np.asarray(value).dtype)
    labels[5, 5] = value
    with pytest.raises(InputError, match=message):
        painted_ids([labels])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("shape", "where"),
    [((40, 48), (3, 3)), ((40, 48, 3), (30, 40, 1)), ((200, 220), (199, 219))],
    ids=["gray", "rgb", "far-from-the-paint"],  # the last lies outside every painted window
)
def test_non_finite_image_is_refused(bad, shape, where):
    image = np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)
    image[where] = bad
    labels = np.zeros(shape[:2], np.uint8)
    labels[:40, :48] = _painted()
    with pytest.raises(InputError, match="NaN or infinite"):
        _train(image, labels)


def test_stack_is_refused_clearly():
    with pytest.raises(InputError, match="2-D"):
        _train(np.zeros((8, 40, 48), np.uint8), _painted())


@pytest.mark.parametrize(
    ("shape", "mode"),
    # pad_to reflects the image, repeating its edge where the pad is wider than the image
    [((20, 24), "edge"), ((40, 48), "reflect"), ((70, 30), "edge")],
    ids=["pad-wider-than-image", "pad-narrower-than-image", "one-side-only"],
)
def test_image_smaller_than_patch_is_padded_not_refused(monkeypatch, shape, mode):
    """The padding is unpainted: the strokes here reach the bottom and right edges, and padded
    labels copied from them (edge or reflect) would invent strokes outside the image."""
    from napari_selfreg.core import train as train_module

    h, w = shape
    size = 64
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[2:4, 2 : w - 4] = 1
    labels[h - 6 :, 4:] = 2  # to the bottom-right corner
    labels[8:10, w - 3 :] = 1  # and again to the right edge
    samplers = []

    class RecordingSampler(PatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(train_module, "PatchSampler", RecordingSampler)
    result = _train(image, labels, patch_size=size)
    assert result.steps == 2
    # what training sampled from: the normalised image padded by pad_to's rule, labels padded with 0
    (sampler,) = samplers
    x = normalize(image, result.last.info.normalization)
    pads = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
    (padded,), (padded_labels,) = sampler.images, sampler.labels
    assert padded_labels.shape == (max(h, size), max(w, size))
    np.testing.assert_array_equal(padded, np.pad(x, pads, mode=mode))
    assert not padded_labels[h:].any() and not padded_labels[:, w:].any()
    inside = padded_labels[:h, :w]
    assert np.all((inside == 0) | (inside == labels))  # training strokes (some held out), nothing new
    # the patches themselves: labels and image as given inside, no paint outside
    direct = PatchSampler(PatchSet([x], [labels.astype(np.int64)]), size, np.random.default_rng(0), augment=False)
    xb, yb = direct.batch(4)
    assert xb.shape == (4, 3, size, size) and yb.shape == (4, size, size)
    for patch, patch_labels in zip(xb, yb, strict=True):
        assert (patch_labels > 0).sum() <= (labels > 0).sum()
        # a side shorter than the patch is padded at its end, so every patch starts at 0 there
        assert not patch_labels[h:].any() and not patch_labels[:, w:].any()
        if h <= size and w <= size:  # the patch is the whole padded image
            np.testing.assert_array_equal(patch_labels[:h, :w], labels)
            np.testing.assert_array_equal(patch, np.moveaxis(np.pad(x, pads, mode=mode), -1, 0))


def test_split_strokes_holds_out_whole_strokes_and_keeps_every_class():
    labels = np.zeros((50, 50), np.int64)
    for i in range(5):
        labels[i * 10 : i * 10 + 2, 2:20] = 1
        labels[i * 10 : i * 10 + 2, 30:45] = 2
    labels[45:47, 25:28] = 3  # a single stroke of class 3 stays in training
    train, val = split_strokes(labels, 0.4, np.random.default_rng(0))
    assert set(np.unique(train)) == {0, 1, 2, 3}
    assert set(np.unique(val)) == {0, 1, 2}
    assert not np.any((train > 0) & (val > 0))
    np.testing.assert_array_equal(np.where(val > 0, val, train), labels)
    # strokes are never cut: every held-out pixel's stroke row is entirely held out
    for i in range(5):
        row = val[i * 10 : i * 10 + 2, 2:20]
        assert row.all() or not row.any()


def test_a_corrected_prediction_keeps_its_large_background_in_training():
    """Dense labels (a prediction corrected and trained on again): the background is one large
    region plus specks; however the draw falls, the large region is never held out."""
    labels = np.full((60, 60), 1, np.int64)
    for i in range(6):
        labels[i * 10 + 2 : i * 10 + 6, 2:6] = 2  # nuclei, 6 components
        labels[i * 10 + 3, 3] = 1  # a background speck inside each: 7 background components
    big = np.zeros_like(labels, bool)
    big[:, 10:] = True  # part of the large background region
    for seed in range(30):
        train, val = split_strokes(labels, 0.2, np.random.default_rng(seed))
        assert np.all(train[big] == 1)
        assert (train == 1).sum() > 0.5 * (labels == 1).sum() and (train == 2).sum() > 0
        np.testing.assert_array_equal(np.where(val > 0, val, train), labels)


def test_sampler_balances_classes_and_patches_have_the_right_shape():
    image = np.random.default_rng(0).random((100, 100, 3)).astype(np.float32)
    labels = np.zeros((100, 100), np.int64)
    labels[:, :60] = 1  # a lot of background
    labels[80:82, 80:82] = 2  # four structure pixels
    sampler = PatchSampler(PatchSet([image], [labels]), 32, np.random.default_rng(0), augment=True)
    x, y = sampler.batch(64)
    assert x.shape == (64, 3, 32, 32) and y.shape == (64, 32, 32)
    with_structure = np.mean([(yy == 2).any() for yy in y])
    assert with_structure > 0.35  # about half the patches are centred on the rare class


def test_prefetched_batches_are_the_batches_the_sampler_draws_in_order():
    image = np.random.default_rng(0).random((80, 90, 3)).astype(np.float32)
    labels = np.zeros((80, 90), np.int64)
    labels[10:20, 10:30] = 1
    labels[50:60, 40:70] = 2

    def sampler():
        return PatchSampler(PatchSet([image], [labels]), 32, np.random.default_rng(7), augment=True)

    direct = sampler()
    expected = [direct.batch(3) for _ in range(4)]
    with BatchPrefetcher(sampler(), 3) as batches:
        got = [batches.batch() for _ in range(4)]
    for (x, y), (xe, ye) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, xe)
        np.testing.assert_array_equal(y, ye)
    with pytest.raises((RuntimeError, CancelledError)):  # closed on leaving the block
        batches.batch()


def test_rgb_image_for_a_gray_model_is_scaled_like_its_tiles():
    """Percentile mode with channel conversion: whole image and tiles get the same range."""
    from napari_selfreg.core.config import Normalization
    from napari_selfreg.core.data import intensity_range

    rgb = np.random.default_rng(2).integers(0, 60000, (48, 40, 3), dtype=np.uint16)
    norm = Normalization(mode="percentile", channels=1)
    whole = normalize(rgb, norm)
    assert whole.shape == (48, 40, 1)
    tile = normalize(rgb[8:30, 4:20], norm, intensity_range(rgb, norm))
    np.testing.assert_allclose(tile, whole[8:30, 4:20], rtol=1e-6)
    with pytest.raises(InputError, match="2 channels"):  # two channels is no image kind we know
        normalize(np.zeros((4, 4, 2), np.uint8), Normalization(channels=3))
