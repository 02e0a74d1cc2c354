import pytest
import torch

from napari_selfreg.core.config import ModelConfig
from napari_selfreg.core.unet import SelfRegUNet, count_parameters


def test_paper_width_has_about_17m_parameters():
    assert 16.5e6 < count_parameters(SelfRegUNet(ModelConfig(base_channels=64))) < 18e6


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_block_names_shapes_and_odd_sizes(depth):
    net = SelfRegUNet(ModelConfig(base_channels=4, depth=depth, num_classes=3)).eval()
    x = torch.randn(1, 3, 37, 29)
    logits, blocks = net.forward_blocks(x)
    assert logits.shape == (1, 3, 37, 29)
    assert list(blocks) == [f"E{i}" for i in range(1, depth + 2)] + [f"D{i}" for i in range(depth, 0, -1)]
    assert blocks["D1"].shape[-2:] == (37, 29)
    assert blocks["E1"].shape[1] == 4 and blocks[f"E{depth + 1}"].shape[1] == 4 * 2 ** (depth - 1)
    with torch.no_grad():
        assert torch.allclose(net(x), logits, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError):
        ModelConfig(num_classes=1)
    with pytest.raises(ValueError):
        ModelConfig(depth=0)
