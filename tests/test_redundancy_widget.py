"""The redundancy dock widget adds aligned, grouped layers and draws the chart."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from test_widgets import docked

pytestmark = pytest.mark.gui

BLOCKS = ["E1", "E2", "E3", "D2", "D1"]


@pytest.fixture
def registry_models():
    import torch

    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel
    from napari_selfreg.widgets.model_registry import model_registry

    registry = model_registry()
    names = []
    for seed, name in ((0, "plain"), (1, "selfreg")):
        torch.manual_seed(seed)
        model = SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2)))
        names.append(registry.add(name, model, replace=True))
    yield names
    for name in names:
        registry.remove(name)


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.result is not None, widget.status.text()


def _viewer_with_image(make_napari_viewer):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(57, 75, 3)).astype(np.uint8)
    viewer.add_image(image, name="tissue", rgb=True, scale=(0.5, 0.5), translate=(10.0, -4.0))
    return viewer


def test_compute_adds_aligned_layers_and_chart(make_napari_viewer, qtbot, registry_models):

    viewer = _viewer_with_image(make_napari_viewer)
    _, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(registry_models[0])
    widget.image_box.setCurrentText("tissue")
    assert widget.compute() is not None
    _wait(qtbot, widget)

    added = [layer for layer in viewer.layers if layer.name != "tissue"]
    assert len(added) == len(BLOCKS) * 3
    expected = [f"plain: {b} {k}" for b in BLOCKS for k in ("redundancy", "SCR", "IFD")]
    assert [layer.name for layer in added] == expected  # grouped, in block order
    for layer in added:
        assert layer.data.shape == (57, 75)
        np.testing.assert_allclose(layer.scale, (0.5, 0.5))
        np.testing.assert_allclose(layer.translate, (10.0, -4.0))
        assert tuple(layer.contrast_limits) == (0.0, 1.0)
        assert layer.colormap.name == "magma"
        assert 0 < layer.opacity < 1
        assert 0.0 <= float(layer.data.min()) and float(layer.data.max()) <= 1.0
    assert sum(layer.visible for layer in added) == 1

    bars, heatmap = widget.figure.axes[0], widget.figure.axes[1]
    assert len(bars.patches) == len(BLOCKS)
    assert widget.block_box.currentText() == "E3"  # the middle block is selected first
    assert heatmap.images[0].get_array().shape == (8, 8)  # E3 of this model has 8 channels
    widget.block_box.setCurrentText("D1")
    assert widget.figure.axes[1].images[0].get_array().shape == (4, 4)

    # computing again updates the layers in place
    widget.compute()
    _wait(qtbot, widget)
    assert len(viewer.layers) == 1 + len(BLOCKS) * 3


def test_compare_two_models_pairs_the_layers(make_napari_viewer, qtbot, registry_models):
    from napari_selfreg.widgets._common import viewer_camera

    viewer = _viewer_with_image(make_napari_viewer)
    _, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(registry_models[0])
    widget.compare_check.setChecked(True)
    widget.compare_box.setCurrentText(registry_models[1])
    for kind in ("scr", "ifd"):
        widget.kind_checks[kind].setChecked(False)
    widget.view_only.setChecked(True)
    camera = viewer_camera(viewer)
    camera.zoom = 200.0  # zoomed far in: only part of the image is computed
    camera.center = (0, 20.0, 10.0)
    widget.compute()
    _wait(qtbot, widget)

    added = [layer.name for layer in viewer.layers if layer.name != "tissue"]
    assert added == [f"{m}: {b} redundancy" for b in BLOCKS for m in ("plain", "selfreg")]
    top, left, bottom, right = widget.result.region
    assert (bottom - top, right - left) != (57, 75)
    layer = viewer.layers["selfreg: E1 redundancy"]
    assert layer.data.shape == (bottom - top, right - left)
    np.testing.assert_allclose(layer.translate, (10.0 + 0.5 * top, -4.0 + 0.5 * left))
    assert len(widget.figure.axes[0].patches) == 2 * len(BLOCKS)
    assert len([ax for ax in widget.figure.axes if ax.images]) == 2


def test_missing_inputs_and_bad_model_file(make_napari_viewer, tmp_path):

    viewer = make_napari_viewer()
    _, widget = docked(viewer, "Feature redundancy")
    assert widget.compute() is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert widget.load_model_file(bad) is None
    assert "bad.safetensors" in widget.status.text()


def test_a_run_replaces_the_last_runs_maps_and_lets_deleted_layers_go(make_napari_viewer, qtbot, registry_models):

    viewer = _viewer_with_image(make_napari_viewer)
    _, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(registry_models[0])
    widget.image_box.setCurrentText("tissue")
    widget.kind_checks["features"].setChecked(True)
    widget.compute()
    _wait(qtbot, widget)
    assert len(viewer.layers) == 1 + len(BLOCKS) * 4
    assert widget.result.layers == []  # the maps live in the layers only
    widget.kind_checks["features"].setChecked(False)
    widget.kind_checks["scr"].setChecked(False)
    widget.compute()
    _wait(qtbot, widget)
    names = [layer.name for layer in viewer.layers]
    assert names == ["tissue", *[f"plain: {b} {k}" for b in BLOCKS for k in ("redundancy", "IFD")]]


def _running_on_a_big_image(make_napari_viewer, qtbot, model_name):
    """A widget docked in a viewer, computing the whole of a 3000 x 3000 image (several seconds)."""

    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    viewer.add_image(rng.integers(0, 256, size=(3000, 3000, 3)).astype(np.uint8), name="big", rgb=True)
    dock, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(model_name)
    widget.image_box.setCurrentText("big")
    widget.view_only.setChecked(False)
    widget.compute()
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=60_000)
    return viewer, widget, dock


def test_stop_restores_the_models_mode_and_adds_nothing(make_napari_viewer, qtbot, registry_models):
    from napari_selfreg.widgets.model_registry import model_registry

    model = model_registry().get(registry_models[0])
    model.network.train()  # a model that is mid-training elsewhere must stay so
    viewer, widget, _ = _running_on_a_big_image(make_napari_viewer, qtbot, registry_models[0])
    widget._run_or_stop()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert widget.status.text() == "Stopped; no maps were added."
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert model.network.training


def test_closing_the_dock_stops_a_run(make_napari_viewer, qtbot, registry_models):
    viewer, widget, dock = _running_on_a_big_image(make_napari_viewer, qtbot, registry_models[0])
    dock.destroyOnClose()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["big"]


def test_a_run_whose_maps_would_not_fit_in_memory_is_refused(make_napari_viewer, qtbot, registry_models,
                                                              monkeypatch):
    from napari_selfreg.widgets import redundancy_widget

    viewer = _viewer_with_image(make_napari_viewer)
    _, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(registry_models[0])
    widget.image_box.setCurrentText("tissue")
    # 57 x 75 pixels, 5 blocks x 3 float32 maps + the report's 29 bytes: 4275 x 89 = 380 kB
    monkeypatch.setattr(redundancy_widget, "available_memory", lambda: 400_000)
    assert widget.compute() is None
    assert "would take about" in widget.status.text() and "Only the region in view" in widget.status.text()
    assert [layer.name for layer in viewer.layers] == ["tissue"]
    monkeypatch.setattr(redundancy_widget, "available_memory", lambda: 500_000)
    assert widget.compute() is not None
    _wait(qtbot, widget)
    maps = [layer.data for layer in viewer.layers if layer.name != "tissue"]
    held = sum(m.nbytes for m in maps)
    estimate = redundancy_widget.maps_bytes(57 * 75, len(BLOCKS), ["redundancy", "scr", "ifd"], 1)
    assert held == estimate - 57 * 75 * redundancy_widget.REPORT_BYTES_PER_PIXEL  # the layers, as estimated


def test_a_stop_while_the_maps_are_built_adds_none(registry_models, monkeypatch):
    # on a slide the maps take seconds each after the last tile: Stop must still add nothing
    import threading

    from napari_selfreg.core.redundancy import RedundancyReport
    from napari_selfreg.widgets.model_registry import model_registry
    from napari_selfreg.widgets.redundancy_widget import redundancy_job

    model = model_registry().get(registry_models[0])
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    stop = threading.Event()
    built = RedundancyReport.image_map

    def build_then_stop(self, *args, **kwargs):
        stop.set()  # pressed while the first map was being built
        return built(self, *args, **kwargs)

    monkeypatch.setattr(RedundancyReport, "image_map", build_then_stop)
    run = redundancy_job([model], ["m"], image, "cosine", ["redundancy", "scr"], None, stop=stop)
    steps = []
    with pytest.raises(StopIteration) as end:
        while True:
            steps.append(next(run))
    assert end.value.value is None
    assert steps and steps[-1][2] != "done"
