"""Tiled sliding-window inference for images of any size (numpy, dask or zarr).

Tiles overlap and are blended with a smooth window, so tiled and whole-image
predictions agree. Memory stays bounded: only one band of tile rows is accumulated at a
time, and finished rows are written straight into the outputs (which may be zarr
arrays or memory maps for huge images).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from .config import PredictConfig
from .data import as_channels_last, check_finite, intensity_range, normalize
from .device import autocast, autocast_dtype, resolve_device
from .model import SegmentationModel
from .train import StopRequest, _stop_requested


@dataclass
class PredictProgress:
    done: int
    total: int


@dataclass
class Prediction:
    """``labels``: painting ids (1 = background, 2.. = structures); ``probabilities``: (K, H, W)."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    complete: bool = True


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` pixels."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Separable weights: 1 in the middle, a raised-cosine ramp over the overlap, never 0."""
    ramp = np.ones(tile, np.float32)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        edge = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = edge
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    ramp = np.maximum(ramp, 1e-3)
    return np.outer(ramp, ramp)


def _network_input(tiles: list[np.ndarray], device, memory_format) -> torch.Tensor:
    batch = np.stack([np.moveaxis(t, -1, 0) for t in tiles])
    return torch.from_numpy(batch).to(device).contiguous(memory_format=memory_format)


def predict_tiled(
    model: SegmentationModel,
    image,
    config: PredictConfig | None = None,
    probabilities: bool = True,
    out_labels=None,
    out_probabilities=None,
    stop: StopRequest = None,
) -> Generator[PredictProgress, None, Prediction]:
    """Yield progress per batch of tiles; return the ``Prediction``.

    ``out_labels`` (H, W) and ``out_probabilities`` (K, H, W) may be preallocated arrays
    (numpy, memmap, zarr) for outputs that do not fit in memory.
    """
    config = config or PredictConfig()
    image = as_channels_last(image)
    check_finite(image)
    h, w = image.shape[:2]
    norm = model.info.normalization
    value_range = intensity_range(image, norm)
    k = model.config.num_classes
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    network = model.network.to(device).to(memory_format=memory_format).eval()

    divisor = model.config.divisor
    tile = max(divisor, int(np.ceil(config.tile_size / divisor) * divisor))
    overlap = min(int(round(tile * config.overlap)), tile // 2)
    stride = tile - overlap
    th, tw = min(tile, _round_up(h, divisor)), min(tile, _round_up(w, divisor))
    ys, xs = tile_starts(h, th, stride), tile_starts(w, tw, stride)
    window = blend_window(tile, overlap)[:th, :tw]

    labels_out = out_labels if out_labels is not None else np.zeros((h, w), np.uint8)
    probs_out = None
    if probabilities:
        probs_out = out_probabilities if out_probabilities is not None else np.zeros((k, h, w), np.float32)

    total = len(ys) * len(xs)
    done = 0
    band_top = 0
    band = np.zeros((k, th + stride, w), np.float32)
    weight = np.zeros((th + stride, w), np.float32)
    for row, top in enumerate(ys):
        # shift the band so that it starts at `top`
        shift = top - band_top
        if shift:
            band = np.roll(band, -shift, axis=1)
            weight = np.roll(weight, -shift, axis=0)
            band[:, -shift:] = 0
            weight[-shift:] = 0
            band_top = top
        for first in range(0, len(xs), config.batch_size):
            if _stop_requested(stop):
                return Prediction(labels_out, probs_out, complete=False)
            lefts = xs[first : first + config.batch_size]
            tiles = [
                _pad_tile(normalize(np.asarray(image[top : top + th, left : left + tw]), norm, value_range), th, tw)
                for left in lefts
            ]
            with torch.no_grad(), autocast(device, dtype):
                logits = network(_network_input(tiles, device, memory_format))
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            for left, p in zip(lefts, probs, strict=True):
                vh, vw = min(th, h - top), min(tw, w - left)
                win = window[:vh, :vw]
                band[:, :vh, left : left + vw] += p[:, :vh, :vw] * win
                weight[:vh, left : left + vw] += win
            done += len(lefts)
            yield PredictProgress(done, total)
        # rows above the next tile row are final
        next_top = ys[row + 1] if row + 1 < len(ys) else h
        final = next_top - top
        block = band[:, :final] / weight[None, :final]
        labels_out[top:next_top] = (block.argmax(0) + 1).astype(np.uint8)
        if probs_out is not None:
            probs_out[:, top:next_top] = block
    return Prediction(labels_out, probs_out)


def _round_up(value: int, divisor: int) -> int:
    return int(np.ceil(value / divisor) * divisor)


def _pad_tile(tile: np.ndarray, th: int, tw: int) -> np.ndarray:
    h, w = tile.shape[:2]
    if h == th and w == tw:
        return tile
    mode = "reflect" if th - h < h and tw - w < w else "edge"
    return np.pad(tile, ((0, th - h), (0, tw - w), (0, 0)), mode=mode)


def predict(model: SegmentationModel, image, config: PredictConfig | None = None, **kwargs) -> Prediction:
    """Run ``predict_tiled`` to completion."""
    gen = predict_tiled(model, image, config, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def predict_whole(model: SegmentationModel, image, device: str = "cpu", precision: str = "float32") -> np.ndarray:
    """Probabilities (K, H, W) from one forward pass over the whole image (reference for tests)."""
    image = as_channels_last(image)
    norm = model.info.normalization
    x = normalize(np.asarray(image), norm)
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    network = model.network.to(dev).eval()
    with torch.no_grad(), autocast(dev, dtype):
        logits = network(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None].to(dev))
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
