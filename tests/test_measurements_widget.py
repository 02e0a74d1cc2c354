"""The objects' measurements in the Segment widget, in a real viewer under Xvfb: the instances
layer's features (shown on hover), Save measurements…, and Objects of following the new
segmentation."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("napari")

from test_uncertainty_widgets import _run, _segment, unsure_model  # noqa: F401 (a fixture)
from test_widgets import docked, wait_idle

from napari_selfreg.widgets._common import same_layer


def _read(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.gui
def test_segment_measures_its_objects_and_saves_them(he_viewer, qtbot, messages, unsure_model, tmp_path,  # noqa: F811
                                                     monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    segment = _segment(he_viewer, unsure_model, uncertainty=False)
    segment.instances.setChecked(True)
    assert segment.split_source.currentText() != "H&E tissue segmentation"
    assert not segment.save_table_button.isEnabled()  # nothing measured yet
    _run(qtbot, segment)
    assert not messages.errors
    # Separate objects acts on the new segmentation next, not on the first labels layer
    assert segment.split_source.currentText() == "H&E tissue segmentation"
    assert same_layer(segment.split_source.layer(), he_viewer.layers["H&E tissue segmentation"])

    layer = he_viewer.layers["H&E tissue instances"]
    data = np.asarray(layer.data)
    ids = np.unique(data[data > 0])
    assert ids.size > 3
    features = layer.features
    np.testing.assert_array_equal(features["index"], ids)
    np.testing.assert_array_equal(features["area_px"], np.bincount(data.ravel())[ids])
    structure = unsure_model.class_names[1]  # the model's name of class 2
    assert set(features["class_name"]) == {structure} and set(features["class_id"]) == {2}
    assert "class" not in features  # the layer holds objects, not class names
    rows, cols = np.nonzero(data == ids[0])
    np.testing.assert_allclose(features[["centroid_row", "centroid_col"]].iloc[0], [rows.mean(), cols.mean()])
    # the colours of the image it segmented, and the stains' densities
    picture = np.asarray(he_viewer.layers["H&E tissue"].data)
    np.testing.assert_allclose(features[["mean_red", "mean_green", "mean_blue"]].iloc[0],
                               picture[data == ids[0]].mean(axis=0))
    assert "hematoxylin_od" in features and "eosin_od" in features
    # hovering an object shows its measurements in napari's status bar
    status = layer.get_status(position=(rows[0], cols[0]), world=True)["coordinates"]
    assert f"area_px: {len(rows)}" in status and f"class_name: {structure}" in status
    assert status.index("area_px") < status.index("circularity") < status.index("touches_edge") < status.index(
        "perimeter_px")  # the sizes, the roundness and the edge flag before the rest
    assert "Hover an object" in segment.status.text()

    assert segment.save_table_button.isEnabled()
    target = tmp_path / "nuclei.csv"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kwargs: (str(tmp_path / "nuclei"), ""))
    segment.save_table_button.click()  # the dialog's name gets .csv
    written = _read(target)
    assert [int(r["id"]) for r in written] == ids.tolist()
    assert [int(r["area_px"]) for r in written] == features["area_px"].tolist()
    assert f"{ids.size} objects" in segment.status.text() and str(target) in segment.status.text()

    # an unwritable place: a clear message, no traceback, the status says so too
    assert segment.save_measurements(tmp_path / "no such folder" / "x.csv") is None
    assert "Could not save the measurements" in messages.errors[-1] and "choose another folder" in messages.errors[-1]
    assert "Could not save" in segment.status.text()

    # the user merges the first object into the second with the fill tool and paints a new one:
    # Save measurements… measures the objects as they are now, not as they were split
    before = dict(zip(features["index"].tolist(), features["area_px"].tolist(), strict=True))
    first, second = ids[0], ids[1]
    layer.data[data == first] = second
    layer.paint((0, 0), 5000)  # a new object, in the corner
    now = np.asarray(layer.data)
    assert segment.save_measurements(tmp_path / "corrected.csv") is not None
    qtbot.waitUntil(lambda: (tmp_path / "corrected.csv").exists() and segment.measure_worker is None, timeout=30_000)
    rows = {int(r["id"]): r for r in _read(tmp_path / "corrected.csv")}
    assert first not in rows and int(rows[second]["area_px"]) == before[first] + before[second]
    assert int(rows[5000]["area_px"]) == int((now == 5000).sum()) > 0
    assert rows[5000]["class_id"] == "1"  # painted on background: the segmentation's class there
    assert sorted(rows) == np.unique(now[now > 0]).tolist()
    assert float(rows[5000]["mean_red"]) == pytest.approx(picture[now == 5000, 0].mean())  # with colours
    assert layer.features.set_index("index").loc[second, "area_px"] == before[first] + before[second]
    assert "measured again" in segment.status.text() and layer.editable
    assert len(messages.errors) == 1  # the unwritable folder's, above

    he_viewer.layers.remove(layer)
    assert not segment.save_table_button.isEnabled()


@pytest.mark.gui
def test_separate_objects_measures_in_the_layers_units_and_saves_the_selected_layer(he_viewer, qtbot, messages,
                                                                                     tmp_path):
    from napari_selfreg.core.instances import separate_instances
    from napari_selfreg.widgets.classes import class_features

    _, segment = docked(he_viewer, "Segment")
    truth = np.asarray(he_viewer.layers["ground truth"].data)
    he_viewer.add_labels(truth, name="placed truth", scale=(0.5, 0.25),
                         features=class_features(["background", "nucleus"]))
    segment.split_source.select("placed truth")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    objects = separate_instances(truth)
    placed = he_viewer.layers["placed truth instances"]
    areas = np.bincount(objects.ravel())[1:]
    assert len(placed.features) == objects.max() == 55
    np.testing.assert_array_equal(placed.features["area_px"], areas)
    np.testing.assert_allclose(placed.features["area_scaled"], areas * 0.125)
    np.testing.assert_allclose(placed.features["equivalent_diameter_scaled"], np.sqrt(4 * areas * 0.125 / np.pi))

    segment.split_source.select("ground truth")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    plain = he_viewer.layers["ground truth instances"]
    assert "area_scaled" not in plain.features  # a scale of 1: pixels only
    # the one image of the layer's shape gives the objects' colours
    picture = np.asarray(he_viewer.layers["H&E tissue"].data)
    first = plain.features.iloc[0]
    np.testing.assert_allclose(first[["mean_red", "mean_green", "mean_blue"]].to_numpy(float),
                               picture[np.asarray(plain.data) == first["index"]].mean(axis=0))
    # the last measured layer is saved, unless another measured layer is selected
    assert same_layer(segment.measured_layer(), plain)
    he_viewer.layers.selection.active = placed
    assert same_layer(segment.measured_layer(), placed)
    assert segment.save_measurements(tmp_path / "placed.csv") == tmp_path / "placed.csv"
    rows = _read(tmp_path / "placed.csv")
    assert len(rows) == 55 and [float(r["area_scaled"]) for r in rows] == (areas * 0.125).tolist()

    # a pixel size in micrometres: every measured layer shows it at once, and the table says so
    segment.pixel_size.setValue(0.5)
    for each in (placed, plain):
        assert "area_scaled" not in each.features
        np.testing.assert_allclose(each.features["area_um2"], areas * 0.25)
        np.testing.assert_allclose(each.features["equivalent_diameter_um"], np.sqrt(4 * areas * 0.25 / np.pi))
    assert segment.save_measurements(tmp_path / "um.csv") == tmp_path / "um.csv"
    assert [float(r["area_um2"]) for r in _read(tmp_path / "um.csv")] == (areas * 0.25).tolist()
    segment.pixel_size.setValue(0)  # back to the layers' scales
    assert "area_um2" not in placed.features and "area_scaled" in placed.features
    assert list(plain.features.columns[:4]) == ["index", "class_name", "area_px", "equivalent_diameter_px"]

    # a copy made with napari's Duplicate layer carries the table: painting on it makes it stale too
    from napari.layers._layer_actions import _duplicate_layer

    he_viewer.layers.selection.active = plain
    _duplicate_layer(he_viewer.layers)
    copy = he_viewer.layers["ground truth instances copy"]
    assert same_layer(segment.measured_layer(), copy)
    copy.paint((0, 0), 900)
    assert segment.save_measurements(tmp_path / "copy.csv") is not None
    qtbot.waitUntil(lambda: (tmp_path / "copy.csv").exists() and segment.measure_worker is None, timeout=30_000)
    rows = _read(tmp_path / "copy.csv")
    assert len(rows) == 56 and rows[-1]["id"] == "900"
    assert len(_read_fresh(plain, segment, tmp_path / "plain.csv")) == 55  # the original is untouched

    # two images of that shape: which one the objects lie on is unknown, so no colours
    he_viewer.add_image(picture[..., 0], name="red channel")
    segment.split_source.select("ground truth")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    assert "mean_red" not in he_viewer.layers["ground truth instances"].features
    assert "mean_intensity" not in he_viewer.layers["ground truth instances"].features
    assert not messages.errors


def _read_fresh(layer, segment, path):
    """Save ``layer``'s table, selected, and read it back."""
    segment.viewer.layers.selection.active = layer
    assert segment.save_measurements(path) == path
    return _read(path)


def test_objects_measured_again_without_their_class_map_keep_their_classes():
    from napari_selfreg.core.measurements import measure_to_end
    from napari_selfreg.core.progress import drain
    from napari_selfreg.widgets.segment_widget import _measure

    objects = np.zeros((6, 6), np.int32)
    objects[0:2, 0:2], objects[4:6, 4:6] = 1, 2
    classes = np.where(objects == 2, 3, np.where(objects == 1, 2, 1)).astype(np.uint8)
    before = measure_to_end(objects, classes)
    objects[2, 2] = 9  # painted by the user: no class known
    objects[4:6, 4] = 0
    table = drain(_measure(objects, None, before))
    assert table.ids.tolist() == [1, 2, 9]
    assert table.class_ids.tolist() == [2, 3, 0] and table.area.tolist() == [4, 2, 1]


@pytest.mark.gui
def test_objects_are_coloured_by_a_measurement(he_viewer, qtbot, messages, tmp_path):
    """Colour objects by: each object's colour on viridis between the column's 2nd and 98th
    percentiles, following the selection, the pixel size, a new table and a removed layer; the
    first entry gives the objects their own colours back."""
    import dataclasses
    import importlib.util

    from napari.layers._layer_actions import _duplicate_layer
    from napari.utils.colormaps import CyclicLabelColormap, DirectLabelColormap, ensure_colormap

    from napari_selfreg.core.measurements import measure_to_end
    from napari_selfreg.widgets.measurement_colours import NO_VALUE_COLOUR, UNMEASURED_COLOUR, number_text
    from napari_selfreg.widgets.segment_widget import MEASUREMENTS_KEY, NAMES_KEY, OWN_COLOURS

    viridis = np.asarray(ensure_colormap("viridis").colors)
    _, segment = docked(he_viewer, "Segment")
    assert segment.colour_by.count() == 1 and not segment.colour_by.isEnabled()  # nothing measured yet
    segment.split_source.select("ground truth")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    layer = he_viewer.layers["ground truth instances"]
    choices = [segment.colour_by.itemText(k) for k in range(segment.colour_by.count())]
    assert choices[0] == OWN_COLOURS and segment.colour_by.currentIndex() == 0 and segment.colour_by.isEnabled()
    assert {"area_px", "equivalent_diameter_px", "circularity", "eccentricity", "mean_red", "eosin_od"} <= set(choices)
    assert not {"index", "class_id", "class_name", "centroid_row", "min_row", "max_col", "touches_edge"} & set(choices)

    own = layer.colormap
    ids = layer.features["index"].to_numpy()
    own_colours = own.map(ids)
    areas = layer.features["area_px"].to_numpy().astype(float)
    segment.colour_by.setCurrentText("area_px")
    assert isinstance(layer.colormap, DirectLabelColormap)
    colours = layer.colormap.map(ids)
    np.testing.assert_allclose(colours[np.argmax(areas)], viridis[-1])  # the largest: the bright end
    np.testing.assert_allclose(colours[np.argmin(areas)], viridis[0])  # the smallest: the dark end
    low, high = np.percentile(areas, [2, 98])
    steps = np.rint(np.clip((areas - low) / (high - low), 0, 1) * 255).astype(int)
    np.testing.assert_allclose(colours, viridis[steps])  # every object, in between
    assert len(np.unique(steps)) > 10
    np.testing.assert_allclose(layer.colormap.map(np.array([0, ids.max() + 1])),
                               [[0, 0, 0, 0], UNMEASURED_COLOUR])  # background; an id painted later
    assert f"area_px: dark {number_text(low)} … bright {number_text(high)}" in segment.status.text()
    he_viewer.screenshot(canvas_only=True, flash=False)  # napari draws it

    # a new table (as measuring again gives) with an object without a value: grey
    table = layer.metadata[MEASUREMENTS_KEY]
    perimeter = table.perimeter.copy()
    perimeter[0] = np.nan
    segment.colour_by.setCurrentText("circularity")
    scale = segment._set_table(layer, dataclasses.replace(table, perimeter=perimeter), layer.metadata[NAMES_KEY])
    np.testing.assert_allclose(layer.colormap.map(ids[:1]), [NO_VALUE_COLOUR])
    assert "circularity: dark" in scale and "grey: no value (1)" in scale
    segment._set_table(layer, table, layer.metadata[NAMES_KEY])
    segment.colour_by.setCurrentText("area_px")

    # a pixel size: the areas in µm² (the same colours, the scale in µm²); back at 0, in pixels again
    segment.pixel_size.setValue(0.5)
    assert segment.colour_by.currentText() == "area_px" and segment.colour_by.findText("area_um2") > 0
    segment.colour_by.setCurrentText("area_um2")
    np.testing.assert_allclose(layer.colormap.map(ids), colours)
    assert f"area_um2: dark {number_text(low / 4)} … bright {number_text(high / 4)}" in segment.status.text()
    segment.pixel_size.setValue(0.25)
    assert segment.colour_by.currentText() == "area_um2"
    assert f"area_um2: dark {number_text(low / 16)}" in segment.status.text()
    segment.pixel_size.setValue(0)
    assert segment.colour_by.currentText() == "area_px" and "area_um2" not in segment.status.text()
    np.testing.assert_allclose(layer.colormap.map(ids), colours)

    # a copy carries its colours and gets its own choice; the choices follow the selection
    he_viewer.layers.selection.active = layer
    _duplicate_layer(he_viewer.layers)
    copy = he_viewer.layers["ground truth instances copy"]
    assert same_layer(segment.measured_layer(), copy) and segment.colour_by.currentText() == "area_px"
    segment.colour_by.setCurrentText("eccentricity")
    assert not np.allclose(copy.colormap.map(ids), colours)
    np.testing.assert_allclose(layer.colormap.map(ids), colours)  # the original keeps the areas
    he_viewer.layers.selection.active = layer
    assert segment.colour_by.currentText() == "area_px"
    he_viewer.layers.selection.active = copy
    segment.colour_by.setCurrentIndex(0)
    np.testing.assert_allclose(copy.colormap.map(ids), own_colours)
    he_viewer.layers.remove(copy)

    # a new object painted: magenta until measured again, then coloured by its area (the largest)
    he_viewer.layers.selection.active = layer
    layer.brush_size = 40
    layer.paint((20, 20), 5000)
    np.testing.assert_allclose(layer.colormap.map(np.array([5000])), [UNMEASURED_COLOUR])
    assert segment.save_measurements(tmp_path / "painted.csv") is not None
    qtbot.waitUntil(lambda: segment.measure_worker is None, timeout=30_000)
    painted = layer.features.set_index("index")["area_px"]
    assert painted.idxmax() == 5000 and painted.size != ids.size  # objects under the brush are gone
    np.testing.assert_allclose(layer.colormap.map(np.array([5000])), [viridis[-1]])
    assert "Wrote" in segment.status.text() and "coloured by area_px: dark" in segment.status.text()
    assert segment.colour_by.currentText() == "area_px"

    # the first entry: the colours the objects had
    segment.colour_by.setCurrentIndex(0)
    assert layer.colormap is own
    np.testing.assert_allclose(layer.colormap.map(ids), own_colours)
    assert "own colours" in segment.status.text()

    # removed while coloured: nothing left to colour, and no error
    segment.colour_by.setCurrentText("circularity")
    he_viewer.layers.remove(layer)
    assert segment.colour_by.count() == 1 and not segment.colour_by.isEnabled()
    assert not messages.errors

    if importlib.util.find_spec("numba") is None:  # napari draws ids above 2**16 one by one only with numba
        objects = np.zeros((8, 8), np.int32)
        objects[:3, :3], objects[5:, 5:] = 70_000, 3
        large = he_viewer.add_labels(objects, name="large ids")
        segment._set_table(large, measure_to_end(objects, None), [])
        segment.colour_by.setCurrentText("area_px")
        assert "numba" in messages.errors[-1] and segment.colour_by.currentIndex() == 0
        assert isinstance(large.colormap, CyclicLabelColormap)
        he_viewer.screenshot(canvas_only=True, flash=False)
