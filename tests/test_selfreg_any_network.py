"""The regulariser attaches to any network that exposes block outputs, not only ours."""

import torch
from torch import nn

from napari_selfreg.core.config import ModelConfig
from napari_selfreg.core.losses import selfreg_total
from napari_selfreg.core.selfreg import BlockRoles, BlockTap
from napari_selfreg.core.unet import SelfRegUNet


class TinyEncoderDecoder(nn.Module):
    """A different small network: strided convs down, transposed convs up, additive skips."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.GELU())
        self.down2 = nn.Sequential(nn.Conv2d(12, 20, 3, stride=2, padding=1), nn.GELU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(20, 12, 2, stride=2), nn.GELU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(12, 8, 2, stride=2), nn.GELU())
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        s = self.stem(x)
        d1 = self.down1(s)
        d2 = self.down2(d1)
        u1 = self.up1(d2) + d1
        u2 = self.up2(u1) + s
        return self.out(u2)


def test_blocktap_feeds_selfreg_on_a_foreign_network_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    net = TinyEncoderDecoder()
    roles = BlockRoles(encoder=("down1", "down2"), decoder=("up1",), teacher="up2")
    x = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 4, (2, 16, 16))
    with BlockTap(net, [*roles.students, roles.teacher]) as tap:
        logits = net(x)
        blocks = dict(tap.outputs)
    assert blocks["down2"].shape == (2, 20, 4, 4) and blocks["up2"].shape == (2, 8, 16, 16)
    terms = selfreg_total(logits, labels, blocks, roles, lambda_scr=1.0, lambda_ifd=1.0, ce_weight=0, dice_weight=0)
    assert terms.scr.item() > 0 and terms.ifd.item() > 0
    terms.total.backward()
    assert net.down1[0].weight.grad.abs().sum() > 0
    # the hooks are gone after the block: a second pass records nothing new
    tap.outputs.clear()
    net(x)
    assert tap.outputs == {}


def test_blocktap_on_our_unet_matches_forward_blocks():
    torch.manual_seed(0)
    net = SelfRegUNet(ModelConfig(base_channels=4, depth=2)).eval()
    x = torch.randn(1, 3, 16, 16)
    _, blocks = net.forward_blocks(x)
    with BlockTap(net, ["encoder.1", "decoder.1"]) as tap:
        net(x)
    assert torch.allclose(tap.outputs["encoder.1"], blocks["E2"])
    assert torch.allclose(tap.outputs["decoder.1"], blocks["D1"])


def test_blocktap_rejects_unknown_names():
    import pytest

    with pytest.raises(KeyError, match="nope"):
        BlockTap(TinyEncoderDecoder(), ["nope"])
