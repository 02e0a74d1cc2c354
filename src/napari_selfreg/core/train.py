"""Training as a generator: one ``TrainReport`` per step, the result as the return value.

``train(...)`` is what the widget runs in a thread worker and the CLI drains with a
progress bar; ``train_to_end(...)`` drains it for scripts and tests. A stop request is
checked before every step; the best and the last weights are kept either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .allocator import freed_memory_kept
from .config import ModelConfig, ModelInfo, Normalization, TrainConfig, settings_of
from .data import (
    BatchPrefetcher,
    InputError,
    PatchSampler,
    PatchSet,
    as_channels_last,
    check_finite,
    check_painted,
    intensity_range,
    normalization_for,
    normalize,
    split_strokes_jointly,
)
from .device import autocast, autocast_dtype, resolve_device
from .losses import LossTerms, selfreg_total
from .model import SegmentationModel
from .progress import StopRequest, drain, stop_requested
from .regions import PaintedCrop, painted_crops
from .selfreg import BlockRoles

VALIDATION_WINDOW = 768


@dataclass
class TrainReport:
    """What one training step did."""

    step: int
    total_steps: int
    ce: float
    dice: float
    scr: float
    ifd: float
    loss: float
    learning_rate: float
    seconds_per_step: float
    elapsed: float
    eta_seconds: float
    val_dice: float | None = None
    best_val_dice: float | None = None
    stopped: bool = False
    # the model being trained (live, not a copy): previews clone it between steps
    model: SegmentationModel | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


@dataclass
class TrainResult:
    best: SegmentationModel
    last: SegmentationModel
    history: list[TrainReport] = field(default_factory=list)
    stopped: bool = False
    keep: str = "last"

    @property
    def model(self) -> SegmentationModel:
        """The weights the run hands over (``TrainConfig.keep``): what widgets and the CLI use."""
        return self.best if self.keep == "best" else self.last

    @property
    def steps(self) -> int:
        return self.history[-1].step if self.history else 0


def default_class_names(num_classes: int) -> list[str]:
    if num_classes == 2:
        return ["background", "foreground"]
    return ["background", *[f"class {i}" for i in range(2, num_classes + 1)]]


def _new_model(info: ModelInfo, seed: int | None) -> SegmentationModel:
    """Initial weights drawn from ``seed`` without moving the caller's global torch generator."""
    if seed is None:
        return SegmentationModel.create(info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SegmentationModel.create(info)


@dataclass
class _ValidationCrop:
    image: torch.Tensor  # 1, C, h, w
    labels: np.ndarray  # h, w painting ids, 0 = not held out


def _validation_crops(images: Sequence[np.ndarray], val_labels: Sequence[np.ndarray]) -> list[_ValidationCrop]:
    """Windows (at most VALIDATION_WINDOW wide) around the held-out strokes."""
    crops = []
    for image, labels in zip(images, val_labels, strict=True):
        coords = np.argwhere(labels > 0)
        if len(coords) == 0:
            continue
        h, w = labels.shape
        y0, x0 = np.maximum(coords.min(0) - 32, 0)
        y1, x1 = np.minimum(coords.max(0) + 33, (h, w))
        for top in range(y0, y1, VALIDATION_WINDOW):
            for left in range(x0, x1, VALIDATION_WINDOW):
                bottom, right = min(top + VALIDATION_WINDOW, y1), min(left + VALIDATION_WINDOW, x1)
                lbl = labels[top:bottom, left:right]
                if not (lbl > 0).any():
                    continue
                tile = np.ascontiguousarray(np.moveaxis(image[top:bottom, left:right], -1, 0))
                crops.append(_ValidationCrop(torch.from_numpy(tile)[None], lbl))
    return crops


def painted_dice(predicted: np.ndarray, painted: np.ndarray) -> float:
    """Mean Dice over the classes painted in ``painted`` (only painted pixels count)."""
    scores = []
    mask = painted > 0
    for cls in np.unique(painted[mask]):
        p = (predicted == cls) & mask
        g = painted == cls
        denom = p.sum() + g.sum()
        scores.append(2.0 * (p & g).sum() / denom if denom else 1.0)
    return float(np.mean(scores)) if scores else float("nan")


def _validate(network, crops, device, dtype, memory_format) -> float | None:
    if not crops:
        return None
    network.eval()
    predicted, painted = [], []
    with torch.no_grad(), autocast(device, dtype):
        for crop in crops:
            x = crop.image.to(device).contiguous(memory_format=memory_format)
            labels = network(x).argmax(1)[0].cpu().numpy() + 1
            predicted.append(labels[crop.labels > 0])
            painted.append(crop.labels[crop.labels > 0])
    network.train()
    return painted_dice(np.concatenate(predicted), np.concatenate(painted))


def _learning_rate(config: TrainConfig, step: int, elapsed: float) -> float:
    """Short warm-up, then cosine decay to a tenth over the step or time budget.

    A time budget can run out during the warm-up (a slow machine, a budget of a second or
    two); the warm-up then follows the decay down, so the last steps still take small ones.
    """
    warmup = min(10, max(1, config.steps // 20))
    progress = step / config.steps
    if config.time_budget:
        progress = max(progress, elapsed / config.time_budget)
    progress = min(progress, 1.0)
    low = config.learning_rate * 0.1
    decayed = low + 0.5 * (config.learning_rate - low) * (1 + math.cos(math.pi * progress))
    if step < warmup:
        ramp = config.learning_rate * (step + 1) / warmup
        return min(ramp, decayed) if config.time_budget else ramp
    return decayed


def _adamw(network: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it: the same update in one kernel instead of
    about ten small ones per parameter (on a 2-core CPU 48 -> 10 ms per step)."""
    params = list(network.parameters())
    try:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def step_losses(network, x, y, roles: BlockRoles | None, device, dtype, generator, **weights) -> LossTerms:
    """One step's forward pass and losses under autocast; the blocks are read only when
    SelfReg regularises (``roles``). Shared with the paper-protocol loop."""
    with autocast(device, dtype):
        if roles is not None:
            logits, blocks = network.forward_blocks(x)
        else:
            logits, blocks = network(x), None
        return selfreg_total(logits, y, blocks, roles, generator=generator, **weights)


def apply_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> None:
    """Backward and optimiser step, through the gradient scaler when training in float16."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def training_margin(patch_size: int) -> int:
    """Context kept around the paint: a patch centred (with jitter) on a painted pixel reaches
    at most 5/6 of a patch away, validation windows 33 pixels."""
    return max(patch_size, 64)


def prepare_training_data(
    images: Sequence[np.ndarray],
    crops: Sequence[PaintedCrop],
    info: ModelInfo,
    validation_fraction: float,
    rng: np.random.Generator,
) -> tuple[PatchSet, list[np.ndarray], list[np.ndarray]]:
    """Normalise the painted windows with their whole image's range and hold out whole strokes.

    The strokes of all images are held out in one draw, as if they lay on one image: a class
    painted once on each of several images still has strokes to hold out.
    Returns (train set, val images, val labels), one entry per window.
    """
    normalized, windows = [], []
    for source, image in enumerate(images):
        mine = [c for c in crops if c.source == source]
        if not mine:
            continue
        value_range = intensity_range(image, info.normalization)
        normalized += [normalize(c.image, info.normalization, value_range) for c in mine]
        windows += [c.labels for c in mine]
    train_labels, val_labels = split_strokes_jointly(windows, validation_fraction, rng)
    return PatchSet(normalized, train_labels), normalized, val_labels


def painted_normalization(images: Sequence[np.ndarray], crops: Sequence[PaintedCrop]) -> Normalization:
    """The normalisation (and input channels) of a new model: the first painted image's.

    An unpainted image trains nothing, so it does not decide. Painted images that differ
    (gray and RGB, 8-bit and 16-bit) still train together: each is matched to the model's
    channels and scaled by its own range, as in prediction (``data.normalize``).
    """
    first = min(crop.source for crop in crops)
    return normalization_for(images[first])


def _pair_lists(images, labels) -> tuple[list, list]:
    """The image and labels lists; one bare array would be split into its rows and refused with
    a misleading shape message, so it is named here instead."""
    for given, name in ((images, "images"), (labels, "labels")):
        shape = getattr(given, "shape", None)
        if shape is None or str(getattr(given, "dtype", "")) == "object":  # a list, or an object array of images
            continue
        one_image = name == "images" and len(shape) == 3 and not hasattr(labels, "shape") and shape[0] != len(labels)
        if len(shape) <= 2 or one_image:
            raise InputError(f"{name} is one array; images and labels are lists: pass [image], [labels] for one pair")
    return list(images), list(labels)


def _names_given(class_names) -> list[str] | None:
    """``class_names`` as a list of strings; a string would be split into letters, and anything
    else would save a model file that does not load again."""
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise InputError(
            f"class_names is a list of names such as ['background', 'nuclei'], not one string ({class_names!r})")
    names = list(class_names)
    if not all(isinstance(name, str) for name in names):
        raise InputError(f"class names must be strings, not {names!r}")
    return [str(name) for name in names] or None


def train(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    class_names: Sequence[str] | None = None,
    initial: SegmentationModel | None = None,
    stop: StopRequest = None,
) -> Generator[TrainReport, None, TrainResult]:
    """Fine-tune a SelfReg UNet on painted strokes (0 = unpainted, 1 = background, 2.. = structures).

    ``initial`` continues training from a loaded model (its classes and normalisation are kept;
    ``class_names``, when given, rename them, so a class renamed between rounds stays renamed).
    Raises ``InputError`` before the first step for anything the user must fix.
    """
    config = settings_of(config, TrainConfig, "config")
    model_config = settings_of(model_config, ModelConfig, "model_config")
    if initial is not None and not isinstance(initial, SegmentationModel):
        raise TypeError(f"initial must be a model (load_model(path) reads one), not {type(initial).__name__}")
    images, labels = _pair_lists(images, labels)
    class_names = _names_given(class_names)
    if not images:
        raise InputError("no image given; choose at least one image with painted labels")
    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} label images; give one labels per image")

    rng = np.random.default_rng(config.seed)
    for image in images:
        check_finite(as_channels_last(image))
    painted = painted_crops(images, labels, training_margin(config.patch_size))
    checked = [crop.labels for crop in painted]
    if initial is not None:
        model = initial.clone()
        num_classes = check_painted(checked, model.config.num_classes)
        info = model.info
        if class_names:
            given = list(class_names)[:num_classes]
            info.class_names = given + list(info.class_names)[len(given):]
    else:
        num_classes = check_painted(checked)
        norm = painted_normalization(images, painted)
        mc = ModelConfig(**{**(model_config or ModelConfig()).to_dict(), "num_classes": num_classes})
        mc.in_channels = norm.channels
        names = list(class_names) if class_names else default_class_names(num_classes)
        if len(names) < num_classes:
            names += default_class_names(num_classes)[len(names):]
        info = ModelInfo(model=mc, class_names=names[:num_classes], normalization=norm)
        model = _new_model(info, config.seed)
    info.training = {**config.to_dict(), "images": len(images)}
    divisor = model.config.divisor
    if config.batch_size * (-(-config.patch_size // divisor)) ** 2 < 2:
        raise InputError(
            f"one patch of {config.patch_size} px per step leaves a single value per channel at the network's "
            f"deepest level, too few for BatchNorm; use a batch size of 2 or more, or patches of {2 * divisor} px"
        )

    train_set, val_images, val_labels = prepare_training_data(
        images, painted, info, config.validation_fraction, rng
    )
    if all(not (t > 0).any() for t in train_set.labels):
        raise InputError("nothing is painted; paint background (label 1) and at least one structure (label 2)")
    sampler = PatchSampler(train_set, config.patch_size, rng, augment=config.augment)
    crops = _validation_crops(val_images, val_labels)

    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    network = model.network.to(device).to(memory_format=memory_format)
    network.train()
    optimizer = _adamw(network, config)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    roles = BlockRoles.for_unet(model.config.depth) if config.selfreg else None
    generator = torch.Generator()  # SCR's channel pairings: seeded with the run, else drawn anew
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()

    history: list[TrainReport] = []
    best_state = model.clone()
    best_score = -math.inf
    best_val: float | None = None
    start = time.perf_counter()
    stopped = False
    step = 0
    with freed_memory_kept(), BatchPrefetcher(sampler, config.batch_size) as batches:
        while step < config.steps:
            elapsed = time.perf_counter() - start
            if stop_requested(stop):
                stopped = True
                break
            if config.time_budget and step and elapsed >= config.time_budget:
                break  # a budget shorter than one step still trains that step
            step_start = time.perf_counter()
            lr = _learning_rate(config, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_np, y_np = batches.batch()
            x = torch.from_numpy(x_np).to(device).contiguous(memory_format=memory_format)
            y = torch.from_numpy(y_np).to(device)
            optimizer.zero_grad(set_to_none=True)
            terms = step_losses(
                network, x, y, roles, device, dtype, generator,
                ce_weight=config.ce_weight, dice_weight=config.dice_weight,
                lambda_scr=config.lambda_scr, lambda_ifd=config.lambda_ifd, scr_pairing=config.scr_pairing,
            )
            if not torch.isfinite(terms.total):
                raise InputError(
                    "training diverged (the loss became NaN/inf); lower the learning rate or check the image"
                )
            apply_step(terms.total, optimizer, scaler)
            step += 1

            loss = float(terms.total.detach())
            val = None
            if crops and (step % config.validation_every == 0 or step == config.steps):
                val = _validate(network, crops, device, dtype, memory_format)
            if val is not None:
                if val > best_score:
                    best_score, best_val = val, val
                    best_state = model.clone()

            now = time.perf_counter()
            elapsed = now - start
            per_step = now - step_start
            remaining = (config.steps - step) * (elapsed / step)
            if config.time_budget:
                remaining = min(remaining, max(0.0, config.time_budget - elapsed))
            report = TrainReport(
                step=step, total_steps=config.steps,
                ce=float(terms.ce.detach()), dice=float(terms.dice.detach()),
                scr=float(terms.scr.detach()), ifd=float(terms.ifd.detach()), loss=loss,
                learning_rate=lr, seconds_per_step=per_step, elapsed=elapsed, eta_seconds=remaining,
                val_dice=val, best_val_dice=best_val, model=model,
            )
            history.append(report)
            yield report

    # a stopped run returns at once (a validation takes seconds on a slow CPU); its best
    # weights are chosen among the validations made so far
    if crops and not stopped and (not history or history[-1].val_dice is None) and step > 0:
        val = _validate(network, crops, device, dtype, memory_format)
        if val is not None and val > best_score:
            best_score, best_val = val, val
            best_state = model.clone()
        if history:
            history[-1].val_dice = val
            history[-1].best_val_dice = best_val
    if history:
        history[-1].stopped = stopped
    network.eval()
    network.to(memory_format=torch.contiguous_format)
    last = model.clone()
    if best_val is None:  # no held-out strokes, or stopped before the first validation
        best_state = last
    record = history_records(model.info.history, history)
    last.info.history = record
    best_state.info.history = record
    last.network.eval()
    best_state.network.eval()
    return TrainResult(best=best_state, last=last, history=history, stopped=stopped, keep=config.keep)


def history_records(earlier: list[dict], reports: list[TrainReport]) -> list[dict]:
    """A model file's history: the rounds before this one (a continued model), then this
    round's reports, each record saying its round."""
    this_round = 1 + max((int(r.get("round", 1)) for r in earlier), default=0)
    return list(earlier) + [{**r.to_dict(), "round": this_round} for r in reports]


def train_to_end(*args, **kwargs) -> TrainResult:
    """Run ``train`` to completion and return its result."""
    return drain(train(*args, **kwargs))
