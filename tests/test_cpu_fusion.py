"""Fused bfloat16 CPU inference: same outputs as the unfused network, and a safe fallback."""

from __future__ import annotations

import pytest
import torch

from napari_selfreg.core import cpu_fusion
from napari_selfreg.core.config import ModelConfig, ModelInfo, PredictConfig
from napari_selfreg.core.cpu_fusion import is_fused
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.core.predict import _FUSED_CACHE, inference_network, predict

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    info = ModelInfo(model=ModelConfig(num_classes=3, base_channels=8), class_names=["background", "a", "b"])
    model = SegmentationModel.create(info)
    torch.manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics from a few inputs, so outputs are not degenerate
        for _ in range(3):
            model.network.train()(torch.rand(2, 3, 64, 64))
    model.network.eval()
    return model


def _logits(network, x, autocast: bool) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return network(x).float()


def test_fused_network_gives_the_unfused_outputs(model):
    fused = inference_network(model.network, CPU, torch.bfloat16)
    plain = inference_network(model.network, CPU)
    assert is_fused(fused) and not is_fused(plain)
    assert not any(isinstance(m, torch.nn.ReLU) for m in fused.modules() if m is not fused.head)
    x = torch.rand(2, 3, 80, 112).contiguous(memory_format=torch.channels_last)  # not a multiple of 16: padded
    expected = _logits(plain, x, autocast=True)
    got = _logits(fused, x, autocast=True)
    assert got.shape == expected.shape == (2, 3, 80, 112)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.99
    assert all(p.dtype == torch.float32 for p in model.network.parameters())  # the stored model is untouched


@pytest.mark.parametrize("fault", ["missing", "wrong"])
def test_a_failing_or_disagreeing_op_leaves_the_network_unfused(model, monkeypatch, fault):
    real = cpu_fusion._pointwise()

    class Wrong:  # the op, but every fused convolution comes out doubled
        def __call__(self, *args):
            return real(*args) * 2

        def binary(self, *args):
            return real.binary(*args) * 2

    def missing():
        raise AttributeError("no such op")

    monkeypatch.setattr(cpu_fusion, "_pointwise", missing if fault == "missing" else Wrong)
    network = inference_network(model.network, CPU, torch.bfloat16)
    assert not is_fused(network)
    assert all(p.dtype == torch.float32 for p in network.parameters())  # the unfused float32 copy
    _FUSED_CACHE.clear()
    labels = predict(model, torch.rand(96, 96, 3).numpy(), PredictConfig(device="cpu", precision="bfloat16")).labels
    assert labels.shape == (96, 96) and set(labels.ravel()) <= {1, 2, 3}
    _FUSED_CACHE.clear()


def test_other_networks_are_left_alone():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    assert cpu_fusion.fuse_for_cpu(network) is network


def test_fusing_leaves_the_global_torch_generator_alone(model):
    """Each preview builds a fused copy; its check drew from the user's (and napari's) generator."""
    _FUSED_CACHE.clear()
    before = torch.random.get_rng_state()
    fused = inference_network(model.network, CPU, torch.bfloat16)
    assert is_fused(fused)
    assert torch.equal(torch.random.get_rng_state(), before)
    _FUSED_CACHE.clear()
