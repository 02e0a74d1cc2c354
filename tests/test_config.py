"""Settings dataclasses: numpy numbers become Python ones, wrong types are refused up front."""

import json

import numpy as np
import pytest

from napari_selfreg.core.config import ModelConfig, Normalization, PredictConfig, TrainConfig
from napari_selfreg.core.data import InputError
from napari_selfreg.core.redundancy import RedundancyConfig


def test_numpy_numbers_become_python_numbers_that_json_can_write():
    train = TrainConfig(steps=np.int64(20), seed=np.uint32(3), learning_rate=np.float32(0.5),
                        time_budget=np.int16(30), selfreg=np.bool_(False))
    model = ModelConfig(base_channels=np.int64(8), depth=np.int32(3))
    for config in (train, model, PredictConfig(tile_size=np.int64(256), flips=np.bool_(True))):
        values = config.to_dict()
        assert json.loads(json.dumps(values)) == values  # failed with "int64 is not JSON serializable"
    assert type(train.steps) is int and type(train.seed) is int and type(train.learning_rate) is float
    assert type(train.time_budget) is float and train.selfreg is False
    assert train.learning_rate == pytest.approx(0.5) and model.base_channels == 8 and model.depth == 3


def test_whole_floats_are_taken_as_whole_numbers():
    assert ModelConfig(base_channels=16.0).base_channels == 16
    assert type(TrainConfig(steps=300.0).steps) is int


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(steps=2.5), "steps must be a whole number"),
        (lambda: TrainConfig(batch_size=2.5), "batch_size must be a whole number"),
        (lambda: TrainConfig(patch_size=float("nan")), "patch_size must be a whole number"),
        (lambda: TrainConfig(selfreg="False"), "selfreg must be True or False"),
        (lambda: TrainConfig(augment=0), "augment must be True or False"),
        (lambda: TrainConfig(time_budget="60"), "time_budget must be a number or None"),
        (lambda: TrainConfig(device=None), "device must be a string"),
        (lambda: TrainConfig(steps=True), "steps must be a number"),
        (lambda: ModelConfig(depth=4.5), "depth must be a whole number"),
        (lambda: PredictConfig(flips="no"), "flips must be True or False"),
        (lambda: PredictConfig(batch_size=-3), "batch size must be at least 1"),
        (lambda: PredictConfig(batch_size=0), "batch size must be at least 1"),
        (lambda: Normalization(channels="3"), "channels must be a number"),
    ],
)
def test_wrong_types_and_values_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(halo=-10), "halo must be 0 pixels or more"),
        (dict(memory_mb=0), "memory budget"),
        (dict(memory_mb=-5.0), "memory budget"),
        (dict(memory_mb=float("inf")), "memory budget"),
        (dict(window=3.5), "window must be a whole number"),
        (dict(render_features="no"), "render_features must be True or False"),
    ],
)
def test_redundancy_settings_are_checked(settings, message):
    with pytest.raises(InputError, match=message):
        RedundancyConfig(**settings)


def test_redundancy_settings_within_range_are_kept():
    config = RedundancyConfig(halo=0, memory_mb=np.float32(64), window=np.int64(8))
    assert config.halo == 0 and type(config.memory_mb) is float and type(config.window) is int
    assert RedundancyConfig(halo=None).halo is None
