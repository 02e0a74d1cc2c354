"""A trained network together with what is needed to use it (classes, normalisation)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
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

    def clone(self) -> SegmentationModel:
        """A deep copy on the CPU (for keeping the best weights while training goes on)."""
        network = SelfRegUNet(self.info.model)
        network.load_state_dict({k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()})
        return SegmentationModel(network, copy.deepcopy(self.info))

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
