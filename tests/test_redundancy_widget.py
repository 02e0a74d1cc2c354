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


def _every_kind_of_map(make_napari_viewer, model_name):
    """A viewer with the tissue image and the dock set to make all four kinds of map."""
    viewer = _viewer_with_image(make_napari_viewer)
    _, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(model_name)
    widget.image_box.setCurrentText("tissue")
    widget.kind_checks["features"].setChecked(True)
    return viewer, widget


def _cell_and_origin(report, block, kind):
    b = report.block(block)
    return (b.stride if kind == "features" else b.cell(kind, report.window)), report.grid_origin


def _centre(report, block, kind, index):
    """Image pixel position (pixel centres at whole numbers) of a grid cell's centre: cell i
    covers pixels origin + i * cell .. origin + (i + 1) * cell - 1 (``upsample_grid``)."""
    cell, origin = _cell_and_origin(report, block, kind)
    return tuple(o + (i + 0.5) * cell - 0.5 for o, i in zip(origin, index, strict=True))


def _needed_cells(report, block, kind, grid_shape):
    """Per axis, the grid cells whose centres bracket the region's pixel centres: the ones the
    region's pixels interpolate from (all of them for the whole image)."""
    cell, origin = _cell_and_origin(report, block, kind)
    top, left, bottom, right = report.region
    out = []
    for o, n, first, last in zip(origin, grid_shape, (top, left), (bottom - 1, right - 1), strict=True):
        centres = o + (np.arange(n) + 0.5) * cell - 0.5
        lo = int(np.flatnonzero(centres <= first)[-1]) if (centres <= first).any() else 0
        hi = int(np.flatnonzero(centres >= last)[0]) if (centres >= last).any() else n - 1
        out.append((lo, hi + 1))
    return out


def _sample(layer, image, rows, cols):
    """The layer's values at image pixels (rows x cols), interpolated linearly between its
    pixels and clamped at its edges: what napari's linear interpolation draws."""
    from scipy import ndimage

    world = [image.data_to_world((r, c)) for r in (0, 1) for c in (0, 1)]
    (r00, c00), (_, c01), (r10, _), _ = [np.asarray(layer.world_to_data(w))[-2:] for w in world]
    ys = r00 + (np.asarray(rows, float)) * (r10 - r00)
    xs = c00 + (np.asarray(cols, float)) * (c01 - c00)
    y, x = np.meshgrid(ys, xs, indexing="ij")
    data = np.asarray(layer.data, np.float64)
    if data.ndim == 3:
        return np.stack([ndimage.map_coordinates(data[..., k], [y, x], order=1, mode="nearest")
                         for k in range(data.shape[-1])], axis=-1)
    return ndimage.map_coordinates(data, [y, x], order=1, mode="nearest")


def _check_map_layers(viewer, widget, kinds):
    """Every map layer holds its block's grid (cut to the cells the region needs), places each
    cell value at the image position of its cell centre, and agrees with ``image_map``."""
    image = viewer.layers["tissue"]
    report, label = widget.result.reports[0], widget.result.labels[0]
    top, left, bottom, right = report.region
    labels = {"redundancy": "redundancy", "scr": "SCR", "ifd": "IFD", "features": "features"}
    for block in report.names:
        for kind in kinds:
            layer = viewer.layers[f"{label}: {block} {labels[kind]}"]
            b = report.block(block)
            grid = b.features_rgb if kind == "features" else b.grid(kind)
            (r0, r1), (c0, c1) = _needed_cells(report, block, kind, grid.shape[:2])
            assert layer.data.shape == (r1 - r0, c1 - c0, *grid.shape[2:])
            assert layer.data.shape[:2] != report.region_shape or b.cell(kind, report.window) == 1
            assert layer.interpolation2d == "linear"
            scale = widget.result.scales.get(kind, {}).get(block)
            expected = grid[r0:r1, c0:c1]
            if kind in ("scr", "ifd"):
                expected = np.clip(expected / scale, 0, 1)
            np.testing.assert_allclose(layer.data, expected, rtol=1e-6)
            # cell centres land where the image shows the core's pixel position for them
            rows, cols = layer.data.shape[:2]
            for i, j in {(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 2), (0, cols - 1)}:
                np.testing.assert_allclose(
                    layer.data_to_world((i, j)),
                    image.data_to_world(_centre(report, block, kind, (r0 + i, c0 + j))),
                    atol=1e-9,
                )
            full = report.features_image(block) if kind == "features" else report.image_map(block, kind, scale)
            # cell centres that fall on pixels of the region (odd cells): image_map there is the cell value
            centres = [
                (i, j, *_centre(report, block, kind, (r0 + i, c0 + j))) for i in range(rows) for j in range(cols)
            ]
            on_pixels = [
                (i, j, int(y), int(x)) for i, j, y, x in centres
                if float(y).is_integer() and float(x).is_integer() and top <= y < bottom and left <= x < right
            ]
            assert on_pixels or _cell_and_origin(report, block, kind)[0] % 2 == 0
            for i, j, y, x in on_pixels:
                np.testing.assert_allclose(layer.data[i, j], full[y - top, x - left], rtol=1e-6, atol=1e-7)
            # the drawn picture: linear between cell centres, as image_map interpolates
            if kind == "redundancy" or b.stride == 1 or kind == "features":
                drawn = _sample(layer, image, np.arange(top, bottom), np.arange(left, right))
                np.testing.assert_allclose(drawn, full, atol=1.0 if kind == "features" else 1e-5, rtol=1e-5)
    return report


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
    report = widget.result.reports[0]
    for layer in added:
        block, kind = layer.name.split(" ")[1], {"SCR": "scr", "IFD": "ifd"}.get(layer.name.split(" ")[2], "redundancy")
        cell = report.block(block).cell(kind, report.window)
        assert layer.data.shape == report.block(block).grid(kind).shape  # one value per cell, all cells
        np.testing.assert_allclose(layer.scale, (0.5 * cell, 0.5 * cell))
        np.testing.assert_allclose(layer.translate, (10.0 + 0.5 * (cell / 2 - 0.5), -4.0 + 0.5 * (cell / 2 - 0.5)))
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
    from napari_selfreg.widgets import redundancy_widget
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
    report = widget.result.reports[1]
    cell, (oy, ox) = 16, report.grid_origin  # E1: stride 1, 16-pixel windows
    assert layer.data.shape[0] <= -(-(bottom - top) // cell) + 2
    (r0, _), (c0, _) = _needed_cells(report, "E1", "redundancy", report.block("E1").redundancy_grid.shape)
    np.testing.assert_allclose(layer.scale, (0.5 * cell, 0.5 * cell))
    centre = (oy + (r0 + 0.5) * cell - 0.5, ox + (c0 + 0.5) * cell - 0.5)
    np.testing.assert_allclose(layer.translate, (10.0 + 0.5 * centre[0], -4.0 + 0.5 * centre[1]))
    assert len(widget.figure.axes[0].patches) == 2 * len(BLOCKS)
    held = sum(viewer.layers[name].data.nbytes for name in added)
    estimate = redundancy_widget.maps_bytes((bottom - top, right - left), (57, 75), [1, 2, 4, 2, 1], ["redundancy"], 2)
    assert held <= estimate - 2 * (bottom - top) * (right - left) * redundancy_widget.REPORT_BYTES_PER_PIXEL
    assert len([ax for ax in widget.figure.axes if ax.images]) == 2


def test_map_layers_hold_the_grids_at_their_cell_centres(make_napari_viewer, qtbot, registry_models):
    viewer, widget = _every_kind_of_map(make_napari_viewer, registry_models[0])
    widget.compute()
    _wait(qtbot, widget)
    report = _check_map_layers(viewer, widget, ["redundancy", "scr", "ifd", "features"])
    assert report.region == (0, 0, 57, 75)
    for block in report.names:  # the whole image: every cell of the core's grids, no more
        layer = viewer.layers[f"plain: {block} SCR"]
        assert layer.data.shape == report.block(block).scr_grid.shape
    assert viewer.layers["plain: E3 redundancy"].data.shape == (1, 2)  # 64-pixel windows over 57 x 75
    assert viewer.layers["plain: E2 features"].data.shape == (29, 38, 3)


def test_map_layers_of_a_region_with_odd_cells(make_napari_viewer, qtbot, registry_models, monkeypatch):
    # 3-pixel windows make E1/D1 redundancy cells odd, so their centres fall on image pixels
    # and image_map there is the cell value itself; the region is off the alignment grid
    from napari_selfreg.widgets import redundancy_widget

    job = redundancy_widget.redundancy_job

    def job_with_small_windows(*args, **kwargs):
        return (yield from job(*args, window=3, **kwargs))

    monkeypatch.setattr(redundancy_widget, "redundancy_job", job_with_small_windows)
    viewer, widget = _every_kind_of_map(make_napari_viewer, registry_models[0])
    widget.view_only.setChecked(True)
    widget.view_region = lambda layer: (29, 13, 52, 47)
    widget.compute()
    _wait(qtbot, widget)
    report = _check_map_layers(viewer, widget, ["redundancy", "scr", "ifd", "features"])
    assert report.region == (29, 13, 52, 47) and report.window == 3
    # the core's grid starts one 12-pixel alignment step above the region: rows 12..56, cols 0..59
    assert report.grid_origin == (12, 0) and report.block("E1").redundancy_grid.shape == (15, 20)
    e1 = viewer.layers["plain: E1 redundancy"]
    # cells 5..13 and 4..15 (centres at rows 28..52, cols 13..46) bracket rows 29..51, cols 13..46
    assert e1.data.shape == (9, 12)
    np.testing.assert_allclose(e1.data_to_world((0, 0)), (10.0 + 0.5 * 28, -4.0 + 0.5 * 13))
    np.testing.assert_allclose(e1.scale, (1.5, 1.5))
    e1_scr = viewer.layers["plain: E1 SCR"]
    assert e1_scr.data.shape == (23, 34)  # stride 1: the region's own pixels
    np.testing.assert_allclose(e1_scr.translate, (10.0 + 0.5 * 29, -4.0 + 0.5 * 13))


def test_missing_inputs_and_bad_model_file(make_napari_viewer, tmp_path):

    viewer = make_napari_viewer()
    _, widget = docked(viewer, "Feature redundancy")
    assert widget.compute() is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert widget.load_model_file(bad) is None
    assert "bad.safetensors" in widget.status.text()


def test_a_run_replaces_the_last_runs_maps_and_lets_deleted_layers_go(make_napari_viewer, qtbot, registry_models):

    viewer, widget = _every_kind_of_map(make_napari_viewer, registry_models[0])
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


def test_a_renamed_map_and_a_users_layer_under_a_maps_name_survive_the_next_run(make_napari_viewer, qtbot,
                                                                                 registry_models):
    """Renaming a map is how a user keeps it; the next run deleted it, and wrote its own values
    into any layer that happened to carry a map's name."""
    from napari_selfreg.widgets.redundancy_widget import MAP_FLAG

    viewer, widget = _every_kind_of_map(make_napari_viewer, registry_models[0])
    widget.compute()
    _wait(qtbot, widget)
    first = f"plain: {BLOCKS[0]} redundancy"
    kept = np.array(viewer.layers[first].data)
    viewer.layers[first].name = "my map"
    taken = f"plain: {BLOCKS[-1]} IFD"
    viewer.layers.remove(taken)
    mine = np.full((5, 5), 0.25, np.float32)
    viewer.add_image(mine, name=taken)
    widget.compute()
    _wait(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers["my map"].data, kept)
    np.testing.assert_array_equal(viewer.layers[f"{taken} (kept)"].data, mine)
    assert viewer.layers[taken].metadata.get(MAP_FLAG) == taken and viewer.layers[taken].data.shape != (5, 5)
    assert viewer.layers[first].metadata.get(MAP_FLAG) == first


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
    # 57 x 75 pixels: float32 SCR and IFD grids at strides 1, 2, 4, 2, 1 (8 x (4275 + 1102 + 285
    # + 1102 + 4275) = 88312 bytes), redundancy grids of 16-pixel windows (216 bytes), and
    # the report's 29 bytes per pixel (123975): 212503 bytes, 380475 at image pixels before
    estimate = redundancy_widget.maps_bytes((57, 75), (57, 75), [1, 2, 4, 2, 1], ["redundancy", "scr", "ifd"], 1)
    assert estimate == 88312 + 216 + 123975
    monkeypatch.setattr(redundancy_widget, "available_memory", lambda: 250_000)
    assert widget.compute() is None
    assert "would take about" in widget.status.text() and "Only the region in view" in widget.status.text()
    assert [layer.name for layer in viewer.layers] == ["tissue"]
    monkeypatch.setattr(redundancy_widget, "available_memory", lambda: 300_000)
    assert widget.compute() is not None
    _wait(qtbot, widget)
    maps = [layer.data for layer in viewer.layers if layer.name != "tissue"]
    held = sum(m.nbytes for m in maps)
    assert held == estimate - 57 * 75 * redundancy_widget.REPORT_BYTES_PER_PIXEL  # the layers, as estimated


def test_a_stop_while_the_maps_are_built_adds_none(registry_models, monkeypatch):
    # on a slide the maps take seconds each after the last tile: Stop must still add nothing
    import threading

    from napari_selfreg.widgets import redundancy_widget
    from napari_selfreg.widgets.model_registry import model_registry
    from napari_selfreg.widgets.redundancy_widget import redundancy_job

    model = model_registry().get(registry_models[0])
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    stop = threading.Event()
    built = redundancy_widget.grid_layer

    def build_then_stop(*args, **kwargs):
        stop.set()  # pressed while the first map was being built
        return built(*args, **kwargs)

    monkeypatch.setattr(redundancy_widget, "grid_layer", build_then_stop)
    run = redundancy_job([model], ["m"], image, "cosine", ["redundancy", "scr"], None, stop=stop)
    steps = []
    with pytest.raises(StopIteration) as end:
        while True:
            steps.append(next(run))
    assert end.value.value is None
    assert steps and steps[-1][2] != "done"


def test_a_failed_run_is_told_on_the_status_line_only(make_napari_viewer, qtbot, registry_models, monkeypatch):
    """Errors go to the status line: not also re-raised in the main thread, where napari shows
    them as an uncaught exception with its traceback."""
    import sys

    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel
    from napari_selfreg.widgets.model_registry import model_registry

    raised = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: raised.append(error))
    registry = model_registry()
    deeper = registry.add("depth 3", SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=3))),
                          replace=True)
    try:
        viewer = _viewer_with_image(make_napari_viewer)
        _, widget = docked(viewer, "Feature redundancy")
        widget.model_box.setCurrentText(registry_models[0])
        widget.compare_check.setChecked(True)
        widget.compare_box.setCurrentText(deeper)
        widget.image_box.setCurrentText("tissue")
        widget.kind_checks["scr"].setChecked(False)
        widget.kind_checks["ifd"].setChecked(False)
        assert widget.compute() is not None
        qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
        qtbot.wait(100)  # a re-raise comes through the event loop
    finally:
        registry.remove(deeper)
    assert widget.status.text() == "the two models have different blocks; compare models of the same depth"
    assert raised == []
    assert [layer.name for layer in viewer.layers] == ["tissue"]


def test_only_the_region_in_view_with_the_image_out_of_view_is_refused(make_napari_viewer, registry_models):
    from napari_selfreg.widgets._common import viewer_camera

    viewer = _viewer_with_image(make_napari_viewer)
    _, widget = docked(viewer, "Feature redundancy")
    widget.model_box.setCurrentText(registry_models[0])
    widget.image_box.setCurrentText("tissue")
    widget.view_only.setChecked(True)
    camera = viewer_camera(viewer)
    camera.center = (0, 5000, 5000)  # panned far off the image
    camera.zoom = 4
    top, left, bottom, right = widget.view_region(viewer.layers["tissue"])
    assert bottom <= top and right <= left  # nothing of the image in view
    assert widget.compute() is None and not widget.running
    assert widget.status.text() == "'tissue' is not in view; pan to it or untick 'Only the region in view'"
    assert [layer.name for layer in viewer.layers] == ["tissue"]


def test_an_image_deleted_mid_run_gets_no_maps_and_the_status_says_why(make_napari_viewer, qtbot, registry_models):
    """27 map layers used to land over an image that was no longer there, with "27 layers"."""
    viewer, widget, _ = _running_on_a_big_image(make_napari_viewer, qtbot, registry_models[0])
    viewer.layers.remove("big")
    _wait(qtbot, widget)
    assert len(viewer.layers) == 0
    assert widget.status.text().startswith("'big' was deleted while its maps were computed: no map layers")
    assert len(widget.figure.axes[0].patches) == len(BLOCKS)  # the chart still shows the run


def test_two_models_named_after_one_image_keep_apart_in_the_chart():
    from napari_selfreg.widgets.redundancy_widget import _short_labels

    first, second = "TCGA-2Z-A9J9-01A-01-TS1 model", "TCGA-2Z-A9J9-01A-01-TS1 model (2)"
    labels = _short_labels([first, second])
    assert labels[0] != labels[1] and labels[1].endswith("model (2)") and labels[0].startswith("TCGA-2Z")
    assert all(len(label) <= 28 for label in labels) and "(A)" not in labels[0]
    assert _short_labels(["plain", "selfreg"]) == ["plain", "selfreg"]


def test_a_probability_map_made_by_segment_is_not_the_image_a_new_dock_offers(make_napari_viewer):
    """napari makes each new layer active, so after a Segment run with probabilities, a dock
    opened next chose the probability map as its image."""
    from napari_selfreg.widgets.segment_widget import OURS_KEY

    viewer = _viewer_with_image(make_napari_viewer)
    viewer.add_image(np.zeros((57, 75), np.float32), name="tissue probabilities", metadata={OURS_KEY: True})
    assert viewer.layers.selection.active.name == "tissue probabilities"
    _, widget = docked(viewer, "Feature redundancy")
    assert widget.image_box.currentText() == "tissue"
    _, segment = docked(viewer, "Segment")
    assert segment.image_combo.currentText() == "tissue"
