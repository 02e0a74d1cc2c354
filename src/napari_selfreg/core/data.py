"""Image normalisation, input checks, stroke hold-out and sparse-label patch sampling.

Every user mistake raises ``InputError`` with a one-line message that says what to do;
the CLI and the widgets show that message instead of a traceback.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import Normalization


class InputError(ValueError):
    """A problem with the user's images, labels or settings (not a bug)."""


# ----------------------------------------------------------------------------- images


def _viewable(image):
    """numpy and dask arrays as they are; other lazy arrays (zarr) wrapped in dask when it is
    installed, because numpy functions and slices read such arrays whole."""
    if isinstance(image, np.ndarray) or hasattr(image, "__array_function__"):
        return image
    try:
        import dask.array as da
    except ImportError:
        return image
    return da.from_array(image, chunks=getattr(image, "chunks", "auto"))


def check_plane_shape(shape: tuple[int, ...]) -> None:
    """Refuse an empty image or a two-channel one, whose shape would otherwise read as a stack."""
    if len(shape) in (2, 3) and 0 in shape:
        raise InputError(f"the image is empty (shape {shape}); choose an image with pixels")
    channels_last_two = shape[-1] == 2 and not (shape[0] in (1, 3, 4) and min(shape[1:]) > 4)
    channels_first_two = shape[0] == 2 and shape[-1] not in (1, 3, 4) and min(shape[1:]) > 4
    if len(shape) == 3 and (channels_last_two or channels_first_two):
        raise InputError(
            f"the image has 2 channels (shape {shape}); gray, RGB or RGBA images are read: "
            "keep one channel, or add a third"
        )


def as_channels_last(image: np.ndarray) -> np.ndarray:
    """View an image as (H, W, C): gray gains a channel axis, RGBA loses its alpha.

    Channel-first images (C, H, W) with C in 1..4 and larger H, W are moved last.
    A 3-D stack is refused: predict its slices one by one. Lazy images stay lazy.
    """
    image = np.asarray(image) if not hasattr(image, "shape") else image
    check_plane_shape(tuple(int(s) for s in image.shape))
    if image.ndim == 2:
        return _viewable(image)[..., None]  # zarr arrays take no None index: through dask
    if image.ndim == 3:
        if image.shape[-1] in (1, 3, 4):
            c = image.shape[-1]
        elif image.shape[0] in (1, 3, 4) and min(image.shape[1:]) > 4:
            image = np.moveaxis(_viewable(image), 0, -1)
            c = image.shape[-1]
        else:
            raise InputError(
                f"image of shape {tuple(image.shape)} looks like a 3-D stack; "
                "select one 2-D slice (or an RGB image) and try again"
            )
        if c == 4:
            image = _viewable(image)[..., :3]
        return image
    raise InputError(
        f"image has {image.ndim} dimensions {tuple(image.shape)}; a 2-D gray or RGB(A) image is needed "
        "(split stacks and time series into 2-D slices)"
    )


def normalization_for(image: np.ndarray) -> Normalization:
    """The normalisation a model trained on this image should use."""
    image = as_channels_last(image)
    mode = "uint8" if image.dtype == np.uint8 else "percentile"
    return Normalization(mode=mode, channels=int(image.shape[-1]))


RANGE_SAMPLE_PIXELS = 2_000_000  # intensity ranges and finiteness are judged on this many pixels


def sample_step(height: int, width: int, max_pixels: int = RANGE_SAMPLE_PIXELS) -> int:
    """The stride of the strided subsample with at most about ``max_pixels`` pixels."""
    return max(1, int(np.ceil(np.sqrt(height * width / max_pixels))))


def _sample_for_percentiles(image: np.ndarray) -> np.ndarray:
    step = sample_step(*image.shape[:2])
    return np.asarray(image[::step, ::step])


def match_channels(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """Gray for an RGB model is repeated, RGB for a gray model is averaged; else an error."""
    c = image.shape[-1]
    if c == norm.channels:
        return image
    if norm.channels == 3 and c == 1:
        return np.repeat(np.asarray(image), 3, axis=-1)
    if norm.channels == 1 and c == 3:
        return np.asarray(image, np.float32).mean(axis=-1, keepdims=True)
    raise InputError(f"the model expects {norm.channels} channel(s) but the image has {c}")


WHITE_LEVEL_OUTLIERS = 1e-5  # share of a sample's values a white level may ignore: hot or cold pixels


def _white_level(sample: np.ndarray) -> float | None:
    """What full white is in an image that is not 8-bit, so that an 8-bit model sees the same
    picture: the bit depth its values fill (8, 10, 12, 14 or 16 bits) for integers, 1 or 255
    for floats in [0, 1] or [0, 255]; None where no such level fits (percentiles then).

    A few outlying pixels (a hot pixel, a resampling overshoot to 1.0001) do not decide it:
    one such pixel used to darken the whole picture by the next level up.
    """
    values = sample.reshape(-1)
    if not values.size:
        return None
    skip = int(values.size * WHITE_LEVEL_OUTLIERS)
    low, high = (float(v) for v in np.partition(values, (skip, values.size - 1 - skip))[[skip, -1 - skip]])
    if np.issubdtype(values.dtype, np.integer):
        if low < 0:
            return None
        return next((2.0**bits - 1 for bits in (8, 10, 12, 14, 16) if high <= 2**bits - 1), None)
    slack = 0.005  # floats: a little under- or overshoot from resampling or colour conversion
    return next((level for level in (1.0, 255.0) if -slack * level <= low and high <= (1 + slack) * level), None)


def intensity_range(image: np.ndarray, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) used to scale an image; computed on a subsample of big images."""
    image = as_channels_last(image)
    if image.dtype == np.uint8 and norm.mode == "uint8":
        return _eight_bit_range(norm)
    return sample_range(_sample_for_percentiles(image), norm)


def _eight_bit_range(norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(norm.channels, np.float32), np.full(norm.channels, 255.0, np.float32)


def sample_range(raw: np.ndarray, norm: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """``intensity_range`` from its channels-last subsample (``sample_step``), which a tiled
    reader takes itself."""
    c = norm.channels
    if raw.dtype == np.uint8 and norm.mode == "uint8":
        return _eight_bit_range(norm)
    if norm.mode == "uint8":
        # an 8-bit model given a 16-bit, 12-bit or float image: the same picture in its units
        # (dividing such an image by 255 would saturate the network's input)
        white = _white_level(raw)
        if white is not None:
            return np.zeros(c, np.float32), np.full(c, white, np.float32)
    sample = match_channels(raw, norm).astype(np.float32).reshape(-1, c)
    low = np.percentile(sample, norm.low_percentile, axis=0).astype(np.float32)
    high = np.percentile(sample, norm.high_percentile, axis=0).astype(np.float32)
    high = np.where(high - low < 1e-6, low + 1.0, high)
    return low, high


def check_finite(image: np.ndarray) -> bool:
    """NaN/inf in an image in memory, or in the subsample a lazy one (dask, zarr, memory map)
    is scaled by: reading a lazy image whole only to check it would defeat the laziness, so
    its tiles are checked as they are read (``check_finite_pixels``). True when every pixel
    was checked (or the image holds no floats), so that its tiles need no check."""
    if not np.issubdtype(np.asarray(image[:1, :1]).dtype, np.floating):
        return True
    in_memory = type(image) is np.ndarray and image.size <= 50_000_000
    check_finite_pixels(image if in_memory else _sample_for_percentiles(image))
    return in_memory


def check_finite_pixels(pixels: np.ndarray) -> None:
    """NaN/inf in pixels already read (a tile of a lazy image, or a sample of one)."""
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise InputError("the image contains NaN or infinite values; replace them (e.g. with 0) and try again")


def normalize(
    image: np.ndarray,
    norm: Normalization,
    value_range: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """(H, W, C) float32 in about [0, 1], the network's input, for a whole image or a tile.

    Tiles of a large image must pass the whole image's ``value_range`` so that every tile
    is scaled alike.
    """
    image = as_channels_last(image)
    if value_range is None:
        value_range = intensity_range(image, norm)
    low, high = value_range
    scaled_by_percentiles = norm.mode == "percentile" or image.dtype != np.uint8
    image = match_channels(image, norm)
    out = (np.asarray(image, np.float32) - low) / (high - low)
    if scaled_by_percentiles:  # (or by a white level, where the clip changes nothing)
        np.clip(out, -0.5, 1.5, out=out)
    return out


# ----------------------------------------------------------------------------- labels


WHOLE_NUMBERS = "labels must be whole numbers (0 = not painted, 1 = background, 2.. = structures)"


def check_pair(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Validate one painted image; return the labels as int64 (H, W)."""
    image = as_channels_last(image)
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != image.shape[:2]:
        raise InputError(
            f"labels have shape {labels.shape} but the image is {image.shape[:2]}; "
            "paint on a labels layer created for this image"
        )
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise InputError(WHOLE_NUMBERS)
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise InputError(
            f"labels hold the id {int(labels.max())}; ids run 0 = not painted, 1 = background, 2.. = structures")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise InputError("labels must not be negative (0 = not painted, 1 = background, 2.. = structures)")
    check_finite(image)
    return labels


MAX_CLASSES = 64  # predictions are written with 8-bit ids; a class table longer than this is a mistake


def painted_ids(labels_list: list[np.ndarray], rows: int = 512) -> set[int]:
    """The ids (above 0) painted in any of the arrays, a band of rows at a time: np.unique
    would sort a slide's labels whole. An id above ``MAX_CLASSES`` is refused here, before
    ``np.bincount`` would allocate a count for every id below it (gigabytes for a
    hash-like instance id)."""
    found: set[int] = set()
    for labels in labels_list:
        labels = np.asarray(labels)
        for top in range(0, labels.shape[0], rows):
            band = labels[top : top + rows].ravel()
            if not band.size:
                continue
            if band.dtype.kind == "f" and not (np.all(np.isfinite(band)) and np.all(band == np.round(band))):
                raise InputError(WHOLE_NUMBERS)
            if band.dtype.kind not in "iu":  # bool, or float ids read from a float file
                band = band.astype(np.int64)
            if band.min() < 0:
                raise InputError(f"labels hold the negative id {int(band.min())}; ids run 0 = not painted, 1, 2, ...")
            if band.max() > MAX_CLASSES:
                raise InputError(
                    f"label {int(band.max())} is painted, but ids run 1 = background, 2, 3, ... = structures, at "
                    f"most {MAX_CLASSES}; if this is a mask or an instance image, map it to 1 and 2 first"
                )
            found.update(int(i) for i in np.flatnonzero(np.bincount(band[band > 0])))
    return found


def check_painted(labels_list: list[np.ndarray], num_classes: int | None = None) -> int:
    """Check that background and at least one structure are painted; return the class count."""
    present = painted_ids(labels_list)
    # a round of corrections often paints one class only; training on it alone would teach
    # the model that class everywhere, so it is refused, and the message says what works
    again = ("; to correct a model, paint over its prediction used as labels, which holds every class"
             if num_classes is not None else "")
    if not present:
        raise InputError("nothing is painted; paint background (label 1) and at least one structure (label 2)")
    if 1 not in present:
        raise InputError(f"no background is painted; paint some background with label 1{again}")
    if len(present) < 2:
        raise InputError(f"only background is painted; paint at least one structure with label 2{again}")
    highest = max(present)
    unused = highest - len(present)
    if num_classes is None and unused > highest // 2:  # a new model gets a class per id
        raise InputError(
            f"labels hold ids up to {highest} but only {len(present)} of them are painted; ids run "
            "1 = background, 2, 3, ... = structures without gaps (a 0/255 mask: use 1 and 2)"
        )
    if num_classes is not None and highest > num_classes:
        raise InputError(
            f"label {highest} is painted but the model knows only {num_classes} classes (1..{num_classes}); "
            "train a new model or use fewer classes"
        )
    return highest if num_classes is None else num_classes


# Held-out strokes never take more than this share of a class's painted pixels: a corrected
# prediction used as labels has one connected background of most of the image, and holding
# it out would leave training almost no background
MAX_HELD_SHARE = 0.5


def split_strokes(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole connected strokes (per class) for validation.

    Returns (train, validation) label images. A class with a single stroke keeps it in
    training, so holding out never removes a class altogether; the largest drawn strokes go
    back to training while the held-out ones cover more than ``MAX_HELD_SHARE`` of the class.
    """
    (train,), (val,) = split_strokes_jointly([labels], fraction, rng)
    return train, val


def split_strokes_jointly(
    labels_list: list[np.ndarray], fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``split_strokes`` over several label images (the windows of one or more images) as if they were one."""
    trains = [lbl.copy() for lbl in labels_list]
    vals = [np.zeros_like(lbl) for lbl in labels_list]
    if fraction <= 0:
        return trains, vals
    classes = np.unique(np.concatenate([np.unique(lbl) for lbl in labels_list]))
    for cls in classes:
        if cls == 0:
            continue
        numbered, n = [], 0
        for lbl in labels_list:
            components, count = ndimage.label(lbl == cls, structure=np.ones((3, 3)))
            components[components > 0] += n
            numbered.append(components)
            n += count
        if n < 2:
            continue
        count = max(1, int(round(n * fraction)))
        count = min(count, n - 1)
        held = rng.choice(np.arange(1, n + 1), size=count, replace=False)
        sizes = sum(np.bincount(components.ravel(), minlength=n + 1) for components in numbered)
        held = _within_share(held, sizes, MAX_HELD_SHARE)
        for components, train, val in zip(numbered, trains, vals, strict=True):
            mask = np.isin(components, held)
            val[mask] = cls
            train[mask] = 0
    return trains, vals


def _within_share(held: np.ndarray, sizes: np.ndarray, share: float) -> np.ndarray:
    """``held`` without its largest components until they cover at most ``share`` of the pixels."""
    limit = share * sizes[1:].sum()
    kept = list(held[np.argsort(sizes[held], kind="stable")])  # smallest first
    while kept and sizes[kept].sum() > limit:
        kept.pop()
    return np.asarray(kept, dtype=held.dtype)


# ----------------------------------------------------------------------------- sampling


@dataclass
class PatchSet:
    """Normalised images with their sparse labels, ready to be sampled from."""

    images: list[np.ndarray]  # (H, W, C) float32
    labels: list[np.ndarray]  # (H, W) int64, 0 = not painted

    def painted_coordinates(self) -> list[np.ndarray]:
        return [np.argwhere(lbl > 0) for lbl in self.labels]


def pad_to(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad an image smaller than a patch with unpainted labels: reflected where the image is
    wider than the padding, its edge repeated otherwise (numpy cannot reflect further)."""
    h, w = labels.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if not (ph or pw):
        return image, labels
    mode = "reflect" if ph < h and pw < w else "edge"
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)
    labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=0)
    return image, labels


class PatchSampler:
    """Draws training patches centred near painted pixels, balanced across classes.

    Augmentation: flips, rot90, small rotations (±20°), and an H&E-minded colour jitter
    (brightness, contrast, per-channel gain, a little gamma). Returns numpy batches
    (B, C, P, P) float32 and (B, P, P) int64.
    """

    def __init__(
        self, patches: PatchSet, patch_size: int, rng: np.random.Generator, augment: bool = True
    ) -> None:
        self.size = patch_size
        self.rng = rng
        self.augment = augment
        self.images = []
        self.labels = []
        for image, labels in zip(patches.images, patches.labels, strict=True):
            image, labels = pad_to(image, labels, patch_size)
            self.images.append(image)
            self.labels.append(labels)
        # index painted pixels by class so that rare classes are drawn as often as common ones
        self.by_class: dict[int, list[tuple[int, np.ndarray]]] = {}
        for index, labels in enumerate(self.labels):
            for cls in np.unique(labels):
                if cls == 0:
                    continue
                self.by_class.setdefault(int(cls), []).append((index, np.argwhere(labels == cls)))
        if not self.by_class:
            raise InputError("nothing is painted; paint background (label 1) and at least one structure")
        self.classes = sorted(self.by_class)

    def _centre(self) -> tuple[int, int, int]:
        cls = self.classes[self.rng.integers(len(self.classes))]
        entries = self.by_class[cls]
        weights = np.array([len(c) for _, c in entries], np.float64)
        index, coords = entries[self.rng.choice(len(entries), p=weights / weights.sum())]
        y, x = coords[self.rng.integers(len(coords))]
        return index, int(y), int(x)

    def _crop(self, index: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.images[index], self.labels[index]
        h, w = labels.shape
        s = self.size
        jitter = self.rng.integers(-s // 3, s // 3 + 1, size=2)
        top = int(np.clip(y - s // 2 + jitter[0], 0, h - s))
        left = int(np.clip(x - s // 2 + jitter[1], 0, w - s))
        return image[top : top + s, left : left + s], labels[top : top + s, left : left + s]

    def _augment(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.3:
            angle = float(rng.uniform(-20, 20))
            image = ndimage.rotate(image, angle, axes=(0, 1), reshape=False, order=1, mode="reflect")
            labels = ndimage.rotate(labels, angle, axes=(0, 1), reshape=False, order=0, mode="constant", cval=0)
        image = np.ascontiguousarray(image, np.float32)
        c = image.shape[-1]
        gain = rng.uniform(0.9, 1.1, size=c).astype(np.float32) if c == 3 else np.float32(1.0)
        contrast = np.float32(rng.uniform(0.8, 1.2))
        brightness = np.float32(rng.uniform(-0.08, 0.08))
        mean = image.mean(axis=(0, 1), keepdims=True)
        image = (image - mean) * contrast + mean
        image = image * gain + brightness
        if rng.random() < 0.3:
            gamma = np.float32(rng.uniform(0.8, 1.25))
            image = np.clip(image, 0, None) ** gamma
        return image, np.ascontiguousarray(labels)

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for _ in range(batch_size):
            image, lbl = self._crop(*self._centre())
            if self.augment:
                image, lbl = self._augment(image, lbl)
            images.append(np.moveaxis(image, -1, 0))
            labels.append(lbl)
        return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64)


class BatchPrefetcher:
    """Draws the next batch in a background thread while the current step trains.

    Cropping and augmenting a batch takes about a tenth of a CPU training step, and numpy
    releases the GIL for most of it, so it overlaps the step instead of preceding it. One
    worker draws the batches in order from the sampler's generator: a seeded run gives the
    same batches as drawing them in the loop.
    """

    def __init__(self, sampler: PatchSampler, batch_size: int) -> None:
        self._sampler = sampler
        self._batch_size = batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-selfreg-batches")
        self._next = self._pool.submit(sampler.batch, batch_size)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        batch = self._next.result()
        self._next = self._pool.submit(self._sampler.batch, self._batch_size)
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
