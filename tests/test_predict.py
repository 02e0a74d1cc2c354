"""Tiled prediction: agreement with whole-image prediction, any size and input kind, outputs on disk.

Tolerances were measured on this project's 2-core CPU (see benchmarks/sections/speed.md):
the UNet zero-pads at every tile border, so tiles and the whole image differ near tile
edges; the overlap and the blending window keep that within the bounds below.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_selfreg.core.config import ModelConfig, ModelInfo, Normalization, PredictConfig, TrainConfig
from napari_selfreg.core.cpu_fusion import is_fused
from napari_selfreg.core.data import intensity_range
from napari_selfreg.core.metrics import binary_dice
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.core.predict import (
    allocate_outputs,
    allocate_uncertainty,
    blend_ramp,
    cached_inference_network,
    inference_network,
    predict,
    predict_tiled,
    predict_whole,
    tile_layout,
    uncertainty_of,
    value_range_of,
)
from napari_selfreg.core.progress import drain
from napari_selfreg.core.train import train_to_end

F32 = dict(precision="float32", device="cpu")


def _calibrated(info: ModelInfo, seed: int = 0) -> SegmentationModel:
    """Random weights drawn after seeding, with BatchNorm statistics from a few inputs, so
    outputs are not degenerate."""
    torch.manual_seed(seed)
    model = SegmentationModel.create(info)
    net = model.network.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, model.config.in_channels, 64, 64))
    net.eval()
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module: on a shared, busy 2-core CI machine two spinning
    OpenMP threads made these tests 5-10x slower; one thread costs little when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dominant_channel_strokes(image: np.ndarray, seed: int, fraction: float = 0.1, margin: int = 12) -> np.ndarray:
    """Strokes 1, 2, 3 where red, green or blue is clearly the brightest channel."""
    ordered = np.sort(image.astype(np.int16), axis=-1)
    clear = ordered[..., -1] - ordered[..., -2] >= margin
    painted = clear & (np.random.default_rng(seed).random(clear.shape) < fraction)
    return np.where(painted, image.argmax(-1) + 1, 0).astype(np.uint8)


def _assert_several_classes(labels: np.ndarray, least: float = 0.05) -> None:
    """At least two classes, each on a share of the pixels, in regions (not pixel noise), so
    that comparing these labels can tell predictions apart."""
    ids, counts = np.unique(labels, return_counts=True)
    shares = dict(zip(ids.tolist(), (counts / labels.size).round(3).tolist(), strict=True))
    assert sum(share >= least for share in shares.values()) >= 2, shares
    if labels.shape[1] > 1:
        assert (labels[:, 1:] == labels[:, :-1]).mean() >= 0.8, "labels are pixel noise, not regions"


@pytest.fixture(scope="module")
def colour_model() -> SegmentationModel:
    """Three classes, one per dominant colour channel, fitted briefly (seeded) to strokes on
    the smooth blobs of ``_image``: its labels on these tests' images hold several classes in
    regions, so tiled and whole labels can disagree. (The calibrated random network used
    before gave near-uniform probabilities, about 0.37 at most, and one class at almost
    every pixel or not, depending on which tests had drawn random numbers first.)"""
    images = [_image(96, 96, seed=seed) for seed in (101, 102)]
    strokes = [_dominant_channel_strokes(image, seed) for seed, image in enumerate(images)]
    config = TrainConfig(steps=80, patch_size=48, batch_size=4, validation_fraction=0.0, seed=0,
                         learning_rate=3e-3, device="cpu", precision="float32")
    model = train_to_end(images, strokes, config, ModelConfig(), class_names=["red", "green", "blue"]).last
    model.network.eval()
    _assert_several_classes(predict_whole(model, _image(150, 170)).argmax(0))
    return model


def _gray16(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth 16-bit blobs over most of the 16-bit range, with a little sensor noise."""
    noise = np.random.default_rng(seed).integers(0, 50, (h, w))
    return (_image(h, w, c=1, seed=seed)[..., 0].astype(np.uint16) * 200 + noise).astype(np.uint16)


@pytest.fixture(scope="module")
def gray16_model() -> SegmentationModel:
    """Two classes, bright and dark blobs, fitted briefly (seeded) to strokes on 16-bit images:
    its labels hold both classes in regions, so tiled and whole predictions can disagree."""
    images = [_gray16(96, 96, seed) for seed in (201, 202)]
    strokes = []
    for seed, image in enumerate(images):
        low, high = np.percentile(image, [30, 70])
        painted = np.random.default_rng(seed).random(image.shape) < 0.1
        dark, bright = painted & (image <= low), painted & (image >= high)
        strokes.append(np.where(dark, 1, np.where(bright, 2, 0)).astype(np.uint8))
    config = TrainConfig(steps=60, patch_size=48, batch_size=4, validation_fraction=0.0, seed=0,
                         learning_rate=3e-3, device="cpu", precision="float32")
    model = train_to_end(images, strokes, config, ModelConfig(in_channels=1), class_names=["dark", "bright"]).last
    model.network.eval()
    assert model.info.normalization.channels == 1
    return model


@pytest.fixture(scope="module")
def trained_model(monuseg_pair) -> SegmentationModel:
    """A model fitted briefly to simulated strokes on a real MoNuSeg image (confident outputs)."""
    from napari_selfreg.bench.strokes import simulate_strokes

    image, mask = monuseg_pair
    strokes = simulate_strokes(mask, seed=0)
    config = TrainConfig(steps=30, patch_size=96, batch_size=4, validation_fraction=0.0, seed=0)
    return train_to_end([image], [strokes], config).last


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random blobs (not white noise), so the network sees structure at every scale."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.random((h, w, c))
    smooth = ndimage.gaussian_filter(noise, (4, 4, 0))
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)
    return (smooth * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100, 255, 256, 257, 300, 511, 1000, 1025, 4097])
def test_tile_layout_covers_with_overlap(length):
    tile, overlap, divisor = 256, 64, 16
    size, starts = tile_layout(length, tile, overlap, divisor)
    assert size % divisor == 0 and size <= tile
    assert starts[0] == 0
    assert starts[-1] + size >= length
    if len(starts) > 1:
        assert starts[-1] + size == length  # last tile ends on the image edge (no padding)
        gaps = np.diff(starts)
        assert (size - gaps >= overlap).all()  # neighbours overlap at least as asked


# ----------------------------------------------------------------------------- agreement


def test_single_tile_equals_whole_image(colour_model):
    image = _image(37, 50)  # smaller than one tile and not a multiple of 16
    whole = predict_whole(colour_model, image)
    tiled = predict(colour_model, image, PredictConfig(tile_size=256, **F32))
    assert tiled.complete
    assert tiled.probabilities.shape == (3, 37, 50)
    np.testing.assert_allclose(tiled.probabilities, whole, atol=1e-4)
    _assert_several_classes(whole.argmax(0))
    np.testing.assert_array_equal(tiled.labels, whole.argmax(0) + 1)


@pytest.mark.parametrize("shape", [(203, 331), (97, 64), (65, 257), (130, 1)])
def test_odd_sizes_and_one_pixel_remainders(colour_model, shape):
    image = _image(*shape, seed=shape[0])
    whole = predict_whole(colour_model, image)
    tiled = predict(colour_model, image, PredictConfig(tile_size=64, overlap=0.25, batch_size=3, **F32))
    assert tiled.labels.shape == shape and tiled.labels.dtype == np.uint8
    assert set(np.unique(tiled.labels)) <= {1, 2, 3}
    np.testing.assert_allclose(tiled.probabilities.sum(0), 1.0, atol=1e-5)
    if min(shape) > 1:
        _assert_several_classes(whole.argmax(0))
    # exactly the blend of the tiles' own predictions (float32 rounding: measured below 1e-6)
    by_hand = _blended_by_hand(colour_model, image, tile=64, overlap=16)
    np.testing.assert_allclose(tiled.probabilities, by_hand, atol=1e-5)
    np.testing.assert_array_equal(tiled.labels[_clear(by_hand)], by_hand.argmax(0)[_clear(by_hand)] + 1)
    # and close to one pass over the whole image: each 64-pixel tile is zero-padded at its
    # borders, which moved the probabilities by 0.0024 to 0.0096 on average and changed
    # 0.5 % to 1.5 % of the labels (a uniform output is 0.2 away)
    delta = np.abs(tiled.probabilities - whole).mean()
    assert delta < 0.015, delta
    agree = (tiled.labels == whole.argmax(0) + 1).mean()
    assert agree >= 0.975, agree


def _blended_by_hand(model: SegmentationModel, image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Tiled prediction by its definition: each tile predicted by a plain forward pass over
    it alone, weighted by its row ramp times its column ramp, over the sum of the weights."""
    h, w = image.shape[:2]
    th, ys = tile_layout(h, tile, overlap, model.config.divisor)
    tw, xs = tile_layout(w, tile, overlap, model.config.divisor)
    ramp_y = blend_ramp(th, overlap).astype(np.float64) if len(ys) > 1 else np.ones(th)
    ramp_x = blend_ramp(tw, overlap).astype(np.float64) if len(xs) > 1 else np.ones(tw)
    total = np.zeros((model.config.num_classes, h, w))
    weights = np.zeros((h, w))
    for y in ys:
        for x in xs:
            probabilities = predict_whole(model, image[y : y + th, x : x + tw])
            vh, vw = probabilities.shape[1:]
            weight = np.outer(ramp_y[:vh], ramp_x[:vw])
            total[:, y : y + vh, x : x + vw] += probabilities * weight
            weights[y : y + vh, x : x + vw] += weight
    return total / weights


def _clear(probabilities: np.ndarray, margin: float = 1e-4) -> np.ndarray:
    """Pixels whose two most likely classes are further apart than rounding."""
    top = np.sort(probabilities, axis=0)
    return top[-1] - top[-2] > margin


def test_tiled_agrees_with_whole_on_real_image(trained_model, monuseg_pair):
    """Tile 256 / overlap 0.25 on a 512 x 512 real crop: labels agree on >= 99 % of pixels."""
    image = monuseg_pair[0][:512, :512]
    whole = predict_whole(trained_model, image)
    tiled = predict(trained_model, image, PredictConfig(tile_size=256, overlap=0.25, **F32))
    agree = (tiled.labels == whole.argmax(0) + 1).mean()
    delta = np.abs(tiled.probabilities - whole).mean()
    assert agree >= 0.99, agree
    assert delta <= 0.015, delta


def test_bfloat16_agrees_with_float32_on_real_image(trained_model, monuseg_pair):
    """The fast path (bf16, BatchNorm folded, ReLU and skip joins fused) against float32 on a
    full 1000 x 1000 image."""
    image = monuseg_pair[0]
    fast = predict(trained_model, image, PredictConfig(precision="bfloat16", device="cpu"))
    network = cached_inference_network(trained_model.network, torch.device("cpu"), torch.bfloat16)
    assert is_fused(network) or not torch.backends.mkldnn.is_available()
    exact = predict(trained_model, image, PredictConfig(**F32))
    agree = (fast.labels == exact.labels).mean()
    delta = np.abs(fast.probabilities - exact.probabilities)
    assert agree >= 0.995, agree
    assert delta.mean() <= 5e-3, delta.mean()
    assert delta.max() <= 0.15, delta.max()


def test_a_model_trained_on_8_bit_segments_the_16_bit_copy_alike(trained_model, monuseg_pair):
    """The 16-bit copy is scaled to the same picture, not divided by 255 (which saturated it)."""
    image = monuseg_pair[0][:384, :384]
    eight = predict(trained_model, image, PredictConfig(**F32))
    sixteen = predict(trained_model, image.astype(np.uint16) * 257, PredictConfig(**F32))
    assert trained_model.info.normalization.mode == "uint8"
    structure = eight.labels == 2
    assert 0.05 < structure.mean() < 0.6
    assert (sixteen.labels == eight.labels).mean() >= 0.99
    assert binary_dice(sixteen.labels == 2, structure) >= 0.98


def test_flips_average_the_four_flipped_views(colour_model):
    """With flips the prediction commutes with flipping the image; without them it does not."""
    image = _image(64, 96, seed=3)
    config = PredictConfig(tile_size=128, flips=True, **F32)
    plain = predict(colour_model, image, PredictConfig(tile_size=128, **F32)).probabilities
    averaged = predict(colour_model, image, config).probabilities
    mirrored = predict(colour_model, np.ascontiguousarray(image[::-1, ::-1]), config).probabilities
    np.testing.assert_allclose(mirrored[:, ::-1, ::-1], averaged, atol=1e-5)
    expected = np.mean([plain] + [
        predict(colour_model, np.ascontiguousarray(v), PredictConfig(tile_size=128, **F32)).probabilities[:, ::sy, ::sx]
        for v, sy, sx in ((image[:, ::-1], 1, -1), (image[::-1], -1, 1), (image[::-1, ::-1], -1, -1))
    ], axis=0)
    np.testing.assert_allclose(averaged, expected, atol=1e-5)
    assert np.abs(averaged - plain).max() > 1e-3  # the network is not flip-invariant (measured 0.17)


# ----------------------------------------------------------------------------- inputs


def test_dask_and_zarr_inputs_match_numpy(colour_model, tmp_path):
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    image = _image(150, 170)
    config = PredictConfig(tile_size=64, **F32)
    reference = predict(colour_model, image, config)
    _assert_several_classes(reference.labels)
    lazy = da.from_array(image, chunks=(64, 64, 3))
    stored = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=image.shape, chunks=(50, 50, 3), dtype="u1")
    stored[:] = image
    for source in (lazy, stored):
        result = predict(colour_model, source, config)
        np.testing.assert_array_equal(result.labels, reference.labels)
        np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-6)


def test_grayscale_16bit_channel_first_and_rgba(gray16_model, colour_model):
    gray16 = _gray16(90, 120, seed=3)
    result = predict(gray16_model, gray16, PredictConfig(tile_size=128, **F32))  # one tile
    assert result.labels.shape == (90, 120)
    _assert_several_classes(result.labels)
    # the brightest fifth is the bright class and the darkest fifth the dark one: the 16-bit
    # values were scaled as in training, not clipped or divided by 255
    assert (result.labels[gray16 >= np.percentile(gray16, 80)] == 2).mean() > 0.95
    assert (result.labels[gray16 <= np.percentile(gray16, 20)] == 1).mean() > 0.95
    whole = predict_whole(gray16_model, gray16)
    np.testing.assert_allclose(result.probabilities, whole, atol=1e-4)
    np.testing.assert_array_equal(result.labels, whole.argmax(0) + 1)

    # a gray image given to an RGB model is repeated to three channels
    gray8 = _image(70, 80, c=1)[..., 0]
    rgb = np.repeat(gray8[..., None], 3, axis=-1)
    np.testing.assert_allclose(
        predict(colour_model, gray8, PredictConfig(**F32)).probabilities,
        predict(colour_model, rgb, PredictConfig(**F32)).probabilities,
        atol=1e-6,
    )
    # channel-first and RGBA give the same as channels-last RGB
    image = _image(70, 80)
    reference = predict(colour_model, image, PredictConfig(**F32)).probabilities
    channel_first = np.ascontiguousarray(np.moveaxis(image, -1, 0))
    rgba = np.concatenate([image, np.full((70, 80, 1), 255, np.uint8)], axis=-1)
    for variant in (channel_first, rgba):
        np.testing.assert_allclose(predict(colour_model, variant, PredictConfig(**F32)).probabilities, reference)


@pytest.mark.parametrize("shape", [(2827, 2829), (1415, 1414, 3), (3, 1600, 1300)])
def test_prediction_scales_an_image_as_training_does(shape):
    """Prediction reads its intensity subsample tile-wise; it must be the very subsample
    training takes, also for sizes just over the sample's pixel budget (2827 x 2829)."""
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 3000.0, shape).astype(np.uint16)
    channels = 1 if len(shape) == 2 else 3
    for norm in (Normalization(mode="percentile", channels=channels), Normalization(mode="uint8", channels=channels)):
        for train_side, predict_side in zip(intensity_range(image, norm), value_range_of(image, norm), strict=True):
            np.testing.assert_array_equal(train_side, predict_side)


def test_nan_image_is_refused(gray16_model):
    from napari_selfreg.core.data import InputError

    image = np.ones((40, 40), np.float32)
    image[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predict(gray16_model, image)
    with pytest.raises(InputError, match="empty"):  # not a kernel-size error from deep inside torch
        predict(gray16_model, np.zeros((0, 40), np.float32))
    with pytest.raises(InputError, match="2 channels"):
        predict(gray16_model, np.zeros((40, 40, 2), np.float32))


# ----------------------------------------------------------------------------- outputs and control


@pytest.mark.parametrize("kind", ["zarr", "memmap"])
def test_outputs_on_disk(colour_model, tmp_path, kind):
    """Labels, probabilities and the uncertainty beside them, in one zarr group or memory-map
    folder; the uncertainty does not disturb the labels."""
    if kind == "zarr":
        pytest.importorskip("zarr")
    image = _image(140, 200)
    config = PredictConfig(tile_size=64, **F32)
    reference = predict(colour_model, image, config, uncertainty=True)
    _assert_several_classes(reference.labels)
    labels, probs = allocate_outputs((140, 200), 3, store=tmp_path / "out", kind=kind, chunk=64)
    unsure = allocate_uncertainty((140, 200), store=tmp_path / "out", kind=kind, chunk=64)
    result = predict(colour_model, image, config, out_labels=labels, out_probabilities=probs, out_uncertainty=unsure)
    assert result.labels is labels and result.probabilities is probs and result.uncertainty is unsure
    np.testing.assert_array_equal(np.asarray(labels[:]), reference.labels)
    np.testing.assert_allclose(np.asarray(probs[:]), reference.probabilities, atol=1e-6)
    np.testing.assert_allclose(np.asarray(unsure[:]), reference.uncertainty, atol=1e-6)


def test_outputs_written_into_the_images_zarr_group_leave_the_image_alone(colour_model, tmp_path):
    """The zarr group that holds the image is a natural place for its prediction; opening it
    to write used to delete the image's chunks (reads then gave the fill value, 0)."""
    zarr = pytest.importorskip("zarr")
    pixels = _image(70, 90)
    root = zarr.open_group(str(tmp_path / "slide.zarr"), mode="w")
    stored = root.create_array("image", shape=pixels.shape, chunks=(32, 32, 3), dtype="uint8")
    stored[:] = pixels
    (tmp_path / "slide.zarr" / "notes.txt").write_text("the user's")
    config = PredictConfig(tile_size=64, **F32)
    for _ in range(2):  # a second run replaces the outputs of the first
        labels, probs = allocate_outputs((70, 90), 3, store=tmp_path / "slide.zarr", kind="zarr", chunk=32)
        predict(colour_model, zarr.open_group(str(tmp_path / "slide.zarr"))["image"], config,
                out_labels=labels, out_probabilities=probs)
    np.testing.assert_array_equal(np.asarray(root["image"][:]), pixels)
    assert (tmp_path / "slide.zarr" / "notes.txt").read_text() == "the user's"
    np.testing.assert_array_equal(np.asarray(labels[:]), predict(colour_model, pixels, config).labels)


def test_uncertainty_of_known_probabilities():
    """Hand-computed: 0 for a sure pixel, 1 for a tie of every class, log 2 / log 3 for a tie
    of two classes out of three."""
    two = np.array([[1.0, 0.5, 0.9], [0.0, 0.5, 0.1]], np.float32)[:, None, :]
    expected_two = [0.0, 1.0, -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2)]
    np.testing.assert_allclose(uncertainty_of(two).numpy()[0], expected_two, atol=1e-6)
    three = np.array([[1 / 3, 0.5, 0.0], [1 / 3, 0.5, 0.0], [1 / 3, 0.0, 1.0]], np.float32)[:, None, :]
    np.testing.assert_allclose(uncertainty_of(three).numpy()[0], [1.0, np.log(2) / np.log(3), 0.0], atol=1e-6)


def test_uncertainty_is_the_entropy_of_the_blended_probabilities(colour_model):
    """Across tile seams and with flips the map is computed from the final (blended,
    averaged) probabilities, the ones the labels come from, with or without them kept."""
    image = _image(150, 170, seed=3)
    for flips in (False, True):
        config = PredictConfig(tile_size=64, overlap=0.25, flips=flips, **F32)
        kept = predict(colour_model, image, config, uncertainty=True)
        p = kept.probabilities.astype(np.float64)
        expected = -(p * np.log(np.clip(p, 1e-12, None))).sum(0) / np.log(3)
        np.testing.assert_allclose(kept.uncertainty, expected, atol=1e-5)
        alone = predict(colour_model, image, config, probabilities=False, uncertainty=True)
        assert alone.probabilities is None
        np.testing.assert_allclose(alone.uncertainty, kept.uncertainty, atol=1e-6)
        np.testing.assert_array_equal(alone.labels, predict(colour_model, image, config).labels)
        # a map that tells pixels apart: low where one class clearly wins, high where classes tie
        top = p.max(0)
        sure, unsure = top >= np.percentile(top, 90), top <= np.percentile(top, 10)
        assert kept.uncertainty[sure].mean() + 0.4 < kept.uncertainty[unsure].mean()
    assert predict(colour_model, image, config).uncertainty is None  # only when asked for


def test_a_stopped_prediction_keeps_the_uncertainty_of_the_rows_it_finished(colour_model):
    image = _image(200, 300)
    config = PredictConfig(tile_size=64, batch_size=2, **F32)
    whole = predict(colour_model, image, config, uncertainty=True)
    done = []
    result = drain(predict_tiled(colour_model, image, config, uncertainty=True, stop=lambda: len(done) >= 6),
                   done.append)
    assert not result.complete
    finished = int(np.flatnonzero(result.labels.any(1)).max()) + 1  # rows with labels are final
    assert 0 < finished < 200
    np.testing.assert_allclose(result.uncertainty[:finished], whole.uncertainty[:finished], atol=1e-6)
    assert not result.uncertainty[finished:].any()


def test_uncertainty_output_of_the_wrong_shape_is_refused(colour_model):
    with pytest.raises(ValueError, match="out_uncertainty has shape"):
        predict(colour_model, _image(80, 90), PredictConfig(tile_size=64, **F32),
                out_uncertainty=np.zeros((80, 91), np.float32))


def test_labels_only(colour_model):
    result = predict(colour_model, _image(80, 90), PredictConfig(tile_size=64, **F32), probabilities=False)
    assert result.probabilities is None and result.labels.shape == (80, 90)


def test_progress_counts_tiles_and_batches(colour_model):
    image = _image(200, 300)
    config = PredictConfig(tile_size=64, overlap=0.25, batch_size=4, **F32)
    _, ys = tile_layout(200, 64, 16, 16)
    _, xs = tile_layout(300, 64, 16, 16)
    run = predict_tiled(colour_model, image, config)
    reports = []
    result = drain(run, reports.append)
    total = len(ys) * len(xs)
    assert [r.done for r in reports] == [*range(4, total, 4), total]
    assert all(r.total == total for r in reports)
    assert result.complete


def test_stop_ends_early(colour_model):
    stop = threading.Event()
    run = predict_tiled(colour_model, _image(200, 300), PredictConfig(tile_size=64, batch_size=2, **F32), stop=stop)
    first = next(run)
    stop.set()
    with pytest.raises(StopIteration) as done:
        next(run)
    assert first.done == 2 and first.done < first.total
    assert done.value.value.complete is False


def test_stop_may_be_a_plain_bool(colour_model):
    image = _image(200, 300)
    config = PredictConfig(tile_size=64, batch_size=2, **F32)
    assert predict(colour_model, image, config, stop=False).complete
    stopped = predict(colour_model, image, config, stop=True)
    assert not stopped.complete and not np.any(stopped.labels)
    assert not predict(colour_model, image, config, stop=np.bool_(True)).complete


def test_wrong_argument_types_are_named_in_one_line(colour_model):
    from napari_selfreg.core.data import InputError

    image = _image(64, 64)
    with pytest.raises(TypeError, match=r"config must be a PredictConfig .*not dict"):
        predict(colour_model, image, {"tile_size": 64})
    with pytest.raises(InputError, match=r"torch tensor; pass a numpy, dask or zarr array"):
        predict(colour_model, torch.from_numpy(image))


def test_overlap_runs_to_half_a_tile_and_no_further(colour_model):
    """Up to 0.9 was accepted, then quietly cut to half a tile."""
    image = _image(150, 170)
    halves = predict(colour_model, image, PredictConfig(tile_size=64, overlap=0.5, **F32))
    whole = predict_whole(colour_model, image)
    assert np.mean(halves.labels == whole.argmax(0) + 1) > 0.99
    with pytest.raises(ValueError, match=r"overlap must be from 0 to 0\.5"):
        PredictConfig(overlap=0.6)


def test_inference_network_folds_batchnorm_without_touching_the_model(colour_model):
    before = {k: v.clone() for k, v in colour_model.network.state_dict().items()}
    fused = inference_network(colour_model.network, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), colour_model.network(x), atol=1e-4, rtol=1e-4)
    after = colour_model.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_written_through_data_are_not_predicted_with_stale_copies():
    """The folded inference network is cached per model; a write through ``.data`` (weight
    averaging does them) does not bump the version counter and used to go unseen."""
    info = ModelInfo(model=ModelConfig(base_channels=4, depth=2, num_classes=3), class_names=["b", "x", "y"])
    model = _calibrated(info)
    image = _image(48, 48, seed=5)
    before = predict(model, image, PredictConfig(**F32)).probabilities
    for parameter in model.network.parameters():
        parameter.data.mul_(-1)
    after = predict(model, image, PredictConfig(**F32)).probabilities
    fresh = predict(model.clone(), image, PredictConfig(**F32)).probabilities
    np.testing.assert_allclose(after, fresh, atol=1e-5)
    assert np.abs(after - before).max() > 0.01
    # a write that keeps every tensor's sum: two classes swapped in the head
    head = model.network.head
    for tensor in (head.weight, head.bias):
        tensor.data[[1, 2]] = tensor.data[[2, 1]].clone()
    swapped = predict(model, image, PredictConfig(**F32)).probabilities
    np.testing.assert_allclose(swapped, after[[0, 2, 1]], atol=1e-5)


class _CountingArray:
    """A lazy float image that records how many pixels each read asks for."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, index):
        region = self.data[index]
        self.reads.append(region.shape[0] * region.shape[1])
        return region


def test_a_lazy_float_image_is_never_read_whole():
    """Checking a lazy float image for NaN used to read all of it before the first tile."""
    from napari_selfreg.core.data import InputError, check_finite

    info = ModelInfo(model=ModelConfig(base_channels=4, depth=2), normalization=Normalization(mode="percentile"))
    torch.manual_seed(0)  # the same weights whatever ran before
    model = SegmentationModel.create(info)
    data = np.random.default_rng(0).random((1500, 1500, 3), dtype=np.float32)
    lazy = _CountingArray(data)
    result = predict(model, lazy, PredictConfig(tile_size=512, **F32))
    assert max(lazy.reads) < data.shape[0] * data.shape[1] // 2
    np.testing.assert_array_equal(result.labels, predict(model, data, PredictConfig(tile_size=512, **F32)).labels)
    lazy.reads.clear()
    check_finite(lazy)  # as training checks an image
    assert max(lazy.reads) < data.shape[0] * data.shape[1] // 2
    # NaN is still found: in the sample before any tile, or in the tile that holds it
    for y, x in ((0, 0), (1, 1)):
        bad = data.copy()
        bad[y, x, 0] = np.nan
        with pytest.raises(InputError, match="NaN"):
            predict(model, _CountingArray(bad), PredictConfig(tile_size=512, **F32))


def test_a_stop_between_tile_rows_keeps_the_finished_rows(colour_model):
    # 100 x 300 at tile 64: two tile rows (starting at 0 and 36), six tiles each
    image = _image(100, 300)
    config = PredictConfig(tile_size=64, batch_size=1, **F32)
    whole = drain(predict_tiled(colour_model, image, config))
    _assert_several_classes(whole.labels[:36])
    tiles_done = []
    run = predict_tiled(colour_model, image, config, stop=lambda: len(tiles_done) >= 6)
    stopped = drain(run, tiles_done.append)
    assert not stopped.complete and len(tiles_done) == 6
    # the finished rows hold exactly what the complete run wrote there; the rest is untouched
    np.testing.assert_array_equal(stopped.labels[:36], whole.labels[:36])
    np.testing.assert_array_equal(stopped.probabilities[:, :36], whole.probabilities[:, :36])
    assert not stopped.labels[36:].any() and not stopped.probabilities[:, 36:].any()


def test_work_on_another_device_leaves_the_model_where_it_is():
    from napari_selfreg.core.device import network_on

    network = torch.nn.Conv2d(3, 2, 1)
    assert network_on(network, torch.device("cpu")) is network
    elsewhere = network_on(network, torch.device("meta"))  # a device without data stands in for a GPU
    assert next(elsewhere.parameters()).device.type == "meta"
    assert next(network.parameters()).device.type == "cpu"
