"""SelfReg's two label-free regularisers (METHOD.md §1): SCR and IFD.

They read block outputs by name, so they attach to any network: our UNet hands its
blocks over directly (``forward_blocks``); any other ``nn.Module`` can be tapped with
``BlockTap``, which records the named sub-modules' outputs through forward hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BlockRoles:
    """Which block outputs take part: students of the encoder and decoder, and the teacher."""

    encoder: tuple[str, ...]
    decoder: tuple[str, ...]
    teacher: str

    @classmethod
    def for_unet(cls, depth: int) -> BlockRoles:
        """E2..E(depth+1) and D(depth)..D2 are students; D1 (the final features) teaches."""
        return cls(
            encoder=tuple(f"E{i}" for i in range(2, depth + 2)),
            decoder=tuple(f"D{i}" for i in range(depth, 1, -1)),
            teacher="D1",
        )

    @property
    def students(self) -> tuple[str, ...]:
        return self.encoder + self.decoder


def scr_term(
    student: torch.Tensor,
    teacher: torch.Tensor,
    pairing: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Semantic consistency of one student map with the detached, pooled teacher."""
    return _scr_pooled(student, _pool_teacher(teacher, student), pairing, generator)


def _pool_teacher(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(teacher.detach(), student.shape[-2:]).to(student.dtype)


def _rows(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) as float32 (B*h*w, C): a free view for channels-last maps (CPU training)."""
    return feature.float().permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def _full_precision(device: torch.device):
    """Autocast off (the channel differences stay float32); a no-op where torch has no autocast."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _pairing_matrix(size: int, plus: torch.Tensor, minus: torch.Tensor | None, device) -> torch.Tensor:
    """(size, k) with +1 at (plus[i], i) and -1 at (minus[i], i): ``rows @ M`` is a channel difference."""
    matrix = torch.zeros(size, len(plus), dtype=torch.float32, device=device)
    columns = torch.arange(len(plus), device=device)
    matrix[plus.to(device), columns] = 1.0
    if minus is not None:
        matrix[minus.to(device), columns] = -1.0
    return matrix


def _scr_pooled(
    student: torch.Tensor,
    pooled: torch.Tensor,
    pairing: str,
    generator: torch.Generator | None,
    student_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCR of one student against the teacher already pooled to its size.

    The paired channels are gathered with a one-hot matmul on the (pixels, channels) view
    instead of ``index_select`` on dim 1: with channels-last maps the gather and its
    backward (index_add) were strided and took most of the SelfReg time. The values are
    exactly those of ``mse_loss(student[:, s], pooled[:, t])`` in float32.
    """
    if pairing == "mean":
        return F.mse_loss(student, pooled.mean(dim=1, keepdim=True).expand_as(student))
    cs, ct = student.shape[1], pooled.shape[1]
    k = min(cs, ct)
    cpu = torch.device("cpu")
    s_idx = torch.randperm(cs, generator=generator, device=cpu)[:k]
    t_idx = torch.randperm(ct, generator=generator, device=cpu)[:k]
    with _full_precision(student.device):
        rows = student_rows if student_rows is not None else _rows(student)
        picked = rows @ _pairing_matrix(cs, s_idx, None, student.device)
        target = _rows(pooled) @ _pairing_matrix(ct, t_idx, None, student.device)
        return (picked - target).square().mean()


def channel_scores(feature: torch.Tensor) -> torch.Tensor:
    """Per-channel score: the mean of its L2-normalised spatial maps over batch and space.

    Computed as (sum of the map) / max(its L2 norm, 1e-12), which is ``F.normalize``
    followed by the mean, without materialising the normalised copy.
    """
    b, _, h, w = feature.shape
    return _scores_of_rows(_rows(feature.detach()), b, h * w)


def _scores_of_rows(rows: torch.Tensor, batch: int, pixels: int) -> torch.Tensor:
    per_sample = rows.detach().reshape(batch, pixels, -1)
    total = per_sample.sum(dim=1)
    norm = per_sample.square().sum(dim=1).sqrt()
    return (total / norm.clamp_min(1e-12)).mean(dim=0) / pixels


def ifd_term(feature: torch.Tensor) -> torch.Tensor:
    """Internal feature distillation: the top-scored half of the channels teaches the bottom half.

    ``mse_loss(feature[:, top], feature[:, bottom])`` computed as one matmul with a
    +1/-1 pairing matrix on the (pixels, channels) view (see ``_scr_pooled`` for why).
    """
    return _ifd_of_rows(feature, None)


def _ifd_of_rows(feature: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    b, c, h, w = feature.shape
    half = c // 2
    if half == 0:
        return feature.new_zeros((), dtype=torch.float32)
    with _full_precision(feature.device):
        rows = rows if rows is not None else _rows(feature)
        order = torch.argsort(_scores_of_rows(rows, b, h * w), descending=True)
        pairs = _pairing_matrix(c, order[:half], order[half : 2 * half], feature.device)
        return (rows @ pairs).square().mean()


class _RowCache(dict):
    """The float32 (pixels, channels) view of each student, shared by SCR and IFD in one step
    (one cast and one cast-back in the backward instead of two)."""

    def __init__(self, blocks: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.blocks = blocks

    def __missing__(self, name: str) -> torch.Tensor:
        rows = _rows(self.blocks[name])
        self[name] = rows
        return rows


def scr_loss(
    blocks: Mapping[str, torch.Tensor],
    roles: BlockRoles,
    pairing: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return _scr_loss(blocks, roles, pairing, generator, None)


def _scr_loss(blocks, roles: BlockRoles, pairing: str, generator, cache: _RowCache | None) -> torch.Tensor:
    teacher = blocks[roles.teacher]
    pooled: dict[tuple, torch.Tensor] = {}  # the teacher pooled once per student size and dtype
    terms = []
    for name in roles.students:
        student = blocks[name]
        key = (*student.shape[-2:], student.dtype)
        if key not in pooled:
            pooled[key] = _pool_teacher(teacher, student)
        rows = cache[name] if cache is not None and pairing != "mean" else None
        terms.append(_scr_pooled(student, pooled[key], pairing, generator, rows))
    return torch.stack([t.float() for t in terms]).mean()


def ifd_loss(blocks: Mapping[str, torch.Tensor], roles: BlockRoles) -> torch.Tensor:
    return _ifd_loss(blocks, roles, None)


def _ifd_loss(blocks, roles: BlockRoles, cache: _RowCache | None) -> torch.Tensor:
    parts = []
    for names in (roles.encoder, roles.decoder):
        if names:
            terms = [_ifd_of_rows(blocks[n], cache[n] if cache is not None else None).float() for n in names]
            parts.append(torch.stack(terms).mean())
    return torch.stack(parts).sum() if parts else torch.zeros(())


def selfreg_losses(
    blocks: Mapping[str, torch.Tensor],
    roles: BlockRoles,
    pairing: str = "random",
    generator: torch.Generator | None = None,
    scr: bool = True,
    ifd: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(SCR, IFD) of one step, sharing the students' float32 views; None for a term not asked for."""
    cache = _RowCache(blocks)
    scr_value = _scr_loss(blocks, roles, pairing, generator, cache) if scr else None
    ifd_value = _ifd_loss(blocks, roles, cache) if ifd else None
    return scr_value, ifd_value


class BlockTap:
    """Records the outputs of named sub-modules of any network during a forward pass.

    >>> with BlockTap(net, ["enc.1", "enc.2", "dec.0", "dec.1"]) as tap:
    ...     logits = net(x)
    ...     blocks = tap.outputs
    """

    def __init__(self, network: nn.Module, names: Sequence[str]) -> None:
        modules = dict(network.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"the network has no sub-module named {missing}")
        self._modules = {n: modules[n] for n in names}
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> BlockTap:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            self.outputs[name] = output

        return record

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
