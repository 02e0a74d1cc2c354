import pytest
import torch

from napari_selfreg.core.config import ModelConfig
from napari_selfreg.core.unet import SelfRegUNet, UpBlock, count_parameters


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


def _find_node(node, name: str):
    """The first autograd node whose type name starts with ``name``, depth first."""
    if node is None:
        return None
    if type(node).__name__.startswith(name):
        return node
    for child, _ in node.next_functions:
        found = _find_node(child, name)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("channels_last", [True, False])
def test_up_sampled_branch_gets_a_dense_gradient_with_the_same_values(channels_last):
    """The concatenation hands each branch a strided channel slice of its gradient; UpBlock
    passes both on dense, in the branch's own layout, and unchanged."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    block = UpBlock(6, 4, 5).to(memory_format=layout)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout).requires_grad_(True)
    skip = torch.randn(2, 4, 10, 14).contiguous(memory_format=layout)
    skip.requires_grad_(True)
    skip_grads = []
    skip.register_hook(skip_grads.append)
    out = block(x, skip)
    node = _find_node(out.grad_fn, "UpsampleBilinear2D")
    into_upsampling = []
    node.register_prehook(lambda grads: into_upsampling.append(grads[0]))
    out.square().sum().backward()
    assert into_upsampling[0].is_contiguous(memory_format=layout)
    assert skip_grads[0].is_contiguous(memory_format=layout)

    expected_x, expected_skip = x.grad.clone(), skip.grad.clone()
    x.grad = skip.grad = None
    up = torch.nn.functional.interpolate(x, size=(10, 14), mode="bilinear", align_corners=False)
    joined = torch.cat([skip, up], 1)
    block.conv(joined).square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(skip.grad, expected_skip, rtol=0, atol=0)
