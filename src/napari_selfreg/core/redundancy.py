"""Per-block feature redundancy (METHOD.md, "Feature redundancy, as the paper shows it").

For every block of a SelfReg UNet (E1..E5, D4..D1; D1 is the final feature map) and one
image (or a region of it) this module computes:

- the channel-similarity matrix ``S = V V^T`` of the block's output (each channel's
  spatial map flattened, centred for ``"pearson"``, L2-normalised) - the picture of the
  paper's Figure 1c - and the block's **redundancy index**, the mean ``|S_ij|`` over
  ``i != j``;
- a spatial **redundancy map**: the same index in non-overlapping ``window x window``
  windows at the block's resolution, interpolated to image pixels (values in [0, 1]);
- the **SCR map**: per block pixel, the mean squared distance between the block's
  channels and the channel mean of the final features average-pooled to the block
  (what SCR's deterministic variant pulls together);
- the **IFD map**: per block pixel, the mean squared distance between the paired top and
  bottom channel halves, ranked as ``selfreg.ifd_term`` ranks them;
- a **feature rendering**: the first three principal components as RGB.

Channels that are zero (constant, for Pearson) over the pixels considered carry no
information and are left out of the index ("dead"); their rows of ``S`` are 0. A block
(or window) with fewer than two live channels has index 0.

Memory stays bounded: large images are processed in tiles whose cores lie on a grid of
``window * 2**depth`` pixels (so pooling, windows and block pixels fall the same way as
in one pass over the whole image) with a halo as wide as the network's receptive field
(so each core sees the context it would see untiled). Statistics that need the whole
image (the similarity matrix, IFD ranking, principal components) are accumulated as
channel moments; maps that depend on them are computed in a second pass. The maps are
kept at block resolution and interpolated to image pixels only on request
(``RedundancyReport.image_map``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .allocator import trim_freed_memory
from .config import check_field_types, settings_of
from .data import InputError, as_channels_last, check_finite, check_finite_pixels, intensity_range, normalize
from .device import network_on, resolve_device
from .model import SegmentationModel, evaluating
from .progress import drain
from .selfreg import BlockRoles

MAP_KINDS = ("redundancy", "scr", "ifd")
SIMILARITIES = ("cosine", "pearson")
# a window must hold at least this share of its pixels to get its own value (edge windows)
_MIN_WINDOW_SHARE = 0.25
# relative variance below which a channel counts as constant (Pearson)
_CONSTANT_TOLERANCE = 1e-10


# ----------------------------------------------------------------------------- similarity maths


def _live_channels(gram: torch.Tensor, raw_diagonal: torch.Tensor, centered: bool) -> torch.Tensor:
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    if centered:
        return diagonal > _CONSTANT_TOLERANCE * raw_diagonal.clamp(min=1e-300)
    return diagonal > 0


def _similarity_and_index(
    gram: torch.Tensor, sums: torch.Tensor, count: torch.Tensor, centered: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched: moments (B, C, C), (B, C), (B,) float64 -> S (B, C, C), index (B,), live (B, C)."""
    raw_diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    if centered:
        n = count.clamp(min=1).to(gram.dtype)[:, None, None]
        gram = gram - sums[:, :, None] * sums[:, None, :] / n
    live = _live_channels(gram, raw_diagonal, centered)
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=1e-300)
    inverse = torch.where(live, diagonal.rsqrt(), torch.zeros_like(diagonal))
    similarity = (gram * inverse[:, :, None] * inverse[:, None, :]).clamp(-1.0, 1.0)
    eye = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
    off = similarity.abs().masked_fill(eye, 0.0).sum(dim=(1, 2))
    n_live = live.sum(dim=1).to(gram.dtype)
    pairs = n_live * (n_live - 1)
    index = torch.where(pairs > 0, off / pairs.clamp(min=1), torch.zeros_like(off))
    return similarity, index, live


def similarity_from_moments(
    gram: np.ndarray, sums: np.ndarray, count: int, similarity: str = "cosine"
) -> tuple[np.ndarray, float, np.ndarray]:
    """(S, redundancy index, live-channel mask) from a block's channel moments.

    ``gram[i, j] = sum_p f_i(p) f_j(p)``, ``sums[i] = sum_p f_i(p)``, ``count`` pixels; so
    tiles can be summed and the result equals the one-pass computation.
    """
    _check_similarity(similarity)
    g = torch.as_tensor(np.asarray(gram, np.float64))[None]
    s = torch.as_tensor(np.asarray(sums, np.float64))[None]
    n = torch.tensor([count], dtype=torch.float64)
    sim, index, live = _similarity_and_index(g, s, n, similarity == "pearson")
    return sim[0].numpy(), float(index[0]), live[0].numpy()


def _moments(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Channel moments of (C, N) features in float64, in chunks to bound memory."""
    c, n = flat.shape
    gram = torch.zeros((c, c), dtype=torch.float64)
    sums = torch.zeros(c, dtype=torch.float64)
    chunk = max(1, 2**22 // max(c, 1))
    for start in range(0, n, chunk):
        part = flat[:, start : start + chunk].to(torch.float64)
        gram += part @ part.T
        sums += part.sum(dim=1)
    return gram, sums, n


def channel_similarity(features, similarity: str = "cosine") -> np.ndarray:
    """The (C, C) channel-similarity matrix of features shaped (C, ...) (any spatial shape)."""
    flat = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    flat = flat.detach().cpu().reshape(flat.shape[0], -1)
    gram, sums, n = _moments(flat)
    return similarity_from_moments(gram.numpy(), sums.numpy(), n, similarity)[0]


def redundancy_index(similarity_matrix: np.ndarray, live: np.ndarray | None = None) -> float:
    """Mean ``|S_ij|`` over ``i != j`` among live channels (rows of a dead channel are all 0)."""
    s = np.abs(np.asarray(similarity_matrix, np.float64))
    if live is None:
        live = np.diagonal(s) > 0
    s = s[np.ix_(live, live)]
    c = s.shape[0]
    if c < 2:
        return 0.0
    return float((s.sum() - np.trace(s)) / (c * (c - 1)))


def _check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise InputError(f"unknown similarity {similarity!r}; choose 'cosine' or 'pearson'")


# ----------------------------------------------------------------------------- settings, reports


@dataclass
class RedundancyConfig:
    """How to compute the maps; the defaults suit a CPU laptop and images of any size.

    ``tile_size`` is the core of a tile in image pixels (rounded up to the alignment grid);
    ``halo`` the context added around it (None: the network's receptive-field radius, which
    makes tiled maps equal the one-pass maps up to float rounding). Images whose features fit
    in ``memory_mb`` are done in one pass. The budget bounds the block features; the report's
    own maps (about 29 bytes per image pixel for the default model) come on top, and a tile
    is never smaller than the alignment grid plus its halo (544 pixels square by default).
    """

    similarity: str = "cosine"  # "cosine" | "pearson"
    window: int = 16  # side of the local windows, in block pixels
    tile_size: int = 1024
    halo: int | None = None
    memory_mb: float = 768.0
    render_features: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        check_field_types(self, InputError)
        _check_similarity(self.similarity)
        if self.window < 2:
            raise InputError("the redundancy window must be at least 2 pixels")
        if self.tile_size < 16:
            raise InputError("tile size must be at least 16 pixels")
        if self.halo is not None and self.halo < 0:
            raise InputError("the halo must be 0 pixels or more, or None for the receptive-field radius")
        if not 0 < self.memory_mb < math.inf:
            raise InputError("the memory budget must be a finite number of megabytes above 0")


@dataclass
class RedundancyProgress:
    stage: str  # "features" (pass 1) or "maps" (pass 2)
    done: int
    total: int


@dataclass
class BlockRedundancy:
    """One block's redundancy. Grids are at block resolution (``stride`` image pixels per
    block pixel) or window resolution (``stride * window``), starting at the report's
    ``grid_origin``; ``RedundancyReport.image_map`` interpolates them to image pixels."""

    name: str
    stride: int
    channels: int
    role: str  # "teacher", "encoder student", "decoder student" or "not regularised"
    redundancy_index: float
    similarity: np.ndarray  # (C, C) float32; |values| <= 1
    dead_channels: int
    scr_mean: float  # mean of the SCR map over the region
    ifd_mean: float
    ifd_pairs: np.ndarray  # (C // 2, 2) channel ids: (top, bottom)
    redundancy_grid: np.ndarray  # window resolution, [0, 1]
    scr_grid: np.ndarray  # block resolution, raw squared distances
    ifd_grid: np.ndarray
    features_rgb: np.ndarray | None = None  # (h, w, 3) uint8 at block resolution

    def grid(self, kind: str) -> np.ndarray:
        return {"redundancy": self.redundancy_grid, "scr": self.scr_grid, "ifd": self.ifd_grid}[kind]

    def cell(self, kind: str, window: int) -> int:
        """Image pixels per grid cell of ``kind``."""
        return self.stride * window if kind == "redundancy" else self.stride

    def summary(self) -> dict:
        return {
            "name": self.name,
            "redundancy_index": self.redundancy_index,
            "channels": self.channels,
            "dead_channels": self.dead_channels,
            "stride": self.stride,
            "role": self.role,
            "scr_mean": self.scr_mean,
            "ifd_mean": self.ifd_mean,
        }


@dataclass
class RedundancyReport:
    """Every block's redundancy for one model and one image region."""

    blocks: list[BlockRedundancy]
    image_shape: tuple[int, int]
    region: tuple[int, int, int, int]  # top, left, bottom, right in image pixels
    grid_origin: tuple[int, int]  # image pixel where every grid's cell (0, 0) starts
    similarity: str
    window: int
    tiles: int
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def region_shape(self) -> tuple[int, int]:
        top, left, bottom, right = self.region
        return bottom - top, right - left

    def block(self, name: str) -> BlockRedundancy:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block named {name!r}; blocks are {self.names}")

    def indices(self) -> dict[str, float]:
        return {b.name: b.redundancy_index for b in self.blocks}

    def region_cells(self, name: str, kind: str) -> np.ndarray:
        """The grid cells of ``kind`` that overlap the region (the grid extends a little beyond it)."""
        block = self.block(name)
        cell = block.cell(kind, self.window)
        top, left, bottom, right = self.region
        (oy, ox) = self.grid_origin
        rows = slice((top - oy) // cell, -(-(bottom - oy) // cell))
        cols = slice((left - ox) // cell, -(-(right - ox) // cell))
        return block.grid(kind)[rows, cols]

    def image_map(self, name: str, kind: str, scale: float | None = None) -> np.ndarray:
        """A map at image pixels of the region, (rows, cols) float32.

        Grid values sit at their cell centres and are interpolated bilinearly to pixel
        centres (as ``align_corners=False`` does), so a stride-1 grid comes back unchanged.
        ``scale`` (for SCR/IFD) divides and clips into [0, 1]; the redundancy map is in
        [0, 1] already.
        """
        if kind not in MAP_KINDS:
            raise KeyError(f"unknown map kind {kind!r}; choose from {MAP_KINDS}")
        block = self.block(name)
        out = upsample_grid(block.grid(kind), block.cell(kind, self.window), self.grid_origin, self.region)
        if scale is not None:
            out = np.clip(out / (scale if scale > 0 else 1.0), 0.0, 1.0, out=out)
        return out

    def features_image(self, name: str) -> np.ndarray:
        """The principal-component rendering at image pixels of the region, (rows, cols, 3) uint8."""
        block = self.block(name)
        if block.features_rgb is None:
            raise ValueError("features were not rendered (render_features=False)")
        rgb = block.features_rgb.astype(np.float32)
        channels = [upsample_grid(rgb[..., i], block.stride, self.grid_origin, self.region) for i in range(3)]
        return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)

    def summary(self) -> dict:
        """JSON-ready numbers (no arrays)."""
        return {
            "blocks": [b.summary() for b in self.blocks],
            "similarity": self.similarity,
            "window": self.window,
            "image_shape": list(self.image_shape),
            "region": list(self.region),
            "tiles": self.tiles,
            "seconds": self.seconds,
            "settings": self.settings,
        }


def map_scale(reports: Sequence[RedundancyReport], name: str, kind: str, percentile: float = 99.0) -> float:
    """A shared scale for one block's SCR or IFD maps: the largest ``percentile`` of the raw
    distances over the given reports (so maps of compared models share one colour scale).
    Only the cells over each report's region count. Maps divided by it and clipped lie in
    [0, 1]; 1.0 when the maps are all zero."""
    values = [float(np.percentile(r.region_cells(name, kind), percentile)) for r in reports]
    scale = max(values) if values else 0.0
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def upsample_grid(
    grid: np.ndarray,
    cell: int,
    origin: tuple[int, int],
    region: tuple[int, int, int, int],
    rows_per_chunk: int = 1024,
) -> np.ndarray:
    """Bilinear interpolation of a grid (cell ``cell`` image pixels, cell (0, 0) starting at
    image pixel ``origin``) to the pixel centres of ``region``; edges are clamped."""
    top, left, bottom, right = region
    grid = np.asarray(grid, np.float32)
    y0, y1, fy = _axis_weights(top, bottom, origin[0], cell, grid.shape[0])
    x0, x1, fx = _axis_weights(left, right, origin[1], cell, grid.shape[1])
    out = np.empty((bottom - top, right - left), np.float32)
    for start in range(0, out.shape[0], rows_per_chunk):
        sl = slice(start, start + rows_per_chunk)
        a, b = grid[y0[sl]], grid[y1[sl]]
        upper = a[:, x0] * (1 - fx) + a[:, x1] * fx
        lower = b[:, x0] * (1 - fx) + b[:, x1] * fx
        w = fy[sl, None]
        out[sl] = upper * (1 - w) + lower * w
    return out


def _axis_weights(start: int, stop: int, origin: int, cell: int, n: int):
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    u = np.clip((centres - origin) / cell - 0.5, 0.0, n - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (u - i0).astype(np.float32)


# ----------------------------------------------------------------------------- tiling


def receptive_radius(depth: int) -> int:
    """How far (image pixels) a D1 pixel of the SelfReg UNet sees: each 3x3 conv adds one
    step of its level, each pool one step of the finer level, each bilinear up-sampling one
    step of the coarser level."""
    radius, step = 0, 1
    for level in range(depth + 1):
        if level:
            radius += step  # 2x2 max-pool
            step *= 2
        radius += 2 * step  # two 3x3 convs
    for _ in range(depth):
        radius += step  # bilinear up-sampling reads the coarse neighbours
        step //= 2
        radius += 2 * step
    return radius


@dataclass(frozen=True)
class Tile:
    core: tuple[int, int, int, int]  # top, left, bottom, right (image pixels)
    window: tuple[int, int, int, int]  # what the network sees: core + halo, clipped to the image


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_tiles(
    grid: tuple[int, int, int, int], image_shape: tuple[int, int], core: int, halo: int
) -> list[Tile]:
    """Tiles covering ``grid`` (its top/left on the alignment grid) with cores of ``core`` pixels."""
    top, left, bottom, right = grid
    h, w = image_shape
    tiles = []
    for ct in range(top, bottom, core):
        for cl in range(left, right, core):
            cb, cr = min(ct + core, bottom), min(cl + core, right)
            window = (max(0, ct - halo), max(0, cl - halo), min(h, cb + halo), min(w, cr + halo))
            tiles.append(Tile((ct, cl, cb, cr), window))
    return tiles


def _floats_per_pixel(model: SegmentationModel) -> float:
    """Feature values per image pixel over all blocks (x3 for the network's temporaries)."""
    mc = model.config
    encoder = sum(c / 4**i for i, c in enumerate(mc.encoder_channels))
    decoder = sum(c / 4 ** (mc.depth - 1 - i) for i, c in enumerate(mc.decoder_channels))
    return 3.0 * (encoder + decoder) + mc.in_channels


def _choose_core(
    model: SegmentationModel,
    grid: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    config: RedundancyConfig,
    align: int,
    halo: int,
) -> int:
    """One tile when the grid's features (with the halo the image has room for) fit in
    ``memory_mb``; else the largest aligned core (at most ``tile_size``) whose window fits."""
    budget = config.memory_mb * 2**20 / (4 * _floats_per_pixel(model))
    top, left, bottom, right = grid
    h, w = image_shape
    gh, gw = bottom - top, right - left
    seen = (min(h, bottom + halo) - max(0, top - halo)) * (min(w, right + halo) - max(0, left - halo))
    if seen <= budget or (gh <= align and gw <= align):
        return _round_up(max(gh, gw), align)
    side = max(align, int(math.sqrt(budget)) - 2 * halo)
    core = max(align, min(_round_up(config.tile_size, align), side // align * align))
    return core


# ----------------------------------------------------------------------------- computation


@dataclass
class _BlockState:
    name: str
    stride: int
    channels: int
    rows: int  # block-resolution grid size
    cols: int
    window: int
    gram: torch.Tensor = None  # type: ignore[assignment]
    sums: torch.Tensor = None  # type: ignore[assignment]
    count: int = 0
    redundancy: np.ndarray = None  # type: ignore[assignment]
    scr: np.ndarray = None  # type: ignore[assignment]
    ifd: np.ndarray = None  # type: ignore[assignment]
    rgb: np.ndarray | None = None
    # set after pass 1
    top: torch.Tensor | None = None
    bottom: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    basis: torch.Tensor | None = None  # (3, C)
    spread: torch.Tensor | None = None  # (3,)

    def __post_init__(self) -> None:
        c = self.channels
        self.gram = torch.zeros((c, c), dtype=torch.float64)
        self.sums = torch.zeros(c, dtype=torch.float64)
        wr, wc = -(-self.rows // self.window), -(-self.cols // self.window)
        self.redundancy = np.full((wr, wc), np.nan, np.float32)
        self.scr = np.zeros((self.rows, self.cols), np.float32)
        self.ifd = np.zeros((self.rows, self.cols), np.float32)


def _pad_input(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``divisor`` the way the network itself does."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x


def _block_roles(model: SegmentationModel) -> dict[str, str]:
    roles = BlockRoles.for_unet(model.config.depth)
    out = {name: "encoder student" for name in roles.encoder}
    out.update({name: "decoder student" for name in roles.decoder})
    out[roles.teacher] = "teacher"
    return out


def _window_index(core: torch.Tensor, window: int, centered: bool) -> tuple[np.ndarray, np.ndarray]:
    """Index per non-overlapping window of (C, h, w) features; also each window's pixel count."""
    c, h, w = core.shape
    ph, pw = (-h) % window, (-w) % window
    valid = torch.ones((1, h, w), dtype=torch.float64)
    x = F.pad(core, (0, pw, 0, ph))
    valid = F.pad(valid, (0, pw, 0, ph))
    nr, nc = x.shape[1] // window, x.shape[2] // window

    def windows(t: torch.Tensor) -> torch.Tensor:
        k = t.shape[0]
        return t.reshape(k, nr, window, nc, window).permute(1, 3, 0, 2, 4).reshape(nr * nc, k, window * window)

    values = windows(x)
    counts = windows(valid)[:, 0].sum(dim=1)
    index = torch.empty(nr * nc, dtype=torch.float64)
    chunk = max(1, 2**24 // max(1, c * window * window))
    for start in range(0, nr * nc, chunk):
        v = values[start : start + chunk].to(torch.float64)
        gram = v @ v.transpose(1, 2)
        _, idx, _ = _similarity_and_index(gram, v.sum(dim=2), counts[start : start + chunk], centered)
        index[start : start + chunk] = idx
    return index.reshape(nr, nc).numpy().astype(np.float32), counts.reshape(nr, nc).numpy()


def block_features(model: SegmentationModel, image, device: str = "auto") -> dict[str, np.ndarray]:
    """Every block's output for a (small) image or crop, as float32 (C, ceil(H/s), ceil(W/s)) arrays
    named E1..E(depth+1), D(depth)..D1 (D1: the final features). For scripts and inspection;
    the maps above never hold all of them for a large image."""
    image = as_channels_last(image)
    check_finite(image)
    h, w = image.shape[:2]
    dev = resolve_device(device)
    x = normalize(np.asarray(image), model.info.normalization)
    x = _pad_input(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None].to(dev), model.config.divisor)
    with evaluating(network_on(model.network, dev)) as network, torch.no_grad():
        _, blocks = network.forward_blocks(x)
    out = {}
    for name, value in blocks.items():
        s = x.shape[-2] // value.shape[-2]
        out[name] = value[0, :, : -(-h // s), : -(-w // s)].float().cpu().numpy()
    return out


def compute_redundancy(
    model: SegmentationModel,
    image,
    config: RedundancyConfig | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> Generator[RedundancyProgress, None, RedundancyReport]:
    """Yield progress per tile and pass; return the ``RedundancyReport``.

    ``region`` (top, left, bottom, right) restricts the work to that part of the image (the
    part in view). The network still sees the surroundings, so the region's redundancy and
    SCR maps equal the same pixels of the whole image's maps; the index, the similarity
    matrix, the IFD ranking and the principal components count the region's pixels only,
    or, on a block where the region holds too few pixels, the few around it
    (``statistics_box``).
    """
    with evaluating(model.network):
        return (yield from _compute_redundancy(model, image, config, region))


def _compute_redundancy(
    model: SegmentationModel,
    image,
    config: RedundancyConfig | None,
    region: tuple[int, int, int, int] | None,
) -> Generator[RedundancyProgress, None, RedundancyReport]:
    config = settings_of(config, RedundancyConfig, "config")
    start_time = time.perf_counter()
    image = as_channels_last(image)
    every_pixel_checked = check_finite(image)
    h, w = image.shape[:2]
    region = check_region(region, (h, w))
    top, left, bottom, right = region
    norm = model.info.normalization
    value_range = intensity_range(image, norm)  # whole image: a region is scaled as the whole
    device = resolve_device(config.device)
    network = network_on(model.network, device)
    divisor = model.config.divisor
    window = config.window
    align = window * divisor
    halo = config.halo if config.halo is not None else receptive_radius(model.config.depth)
    halo = _round_up(max(0, halo), divisor)
    # the computed area: the region widened to the alignment grid, plus one grid step on each
    # side, so its windows are whole and its edge pixels have both neighbours to interpolate from
    grid = (
        max(0, top // align * align - align),
        max(0, left // align * align - align),
        min(h, _round_up(bottom, align) + align),
        min(w, _round_up(right, align) + align),
    )
    core = _choose_core(model, grid, (h, w), config, align, halo)
    tiles = plan_tiles(grid, (h, w), core, halo)
    centered = config.similarity == "pearson"
    roles = _block_roles(model)
    teacher = BlockRoles.for_unet(model.config.depth).teacher

    minimum = math.ceil(_MIN_WINDOW_SHARE * window * window)
    states: dict[str, _BlockState] = {}
    cached: list[dict[str, torch.Tensor]] | None = [] if len(tiles) == 1 else None
    passes = 2 if (len(tiles) > 1) else 1
    total = len(tiles) * passes

    def features_of(tile: Tile) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        wt, wl, wb, wr = tile.window
        pixels = np.asarray(image[wt:wb, wl:wr])
        if not every_pixel_checked:  # a lazy image was checked on a subsample only
            check_finite_pixels(pixels)
        x = normalize(pixels, norm, value_range)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None].to(device)
        x = _pad_input(x, divisor)
        with torch.no_grad():
            _, blocks = network.forward_blocks(x)
        features = {k: v[0].float().cpu() for k, v in blocks.items()}
        strides = {k: x.shape[-2] // v.shape[-2] for k, v in features.items()}
        return features, strides

    def core_slice(tile: Tile, stride: int) -> tuple[slice, slice, int, int]:
        (ct, cl, cb, cr), (wt, wl, _, _) = tile.core, tile.window
        rows = slice((ct - wt) // stride, -(-(cb - wt) // stride))
        cols = slice((cl - wl) // stride, -(-(cr - wl) // stride))
        return rows, cols, (ct - grid[0]) // stride, (cl - grid[1]) // stride

    # pass 1: channel moments, window indices, SCR maps
    for number, tile in enumerate(tiles):
        features, strides = features_of(tile)
        pooled_teacher = features[teacher]
        for name, f in features.items():
            s = strides[name]
            if name not in states:
                rows = -(-grid[2] // s) - grid[0] // s
                cols = -(-grid[3] // s) - grid[1] // s
                states[name] = _BlockState(name, s, f.shape[0], rows, cols, window)
            state = states[name]
            rs, cs, r0, c0 = core_slice(tile, s)
            teacher_mean = F.avg_pool2d(pooled_teacher[None], s)[0].mean(dim=0) if s > 1 else pooled_teacher.mean(0)
            scr = ((f - teacher_mean) ** 2).mean(dim=0)[rs, cs]
            state.scr[r0 : r0 + scr.shape[0], c0 : c0 + scr.shape[1]] = scr.numpy()
            part = f[:, rs, cs]
            # the region's pixels only for the whole-region statistics (widened on a coarse block)
            gr0, gc0 = grid[0] // s + r0, grid[1] // s + c0
            bt, bl, bb, br = statistics_box(region, grid, s, minimum)
            ra, rb = max(0, bt - gr0), min(part.shape[1], bb - gr0)
            ca, cb = max(0, bl - gc0), min(part.shape[2], br - gc0)
            if rb > ra and cb > ca:
                g, sm, n = _moments(part[:, ra:rb, ca:cb].reshape(part.shape[0], -1))
                state.gram += g
                state.sums += sm
                state.count += n
            index, counts = _window_index(part, window, centered)
            wr0, wc0 = r0 // window, c0 // window
            state.redundancy[wr0 : wr0 + index.shape[0], wc0 : wc0 + index.shape[1]] = np.where(
                counts >= _MIN_WINDOW_SHARE * window * window, index, np.nan
            )
        if cached is not None:
            cached.append(features)
        # let this tile's maps go before the next tile's forward pass allocates its own
        features = pooled_teacher = f = part = scr = None
        if cached is None:
            trim_freed_memory()  # the next tile's maps would come on top of this one's freed ones
        yield RedundancyProgress("features", number + 1, total)

    # whole-region statistics: similarity, IFD ranking, principal components
    results: dict[str, tuple[np.ndarray, float, np.ndarray]] = {}
    for name, state in states.items():
        sim, index, live = similarity_from_moments(
            state.gram.numpy(), state.sums.numpy(), state.count, config.similarity
        )
        results[name] = (sim, index, live)
        n = max(state.count, 1)
        norms = state.gram.diagonal().clamp(min=0).sqrt().clamp(min=1e-12)
        scores = (state.sums / norms / n).numpy()
        order = np.argsort(-scores, kind="stable")
        half = state.channels // 2
        state.top = torch.from_numpy(order[:half].copy())
        state.bottom = torch.from_numpy(order[half : 2 * half].copy())
        mean = state.sums / n
        covariance = state.gram / n - mean[:, None] * mean[None, :]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        k = min(3, state.channels)
        basis = eigenvectors[:, -k:].flip(1).T  # (k, C), largest first
        signs = torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True)))
        basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
        state.mean = mean.float()
        state.basis = basis.float()
        state.spread = eigenvalues.flip(0)[:k].clamp(min=1e-12).sqrt().float()

    # pass 2: IFD maps and feature renderings (which need the whole-region ranking and basis)
    for number, tile in enumerate(tiles):
        if cached is not None:
            features = cached[number]
        else:
            features, _ = features_of(tile)
        for name, f in features.items():
            state = states[name]
            rs, cs, r0, c0 = core_slice(tile, state.stride)
            part = f[:, rs, cs]
            if state.top is not None and len(state.top):
                ifd = ((part[state.top] - part[state.bottom]) ** 2).mean(dim=0)
                state.ifd[r0 : r0 + ifd.shape[0], c0 : c0 + ifd.shape[1]] = ifd.numpy()
            if config.render_features:
                if state.rgb is None:
                    state.rgb = np.zeros((state.rows, state.cols, 3), np.uint8)
                centred = part - state.mean[:, None, None]
                projection = torch.einsum("kc,chw->hwk", state.basis, centred) / (4 * state.spread)
                rgb = ((projection + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                state.rgb[r0 : r0 + rgb.shape[0], c0 : c0 + rgb.shape[1], : rgb.shape[2]] = rgb
        features = f = part = centred = projection = None
        if passes == 2:
            trim_freed_memory()
            yield RedundancyProgress("maps", len(tiles) + number + 1, total)
    cached = None

    blocks = []
    for name, state in states.items():
        sim, index, live = results[name]
        s = state.stride
        region_rows = slice(top // s - grid[0] // s, -(-bottom // s) - grid[0] // s)
        region_cols = slice(left // s - grid[1] // s, -(-right // s) - grid[1] // s)
        redundancy = _fill_nan(state.redundancy, index)
        blocks.append(
            BlockRedundancy(
                name=name,
                stride=s,
                channels=state.channels,
                role=roles.get(name, "not regularised"),
                redundancy_index=index,
                similarity=sim.astype(np.float32),
                dead_channels=int((~live).sum()),
                scr_mean=float(state.scr[region_rows, region_cols].mean()),
                ifd_mean=float(state.ifd[region_rows, region_cols].mean()),
                ifd_pairs=np.stack([state.top.numpy(), state.bottom.numpy()], axis=1).astype(np.int64),
                redundancy_grid=redundancy,
                scr_grid=state.scr,
                ifd_grid=state.ifd,
                features_rgb=state.rgb,
            )
        )
    settings = {
        "similarity": config.similarity,
        "window": window,
        "halo": halo,
        "tile_core": core,
        "device": str(device),
    }
    return RedundancyReport(
        blocks=blocks,
        image_shape=(h, w),
        region=region,
        grid_origin=(grid[0], grid[1]),
        similarity=config.similarity,
        window=window,
        tiles=len(tiles),
        seconds=time.perf_counter() - start_time,
        settings=settings,
    )


def statistics_box(
    region: tuple[int, int, int, int], grid: tuple[int, int, int, int], stride: int, minimum: int
) -> tuple[int, int, int, int]:
    """The block pixels (top, left, bottom, right) whose features make a block's index and
    similarity matrix: those the region touches, widened a pixel a side at a time within
    the computed ``grid`` until they are ``minimum`` (as many as a window needs for a value
    of its own). A region of one or two pixels of a coarse block (the bottleneck when zoomed
    in) would otherwise read as fully redundant: channels of one pixel are all parallel."""
    s = stride
    top, left, bottom, right = region[0] // s, region[1] // s, -(-region[2] // s), -(-region[3] // s)
    g_top, g_left, g_bottom, g_right = grid[0] // s, grid[1] // s, -(-grid[2] // s), -(-grid[3] // s)
    while (bottom - top) * (right - left) < minimum and (top, left, bottom, right) != (g_top, g_left, g_bottom,
                                                                                       g_right):
        top, left = max(g_top, top - 1), max(g_left, left - 1)
        bottom, right = min(g_bottom, bottom + 1), min(g_right, right + 1)
    return top, left, bottom, right


def _fill_nan(values: np.ndarray, whole: float) -> np.ndarray:
    """Windows too sparse to score (edges) take the nearest scored window's value; where no
    window is scored (a coarse block of a small image), the region's own index ``whole``:
    0 would read as "orthogonal channels"."""
    values = values.copy()
    missing = np.isnan(values)
    if not missing.any():
        return values
    if missing.all():
        return np.full_like(values, whole)
    from scipy import ndimage

    _, (rows, cols) = ndimage.distance_transform_edt(missing, return_indices=True)
    return values[rows, cols]


def check_region(region, image_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Validate (top, left, bottom, right) against the image; None means the whole image."""
    h, w = image_shape
    if region is None:
        return 0, 0, h, w
    try:
        top, left, bottom, right = (int(v) for v in region)
    except (TypeError, ValueError):
        raise InputError("a region is four whole numbers: top, left, bottom, right") from None
    top, left = max(0, top), max(0, left)
    bottom, right = min(h, bottom), min(w, right)
    if bottom - top < 1 or right - left < 1:
        raise InputError(f"the region {tuple(region)} does not overlap the {h}x{w} image")
    return top, left, bottom, right


def redundancy_report(
    model: SegmentationModel,
    image,
    config: RedundancyConfig | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> RedundancyReport:
    """Run ``compute_redundancy`` to completion."""
    return drain(compute_redundancy(model, image, config, region))
