"""The uncertainty map in the dock widgets, in a real viewer under Xvfb:
Segment's checkbox and Train's end-of-round map share one "… uncertainty" layer, whose values
are the core's ``uncertainty_of`` and whose lifecycle follows the probability layers'."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from test_widget_choices import _stop_at_once
from test_widgets import docked, tiny, train_widget_for, wait_idle

from napari_selfreg.sample_data import he_arrays

NAME = "H&E tissue uncertainty"


@pytest.fixture(scope="module")
def unsure_model():
    """A model trained just enough (a second or two) that its uncertainty spans 0.4 .. 1 on the
    sample: an untrained one is near 1 everywhere, and any map would pass for it."""
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.core.train import train_to_end

    sample = he_arrays()
    settings = TrainConfig(steps=30, patch_size=32, batch_size=2, device="cpu", seed=0, learning_rate=1e-2,
                           selfreg=False, validation_every=1000)
    return train_to_end([sample["image"]], [sample["strokes"]], settings, ModelConfig(base_channels=8, depth=2)).model


def _segment(viewer, model, uncertainty: bool = True, probabilities: bool = False):
    """The Segment widget docked, ``model`` chosen, the H&E sample as its image, on the CPU."""
    _, segment = docked(viewer, "Segment")
    segment.registry.add("unsure", model, replace=True)
    segment.model_combo.set_names(segment.registry.names())
    segment.model_combo.setCurrentText("unsure")
    segment.image_combo.select("H&E tissue")
    segment.device.setCurrentText("cpu")
    segment.uncertainty.setChecked(uncertainty)
    segment.probabilities.setChecked(probabilities)
    return segment


def _run(qtbot, segment) -> None:
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)


def _expected(model, image, config, **kwargs) -> np.ndarray:
    from napari_selfreg.core.predict import predict

    return predict(model, image, config, probabilities=False, uncertainty=True, **kwargs).uncertainty


@pytest.mark.gui
def test_segment_adds_the_uncertainty_of_its_probabilities(he_viewer, qtbot, messages, unsure_model):
    """The layer holds entropy / log K of the same run's probabilities, in [0, 1], shown so that
    the tissue stays visible (transparent where sure, opaque where the classes tie) and marked as
    the plugin's."""
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.core.predict import uncertainty_of
    from napari_selfreg.widgets._common import OURS_KEY

    segment = _segment(he_viewer, unsure_model, probabilities=True)
    assert segment.uncertainty.isVisibleTo(segment) and segment.probabilities.isVisibleTo(segment)
    _run(qtbot, segment)
    assert not messages.errors
    layer = he_viewer.layers[NAME]
    data = np.asarray(layer.data)
    assert data.shape == (256, 256) and 0.0 <= data.min() and data.max() <= 1.0
    assert data.max() - data.min() > 0.3  # a map of where the model hesitates, not a constant
    np.testing.assert_allclose(data, uncertainty_of(segment.prediction.probabilities).numpy(), atol=1e-6)
    image = he_viewer.layers["H&E tissue"].data
    config = PredictConfig(tile_size=segment.tile_size.value(), overlap=segment.overlap.value(), device="cpu")
    np.testing.assert_allclose(data, _expected(unsure_model, image, config), atol=1e-6)
    assert tuple(layer.contrast_limits) == (0.0, 1.0) and layer.visible and layer.metadata.get(OURS_KEY)
    assert layer.blending == "translucent" and 0 < layer.opacity < 1
    np.testing.assert_allclose(layer.colormap.map(np.array([0.0, 0.5, 1.0]))[:, 3], [0.0, 0.25, 1.0], atol=1e-3)
    assert tuple(layer.scale) == tuple(he_viewer.layers["H&E tissue"].scale)


@pytest.mark.gui
def test_a_run_without_uncertainty_drops_ours_and_keeps_the_users(he_viewer, qtbot, messages, unsure_model):
    """As with probabilities: the last run's map goes with its segmentation; a map the user
    renamed, or a layer of that name the user made, stays (the next map goes beside it)."""
    segment = _segment(he_viewer, unsure_model)
    _run(qtbot, segment)
    first = he_viewer.layers[NAME]
    first.name = "unsure, round 1"  # renamed: the user's now
    _run(qtbot, segment)
    second = he_viewer.layers[NAME]
    segment.uncertainty.setChecked(False)
    _run(qtbot, segment)
    assert NAME not in he_viewer.layers  # stale: dropped
    assert "unsure, round 1" in he_viewer.layers and second not in he_viewer.layers

    theirs = he_viewer.add_image(np.full((256, 256), 0.5, np.float32), name=NAME)
    _run(qtbot, segment)
    assert he_viewer.layers[NAME] is theirs  # not ours: left alone
    segment.uncertainty.setChecked(True)
    _run(qtbot, segment)
    assert theirs.name == f"{NAME} (kept)" and np.all(np.asarray(theirs.data) == 0.5)
    ours = he_viewer.layers[NAME]
    assert ours is not theirs and np.asarray(ours.data).min() < 0.5
    assert not any("[1]" in layer.name for layer in he_viewer.layers) and not messages.errors


@pytest.mark.gui
def test_a_stopped_segment_run_adds_no_half_map(he_viewer, qtbot, messages, unsure_model, monkeypatch):
    """A stopped run adds no probabilities, and no uncertainty either: the last complete map stays."""
    segment = _segment(he_viewer, unsure_model)
    _run(qtbot, segment)
    complete = he_viewer.layers[NAME]
    kept = np.array(complete.data, copy=True)
    _stop_at_once(monkeypatch)
    _run(qtbot, segment)
    assert not segment.prediction.complete
    assert he_viewer.layers[NAME] is complete
    np.testing.assert_array_equal(complete.data, kept)
    he_viewer.layers.remove(NAME)
    _run(qtbot, segment)
    assert NAME not in he_viewer.layers and not messages.errors


@pytest.mark.gui
def test_a_large_images_uncertainty_goes_to_a_memory_map(make_napari_viewer, qtbot, messages, monkeypatch,
                                                         unsure_model):
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.widgets import segment_widget

    monkeypatch.setattr(segment_widget, "MEMMAP_PIXELS", 10_000)
    viewer = make_napari_viewer()
    image = he_arrays()["image"]
    viewer.add_image(image, name="H&E tissue", rgb=True)
    segment = _segment(viewer, unsure_model)
    _run(qtbot, segment)
    data = viewer.layers[NAME].data
    assert isinstance(data, np.memmap) and data.dtype == np.float16 and data.shape == (256, 256)
    expected = _expected(unsure_model, image, PredictConfig(tile_size=segment.tile_size.value(), device="cpu"))
    np.testing.assert_allclose(np.asarray(data, np.float32), expected, atol=1e-3)
    assert not messages.errors


def _train_round(train, qtbot, uncertainty: bool = True) -> None:
    train.uncertainty.setChecked(uncertainty)
    train.start()
    wait_idle(qtbot, train)


def _quick(train) -> None:
    tiny(train, steps=3)
    train.patch_size.setValue(32)
    train.base_channels.setValue(8)
    train.preview_every.setValue(0.0)


@pytest.mark.gui
def test_each_round_shows_the_uncertainty_of_its_final_prediction(he_viewer, qtbot, messages, monkeypatch):
    """Off by default (painting where it is bright helped no more than painting anywhere,
    BENCHMARKS.md); computed in the end-of-round prediction's own pass (no second one); the same
    layer is updated round after round, keeping the user's choices; off, the map goes."""
    from napari_selfreg.core import predict as core_predict
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.widgets._common import OURS_KEY

    calls = []
    real = core_predict.predict

    def counting(*args, **kwargs):
        calls.append(kwargs.get("uncertainty", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(core_predict, "predict", counting)
    train = train_widget_for(he_viewer)
    assert not train.uncertainty.isChecked() and train.uncertainty.window() is train.window()  # off, in the dock
    _quick(train)
    _train_round(train, qtbot)
    assert calls == [True] and not messages.errors  # one pass: labels and uncertainty together
    layer = he_viewer.layers[NAME]
    image = he_viewer.layers["H&E tissue"].data
    settings = PredictConfig(tile_size=512, device="cpu")
    np.testing.assert_allclose(layer.data, _expected(train.selected_model(), image, settings), atol=1e-6)
    assert 0.0 <= np.min(layer.data) and np.max(layer.data) <= 1.0
    assert layer.metadata.get(OURS_KEY) and layer.colormap.name == "inferno fading" and layer.visible
    assert f"'{NAME}' shows where the model is unsure" in train.status.text()
    assert he_viewer.layers["H&E tissue prediction"].data.min() >= 1  # the labels of that pass, as before

    layer.visible, layer.opacity = False, 0.3  # the user's choices
    _train_round(train, qtbot)
    again = he_viewer.layers[NAME]
    assert again is layer and not again.visible and again.opacity == 0.3
    np.testing.assert_allclose(again.data, _expected(train.selected_model(), image, settings), atol=1e-6)

    calls.clear()
    _train_round(train, qtbot, uncertainty=False)
    assert calls == [False] and NAME not in he_viewer.layers  # the last map was of an older model
    assert "uncertainty" not in train.status.text() and not messages.errors


@pytest.mark.gui
def test_a_large_images_round_fills_the_view_box_only(he_viewer, qtbot, messages, monkeypatch):
    """A slide's end-of-round prediction covers the view: the map covers that box alone, placed
    over it (a slide-sized map would take gigabytes), and the prediction layer is 0 elsewhere."""
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.core.predict import value_range_of
    from napari_selfreg.widgets import train_widget

    box = (slice(32, 160), slice(64, 224))
    monkeypatch.setattr(train_widget, "visible_box", lambda *args, **kwargs: box)
    monkeypatch.setattr(train_widget, "FULL_PREVIEW_PIXELS", 1000)
    train = train_widget_for(he_viewer)
    _quick(train)
    _train_round(train, qtbot)
    assert not messages.errors
    layer, image_layer = he_viewer.layers[NAME], he_viewer.layers["H&E tissue"]
    data = np.asarray(layer.data, np.float32)
    assert data.shape == (128, 160)
    np.testing.assert_allclose(layer.translate[-2:], np.asarray(image_layer.translate[-2:]) + np.multiply(
        (32, 64), image_layer.scale[-2:]))
    np.testing.assert_allclose(layer.scale[-2:], image_layer.scale[-2:])
    outside = np.ones((256, 256), bool)
    outside[box] = False
    assert (he_viewer.layers["H&E tissue prediction"].data[outside] == 0).all()
    model, image = train.selected_model(), image_layer.data
    whole_range = value_range_of(image, model.info.normalization)  # a crop is scaled as its image is
    expected = _expected(model, image[box], PredictConfig(tile_size=512, device="cpu"), value_range=whole_range)
    np.testing.assert_allclose(data, expected, atol=1e-6)
    assert data.min() > 0


@pytest.mark.gui
def test_segment_and_train_share_one_layer_and_drop_only_their_own(he_viewer, qtbot, messages, unsure_model):
    """Each widget replaces the other's map in place (one layer, not "… [1]"); a run without a
    map drops only the map its own widget made (Train's belongs to its prediction, not to the
    segmentation, and the other way round)."""
    from napari_selfreg.widgets._common import UNCERTAINTY_KEY

    segment = _segment(he_viewer, unsure_model)
    _run(qtbot, segment)
    layer = he_viewer.layers[NAME]
    train = train_widget_for(he_viewer)
    _quick(train)
    _train_round(train, qtbot, uncertainty=False)
    assert he_viewer.layers[NAME] is layer  # Segment's map: not Train's to drop
    _train_round(train, qtbot)
    assert he_viewer.layers[NAME] is layer and layer.metadata[UNCERTAINTY_KEY] == "Train"
    segment.uncertainty.setChecked(False)
    _run(qtbot, segment)
    assert he_viewer.layers[NAME] is layer  # Train's map: not Segment's to drop
    segment.uncertainty.setChecked(True)
    _run(qtbot, segment)
    assert he_viewer.layers[NAME] is layer and layer.metadata[UNCERTAINTY_KEY] == "Segment"
    assert [item.name for item in he_viewer.layers].count(NAME) == 1
    assert not any("uncertainty" in item.name and item.name != NAME for item in he_viewer.layers)
    assert not messages.errors
