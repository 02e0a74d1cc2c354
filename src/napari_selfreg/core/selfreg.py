"""SelfReg's two label-free regularisers (METHOD.md §1): SCR and IFD.

They read block outputs by name, so they attach to any network: our UNet hands its
blocks over directly (``forward_blocks``); any other ``nn.Module`` can be tapped with
``BlockTap``, which records the named sub-modules' outputs through forward hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


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
    """(B, C, h, w) as float32 (B*h*w, C): a free view of channels-last maps after the cast."""
    return feature.float().permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def _full_precision(device: torch.device):
    """Autocast off (the channel differences stay float32); a no-op where torch has no autocast."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _pairings(cs: int, ct: int, pairing: str, generator: torch.Generator | None):
    """SCR's (student, teacher) channel pairs: k = min(Cs, Ct) random distinct channels of each,
    redrawn every call; for "mean" every student channel against column 0 (the channel mean)."""
    if pairing == "mean":
        return torch.arange(cs), torch.zeros(cs, dtype=torch.long)
    if pairing != "random":
        raise ValueError(f"unknown SCR pairing {pairing!r}; use 'random' or 'mean'")
    k = min(cs, ct)
    return torch.randperm(cs, generator=generator)[:k], torch.randperm(ct, generator=generator)[:k]


def _scr_pooled(
    student: torch.Tensor,
    pooled: torch.Tensor,
    pairing: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """SCR of one student against the teacher already pooled to its size (the definition)."""
    if pairing == "mean":
        pooled = pooled.mean(dim=1, keepdim=True)
    s_idx, t_idx = _pairings(student.shape[1], pooled.shape[1], pairing, generator)
    with _full_precision(student.device):
        s_idx, t_idx = s_idx.to(student.device), t_idx.to(student.device)
        return F.mse_loss(student.float()[:, s_idx], pooled.float()[:, t_idx])


def channel_scores(feature: torch.Tensor) -> torch.Tensor:
    """Per-channel score: the mean of its L2-normalised spatial maps over batch and space.

    Computed as (sum of the map) / max(its L2 norm, 1e-12), which is ``F.normalize``
    followed by the mean, without materialising the normalised copy.
    """
    b, _, h, w = feature.shape
    per_sample = _rows(feature.detach()).reshape(b, h * w, -1)
    return _scores(per_sample.sum(dim=1), per_sample.square().sum(dim=1), h * w)


def _scores(sums: torch.Tensor, squares: torch.Tensor, pixels: int) -> torch.Tensor:
    """Channel scores from each (sample, channel) map's sum and sum of squares."""
    return (sums / squares.sqrt().clamp_min(1e-12)).mean(dim=0) / pixels


def ifd_term(feature: torch.Tensor) -> torch.Tensor:
    """Internal feature distillation: the top-scored half of the channels teaches the bottom half."""
    half = feature.shape[1] // 2
    if half == 0:
        return feature.new_zeros((), dtype=torch.float32)
    order = torch.argsort(channel_scores(feature), descending=True).to(feature.device)
    with _full_precision(feature.device):
        f = feature.float()
        return F.mse_loss(f[:, order[:half]], f[:, order[half : 2 * half]])


@dataclass
class _StudentTerms:
    """One student's SCR and IFD values and the channel pairs their gradients are made of."""

    scr: float
    ifd: float
    channels: int
    top: np.ndarray  # IFD: the top-ranked half of the channels, paired rank by rank with
    bottom: np.ndarray  # the bottom half
    s_idx: np.ndarray  # SCR: student channel s_idx[j] against teacher column t_idx[j]
    t_idx: np.ndarray
    ifd_scale: float  # d IFD / d top = ifd_scale * (top - bottom)
    scr_scale: float

    def fill_weights(self, own: np.ndarray, cross: np.ndarray, d_scr: float, d_ifd: float) -> None:
        """Writes the zeroed (C, C) ``own`` and (Ct, C) ``cross`` so that
        d (d_scr * SCR + d_ifd * IFD) / d rows = rows @ own + target @ cross."""
        a, v = d_ifd * self.ifd_scale, d_scr * self.scr_scale
        own[self.top, self.top] = a
        own[self.bottom, self.bottom] = a
        own[self.top, self.bottom] = -a
        own[self.bottom, self.top] = -a
        own[self.s_idx, self.s_idx] += v
        cross[self.t_idx, self.s_idx] = -v


def _student_terms(squares: np.ndarray, sums: np.ndarray, total: np.ndarray, columns: _Columns, pixels: int,
                   s_idx: np.ndarray, t_idx: np.ndarray, target_squares: np.ndarray) -> _StudentTerms:
    """SCR and IFD of one student from ``total = rows^T operand`` (C, width), whose columns
    ``columns`` names, and each sample's channel sums of squares and sums (B, C), which rank
    the channels (``channel_scores``).

    Every term is a sum of squared channel differences, ``|a - b|^2 = G_aa + G_bb - 2 G_ab``.
    Channels whose scores tie to float32 rounding may rank in another order than
    ``channel_scores`` gives; either order is the definition's.
    """
    b, c = squares.shape
    n = b * pixels
    scores = (sums / np.maximum(np.sqrt(np.maximum(squares, 0.0)), 1e-12)).mean(axis=0) / pixels
    own = total[:, columns.own : columns.own + c]
    diagonal = np.diagonal(own)
    half = c // 2
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:half], order[half : 2 * half]
    ifd = (diagonal[top].sum() + diagonal[bottom].sum() - 2.0 * own[top, bottom].sum()) / (n * half) if half else 0.0
    k = len(s_idx)
    cross = total[s_idx, columns.target + t_idx].sum()
    scr = (diagonal[s_idx].sum() + target_squares[t_idx].sum() - 2.0 * cross) / (n * k)
    return _StudentTerms(
        scr=max(scr, 0.0), ifd=max(ifd, 0.0), channels=c, top=top, bottom=bottom,
        s_idx=s_idx, t_idx=t_idx, ifd_scale=2.0 / (n * half) if half else 0.0, scr_scale=2.0 / (n * k),
    )


class _Columns(NamedTuple):
    """Where a student's own channels, the pooled teacher and the ones column sit in the
    operand columns its Gram product multiplies."""

    own: int
    target: int
    ones: int


def _summaries(products: torch.Tensor, columns: _Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample channel sums of squares and sums, and the batch total, on the host (a
    free view on the CPU; one small copy from a GPU)."""
    host = products.cpu().numpy()
    c = host.shape[1]
    squares = np.diagonal(host[:, :, columns.own : columns.own + c], axis1=1, axis2=2)
    return squares, host[:, :, columns.ones], host.sum(axis=0, dtype=np.float64)


def _gram_products(students: Sequence[torch.Tensor], target: torch.Tensor) -> list[tuple[torch.Tensor, _Columns]]:
    """Each student's per-sample ``rows^T operand`` for students of one size, which share
    the pooled teacher: two of them share one float32 operand ``[A | target | 1 | B]``, A
    multiplying its first C_A + Ct + 1 columns and B its last Ct + 1 + C_B, so the teacher
    is copied once for both."""
    out = []
    for pair in (students[i : i + 2] for i in range(0, len(students), 2)):
        b, _, h, w = pair[0].shape
        n, ct = b * h * w, target.shape[1]
        widths = [s.shape[1] for s in pair]
        operand = torch.empty(n, sum(widths) + ct + 1, dtype=torch.float32, device=target.device)
        starts = [0, widths[0] + ct + 1]
        for student, start, c in zip(pair, starts, widths, strict=False):
            operand[:, start : start + c].view(b, h, w, c).copy_(student.permute(0, 2, 3, 1))  # any layout, one pass
        operand[:, widths[0] : widths[0] + ct].copy_(target)
        operand[:, widths[0] + ct] = 1.0
        per_sample = operand.view(b, h * w, -1)
        first = _Columns(own=0, target=widths[0], ones=widths[0] + ct)
        rows = per_sample[:, :, : widths[0]].transpose(1, 2)
        out.append((torch.bmm(rows, per_sample[:, :, : widths[0] + ct + 1]), first))
        if len(pair) == 2:
            rows = per_sample[:, :, starts[1] :].transpose(1, 2)
            out.append((torch.bmm(rows, per_sample[:, :, widths[0] :]), _Columns(own=ct + 1, target=0, ones=ct)))
    return out


class _Plan(NamedTuple):
    """What ``_SelfRegTerms`` needs of the teacher and the random pairing for one student."""

    target: torch.Tensor  # the pooled teacher's float32 (pixels, Ct) rows
    target_squares: np.ndarray  # their sums of squares per column
    s_idx: np.ndarray
    t_idx: np.ndarray
    backward_target: torch.Tensor  # the rows in the backward's precision


class _SelfRegTerms(torch.autograd.Function):
    """SCR and IFD of every student in one step, valued through channel Gram matrices.

    Per student: one copy of its map into a float32 operand ``[rows | pooled teacher | 1]``
    (two students of one size share one, ``_gram_products``), one batched matmul ``rows^T
    operand`` for the values and the channel ranking, and in the backward one matmul of the
    student's own map (and the pooled teacher, once per size) with a small pairing matrix:
    the terms are quadratic, so their gradient is linear in the maps. The backward's
    matmuls run in the student's precision (bfloat16 under CPU autocast, whose gradient is
    rounded to it anyway; float16 goes through float32), the float32 operands are not kept
    for them, and all pairing matrices reach the device in one conversion
    (``_WeightLayout``). The bookkeeping on the small products (ranking, pairing, values)
    runs in numpy, after all students' matmuls are queued, so a GPU waits for the host once
    a step. Gathering the
    paired channels instead took about three times the operations, each of which starts
    a parallel region on the CPU. Values agree with ``scr_loss`` and ``ifd_loss`` (the
    definitions) to float32 rounding; the forward's arithmetic is float32 whatever
    autocast runs.
    """

    @staticmethod
    def forward(ctx, plan, *students):
        by_target: dict[int, list[int]] = {}  # students of one size share the pooled teacher
        for i, p in enumerate(plan):
            by_target.setdefault(id(p.target), []).append(i)
        products: list = [None] * len(students)
        for members in by_target.values():
            results = _gram_products([students[i] for i in members], plan[members[0]].target)
            for i, result in zip(members, results, strict=True):
                products[i] = result
        terms = [
            _student_terms(*_summaries(prod, columns), columns, s.shape[2] * s.shape[3], p.s_idx, p.t_idx,
                           p.target_squares)
            for (prod, columns), s, p in zip(products, students, plan, strict=True)
        ]
        targets: list[torch.Tensor] = []  # students of one size share their backward target
        for p in plan:
            if not any(p.backward_target is t for t in targets):
                targets.append(p.backward_target)
        ctx.groups = [next(j for j, t in enumerate(targets) if p.backward_target is t) for p in plan]
        ctx.save_for_backward(*students, *targets)
        ctx.terms = terms
        values = [[t.scr for t in terms], [t.ifd for t in terms]]
        return torch.tensor(values, dtype=torch.float32, device=students[0].device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):
        g = grad_values.detach().cpu().double().numpy()  # MPS has no float64
        saved = ctx.saved_tensors
        students, targets = saved[: len(ctx.terms)], saved[len(ctx.terms) :]
        layout = _WeightLayout(ctx.terms, ctx.groups, [t.shape[1] for t in targets])
        buffer = np.zeros(layout.size, dtype=np.float32)
        for i, terms in enumerate(ctx.terms):
            terms.fill_weights(*layout.blocks(buffer, i), g[0, i], g[1, i])
        host = torch.from_numpy(buffer)  # one conversion per backward precision, not per target size
        weights = {dtype: host.to(device=targets[0].device, dtype=dtype) for dtype in {t.dtype for t in targets}}
        grads = []
        with _full_precision(students[0].device):
            shared = [t @ layout.cross(weights[t.dtype], j) for j, t in enumerate(targets)]
            for i, student in enumerate(students):
                b, c, h, w = student.shape
                j = ctx.groups[i]
                dtype = targets[j].dtype
                rows = student.permute(0, 2, 3, 1).reshape(-1, c).to(dtype)  # a view of channels-last maps
                own, columns = layout.own(weights[dtype], i), layout.columns(i)
                grad = torch.addmm(shared[j][:, columns], rows, own)
                grads.append(grad.view(b, h, w, c).permute(0, 3, 1, 2).to(student.dtype))
        return (None, *grads)


class _WeightLayout:
    """Where the backward's pairing weights sit in one flat buffer, so that they reach the
    device in one conversion: each student's (C, C) block, then per shared target one
    (Ct, sum of its students' C) block whose columns are the students' in turn."""

    def __init__(self, terms: Sequence[_StudentTerms], groups: Sequence[int], target_channels: Sequence[int]) -> None:
        self.channels = [t.channels for t in terms]
        self.own_at = np.cumsum([0] + [c * c for c in self.channels]).tolist()
        widths = [0] * len(target_channels)
        self.first_column = []
        for c, j in zip(self.channels, groups, strict=True):
            self.first_column.append(widths[j])
            widths[j] += c
        self.groups = list(groups)
        self.widths = widths
        self.target_channels = list(target_channels)
        blocks = [ct * w for ct, w in zip(target_channels, widths, strict=True)]
        self.cross_at = np.cumsum([self.own_at[-1], *blocks]).tolist()
        self.size = self.cross_at[-1]

    def own(self, buffer, i: int):
        c = self.channels[i]
        return buffer[self.own_at[i] : self.own_at[i + 1]].reshape(c, c)

    def cross(self, buffer, j: int):
        return buffer[self.cross_at[j] : self.cross_at[j + 1]].reshape(self.target_channels[j], self.widths[j])

    def columns(self, i: int) -> slice:
        return slice(self.first_column[i], self.first_column[i] + self.channels[i])

    def blocks(self, buffer: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Student i's (C, C) block and its (Ct, C) columns of its target's block."""
        return self.own(buffer, i), self.cross(buffer, self.groups[i])[:, self.columns(i)]


def _gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The backward's matmul type: the student's own, except float16, whose range the small
    pairing weights (about 1e-8 without a gradient scaler) would underflow."""
    return torch.float32 if dtype == torch.float16 else dtype


class _PooledTeacher:
    """The detached teacher, average-pooled to each student size once per step, as float32
    (pixels, channels) rows; exact reductions are pooled from the nearest larger level."""

    def __init__(self, teacher: torch.Tensor, pairing: str) -> None:
        self.full = teacher.detach()
        self.pairing = pairing
        self.maps: dict[tuple[int, int], torch.Tensor] = {}
        self.rows: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]] = {}
        self.cast: dict[tuple[tuple[int, int], torch.dtype], torch.Tensor] = {}

    def _map(self, size: tuple[int, int]) -> torch.Tensor:
        th, tw = self.full.shape[-2:]
        levels = [*sorted(self.maps.items()), ((th, tw), self.full)]
        for (h, w), level in levels:
            exact = th % h == 0 and tw % w == 0 and h % size[0] == 0 and w % size[1] == 0
            if exact and (h, w) != size:  # the full map is pooled in its own precision, as ``scr_term`` does
                return F.avg_pool2d(level, (h // size[0], w // size[1])).float()
        return F.adaptive_avg_pool2d(self.full, size).float()

    def at(self, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
        """(rows, float64 sum of squares per column); "mean" pairing keeps only the channel mean."""
        if size not in self.rows:
            pooled = self._map(size)
            self.maps[size] = pooled
            if self.pairing == "mean":
                pooled = pooled.mean(dim=1, keepdim=True)
            rows = pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])
            squares = torch.linalg.vector_norm(rows, dim=0).square()
            self.rows[size] = (rows, squares.cpu().double().numpy())
        return self.rows[size]

    def rows_as(self, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The rows at ``size`` in ``dtype`` (the backward's), converted once per size."""
        if (size, dtype) not in self.cast:
            self.cast[size, dtype] = self.at(size)[0].to(dtype)
        return self.cast[size, dtype]


def scr_loss(
    blocks: Mapping[str, torch.Tensor],
    roles: BlockRoles,
    pairing: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SCR by its definition (``scr_term`` per student, mean over the seven)."""
    teacher = blocks[roles.teacher]
    terms = [scr_term(blocks[n], teacher, pairing, generator) for n in roles.students]
    return torch.stack(terms).mean()


def ifd_loss(blocks: Mapping[str, torch.Tensor], roles: BlockRoles) -> torch.Tensor:
    """IFD by its definition (``ifd_term`` per student)."""
    if not roles.students:
        return torch.zeros(())
    return _encoder_plus_decoder(torch.stack([ifd_term(blocks[n]) for n in roles.students]), roles)


def _encoder_plus_decoder(per_student: torch.Tensor, roles: BlockRoles) -> torch.Tensor:
    """IFD's reduction: the mean over the encoder students plus the mean over the decoder ones
    (``per_student`` in ``roles.students`` order)."""
    count = len(roles.encoder)
    parts = [part.mean() for part in (per_student[:count], per_student[count:]) if part.numel()]
    return torch.stack(parts).sum() if parts else per_student.new_zeros(())


def selfreg_losses(
    blocks: Mapping[str, torch.Tensor],
    roles: BlockRoles,
    pairing: str = "random",
    generator: torch.Generator | None = None,
    scr: bool = True,
    ifd: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(SCR, IFD) of one step as training computes them (``_SelfRegTerms``); None for a term
    not asked for. The same random draws as ``scr_loss`` and ``ifd_loss``, and their values to
    float32 rounding."""
    if not (scr or ifd):
        return None, None
    teacher = _PooledTeacher(blocks[roles.teacher], pairing)
    students = [blocks[name] for name in roles.students]
    plan = []
    for student in students:
        size = tuple(student.shape[-2:])
        target, squares = teacher.at(size)
        s_idx, t_idx = _pairings(student.shape[1], teacher.full.shape[1], pairing, generator)
        backward_target = teacher.rows_as(size, _gradient_dtype(student.dtype))
        plan.append(_Plan(target, squares, s_idx.numpy(), t_idx.numpy(), backward_target))
    with _full_precision(teacher.full.device):
        values = _SelfRegTerms.apply(plan, *students)
    scr_value = values[0].mean() if scr else None
    ifd_value = _encoder_plus_decoder(values[1], roles) if ifd else None
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
