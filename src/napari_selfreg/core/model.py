"""A trained network together with what is needed to use it (classes, normalisation)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import ModelConfig, ModelInfo
from .unet import SelfRegUNet


@dataclass
class SegmentationModel:
    """The unit that is trained, saved, loaded and predicted with."""

    network: SelfRegUNet
    info: ModelInfo

    @classmethod
    def create(cls, info: ModelInfo) -> SegmentationModel:
        return cls(SelfRegUNet(info.model), info)

    @property
    def config(self) -> ModelConfig:
        return self.info.model

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @classmethod
    def from_weights(cls, info: ModelInfo, weights: Mapping[str, torch.Tensor]) -> SegmentationModel:
        """A network that owns copies of ``weights`` (on the CPU, in the dtypes it declares).

        It is built on the meta device, so no random initialisation is paid for and thrown
        away, and torch's global generator, which napari and the user's code share, is not
        drawn from. Raises ``RuntimeError`` when the names or shapes do not fit.
        """
        with torch.device("meta"):
            network = SelfRegUNet(info.model)
        declared = network.state_dict()
        owned = {
            name: tensor.detach().to(device="cpu", dtype=declared[name].dtype if name in declared else None,
                                     memory_format=torch.contiguous_format, copy=True)
            for name, tensor in weights.items()
        }
        network.load_state_dict(owned, strict=True, assign=True)
        return cls(network, info)

    def clone(self) -> SegmentationModel:
        """A deep copy on the CPU (for keeping the best weights while training goes on)."""
        return SegmentationModel.from_weights(copy.deepcopy(self.info), self.network.state_dict())

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.network.state_dict().items()}


@contextmanager
def evaluating(network: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for one use, then the mode it had: a live model read between training steps
    must go on training with BatchNorm's batch statistics."""
    was_training = network.training
    network.eval()
    try:
        yield network
    finally:
        network.train(was_training)
