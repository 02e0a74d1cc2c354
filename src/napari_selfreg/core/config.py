"""Settings as dataclasses that round-trip through JSON (model files, CLI, widgets)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# annotation (a string under ``from __future__ import annotations``) -> the plain type it holds
_PLAIN_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def settings_of(value: T | None, kind: type[T], name: str) -> T:
    """``value``, or ``kind``'s defaults for None; a dict or another object is refused in one
    line instead of failing deep inside on an attribute it lacks."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__} (or None for the defaults), not {type(value).__name__}")
    return value


def check_field_types(settings, error: type[Exception] = ValueError) -> None:
    """Refuse wrong types and turn numpy numbers into Python ones, in place.

    Why: a numpy int64 seed or width passed the range checks and then failed at the first
    step or in ``json.dumps`` at save time, after the training was done; a string "False"
    switched a feature on; 2.5 steps ran 3. Whole floats (16.0, as JSON may hold) become ints.
    """
    for spec in dataclasses.fields(settings):
        parts = [part.strip() for part in str(spec.type).split("|")]
        optional = "None" in parts
        kinds = [part for part in parts if part != "None"]
        if len(kinds) != 1 or kinds[0] not in _PLAIN_TYPES:
            continue
        kind, value = kinds[0], getattr(settings, spec.name)
        if value is None and optional:
            continue
        setattr(settings, spec.name, _plain(spec.name, kind, value, optional, error))


def _plain(name: str, kind: str, value, optional: bool, error: type[Exception]):
    alternative = " or None" if optional else ""
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise error(f"{name} must be True or False{alternative}, not {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise error(f"{name} must be a string{alternative}, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number{alternative}, not {value!r}")
    if kind == "float":
        return float(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise error(f"{name} must be a whole number{alternative}, not {value!r}")


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build from a dict, ignoring unknown keys so older/newer files still load."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_json(Path(path).read_text())  # type: ignore[attr-defined]


# beyond these the network outgrows any machine (depth 12 at width 16: 32768 channels)
MAX_DEPTH = 8
MAX_BASE_CHANNELS = 512


@dataclass
class ModelConfig(_JsonMixin):
    """The SelfReg UNet's architecture.

    Channels follow METHOD.md's 64-128-256-512-512 pattern scaled by ``base_channels``:
    encoder ``base * 2**min(i, depth - 1)``; ``depth`` is the number of down-samplings
    (4 in the paper). ``base_channels=16`` keeps interactive CPU training useful within
    a minute (see BENCHMARKS.md); 64 is the paper's full width.
    """

    in_channels: int = 3
    num_classes: int = 2
    base_channels: int = 16
    depth: int = 4

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth must be 1 to {MAX_DEPTH} (the paper's network has 4)")
        if not 2 <= self.base_channels <= MAX_BASE_CHANNELS:
            raise ValueError(f"width (base channels) must be 2 to {MAX_BASE_CHANNELS} (the paper's network has 64)")
        if self.num_classes < 2:
            raise ValueError("a model needs at least 2 classes (background and one structure)")

    @property
    def encoder_channels(self) -> list[int]:
        """Output channels of E1..E(depth+1)."""
        widths = [self.base_channels * 2**i for i in range(self.depth)]
        return [*widths, widths[-1]]

    @property
    def decoder_channels(self) -> list[int]:
        """Output channels of D(depth)..D1 (deepest first)."""
        widths = [self.base_channels * 2**i for i in range(self.depth)]
        return [*widths[: self.depth - 1][::-1], widths[0]]

    @property
    def divisor(self) -> int:
        """Input sides must be a multiple of this (the network pads otherwise)."""
        return 2**self.depth


@dataclass
class TrainConfig(_JsonMixin):
    """Training settings; the defaults work on a 2-core CPU laptop."""

    steps: int = 300
    time_budget: float | None = None  # seconds (None or 0: no limit); training stops at whichever comes first
    patch_size: int = 128
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    ce_weight: float = 0.4
    dice_weight: float = 0.6
    selfreg: bool = True
    lambda_scr: float = 0.015
    lambda_ifd: float = 0.015
    scr_pairing: str = "random"  # "random" (the paper) or "mean" (lower variance)
    validation_fraction: float = 0.2  # share of connected strokes held out
    validation_every: int = 25
    # which weights the run hands over: "last" (default) or "best" held-out stroke Dice.
    # Held-out strokes lie deep inside objects and far into the background, so their
    # Dice saturates early and picks under-trained weights (BENCHMARKS.md, "Training defaults").
    keep: str = "last"
    augment: bool = True
    device: str = "auto"
    precision: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    # initial weights, sampling, held-out strokes and SelfReg's pairing; torch's global generator is left alone
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.patch_size < 16:
            raise ValueError("patch size must be at least 16 pixels")
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError("learning rate must be above 0")
        if self.validation_every < 1:
            raise ValueError("validation_every must be at least 1 step")
        if self.time_budget is not None and not 0 <= self.time_budget < math.inf:
            raise ValueError("time budget must be a finite number of seconds, 0 or more")
        if not all(0 <= weight < math.inf for weight in (self.lambda_scr, self.lambda_ifd)):
            raise ValueError("the SCR and IFD weights must be finite numbers, 0 or more")
        if not all(0 <= weight < math.inf for weight in (self.ce_weight, self.dice_weight)):
            raise ValueError("the CE and Dice loss weights must be finite numbers, 0 or more")
        if not (self.ce_weight > 0 or self.dice_weight > 0):
            raise ValueError("the CE or the Dice loss weight must be above 0, or nothing is learnt from the strokes")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError("weight decay must be a finite number, 0 or more")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("seed must be a whole number from 0 to 2**64 - 1, or None for a different run each time")
        if self.scr_pairing not in ("random", "mean"):
            raise ValueError("scr_pairing must be 'random' or 'mean'")
        if self.keep not in ("last", "best"):
            raise ValueError("keep must be 'last' or 'best'")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")


@dataclass
class PredictConfig(_JsonMixin):
    """Tiled inference settings."""

    tile_size: int = 1024  # a 1000 x 1000 image is one forward pass; tiles shrink to fit smaller images
    overlap: float = 0.25  # fraction of the tile shared with each neighbour
    batch_size: int = 2
    device: str = "auto"
    precision: str = "auto"  # "auto" -> bfloat16 on CPUs with fast bf16; on CUDA bfloat16, or float16 without it
    # average over the four horizontal/vertical flips of every tile: 4x the time, about
    # +1 Dice after a minute of training from strokes (BENCHMARKS.md)
    flips: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.tile_size < 16:
            raise ValueError("tile size must be at least 16 pixels")
        if not 0.0 <= self.overlap <= 0.5:
            raise ValueError("overlap must be from 0 to 0.5 (half a tile: each pixel then lies in two tiles a side)")
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1 tile")


@dataclass
class Normalization(_JsonMixin):
    """How raw pixels become network input; stored with the model so prediction matches.

    ``mode``: "uint8" divides 8-bit images by 255; "percentile" maps the image's own low/high
    percentiles to 0/1 (16-bit, float). Per image, the same in training and prediction; an
    image that is not 8-bit is scaled to 8-bit units where its pixel values show its white
    level (``data.intensity_range``), else by its percentiles.
    """

    mode: str = "uint8"
    low_percentile: float = 0.5
    high_percentile: float = 99.8
    channels: int = 3

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclass
class ModelInfo(_JsonMixin):
    """Everything a model file records beside its weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    class_names: list[str] = field(default_factory=lambda: ["background", "foreground"])
    normalization: Normalization = field(default_factory=Normalization)
    training: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    package_version: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            model=ModelConfig.from_dict(data.get("model", {})),
            class_names=list(data.get("class_names", ["background", "foreground"])),
            normalization=Normalization.from_dict(data.get("normalization", {})),
            training=dict(data.get("training", {})),
            history=list(data.get("history", [])),
            package_version=str(data.get("package_version", "")),
        )

    @property
    def label_ids(self) -> list[int]:
        """Painting ids of the classes: 1 = background, 2.. = structures."""
        return list(range(1, len(self.class_names) + 1))
