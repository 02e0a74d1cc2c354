"""The SelfReg UNet (METHOD.md): double-conv blocks, max-pool down, bilinear up.

The network exposes its named block outputs (E1..E(depth+1), D(depth)..D1) so that the
SelfReg regulariser and the redundancy maps can read them; inference ignores them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class DoubleConv(nn.Sequential):
    """(3x3 conv without bias, BatchNorm, ReLU) twice; decoder blocks narrow through ``middle``."""

    def __init__(self, in_channels: int, out_channels: int, middle: int | None = None) -> None:
        middle = middle or out_channels
        super().__init__(
            nn.Conv2d(in_channels, middle, 3, padding=1, bias=False),
            nn.BatchNorm2d(middle),
            nn.ReLU(inplace=True),
            nn.Conv2d(middle, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient in the forward's memory layout.

    The concatenation's backward gives each input a channel slice of its gradient, which
    is strided. On the CPU in bfloat16 channels-last, bilinear backward on such a slice
    takes a generic path about three times slower than one copy plus the dense path, and
    so does adding the skip's slice to its other gradient (BENCHMARKS.md, speed section)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=ctx.layout)


def _dense_gradient(x: torch.Tensor) -> torch.Tensor:
    return _DenseGradient.apply(x) if torch.is_grad_enabled() and x.requires_grad else x


class UpBlock(nn.Module):
    """Bilinear x2 up-sampling, concatenation with the skip, double conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        joined = in_channels + skip_channels
        self.conv = DoubleConv(joined, out_channels, middle=joined // 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([_dense_gradient(skip), _dense_gradient(x)], dim=1))


class SelfRegUNet(nn.Module):
    """UNet whose blocks are named as in METHOD.md.

    ``forward(x)`` returns logits; ``forward_blocks(x)`` also returns an ordered dict of
    every block output (encoder shallow to deep, then decoder deep to shallow; "D1" is
    the final feature map that SCR uses as teacher).
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        enc = self.config.encoder_channels
        dec = self.config.decoder_channels
        depth = self.config.depth
        self.encoder = nn.ModuleList()
        previous = self.config.in_channels
        for width in enc:
            self.encoder.append(DoubleConv(previous, width))
            previous = width
        self.decoder = nn.ModuleList()
        for i in range(depth):
            skip = enc[depth - 1 - i]
            self.decoder.append(UpBlock(previous, skip, dec[i]))
            previous = dec[i]
        self.head = nn.Conv2d(previous, self.config.num_classes, 1)

    @property
    def encoder_names(self) -> list[str]:
        return [f"E{i + 1}" for i in range(len(self.encoder))]

    @property
    def decoder_names(self) -> list[str]:
        return [f"D{self.config.depth - i}" for i in range(len(self.decoder))]

    @property
    def block_names(self) -> list[str]:
        return self.encoder_names + self.decoder_names

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        d = self.config.divisor
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return x, (h, w)

    def forward_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, OrderedDict[str, torch.Tensor]]:
        x, (h, w) = self._pad(x)
        blocks: OrderedDict[str, torch.Tensor] = OrderedDict()
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            blocks[f"E{i + 1}"] = x
            skips.append(x)
        skips.pop()  # the bottleneck is no skip
        for name, block in zip(self.decoder_names, self.decoder, strict=True):
            x = block(x, skips.pop())
            blocks[name] = x
        logits = self.head(x)
        if logits.shape[-2:] != (h, w):
            logits = logits[..., :h, :w]
            blocks = OrderedDict(
                (k, v[..., : -(-h * v.shape[-2] // x.shape[-2]), : -(-w * v.shape[-1] // x.shape[-1])])
                for k, v in blocks.items()
            )
        return logits, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = self._pad(x)
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = block(x, skips.pop())
        return self.head(x)[..., :h, :w]


def build_unet(config: ModelConfig) -> SelfRegUNet:
    return SelfRegUNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
