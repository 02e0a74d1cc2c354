"""Feature redundancy: exact similarity values, alignment of maps with the image, tiling."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_selfreg.core.config import ModelConfig, ModelInfo
from napari_selfreg.core.data import InputError
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.core.progress import drain
from napari_selfreg.core.redundancy import (
    MAP_KINDS,
    RedundancyConfig,
    RedundancyProgress,
    RedundancyReport,
    block_features,
    channel_similarity,
    compute_redundancy,
    map_scale,
    receptive_radius,
    redundancy_index,
    redundancy_report,
    similarity_from_moments,
)
from napari_selfreg.core.selfreg import channel_scores

# ----------------------------------------------------------------------------- the maths


def test_duplicated_channels_are_fully_redundant():
    rng = np.random.default_rng(0)
    base = rng.random((1, 9, 7))
    features = np.concatenate([base] * 4)
    s = channel_similarity(features)
    np.testing.assert_allclose(s, np.ones((4, 4)), atol=1e-12)
    assert redundancy_index(s) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_channels_have_index_zero():
    features = np.zeros((4, 8, 8))
    for c in range(4):  # disjoint supports: exactly orthogonal
        features[c, 2 * c : 2 * c + 2] = np.arange(1, 9)
    s = channel_similarity(features)
    np.testing.assert_array_equal(s, np.eye(4))
    assert redundancy_index(s) == 0.0


def test_pearson_centres_the_channels():
    rng = np.random.default_rng(1)
    x = rng.random(500)
    features = np.stack([x, 2 * x + 3, 1 - x])
    cosine = channel_similarity(features, "cosine")
    pearson = channel_similarity(features, "pearson")
    assert cosine[0, 1] < 0.99  # an offset lowers the cosine ...
    np.testing.assert_allclose(pearson, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-12)  # ... not Pearson
    assert redundancy_index(pearson) == pytest.approx(1.0, abs=1e-12)
    # independent noise is close to uncorrelated in Pearson but not in cosine (all positive)
    noise = rng.random((2, 20000))
    assert redundancy_index(channel_similarity(noise, "pearson")) < 0.03
    assert redundancy_index(channel_similarity(noise, "cosine")) > 0.7


def test_dead_channels_are_left_out():
    rng = np.random.default_rng(2)
    base = rng.random(50)
    features = np.stack([base, base, np.zeros(50)])
    s, index, live = similarity_from_moments(features @ features.T, features.sum(1), 50)
    assert index == pytest.approx(1.0)
    assert live.tolist() == [True, True, False]
    assert (s[2] == 0).all()
    # a constant channel is dead for Pearson only
    features = np.stack([base, 1 - base, np.full(50, 0.5)])
    _, _, live = similarity_from_moments(features @ features.T, features.sum(1), 50, "pearson")
    assert live.tolist() == [True, True, False]


def test_moments_add_up_over_tiles():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(5, 40))
    whole = channel_similarity(features, "pearson")
    a, b = features[:, :13], features[:, 13:]
    summed = similarity_from_moments(a @ a.T + b @ b.T, a.sum(1) + b.sum(1), 40, "pearson")[0]
    np.testing.assert_allclose(summed, whole, atol=1e-12)
    with pytest.raises(InputError):
        channel_similarity(features, "spearman")


# ----------------------------------------------------------------------------- maps and alignment


class PoolingNet(nn.Module):
    """Stands in for the UNet (depth 2): every block is the input average-pooled to its stride,
    and the final features are zero, so a block's SCR map is its mean squared value."""

    def forward_blocks(self, x: torch.Tensor):
        blocks = OrderedDict()
        for name, stride in (("E1", 1), ("E2", 2), ("E3", 4), ("D2", 2)):
            blocks[name] = F.avg_pool2d(x, stride) if stride > 1 else x.clone()
        blocks["D1"] = torch.zeros_like(x)
        return x[:, :2], blocks


def _pooling_model() -> SegmentationModel:
    info = ModelInfo(model=ModelConfig(depth=2, base_channels=4))
    return SegmentationModel(PoolingNet(), info)  # type: ignore[arg-type]


def test_scr_map_aligns_with_the_image_pixel_for_pixel():
    h, w = 53, 61  # odd sizes: the network pads, the maps must not shift
    image = np.zeros((h, w), np.uint8)
    image[21:29, 33:41] = 255  # an 8x8 square at an offset that is not a multiple of 4
    model = _pooling_model()
    config = RedundancyConfig(window=4, device="cpu")
    report = redundancy_report(model, np.stack([image] * 3, -1), config)
    e1 = report.image_map("E1", "scr")
    np.testing.assert_allclose(e1, (image / 255.0) ** 2, atol=1e-6)  # stride 1: pixel for pixel
    ys, xs = np.mgrid[:h, :w]
    for name in ("E2", "E3"):
        m = report.image_map(name, "scr")
        assert m.shape == (h, w)
        centre = (float((m * ys).sum() / m.sum()), float((m * xs).sum() / m.sum()))
        assert centre == pytest.approx((24.5, 36.5), abs=0.75), name


def _tiny_model(seed: int = 0, depth: int = 2) -> SegmentationModel:
    torch.manual_seed(seed)
    return SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=depth)))


@pytest.fixture(scope="module")
def odd_image() -> np.ndarray:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(101, 87, 3)).astype(np.uint8)
    image[20:60, 30:70] //= 3  # some structure
    return image


def test_maps_have_the_image_shape_and_values_in_range(odd_image):
    model = _tiny_model()
    report = redundancy_report(model, odd_image, RedundancyConfig(device="cpu"))
    assert report.names == ["E1", "E2", "E3", "D2", "D1"]
    assert report.block("D1").role == "teacher" and report.block("E1").role == "not regularised"
    for name in report.names:
        block = report.block(name)
        assert block.similarity.shape == (block.channels, block.channels)
        assert 0.0 <= block.redundancy_index <= 1.0
        for kind in MAP_KINDS:
            scale = None if kind == "redundancy" else map_scale([report], name, kind)
            m = report.image_map(name, kind, scale)
            assert m.shape == odd_image.shape[:2] and m.dtype == np.float32
            assert m.min() >= 0.0 and m.max() <= 1.0
        rgb = report.features_image(name)
        assert rgb.shape == (*odd_image.shape[:2], 3) and rgb.dtype == np.uint8
    json.dumps(report.summary())


def test_a_block_too_coarse_for_any_window_maps_its_own_index(odd_image):
    """Depth 4 on a 101 x 87 image: the bottleneck's 16 x 16 windows cover too little of it
    to be scored; its map shows the block's index, not 0 (which reads as orthogonal channels)."""
    report = redundancy_report(_tiny_model(depth=4), odd_image, RedundancyConfig(device="cpu"))
    bottleneck = report.block("E5")
    assert bottleneck.redundancy_index > 0.05
    np.testing.assert_allclose(report.image_map("E5", "redundancy"), bottleneck.redundancy_index, rtol=1e-6)


def test_tiled_maps_equal_the_one_pass_maps(odd_image):
    model = _tiny_model(depth=3)
    whole = redundancy_report(model, odd_image, RedundancyConfig(device="cpu", window=4))
    tiled = redundancy_report(model, odd_image, RedundancyConfig(device="cpu", window=4, memory_mb=0.05, tile_size=16))
    assert whole.tiles == 1 and tiled.tiles > 1
    for name in whole.names:
        a, b = whole.block(name), tiled.block(name)
        assert a.redundancy_index == pytest.approx(b.redundancy_index, abs=1e-6)
        np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-5)
        np.testing.assert_array_equal(a.ifd_pairs, b.ifd_pairs)
        for kind in MAP_KINDS:
            np.testing.assert_allclose(whole.image_map(name, kind), tiled.image_map(name, kind), atol=1e-5, rtol=1e-4)


def test_region_maps_are_crops_of_the_whole_maps(odd_image):
    model = _tiny_model()
    config = RedundancyConfig(device="cpu")
    whole = redundancy_report(model, odd_image, config)
    region = (17, 9, 80, 50)
    part = redundancy_report(model, odd_image, config, region=region)
    assert part.region == region
    assert part.region_cells("E1", "scr").shape == (63, 41)  # the grid reaches beyond the region
    np.testing.assert_array_equal(part.region_cells("E2", "scr"), whole.block("E2").scr_grid[8:40, 4:25])
    for name in whole.names:
        for kind in ("redundancy", "scr"):
            np.testing.assert_allclose(part.image_map(name, kind), whole.image_map(name, kind)[17:80, 9:50], atol=1e-6)


def test_ifd_pairs_follow_selfreg_ranking():
    model = _tiny_model()
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(32, 48, 3)).astype(np.uint8)
    report = redundancy_report(model, image, RedundancyConfig(device="cpu", window=4))
    x = torch.from_numpy(np.moveaxis(image.astype(np.float32) / 255.0, -1, 0).copy())[None]
    with torch.no_grad():
        _, blocks = model.network.eval().forward_blocks(x)  # the report reads the model in eval mode
    for name, feature in blocks.items():
        scores = channel_scores(feature).numpy()
        top = report.block(name).ifd_pairs[:, 0]
        half = feature.shape[1] // 2
        # the same channels form the top half (ties aside)
        assert np.sort(scores)[::-1][:half].sum() == pytest.approx(scores[top].sum(), rel=1e-5)


def test_generator_yields_progress_and_returns_report(odd_image):
    model = _tiny_model()
    gen = compute_redundancy(model, odd_image, RedundancyConfig(device="cpu", window=8, memory_mb=0.05, tile_size=16))
    steps = []
    report = drain(gen, steps.append)
    assert all(isinstance(s, RedundancyProgress) for s in steps)
    assert steps[-1].done == steps[-1].total == 2 * report.tiles
    assert isinstance(report, RedundancyReport)


def test_user_errors_are_input_errors(odd_image):
    model = _tiny_model()
    with pytest.raises(InputError):
        redundancy_report(model, odd_image, region=(200, 0, 300, 10))
    with pytest.raises(InputError):
        RedundancyConfig(similarity="spearman")
    with pytest.raises(InputError):
        redundancy_report(model, np.zeros((4, 5, 6, 7)))


def test_receptive_radius_of_the_paper_unet():
    assert receptive_radius(4) == 137
    assert receptive_radius(1) == 11


def test_block_features_and_their_index(odd_image):
    model = _tiny_model()
    features = block_features(model, odd_image, device="cpu")
    assert list(features) == ["E1", "E2", "E3", "D2", "D1"]
    assert features["E1"].shape == (4, 101, 87) and features["E3"].shape == (8, 26, 22)
    report = redundancy_report(model, odd_image, RedundancyConfig(device="cpu"))
    for name, f in features.items():  # the report's index is the index of these very features
        s = channel_similarity(f)
        assert redundancy_index(s) == pytest.approx(report.block(name).redundancy_index, abs=1e-6)


def test_a_region_of_one_bottleneck_pixel_takes_its_index_from_the_pixels_around_it():
    """Zoomed in, the region in view may hold one pixel of a coarse block, whose channels are
    then all parallel (cosine index 1). Its statistics widen to the 9 x 9 block pixels around
    that one (the first square of at least 0.25 x 16^2 = 64)."""
    from napari_selfreg.core.redundancy import statistics_box

    model = _tiny_model(depth=3)
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3)).astype(np.uint8)
    report = redundancy_report(model, image, RedundancyConfig(device="cpu"), region=(40, 40, 48, 48))
    features = block_features(model, image, device="cpu")["E4"]  # stride 8: the region is block pixel (5, 5)
    assert statistics_box((40, 40, 48, 48), (0, 0, 96, 96), 8, 64) == (1, 1, 10, 10)
    expected = redundancy_index(channel_similarity(features[:, 1:10, 1:10]))
    assert report.block("E4").redundancy_index == pytest.approx(expected, abs=1e-6)
    assert report.block("E4").redundancy_index < 0.9
    # a block where the region holds enough pixels keeps to them
    expected = redundancy_index(channel_similarity(block_features(model, image, device="cpu")["E1"][:, 40:48, 40:48]))
    assert report.block("E1").redundancy_index == pytest.approx(expected, abs=1e-6)
    # near the image's edge the box stops there
    assert statistics_box((0, 0, 8, 8), (0, 0, 96, 96), 8, 64) == (0, 0, 8, 8)


def test_reading_a_model_in_training_mode_leaves_it_training(odd_image):
    """Previews and maps of the live model between training steps must not freeze BatchNorm
    for the rest of the run; each reader used to switch the model to eval mode for good."""
    from napari_selfreg.core.predict import predict_whole

    model = _tiny_model()
    model.network.train()
    redundancy_report(model, odd_image, RedundancyConfig(device="cpu"))
    assert model.network.training
    block_features(model, odd_image, device="cpu")
    assert model.network.training
    predict_whole(model, odd_image)
    assert model.network.training
    model.network.eval()
    redundancy_report(model, odd_image, RedundancyConfig(device="cpu"))
    assert not model.network.training


def test_lazy_gray_images_are_read_and_their_tiles_checked_for_nan(tmp_path):
    import dask.array as da
    import zarr

    from napari_selfreg.core.config import Normalization

    torch.manual_seed(0)
    gray = SegmentationModel.create(
        ModelInfo(model=ModelConfig(base_channels=4, depth=2, in_channels=1), normalization=Normalization(channels=1))
    )
    pixels = np.random.default_rng(0).integers(0, 256, (90, 70)).astype(np.uint8)
    stored = zarr.open_array(str(tmp_path / "g.zarr"), mode="w", shape=pixels.shape, chunks=(32, 32), dtype="u1")
    stored[:] = pixels
    config = RedundancyConfig(device="cpu", window=4)
    from_zarr = redundancy_report(gray, stored, config)
    in_memory = redundancy_report(gray, pixels, config)
    assert from_zarr.block("E2").redundancy_index == pytest.approx(in_memory.block("E2").redundancy_index)
    # a NaN off the grid that the whole-image check samples is found in its tile
    floats = np.random.default_rng(1).random((1500, 1500)).astype(np.float32)
    floats[1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        redundancy_report(gray, da.from_array(floats, chunks=500), config, region=(0, 0, 40, 40))
