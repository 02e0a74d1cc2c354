"""bfloat16 CPU inference with ReLU and the decoder's skip join fused into the convolutions.

After BatchNorm folding, a 1000 x 1000 CPU prediction at 2 threads still spent about
13 ms in separate ReLU passes and 14 ms concatenating skips with up-sampled features
(torch.profiler, BENCHMARKS.md speed section). oneDNN applies a ReLU, and the sum of
two convolutions, inside the convolution itself. Splitting a decoder block's first
convolution by its input channels, conv(cat(skip, up)) = conv_skip(skip) + conv_up(up),
so the concatenation disappears: the skip's half is added to the up-sampled half's output
inside oneDNN, with the bias and the ReLU.

The op is ``torch.ops.mkldnn._convolution_pointwise``, which torch.compile's CPU backend
emits; it is private, so ``fuse_for_cpu`` checks it against the unfused blocks on a small
input and leaves the network as it is when the op is missing, fails or disagrees.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .unet import DoubleConv, SelfRegUNet, UpBlock

CHECK_TOLERANCE = 0.02  # of the largest logit: bfloat16 rounds the split sum once more


# padding, stride, dilation, groups of every 3x3 convolution in the UNet's blocks
_GEOMETRY = ([1, 1], [1, 1], [1, 1], 1)


def _pointwise():
    return torch.ops.mkldnn._convolution_pointwise


def _convs(block: DoubleConv) -> tuple[nn.Conv2d, nn.Conv2d]:
    first, second = (m for m in block if isinstance(m, nn.Conv2d))
    return first, second


def _conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _pointwise()(x, weight, bias, *_GEOMETRY, "relu", [], "")


class FusedDoubleConv(nn.Module):
    """A BatchNorm-folded ``DoubleConv``: two 3x3 convolutions, each with its ReLU inside."""

    def __init__(self, block: DoubleConv) -> None:
        super().__init__()
        self.first, self.second = _convs(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.first.weight.dtype)  # the network's input arrives in float32
        x = _conv_relu(x, self.first.weight, self.first.bias)
        return _conv_relu(x, self.second.weight, self.second.bias)


class FusedUpBlock(nn.Module):
    """A BatchNorm-folded ``UpBlock`` whose first convolution is split at the skip's channels."""

    def __init__(self, block: UpBlock, skip_channels: int) -> None:
        super().__init__()
        first, self.second = _convs(block.conv)
        weight = first.weight.detach()
        layout = torch.channels_last
        self.skip_weight = nn.Parameter(weight[:, :skip_channels].contiguous(memory_format=layout), False)
        self.up_weight = nn.Parameter(weight[:, skip_channels:].contiguous(memory_format=layout), False)
        self.bias = first.bias

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        from_skip = _pointwise()(skip, self.skip_weight, None, *_GEOMETRY, "none", [], "")
        joined = _pointwise().binary(x, from_skip, self.up_weight, self.bias, *_GEOMETRY, "add", None, "relu", [], "")
        return _conv_relu(joined, self.second.weight, self.second.bias)


def fuse_for_cpu(network: nn.Module) -> nn.Module:
    """A bfloat16 copy of a BatchNorm-folded, channels-last ``SelfRegUNet`` with fused blocks.

    Any other network, or one whose fused copy fails the check, comes back unchanged.
    """
    if not isinstance(network, SelfRegUNet) or not _blocks_folded(network):
        return network
    fused = copy.deepcopy(network).to(torch.bfloat16)
    skips = network.config.encoder_channels[-2::-1]
    fused.encoder = nn.ModuleList(FusedDoubleConv(block) for block in fused.encoder)
    fused.decoder = nn.ModuleList(FusedUpBlock(b, skip) for b, skip in zip(fused.decoder, skips, strict=True))
    side = network.config.divisor * 2
    own = torch.Generator().manual_seed(0)  # the user's global generator is theirs
    x = torch.rand(1, network.config.in_channels, side, side, generator=own)
    x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            with torch.autocast("cpu", dtype=torch.bfloat16):  # what prediction runs without fusion
                expected = network(x).float()
            got = fused(x).float()
    except (RuntimeError, AttributeError, TypeError):
        return network
    if (got - expected).abs().max() > CHECK_TOLERANCE * expected.abs().max().clamp_min(1.0):
        return network
    return fused


def _blocks_folded(network: SelfRegUNet) -> bool:
    """Every block is a 3x3 conv with the folded bias, Identity, ReLU, twice."""
    blocks = [*network.encoder, *(up.conv for up in network.decoder)]
    for block in blocks:
        if [type(m) for m in block] != [nn.Conv2d, nn.Identity, nn.ReLU] * 2:
            return False
        for conv in _convs(block):
            plain = conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            if conv.bias is None or not plain or conv.dilation != (1, 1) or conv.groups != 1:
                return False
    return True


def is_fused(network: nn.Module) -> bool:
    """True when ``fuse_for_cpu`` swapped the blocks."""
    return any(isinstance(m, FusedUpBlock) for m in network.modules())
