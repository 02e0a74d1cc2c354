"""Tiled sliding-window inference for images of any size (numpy, dask or zarr).

Tiles overlap and are blended with a smooth window that falls towards the tile edges,
where the network's zero padding makes its output least reliable, so tiled and
whole-image predictions agree. Memory stays bounded by one band of tile rows plus the
outputs: finished rows are written straight into the outputs, which may be zarr arrays
or memory maps (``allocate_outputs``) for images that do not fit in memory.

Speed (see BENCHMARKS.md): the network used for inference is a copy with BatchNorm
folded into the convolutions, in channels-last layout, run under ``inference_mode`` and
bfloat16 autocast on CPUs with native bfloat16, where ReLU and the decoder's skip join are
fused into the convolutions as well (``cpu_fusion``); tiles shrink to the smallest size that
covers the image with the same number of tiles, so a 1000 x 1000 image with the default
1024-pixel tile is a single forward pass.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .allocator import freed_memory_kept
from .config import Normalization, PredictConfig, settings_of
from .cpu_fusion import fuse_for_cpu
from .data import (
    RANGE_SAMPLE_PIXELS,
    InputError,
    check_finite_pixels,
    check_plane_shape,
    intensity_range,
    normalize,
    sample_range,
    sample_step,
)
from .device import autocast, autocast_dtype, network_on, resolve_device
from .model import SegmentationModel, evaluating
from .progress import StopRequest, drain, stop_requested

FINITE_CHECK_PIXELS = 50_000_000  # images in memory up to this size are checked for NaN/inf before the first tile


@dataclass
class PredictProgress:
    done: int
    total: int


@dataclass
class Prediction:
    """``labels``: painting ids (1 = background, 2.. = structures); ``probabilities``: (K, H, W);
    ``uncertainty``: (H, W) in [0, 1] (``uncertainty_of``), where asked for."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    complete: bool = True
    uncertainty: np.ndarray | None = None


# ----------------------------------------------------------------------------- tile geometry


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` pixels at most ``stride`` apart."""
    if length <= tile:
        return [0]
    count = 1 + int(np.ceil((length - tile) / stride))
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def tile_layout(length: int, tile: int, overlap: int, divisor: int) -> tuple[int, list[int]]:
    """(tile size, start offsets) for one axis.

    The number of tiles is what ``tile`` with ``overlap`` needs; the tile then shrinks to
    the smallest multiple of ``divisor`` that still covers ``length`` with that many
    tiles overlapping by at least ``overlap``, which wastes less work on the margins.
    An axis shorter than a tile gets one tile rounded up to ``divisor`` (padded input).
    """
    if length <= tile:
        return min(tile, _round_up(length, divisor)), [0]
    count = 1 + int(np.ceil((length - tile) / (tile - overlap)))
    size = min(tile, _round_up(int(np.ceil((length + (count - 1) * overlap) / count)), divisor))
    return size, tile_starts(length, size, size - overlap)


def blend_ramp(size: int, overlap: int) -> np.ndarray:
    """1 in the middle, a raised-cosine ramp over ``overlap`` pixels at both ends, never 0."""
    ramp = np.ones(size, np.float32)
    overlap = min(overlap, size // 2)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        edge = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = edge
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    return np.maximum(ramp, 1e-3)


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Separable 2-D blending weights of a square tile."""
    ramp = blend_ramp(tile, overlap)
    return np.outer(ramp, ramp)


def _round_up(value: int, divisor: int) -> int:
    return int(np.ceil(value / divisor) * divisor)


# ----------------------------------------------------------------------------- lazy input


class _TileReader:
    """Reads (H, W, C) regions of a numpy, dask or zarr image without loading all of it.

    Mirrors ``data.as_channels_last``: gray gains a channel axis, RGBA loses alpha, and
    channel-first (C, H, W) is moved last, but per region, so a 20000 x 20000 zarr array
    is never read whole.
    """

    def __init__(self, image) -> None:
        if type(image).__module__.startswith("torch"):  # numpy cannot read a tensor's dtype
            raise InputError("the image is a torch tensor; pass a numpy, dask or zarr array (tensor.numpy())")
        if not hasattr(image, "shape") or not hasattr(image, "__getitem__"):
            image = np.asarray(image)
        self.image = image
        shape = tuple(int(s) for s in image.shape)
        check_plane_shape(shape)
        self.channel_first = False
        if len(shape) == 2:
            h, w, c = *shape, 1
        elif len(shape) == 3 and shape[-1] in (1, 3, 4):
            h, w, c = shape
        elif len(shape) == 3 and shape[0] in (1, 3, 4) and min(shape[1:]) > 4:
            c, h, w = shape
            self.channel_first = True
        elif len(shape) == 3:
            raise InputError(
                f"image of shape {shape} looks like a 3-D stack; select one 2-D slice (or an RGB image) and try again"
            )
        else:
            raise InputError(
                f"image has {len(shape)} dimensions {shape}; a 2-D gray or RGB(A) image is needed "
                "(split stacks and time series into 2-D slices)"
            )
        self.height, self.width = h, w
        self.channels = 3 if c == 4 else c
        self.ndim = len(shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.image.dtype)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        try:
            if self.ndim == 2:
                region = np.asarray(self.image[rows, cols])[..., None]
            elif self.channel_first:
                region = np.moveaxis(np.asarray(self.image[:, rows, cols]), 0, -1)
            else:
                region = np.asarray(self.image[rows, cols])
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:
            if isinstance(self.image, np.ndarray):
                raise
            # a slide read lazily: a damaged tile, or a codec tifffile lacks, surfaces only here
            cause = "install imagecodecs" if "imagecodecs" in str(error) else "the file may be damaged"
            raise InputError(f"could not read part of the image ({type(error).__name__}: {error}); {cause}") from error
        return region[..., :3] if region.shape[-1] == 4 else region

    def sample(self, max_pixels: int = RANGE_SAMPLE_PIXELS) -> np.ndarray:
        """A strided subsample of at most about ``max_pixels`` pixels; by default the one
        ``data.intensity_range`` takes of an image in memory, so both scale an image alike."""
        step = sample_step(self.height, self.width, max_pixels)
        return self.read(slice(None, None, step), slice(None, None, step))


def value_range_of(image, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) prediction scales ``image`` by: ``data.intensity_range``, read tile-wise."""
    return _value_range(_TileReader(image), norm)


def plane_shape(image) -> tuple[int, int]:
    """(H, W) of a 2-D gray, RGB(A) or channel-first image, without reading its pixels."""
    reader = _TileReader(image)
    return reader.height, reader.width


def _value_range(reader: _TileReader, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """``data.intensity_range`` of the whole image, computed from the same subsample it would take."""
    if norm.mode == "uint8" and reader.dtype == np.uint8:
        return intensity_range(np.zeros((1, 1, reader.channels), np.uint8), norm)
    sample = reader.sample()
    check_finite_pixels(sample)  # percentiles of NaN would make every tile NaN
    return sample_range(sample, norm)


# ----------------------------------------------------------------------------- network


_FUSED_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_signature(network: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is modified in place or replaced.

    Writes through ``.data`` (weight averaging does them) leave the version counter alone,
    so each tensor's sum is part of it too, and a sum weighted by fixed random numbers, which
    a write that moves values about (two classes' rows swapped) changes too.
    """
    tensors = list(itertools.chain(network.parameters(), network.buffers()))
    with torch.no_grad():
        floats = [t for t in tensors if t.is_floating_point() and t.numel()]
        sums = torch.stack([t.sum() for t in floats]).tolist() if floats else []
        mixed = [torch.dot(t.reshape(-1).float(), _mixing(t.numel(), t.device)) for t in floats]
        weighted = torch.stack(mixed).tolist() if mixed else []
    return tuple((t.data_ptr(), t._version) for t in tensors) + tuple(sums) + tuple(weighted)


_MIXING: dict[torch.device, torch.Tensor] = {}


def _mixing(n: int, device: torch.device) -> torch.Tensor:
    """n fixed random weights in [0.5, 1.5) (one vector per device, grown as needed)."""
    known = _MIXING.get(device)
    if known is None or known.numel() < n:
        generator = torch.Generator().manual_seed(0)
        known = (torch.rand(max(n, 1 << 16), generator=generator) + 0.5).to(device)
        _MIXING[device] = known
    return known[:n]


def cached_inference_network(network: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """``inference_network``, reused while the weights are unchanged (saves ~25 ms a call)."""
    key = (_weights_signature(network), str(device), dtype)
    entry = _FUSED_CACHE.get(network)
    if entry is not None and entry[0] == key:
        return entry[1]
    fused = inference_network(network, device, dtype)
    _FUSED_CACHE[network] = (key, fused)
    return fused


def inference_network(network: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``network`` for inference: BatchNorm folded into the preceding conv.

    Folding removes one memory-bound pass per conv (about 20 % of CPU inference time);
    it works on a copy so the stored model and its state dict never change. For bfloat16
    on the CPU, ReLU and the skip join are fused into the convs too (``cpu_fusion``).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(network).eval()
    for module in list(fused.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    for parameter in fused.parameters():
        parameter.requires_grad_(False)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    fused = fused.to(device).to(memory_format=memory_format)
    if device.type == "cpu" and dtype == torch.bfloat16:
        fused = fuse_for_cpu(fused)
    return fused


def _forward_probabilities(network: nn.Module, batch: np.ndarray, device, dtype, flips: bool = False) -> torch.Tensor:
    """Softmax probabilities (B, K, h, w) float32 of a (B, h, w, C) float32 batch.

    A channels-last (B, h, w, C) array viewed as (B, C, h, w) is already channels-last
    memory, so the tiles go to the network without a transposing copy. ``flips``
    averages the probabilities of the four flipped views (each flipped back).
    """
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
    if device.type != "cpu":
        x = x.contiguous()
    views = [(), (3,), (2,), (2, 3)] if flips else [()]
    with torch.inference_mode():
        total = None
        for dims in views:
            with autocast(device, dtype):
                logits = network(torch.flip(x, dims) if dims else x)
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total.add_(probs)
        return total.div_(len(views)) if len(views) > 1 else total


# ----------------------------------------------------------------------------- outputs


def allocate_outputs(
    shape: tuple[int, int],
    num_classes: int,
    store: str | Path | None = None,
    probabilities: bool = True,
    kind: str = "zarr",
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels (H, W) uint8, probabilities (K, H, W) float32 or None) to pass to ``predict_tiled``.

    ``store=None`` gives in-memory numpy arrays. Otherwise ``kind="zarr"`` creates (or
    replaces) arrays "labels" and "probabilities" in the zarr group at ``store``, leaving
    anything else in it alone (chunked ``chunk`` pixels square, a napari-friendly layout);
    ``kind="memmap"`` creates ``labels.npy`` and ``probabilities.npy`` memory maps in the
    folder ``store``. Either way the outputs live on disk, so a 20000 x 20000 prediction
    needs little RAM.
    """
    h, w = int(shape[0]), int(shape[1])
    labels = _allocate("labels", (h, w), np.uint8, store, kind, chunk)
    probs = _allocate("probabilities", (num_classes, h, w), np.float32, store, kind, chunk) if probabilities else None
    return labels, probs


def allocate_uncertainty(
    shape: tuple[int, int], store: str | Path | None = None, kind: str = "zarr", chunk: int = 1024
) -> np.ndarray:
    """The (H, W) float32 uncertainty map to pass to ``predict_tiled`` as ``out_uncertainty``:
    in memory, or "uncertainty" beside ``allocate_outputs``' arrays in the same ``store``."""
    return _allocate("uncertainty", (int(shape[0]), int(shape[1])), np.float32, store, kind, chunk)


def _allocate(name: str, shape: tuple[int, ...], dtype, store, kind: str, chunk: int) -> np.ndarray:
    if store is None:
        return np.zeros(shape, dtype)
    if kind == "memmap":
        folder = Path(store)
        folder.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
    if kind != "zarr":
        raise ValueError("kind must be 'zarr' or 'memmap'")
    import zarr

    # "a", not "w": the group may hold the image itself, or other work, which "w" deleted
    group = zarr.open_group(str(store), mode="a")
    h, w = shape[-2:]
    c = max(16, min(chunk, max(h, w)))
    chunks = (1,) * (len(shape) - 2) + (min(c, h), min(c, w))  # one class plane per chunk
    return group.create_array(
        name, shape=shape, chunks=chunks, dtype=np.dtype(dtype).name, fill_value=0, overwrite=True
    )


# ----------------------------------------------------------------------------- prediction


def predict_tiled(
    model: SegmentationModel,
    image,
    config: PredictConfig | None = None,
    probabilities: bool = True,
    out_labels=None,
    out_probabilities=None,
    stop: StopRequest = None,
    value_range: tuple[np.ndarray, np.ndarray] | None = None,
    uncertainty: bool = False,
    out_uncertainty=None,
) -> Generator[PredictProgress, None, Prediction]:
    """Yield progress per batch of tiles; return the ``Prediction``.

    ``image``: (H, W), (H, W, C) or (C, H, W) numpy, dask or zarr array. ``out_labels``
    (H, W), ``out_probabilities`` (K, H, W) and ``out_uncertainty`` (H, W) may be
    preallocated arrays (numpy, memmap, zarr; see ``allocate_outputs``) for outputs that do
    not fit in memory; ``uncertainty`` (or an ``out_uncertainty``) asks for the map of
    where the model is unsure (``uncertainty_of``). A stop
    request is honoured between batches; the rows finished so far are then in the
    outputs and ``complete`` is False. ``value_range`` (``value_range_of``) scales the image;
    a crop must be given its whole image's, else it is stretched by its own percentiles.
    """
    config = settings_of(config, PredictConfig, "config")
    reader = _TileReader(image)
    h, w = reader.height, reader.width
    norm = model.info.normalization
    # an image in memory is checked before the first tile; a lazy one (dask, zarr, a memory
    # map) tile by tile, so that checking never reads it whole
    checked = reader.dtype.kind != "f" or (type(reader.image) is np.ndarray and h * w <= FINITE_CHECK_PIXELS)
    if reader.dtype.kind == "f" and checked:
        check_finite_pixels(reader.sample(FINITE_CHECK_PIXELS))
    check_tiles = not checked
    if value_range is None:
        value_range = _value_range(reader, norm)
    k = model.config.num_classes
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    network = cached_inference_network(model.network, device, dtype)

    divisor = model.config.divisor
    tile = max(divisor, _round_up(config.tile_size, divisor))
    overlap = int(round(tile * config.overlap))
    th, ys = tile_layout(h, tile, overlap, divisor)
    tw, xs = tile_layout(w, tile, overlap, divisor)
    ramp_y = blend_ramp(th, overlap) if len(ys) > 1 else np.ones(th, np.float32)
    ramp_x = blend_ramp(tw, overlap) if len(xs) > 1 else np.ones(tw, np.float32)
    # The tiles form a product grid, so the summed weights are separable: dividing each
    # tile's ramps by the row and column sums beforehand makes the band hold final values.
    norm_y = _normalized_ramps(ramp_y, ys, h)
    norm_x = _normalized_ramps(ramp_x, xs, w)

    labels_out = out_labels if out_labels is not None else np.zeros((h, w), np.uint8)
    probs_out = None
    if probabilities:
        probs_out = out_probabilities if out_probabilities is not None else np.zeros((k, h, w), np.float32)
    if tuple(labels_out.shape) != (h, w):
        raise ValueError(f"out_labels has shape {tuple(labels_out.shape)}, expected {(h, w)}")
    if probs_out is not None and tuple(probs_out.shape) != (k, h, w):
        raise ValueError(f"out_probabilities has shape {tuple(probs_out.shape)}, expected {(k, h, w)}")
    unsure_out = out_uncertainty
    if unsure_out is None and uncertainty:
        unsure_out = np.zeros((h, w), np.float32)
    if unsure_out is not None and tuple(unsure_out.shape) != (h, w):
        raise ValueError(f"out_uncertainty has shape {tuple(unsure_out.shape)}, expected {(h, w)}")
    outputs = _Outputs(labels_out, probs_out, unsure_out)

    batch_size = max(1, int(config.batch_size))
    tiles = [(row, col) for row in range(len(ys)) for col in range(len(xs))]
    total = len(tiles)
    with freed_memory_kept():
        band = torch.zeros((k, th, w), dtype=torch.float32)  # blended rows [band_top, band_top + th)
        band_top = 0
        done = 0
        for first in range(0, total, batch_size):
            if stop_requested(stop):
                next_top = ys[tiles[first][0]]
                if next_top != band_top:  # the rows above the next tile row are final: keep them
                    _flush(band, band_top, next_top, outputs)
                return outputs.prediction(complete=False)
            chunk = tiles[first : first + batch_size]
            batch = np.empty((len(chunk), th, tw, norm.channels), np.float32)
            for i, (row, col) in enumerate(chunk):
                region = reader.read(slice(ys[row], ys[row] + th), slice(xs[col], xs[col] + tw))
                if check_tiles:
                    check_finite_pixels(region)
                batch[i] = _pad_tile(normalize(region, norm, value_range), th, tw)
            probs = _forward_probabilities(network, batch, device, dtype, config.flips).cpu()
            for (row, col), p in zip(chunk, probs, strict=True):
                top, left = ys[row], xs[col]
                if top != band_top:
                    # every tile of the rows above `top` is done (row-major order): those rows are final
                    _flush(band, band_top, top, outputs)
                    shift = top - band_top
                    keep = th - shift
                    if keep > 0:
                        band[:, :keep] = band[:, shift:].clone()
                    band[:, max(keep, 0) :] = 0
                    band_top = top
                vh, vw = min(th, h - top), min(tw, w - left)
                win = torch.outer(norm_y[row][:vh], norm_x[col][:vw])
                band[:, :vh, left : left + vw].addcmul_(p[:, :vh, :vw], win)
            done += len(chunk)
            yield PredictProgress(done, total)
        _flush(band, band_top, h, outputs)
        return outputs.prediction(complete=True)


def _normalized_ramps(ramp: np.ndarray, starts: list[int], length: int) -> list[torch.Tensor]:
    """Each tile's ramp divided by the sum of all ramps at the same image positions."""
    total = np.zeros(length, np.float64)
    for start in starts:
        n = min(len(ramp), length - start)
        total[start : start + n] += ramp[:n]
    out = []
    for start in starts:
        n = min(len(ramp), length - start)
        out.append(torch.from_numpy((ramp[:n] / total[start : start + n]).astype(np.float32)))
    return out


@dataclass
class _Outputs:
    labels: np.ndarray
    probabilities: np.ndarray | None
    uncertainty: np.ndarray | None

    def prediction(self, complete: bool) -> Prediction:
        return Prediction(self.labels, self.probabilities, complete, self.uncertainty)


def _flush(band: torch.Tensor, band_top: int, end: int, outputs: _Outputs, columns: int = 4096) -> None:
    """Write the finished rows [band_top, end) into the outputs, a few columns at a time
    so that the temporaries stay small for very wide images."""
    rows = end - band_top
    for left in range(0, band.shape[-1], columns):
        block = band[:, :rows, left : left + columns]
        outputs.labels[band_top:end, left : left + columns] = _painting_ids(block).numpy()
        if outputs.probabilities is not None:
            outputs.probabilities[:, band_top:end, left : left + columns] = block.numpy()
        if outputs.uncertainty is not None:
            outputs.uncertainty[band_top:end, left : left + columns] = uncertainty_of(block).numpy()


def uncertainty_of(probabilities: torch.Tensor | np.ndarray) -> torch.Tensor:
    """How unsure the model is, per pixel: the entropy of the (K, ...) class probabilities
    divided by its largest value, log K.

    0 where one class has all the probability, 1 where every class is equally likely: the
    user-facing map of METHOD.md (UG-MCL) of where the model is unsure. Computed on the
    blended probabilities (averaged over flips where those are on), so it also rises where
    tiles or flipped views disagree. Measured (BENCHMARKS.md): errors are 3-4x as dense where
    it is high, mostly along the predicted outlines, and a third of them are confident.
    """
    p = torch.as_tensor(probabilities, dtype=torch.float32)
    k = p.shape[0]
    if k < 2:
        return torch.zeros(p.shape[1:], dtype=torch.float32)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
    return entropy.div_(float(np.log(k))).clamp_(0.0, 1.0)


def _painting_ids(probabilities: torch.Tensor) -> torch.Tensor:
    """argmax over classes + 1 as uint8, class plane by class plane.

    ``Tensor.argmax(0)`` on a (K, rows, columns) view reduces over the outermost axis
    and took 0.17 s for a 1000 x 1000 image (a third of the whole prediction); this is
    a few contiguous passes. Ties go to the lower class, as with argmax.
    """
    best = probabilities[0].clone()
    ids = torch.ones(best.shape, dtype=torch.uint8)
    for k in range(1, probabilities.shape[0]):
        better = probabilities[k] > best
        ids.masked_fill_(better, k + 1)
        torch.maximum(best, probabilities[k], out=best)
    return ids


def _pad_tile(tile: np.ndarray, th: int, tw: int) -> np.ndarray:
    h, w = tile.shape[:2]
    if h == th and w == tw:
        return tile
    mode = "reflect" if th - h < h and tw - w < w else "edge"
    return np.pad(tile, ((0, th - h), (0, tw - w), (0, 0)), mode=mode)


def predict(model: SegmentationModel, image, config: PredictConfig | None = None, **kwargs) -> Prediction:
    """Run ``predict_tiled`` to completion."""
    return drain(predict_tiled(model, image, config, **kwargs))


def predict_whole(model: SegmentationModel, image, device: str = "cpu", precision: str = "float32") -> np.ndarray:
    """Probabilities (K, H, W) from one plain forward pass over the whole image (reference for tests)."""
    reader = _TileReader(image)
    norm = model.info.normalization
    x = normalize(reader.read(slice(None), slice(None)), norm, _value_range(reader, norm))
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    with evaluating(network_on(model.network, dev)) as network, torch.no_grad(), autocast(dev, dtype):
        logits = network(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None].to(dev))
    return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
