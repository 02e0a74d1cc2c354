"""What the widgets train and segment on is what the user chose: removed, renamed, stacked,
other-image and repeated cases (a real viewer under Xvfb)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")

from test_widgets import PLUGIN, docked, train_widget_for, wait_idle


def _add_tiny_model(segment) -> None:
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    model = SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2)))
    segment.registry.add("tiny", model, replace=True)
    segment.model_combo.set_names(segment.registry.names())
    segment.model_combo.setCurrentText("tiny")


def _segment_he(viewer, probabilities: bool = False, instances: bool = False):
    """The Segment widget docked, a tiny model chosen, the H&E sample as its image."""
    _, segment = docked(viewer, "Segment")
    _add_tiny_model(segment)
    segment.image_combo.select("H&E tissue")
    segment.probabilities.setChecked(probabilities)
    segment.instances.setChecked(instances)
    return segment


def _stop_at_once(monkeypatch) -> None:
    """Every later Segment run is stopped before its first tile."""
    from napari_selfreg.widgets import segment_widget

    real = segment_widget.run_prediction

    def stopped_at_once(*args):
        args[-1].set()  # the stop event
        return (yield from real(*args))

    monkeypatch.setattr(segment_widget, "run_prediction", stopped_at_once)


def test_a_removed_strokes_layer_leaves_nothing_chosen_and_a_renamed_one_stays(he_viewer, messages):
    train = train_widget_for(he_viewer)
    he_viewer.layers["strokes"].name = "my strokes"
    assert train.labels_combo.layer() == he_viewer.layers["my strokes"]
    he_viewer.layers.selection.active = he_viewer.layers["ground truth"]  # as napari selects a neighbour
    he_viewer.layers.remove("my strokes")
    assert train.labels_combo.layer() is None  # not silently the "ground truth" layer
    assert train.labels_combo.currentText() == ""
    assert train.start() is None and "Choose the labels layer" in messages.errors[-1]
    new = he_viewer.add_labels(np.zeros((256, 256), np.uint8), name="fresh strokes")
    assert train.labels_combo.layer() is None  # the user chooses again
    train.labels_combo.setCurrentText("fresh strokes")
    assert train.labels_combo.layer() == new


def test_an_added_pair_row_starts_empty_and_is_not_a_pair(he_viewer):
    train = train_widget_for(he_viewer)
    row = train.add_pair()
    assert row.image.layer() is None and row.labels.layer() is None
    assert train._pairs() == [(he_viewer.layers["H&E tissue"], he_viewer.layers["strokes"])]
    row.image.select("H&E tissue")
    assert train._pairs()[1] == (he_viewer.layers["H&E tissue"], None)  # half a pair is reported at Start


def test_a_three_plane_stack_is_not_taken_for_rgb(he_viewer, messages):

    stack = he_viewer.add_image(np.zeros((3, 256, 256), np.uint8), name="z-stack")
    assert not stack.rgb and stack.ndim == 3
    train = train_widget_for(he_viewer)
    train.image_combo.select("z-stack")
    assert train.start() is None and "stack of 2-D planes" in messages.errors[-1]
    _, segment = docked(he_viewer, "Segment")
    _add_tiny_model(segment)
    segment.image_combo.select("z-stack")
    assert segment.start() is None and "stack of 2-D planes" in messages.errors[-1]


def test_a_refused_start_leaves_the_edited_predictions_name_alone(he_viewer, messages):
    """Start renamed a '… prediction' labels layer to '… corrected' before checking the ids."""
    train = train_widget_for(he_viewer)
    edited = he_viewer.add_labels(np.full((256, 256), 9, np.uint8), name="H&E tissue prediction")
    train.labels_combo.select("H&E tissue prediction")
    assert train.start() is None and "hold id 9" in messages.errors[-1]
    assert edited.name == "H&E tissue prediction"


def test_correction_starts_from_the_chosen_images_own_prediction(he_viewer, qtbot, messages):
    image = he_viewer.layers["H&E tissue"]
    other = he_viewer.add_image(np.asarray(image.data)[::-1].copy(), name="other tissue", rgb=True)
    train = train_widget_for(he_viewer)
    prediction = he_viewer.add_labels(np.full((256, 256), 2, np.uint8), name="H&E tissue prediction")
    train.image_combo.select("other tissue")
    assert train.use_prediction_as_labels() is None
    assert "no prediction of 'other tissue'" in messages.errors[-1]
    # the Segment widget's output counts as a prediction of its image
    he_viewer.add_labels(np.ones((256, 256), np.uint8), name="other tissue segmentation")
    corrected = train.use_prediction_as_labels()
    assert corrected.name == "other tissue corrected" and train.labels_combo.layer() == corrected
    painted = np.asarray(he_viewer.layers["strokes"].data) > 0
    assert (np.asarray(corrected.data)[~painted] == 1).all()  # from other's segmentation, not H&E's 2s
    train.image_combo.select("H&E tissue")
    assert np.asarray(train.use_prediction_as_labels().data)[~painted].min() == 2
    assert prediction in he_viewer.layers and other in he_viewer.layers


def test_correcting_a_second_round_starts_from_its_new_prediction(he_viewer, qtbot, messages):
    """The labels of round 2 are round 1's correction, with zeros where nothing was predicted
    (a large image's view) or erased: round 2's prediction must not be hidden under it."""
    train = train_widget_for(he_viewer)
    prediction = he_viewer.add_labels(np.full((256, 256), 2, np.uint8), name="H&E tissue prediction")
    first = train.use_prediction_as_labels()
    assert train.labels_combo.layer() == first
    first.data[:, 200:] = 0  # unpredicted beyond the view, or erased by the user
    first.data[:50, :50] = 1  # and a correction
    prediction.data[:] = 1  # round 2's prediction, trained on that correction
    prediction.data[100:150, 100:150] = 2
    second = train.use_prediction_as_labels()
    assert second is not first and train.labels_combo.layer() == second
    np.testing.assert_array_equal(second.data, prediction.data)
    np.testing.assert_array_equal(first.data[:50, :50], 1)  # the earlier correction is left as it was
    # sparse strokes still go on top of a prediction
    train.labels_combo.select("strokes")
    strokes = np.asarray(he_viewer.layers["strokes"].data)
    third = train.use_prediction_as_labels()
    np.testing.assert_array_equal(np.asarray(third.data)[strokes > 0], strokes[strokes > 0])
    assert not messages.errors


def test_segmenting_again_replaces_the_probabilities_and_drops_the_previous_result(he_viewer, qtbot, messages):

    segment = _segment_he(he_viewer, probabilities=True)
    for _ in range(2):
        assert segment.start() is not None
        wait_idle(qtbot, segment, timeout=60_000)
    names = [layer.name for layer in he_viewer.layers]
    assert names.count("H&E tissue probabilities") == 1 and names.count("H&E tissue segmentation") == 1
    assert "H&E tissue segmentation (previous)" not in names
    assert not messages.errors


def test_no_preview_when_the_preview_interval_is_zero():
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.sample_data import he_arrays
    from napari_selfreg.widgets._workers import run_training

    data = he_arrays()
    config = TrainConfig(steps=6, patch_size=48, batch_size=2, seed=0)
    events = list(run_training(
        [data["image"]], [data["strokes"]], config, ModelConfig(base_channels=4, depth=2), ["background", "nuclei"],
        None, threading.Event(), view=lambda: (slice(0, 64), slice(0, 64)), preview_image=data["image"],
        preview_every=0.0,
    ))
    assert [kind for kind, _ in events] == ["report"] * 6
    events = list(run_training(
        [data["image"]], [data["strokes"]], config, ModelConfig(base_channels=4, depth=2), ["background", "nuclei"],
        None, threading.Event(), view=lambda: (slice(0, 64), slice(0, 64)), preview_image=data["image"],
        preview_every=1e-6,
    ))
    assert "preview" in [kind for kind, _ in events]  # the same run with an interval does preview


def test_loading_a_model_shows_its_training_settings(make_napari_viewer, messages, tmp_path):
    """Load… used to leave the Advanced section at its defaults, so a second round trained
    with other settings than the first."""
    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelConfig, ModelInfo, TrainConfig
    from napari_selfreg.core.model import SegmentationModel

    settings = TrainConfig(steps=77, time_budget=42.0, patch_size=96, batch_size=6, learning_rate=3e-4,
                           selfreg=False, lambda_scr=0.02, lambda_ifd=0.03, validation_every=9, keep="best",
                           device="cpu", seed=None)
    info = ModelInfo(model=ModelConfig(base_channels=8, depth=2), class_names=["bg", "gland"],
                     training={**settings.to_dict(), "images": 2})
    path = save_model(SegmentationModel.create(info), tmp_path / "round1")
    train = train_widget_for(make_napari_viewer())
    device = train.device.currentText()
    assert train.load_model(path) == "round1"
    shown = train.train_config()
    for key in ("steps", "time_budget", "patch_size", "batch_size", "selfreg", "validation_every", "keep", "seed"):
        assert getattr(shown, key) == getattr(settings, key), key
    for key in ("learning_rate", "lambda_scr", "lambda_ifd"):
        assert getattr(shown, key) == pytest.approx(getattr(settings, key)), key
    assert shown.device == device  # this machine's choice, not the file's
    assert train.base_channels.value() == 8
    assert train.class_names() == ["bg", "gland"]


def test_loading_a_model_keeps_the_names_of_classes_beyond_its_own(make_napari_viewer, tmp_path):
    """Load… used to replace the strokes layer's class list by the model's: a third class
    painted and named before loading a two-class model lost its name."""
    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel
    from napari_selfreg.widgets.classes import class_names_of

    info = ModelInfo(model=ModelConfig(base_channels=4, depth=2), class_names=["bg", "nucleus"])
    path = save_model(SegmentationModel.create(info), tmp_path / "two")
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, name="image")
    train = train_widget_for(viewer)
    train.image_combo.select("image")
    layer = train.new_labels_layer()
    train.labels_combo.select(layer.name)
    train.set_class_names(["background", "nuclei"])
    train.add_class("mitosis")  # written to the strokes layer, as the + button does
    train.add_class("debris")
    assert class_names_of(layer) == ["background", "nuclei", "mitosis", "debris"]
    assert train.load_model(path) == "two"
    expected = ["bg", "nucleus", "mitosis", "debris"]
    assert train.class_names() == expected
    assert class_names_of(layer) == expected


def test_closing_the_train_dock_stops_its_training(he_viewer, qtbot):
    """napari's ✕ on a dock detaches the widget without deleting it; its training must not run on."""
    from test_widgets import tiny


    dock, train = docked(he_viewer, "Train SelfReg UNet")
    train.image_combo.select("H&E tissue")
    train.labels_combo.select("strokes")
    tiny(train, steps=100_000)
    train.start()
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 2, timeout=60_000)
    dock.destroyOnClose()
    qtbot.waitUntil(lambda: not train.running, timeout=30_000)
    assert train.result is not None and train.result.stopped
    assert train.model_combo.currentText() in train.registry  # the model so far is kept
    wait_idle(qtbot, train)


def test_closing_the_train_dock_mid_training_starts_no_end_of_round_prediction(he_viewer, qtbot, monkeypatch):
    """The training stopped by the dock's ✕ returns later: its model is kept, but the whole-image
    prediction of a round's end must not start for a dock no one sees (minutes on a CPU)."""
    from test_widgets import tiny

    from napari_selfreg.widgets import train_widget

    started = []
    real = train_widget._predict_labels

    def spy(*args):
        started.append(args[-1].is_set())
        return real(*args)

    monkeypatch.setattr(train_widget, "_predict_labels", spy)
    dock, train = docked(he_viewer, "Train SelfReg UNet")
    train.image_combo.select("H&E tissue")
    train.labels_combo.select("strokes")
    tiny(train, steps=100_000)
    train.preview_every.setValue(0.0)
    train.start()
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 2, timeout=60_000)
    dock.destroyOnClose()
    qtbot.waitUntil(lambda: not train.running, timeout=30_000)
    qtbot.wait(300)  # time for a prediction started on return to reach its worker
    wait_idle(qtbot, train)
    assert train.result is not None and train.result.stopped
    name = train.model_combo.currentText()
    assert name in train.registry and train.registry.get(name) is train.result.model  # the model is kept
    assert started == [] and train.final_worker is None


def test_closing_the_train_dock_stops_its_end_of_round_prediction(he_viewer, qtbot, monkeypatch):
    """A 4 MP end-of-round prediction takes minutes on a CPU; a closed dock has no one to show it to."""
    from test_widgets import tiny

    from napari_selfreg.widgets import train_widget

    gate, stopped, results = threading.Event(), [], []
    real = train_widget._predict_labels

    def held(*args):
        gate.wait(60)
        stopped.append(args[-1].is_set())  # the stop request the prediction checks between tiles
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(train_widget, "_predict_labels", held)
    dock, train = docked(he_viewer, "Train SelfReg UNet")
    train.image_combo.select("H&E tissue")
    train.labels_combo.select("strokes")
    tiny(train, steps=3)
    train.start()
    qtbot.waitUntil(lambda: not train.running and train.final_worker is not None, timeout=60_000)
    prediction = "H&E tissue prediction"
    # a live preview may have drawn into the layer during training (a slow first step does)
    previewed = np.array(he_viewer.layers[prediction].data) if prediction in he_viewer.layers else None
    dock.destroyOnClose()
    gate.set()
    wait_idle(qtbot, train)
    assert stopped == [True] and results == [None]  # stopped before its first tile
    # a stopped prediction writes nothing; an empty layer goes
    if previewed is None or not previewed.any():
        assert prediction not in he_viewer.layers or not np.any(he_viewer.layers[prediction].data)
    else:
        np.testing.assert_array_equal(he_viewer.layers[prediction].data, previewed)


def test_a_rounds_final_prediction_lands_on_its_own_image(he_viewer, qtbot, messages, monkeypatch):
    """The end-of-round prediction may come back after the next round started on another image."""
    from test_widgets import tiny

    from napari_selfreg.widgets import train_widget

    gate = threading.Event()
    real = train_widget._predict_labels

    def held(*args):
        gate.wait(60)
        return real(*args)

    monkeypatch.setattr(train_widget, "_predict_labels", held)
    image = he_viewer.layers["H&E tissue"]
    he_viewer.add_image(np.asarray(image.data)[64:128, 64:160].copy(), name="small", rgb=True)
    he_viewer.add_labels(np.asarray(he_viewer.layers["strokes"].data)[64:128, 64:160].copy(), name="small strokes")
    train = train_widget_for(he_viewer)
    tiny(train, steps=3)
    train.patch_size.setValue(32)
    train.start()
    qtbot.waitUntil(lambda: not train.running and train.final_worker is not None, timeout=60_000)
    train.image_combo.select("small")
    train.labels_combo.select("small strokes")
    train.model_combo.setCurrentText(train_widget.NEW_MODEL)
    assert train.start() is not None, messages.errors
    qtbot.waitUntil(lambda: not train.running, timeout=60_000)
    gate.set()
    wait_idle(qtbot, train)
    first, second = he_viewer.layers["H&E tissue prediction"], he_viewer.layers["small prediction"]
    assert first.data.shape == (256, 256) and second.data.shape == (64, 96)
    assert np.asarray(first.data).min() >= 1 and np.asarray(second.data).min() >= 1  # each filled whole
    assert not messages.errors


def test_a_new_round_on_the_same_image_stops_the_last_rounds_final_prediction(he_viewer, qtbot, monkeypatch):
    """Coming back after the new round's previews began, it painted the old model's labels over them."""
    from test_widgets import tiny

    from napari_selfreg.widgets import train_widget

    gate, stopped = threading.Event(), []
    real = train_widget._predict_labels

    def held(*args):
        gate.wait(60)
        stopped.append(args[-1].is_set())
        return real(*args)

    monkeypatch.setattr(train_widget, "_predict_labels", held)
    train = train_widget_for(he_viewer)
    tiny(train, steps=3)
    train.start()
    qtbot.waitUntil(lambda: not train.running and train.final_worker is not None, timeout=60_000)
    first = train.final_worker
    assert train.start() is not None
    assert first.stop_event.is_set()
    qtbot.waitUntil(lambda: not train.running, timeout=60_000)
    gate.set()
    wait_idle(qtbot, train)
    assert sorted(stopped) == [False, True]  # the old round's stopped, this round's ran
    assert np.asarray(he_viewer.layers["H&E tissue prediction"].data).min() >= 1


def test_ids_beyond_the_class_table_and_misaligned_strokes_are_refused(he_viewer, messages):
    train = train_widget_for(he_viewer)
    strokes = he_viewer.layers["strokes"]
    strokes.data[:5, :5] = 9  # e.g. an instance image loaded as labels
    assert train.start() is None
    assert "id 9 but there are 2 classes" in messages.errors[-1]
    strokes.data[:5, :5] = 0
    strokes.translate = (40, 40)
    assert train.start() is None
    assert "moved or scaled against 'H&E tissue'" in messages.errors[-1]
    train.image_combo.select("H&E tissue")
    train.add_pair().image.select("H&E tissue")
    strokes.translate = (0, 0)
    assert train.start() is None
    assert "strokes on 'H&E tissue' (extra pair 1)" in messages.errors[-1]


def test_segmenting_again_keeps_a_segmentation_the_user_edited(he_viewer, qtbot, messages):

    segment = _segment_he(he_viewer)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    edited = he_viewer.layers["H&E tissue segmentation"]
    edited.paint((100, 100), 3 - int(edited.data[100, 100]))  # the brush, with the other class
    painted = np.array(edited.data, copy=True)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    names = [layer.name for layer in he_viewer.layers]
    assert "H&E tissue segmentation (corrected)" in names and "H&E tissue segmentation" in names
    assert he_viewer.layers["H&E tissue segmentation (corrected)"] is edited
    assert np.array_equal(edited.data, painted)
    assert "H&E tissue segmentation (previous)" not in names
    assert any("Your edits are kept in 'H&E tissue segmentation (corrected)'" in m for m in messages.infos)


def test_three_classes_give_one_named_probability_layer_per_structure(he_viewer, qtbot, messages):
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    info = ModelInfo(model=ModelConfig(base_channels=4, depth=2, num_classes=3), class_names=["bg", "nuclei", "glands"])
    _, segment = docked(he_viewer, "Segment")
    segment.registry.add("three", SegmentationModel.create(info), replace=True)
    segment.model_combo.set_names(segment.registry.names())
    segment.model_combo.setCurrentText("three")
    segment.image_combo.select("H&E tissue")
    segment.probabilities.setChecked(True)
    segment.instances.setChecked(False)
    for _ in range(2):  # the second run replaces the layers
        segment.start()
        wait_idle(qtbot, segment, timeout=60_000)
    layers = [layer for layer in he_viewer.layers if "probabilities" in layer.name]
    assert [layer.name for layer in layers] == ["H&E tissue probabilities: nuclei", "H&E tissue probabilities: glands"]
    assert all(layer.data.shape == (256, 256) for layer in layers)
    total = sum(np.asarray(layer.data, np.float32) for layer in layers)
    assert float(total.max()) <= 1.0 + 1e-3 and he_viewer.dims.ndim == 2


def test_a_device_can_be_chosen_before_the_list_was_opened(he_viewer, monkeypatch):
    from napari_selfreg.widgets import _common

    monkeypatch.setattr(_common, "_DEVICES", [])
    monkeypatch.setattr(_common, "_list_devices", lambda: ["cuda", "cpu"])
    monkeypatch.delitem(__import__("sys").modules, "torch", raising=False)  # as at docking
    combo = _common.DeviceCombo()
    assert [combo.itemText(i) for i in range(combo.count())] == ["auto", "cpu"]  # torch not imported
    combo.setCurrentText("cuda")
    assert combo.currentText() == "cuda"


def test_a_failed_segmentation_is_replaced_not_kept_as_corrected(he_viewer, qtbot, messages, monkeypatch):
    from napari_selfreg.widgets import segment_widget

    segment = _segment_he(he_viewer)
    real = segment_widget.run_prediction

    def out_of_memory(*args):
        raise MemoryError("simulated")
        yield

    monkeypatch.setattr(segment_widget, "run_prediction", out_of_memory)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    assert any("Segmentation failed" in m for m in messages.errors)
    monkeypatch.setattr(segment_widget, "run_prediction", real)
    for _ in range(2):
        segment.start()
        wait_idle(qtbot, segment, timeout=60_000)
    names = [layer.name for layer in he_viewer.layers]
    assert names.count("H&E tissue segmentation") == 1 and not any("corrected" in n or "previous" in n for n in names)


def test_widgets_docked_through_napari_keep_their_layers_when_the_list_changes(he_viewer, qtbot, messages):
    """napari hands a docked plugin widget a proxy of the viewer, which wraps every layer anew
    on each access: the choices must survive another layer being added, and Segment must run
    twice without the image being chosen again."""
    from napari_selfreg.widgets._common import LayerCombo

    docked = {title: he_viewer.window.add_plugin_dock_widget(PLUGIN, title)[1]
              for title in ("Train SelfReg UNet", "Segment", "Feature redundancy")}
    assert type(docked["Segment"].viewer).__name__ == "PublicOnlyProxy"  # what users get
    train, segment = docked["Train SelfReg UNet"], docked["Segment"]
    train.image_combo.select("H&E tissue")
    train.labels_combo.select("strokes")
    segment.image_combo.select("H&E tissue")
    combos = [c for widget in docked.values() for c in widget.findChildren(LayerCombo)]
    before = [c.currentText() for c in combos]
    assert "H&E tissue" in before and "strokes" in before
    he_viewer.add_points(name="points")
    he_viewer.layers.remove("points")
    assert [c.currentText() for c in combos] == before
    assert train.labels_combo.layer().name == "strokes"

    _add_tiny_model(segment)
    for _ in range(2):
        segment.start()
        qtbot.waitUntil(lambda: segment.worker is None, timeout=60_000)
        assert segment.image_combo.currentText() == "H&E tissue"
    assert not messages.errors
    assert "H&E tissue segmentation" in he_viewer.layers
    wait_idle(qtbot, *docked.values())


def test_stopped_runs_never_cost_the_last_complete_segmentation(he_viewer, qtbot, messages, monkeypatch):
    """Two stopped runs after a complete one: the complete result stays as '(previous)'; the
    output cannot be painted while it fills in (the tiles would overwrite the strokes)."""
    from napari_selfreg.widgets import segment_widget

    segment = _segment_he(he_viewer)
    segment.start()
    assert segment.output_layer.editable is False
    wait_idle(qtbot, segment, timeout=60_000)
    assert segment.output_layer.editable is True
    complete = he_viewer.layers["H&E tissue segmentation"]
    kept = np.array(complete.data, copy=True)
    assert set(np.unique(kept)) <= {1, 2} and kept.min() >= 1  # every pixel predicted

    real = segment_widget.run_prediction
    _stop_at_once(monkeypatch)
    for _ in range(2):
        segment.start()
        wait_idle(qtbot, segment, timeout=60_000)
        assert (np.asarray(he_viewer.layers["H&E tissue segmentation"].data) == 0).all()  # nothing done
    assert he_viewer.layers["H&E tissue segmentation (previous)"] is complete
    np.testing.assert_array_equal(complete.data, kept)
    assert "kept as 'H&E tissue segmentation (previous)'" in segment.status.text()
    names = [layer.name for layer in he_viewer.layers]
    assert names.count("H&E tissue segmentation") == 1 and not any("corrected" in n for n in names)

    monkeypatch.setattr(segment_widget, "run_prediction", real)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    names = [layer.name for layer in he_viewer.layers]
    assert "H&E tissue segmentation (previous)" not in names  # a complete run replaces it


def test_segmenting_again_keeps_the_users_instances_and_probability_layers(he_viewer, qtbot, messages):
    segment = _segment_he(he_viewer, probabilities=True, instances=True)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    instances = he_viewer.layers["H&E tissue instances"]
    instances.paint((10, 10), 999)
    painted = np.array(instances.data, copy=True)
    ours = he_viewer.layers["H&E tissue probabilities"]
    mine = he_viewer.add_image(np.asarray(ours.data) > 0.5, name="H&E tissue probabilities thresholded by me")
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    names = [layer.name for layer in he_viewer.layers]
    assert he_viewer.layers["H&E tissue instances (corrected)"] is instances
    np.testing.assert_array_equal(instances.data, painted)
    assert names.count("H&E tissue instances") == 1 and 999 not in he_viewer.layers["H&E tissue instances"].data
    assert mine in he_viewer.layers and ours not in he_viewer.layers
    assert names.count("H&E tissue probabilities") == 1


def test_stop_reaches_the_instance_split_and_keeps_the_objects_found(he_viewer, qtbot, messages, monkeypatch):
    """The split of a slide runs window by window after the tiles: the button stays Stop
    until it ends, and Stop ends it with the finished windows' objects in the layer."""
    from napari_selfreg.core import instances
    from napari_selfreg.sample_data import he_arrays

    real = instances.split_instances
    held = threading.Event()
    # the sample's nuclei as the class map (the untrained tiny model's is one blob)
    nuclei = he_arrays()["ground_truth"]  # 1 = background, 2 = nuclei

    def held_after_one_window(labels, out=None, stop=None, **options):
        run = real(nuclei, out, tile=64, margin=8, stop=stop)  # 16 windows on the 256 x 256 sample
        yield next(run)
        held.set()
        assert stop.wait(30)  # until the user presses Stop
        return (yield from run)

    monkeypatch.setattr(instances, "split_instances", held_after_one_window)
    segment = _segment_he(he_viewer, instances=True)
    segment.start()
    qtbot.waitUntil(held.is_set, timeout=60_000)
    qtbot.waitUntil(lambda: segment.worker is None, timeout=10_000)  # the tiles are done
    qtbot.waitUntil(lambda: segment.progress.maximum() == 16, timeout=10_000)  # the windows' progress
    assert segment.running and segment.run_button.text() == "Stop" and segment.progress.value() == 1
    # the tiles are done, but a stroke now would reach some windows of the split and not others
    classes = he_viewer.layers["H&E tissue segmentation"]
    assert not classes.editable and "read-only" in segment.status.text()
    segment.run_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    assert segment.run_button.text() == "Segment" and not segment.running
    assert classes.editable
    layer = he_viewer.layers["H&E tissue instances"]
    assert 0 < layer.data.max() < instances.separate_instances(nuclei).max()  # the first window's objects
    assert "stopped" in segment.status.text() and f"{layer.data.max()} objects" in segment.status.text()
    assert not messages.errors


def test_the_objects_of_a_corrected_labels_layer_are_separated_on_demand(he_viewer, qtbot, messages, tmp_path):
    """"Objects of" a labels layer: its classes split into objects; painting on it and splitting
    again replaces the objects, unless the user edited them; an instance layer is refused."""
    from napari_selfreg.core.instances import separate_instances

    _, segment = docked(he_viewer, "Segment")
    truth = he_viewer.layers["ground truth"]  # 1 = background, 2 = nuclei
    segment.split_source.select("ground truth")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    objects = he_viewer.layers["ground truth instances"]
    np.testing.assert_array_equal(objects.data, separate_instances(np.asarray(truth.data)))
    assert objects.data.max() == 55 and "55 objects" in segment.status.text()
    assert tuple(objects.scale) == tuple(truth.scale)

    nucleus = objects.data == objects.data[tuple(np.argwhere(objects.data > 0)[0])]
    truth.data[nucleus] = 1  # the user erases a nucleus from the class map
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    assert he_viewer.layers["ground truth instances"].data.max() == 54
    assert [layer.name for layer in he_viewer.layers].count("ground truth instances") == 1

    # two structure classes: the objects are counted by class, under the layer's class names
    from napari_selfreg.widgets.classes import class_features

    two = np.array(truth.data, copy=True)
    two[:, 128:][two[:, 128:] == 2] = 3
    he_viewer.add_labels(two, name="two kinds", features=class_features(["background", "nucleus", "lymphocyte"]))
    segment.split_source.select("two kinds")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    whole = separate_instances(two)
    ids, first = np.unique(whole.ravel(), return_index=True)
    kinds = two.ravel()[first[ids > 0]]
    counts = f"{whole.max()} objects: {(kinds == 2).sum()} nucleus, {(kinds == 3).sum()} lymphocyte"
    assert (kinds == 3).sum() > 10 and counts in segment.status.text()

    # a layer of objects is measured as it is, not split again: ours, and one made elsewhere
    from napari_selfreg.widgets.segment_widget import MEASUREMENTS_KEY

    errors = len(messages.errors)
    objects = he_viewer.layers["ground truth instances"]
    objects.data[objects.data == 7] = 0  # erased since it was measured
    segment.split_source.select("ground truth instances")
    assert segment.split_layer() is not None
    wait_idle(qtbot, segment, timeout=30_000)
    assert 7 not in objects.metadata[MEASUREMENTS_KEY].ids.tolist()
    assert len(objects.features) == len(np.unique(objects.data)) - 1
    assert "measured its" in segment.status.text() and "ground truth instances instances" not in he_viewer.layers
    ids = (np.arange(256 * 256, dtype=np.int32).reshape(256, 256) // 7) % 100 + 1  # objects made elsewhere
    elsewhere = he_viewer.add_labels(ids, name="objects from elsewhere")
    segment.split_source.select("objects from elsewhere")
    assert segment.split_layer() is not None  # its ids are read in the worker: a slide's take seconds
    assert not elsewhere.editable  # read-only while measured
    wait_idle(qtbot, segment, timeout=30_000)
    assert len(messages.errors) == errors and elsewhere.editable
    assert "'objects from elsewhere' holds objects already: measured its 100 objects" in segment.status.text()
    np.testing.assert_array_equal(elsewhere.features["area_px"], np.bincount(ids.ravel())[1:])
    assert set(elsewhere.features["class_id"]) == {0}  # no class map: unknown
    assert "objects from elsewhere instances" not in he_viewer.layers
    assert not segment.running and segment.run_button.text() == "Segment"
    from napari_selfreg.widgets._common import same_layer

    assert segment.colour_by.isEnabled() and same_layer(segment.measured_layer(), elsewhere)
    # painted on, then saved: measured again without a class map, the new object of class 0
    he_viewer.layers.selection.active = elsewhere
    elsewhere.paint((128, 128), 500)
    assert segment.save_measurements(tmp_path / "elsewhere.csv") is not None
    qtbot.waitUntil(lambda: segment.measure_worker is None, timeout=30_000)
    assert elsewhere.features.set_index("index").loc[500, "class_id"] == 0
    assert "500," in (tmp_path / "elsewhere.csv").read_text() and len(messages.errors) == errors

    # a GlaS-like annotation of a few objects (ids 1..9 on 0): object 1 was taken for background
    few = np.zeros((256, 256), np.uint8)
    for index in range(9):
        few[20 + 25 * index : 35 + 25 * index, 30:60] = index + 1
    he_viewer.add_labels(few, name="nine glands")
    segment.split_source.select("nine glands")
    assert segment.split_layer() is not None
    wait_idle(qtbot, segment, timeout=30_000)
    assert "'nine glands' looks like a mask or objects with 0 as background" in messages.errors[-1]
    assert "nine glands instances" not in he_viewer.layers and not segment.running
    # with class names the layer says it is a class map: 0 is then unpainted, 1 background
    he_viewer.layers["nine glands"].features = class_features([f"class {i}" for i in range(1, 11)])
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    assert "nine glands instances" in he_viewer.layers


def test_correction_starts_from_the_prediction_the_user_corrected(he_viewer, qtbot, messages):
    """With a training preview and a Segment output of the same image, the one painted on is
    copied; the preview's class names follow the class table."""
    from test_widgets import tiny

    train = train_widget_for(he_viewer)
    tiny(train, steps=3)
    train.start()
    wait_idle(qtbot, train)
    assert "H&E tissue prediction" in he_viewer.layers
    segment = _segment_he(he_viewer)
    segment.start()
    wait_idle(qtbot, segment)
    untouched = train.use_prediction_as_labels()
    assert "Copied from 'H&E tissue prediction'" in messages.infos[-1]  # nothing corrected: the preview
    he_viewer.layers.remove(untouched)
    segmentation = he_viewer.layers["H&E tissue segmentation"]
    segmentation.paint((200, 30), 3)  # a correction with a third class
    corrected = train.use_prediction_as_labels()
    assert "Copied from 'H&E tissue segmentation' into 'H&E tissue corrected'" in messages.infos[-1]
    assert np.asarray(corrected.data)[200, 30] == 3
    again = train.use_prediction_as_labels()  # napari named it "… corrected [1]", the message no layer
    assert again.name == "H&E tissue corrected 2" and "into 'H&E tissue corrected 2'" in messages.infos[-1]
    he_viewer.layers.remove(again)

    train.class_table.item(1, 1).setText("tumour nucleus")
    preview = train._prediction_layer(he_viewer.layers["H&E tissue"], "H&E tissue prediction")
    assert list(preview.features["class"])[2] == "tumour nucleus"


def test_a_segmentation_removed_mid_run_is_reported_and_the_previous_one_kept(he_viewer, qtbot, messages, monkeypatch):
    segment = _segment_he(he_viewer)
    segment.start()
    wait_idle(qtbot, segment)
    complete = he_viewer.layers["H&E tissue segmentation"]
    segment.start()
    he_viewer.layers.remove("H&E tissue segmentation")  # the new, unfinished one
    wait_idle(qtbot, segment)
    assert "removed during the run" in segment.status.text()
    assert "kept as 'H&E tissue segmentation (previous)'" in segment.status.text()
    _stop_at_once(monkeypatch)
    segment.start()
    wait_idle(qtbot, segment)
    assert he_viewer.layers["H&E tissue segmentation (previous)"] is complete


def test_a_class_without_strokes_is_a_warning_at_start(he_viewer, qtbot, messages):
    from test_widgets import tiny

    from napari_selfreg.core.data import painted_ids

    train = train_widget_for(he_viewer)
    train.add_class("gland")
    tiny(train, steps=2)
    assert train.start() is not None  # a warning, not a refusal
    assert "No strokes of 'gland' (3): this training does not teach that class" in messages.warnings[-1]
    wait_idle(qtbot, train)
    labels = np.zeros((1500, 7), np.int32)
    labels[3, 2], labels[1400, 5] = 1, 4
    assert painted_ids([labels, np.full((2, 2), 2, np.uint8)], rows=512) == {1, 2, 4}


def test_splitting_a_large_layer_again_leaves_the_users_memory_mapped_objects_alone(he_viewer, qtbot, messages,
                                                                                    monkeypatch):
    """Objects of a layer too large for memory go to a file the layer maps; splitting again
    must write a new file, not the one under the objects the user corrected."""
    from napari_selfreg.widgets import segment_widget

    monkeypatch.setattr(segment_widget, "MEMMAP_PIXELS", 1000)
    _, segment = docked(he_viewer, "Segment")
    segment.split_source.select("ground truth")
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    objects = he_viewer.layers["ground truth instances"]
    assert isinstance(objects.data, np.memmap) and objects.data.max() == 55
    objects.paint((10, 10), 999)  # the user's correction
    corrected = np.array(objects.data, copy=True)
    segment.split_button.click()
    wait_idle(qtbot, segment, timeout=30_000)
    assert he_viewer.layers["ground truth instances (corrected)"] is objects
    np.testing.assert_array_equal(objects.data, corrected)
    again = he_viewer.layers["ground truth instances"]
    assert again.data.max() == 55 and 999 not in again.data
    assert not messages.errors


def test_a_layer_is_read_only_while_its_objects_are_separated(he_viewer, qtbot, messages, monkeypatch):
    """Painting during the split of a slide's windows would lose objects or cut them in two."""
    from napari_selfreg.core import instances

    real = instances.split_instances
    held, release = threading.Event(), threading.Event()

    def held_after_one_window(labels, out=None, stop=None, **options):
        run = real(labels, out, tile=64, margin=8, stop=stop)
        yield next(run)
        held.set()
        assert release.wait(30)
        return (yield from run)

    monkeypatch.setattr(instances, "split_instances", held_after_one_window)
    _, segment = docked(he_viewer, "Segment")
    truth = he_viewer.layers["ground truth"]
    truth.editable = True
    segment.split_source.select("ground truth")
    segment.split_button.click()
    qtbot.waitUntil(held.is_set, timeout=30_000)
    assert not truth.editable and "read-only" in segment.status.text()
    release.set()
    wait_idle(qtbot, segment, timeout=30_000)
    assert truth.editable and he_viewer.layers["ground truth instances"].data.max() == 55
    assert not messages.errors


def test_the_layer_pickers_follow_renames(he_viewer, qtbot, messages):
    """A rename emits no layer-list event: the pickers must still name the chosen layer, and an
    item chosen with the wheel or the keyboard must be the layer it shows."""
    from napari_selfreg.widgets._common import LayerCombo

    train = train_widget_for(he_viewer)
    old = he_viewer.layers["strokes"]
    new = he_viewer.add_labels(np.zeros((256, 256), np.uint8), name="new strokes")
    new.data[100:110, 100:110] = 1
    new.data[150:160, 150:160] = 2
    # the old strokes kept under another name, the new ones under the usual name
    old.name = "strokes (old)"
    new.name = "strokes"
    combo = train.labels_combo
    assert combo.currentText() == "strokes (old)" and combo.layer().name == "strokes (old)"
    items = [combo.itemText(i) for i in range(combo.count())]
    assert items == ["ground truth", "strokes (old)", "strokes"]
    for i, text in enumerate(items):  # what the wheel and the arrow keys do
        combo.setCurrentIndex(i)
        assert combo.layer().name == text
    assert combo.layer() == new
    assert train._pairs()[0][1] == new  # what Start trains on: the layer shown

    _, segment = docked(he_viewer, "Segment")
    segment.split_source.select("ground truth")
    he_viewer.layers["ground truth"].name = "gt (renamed)"
    assert segment.split_source.currentText() == "gt (renamed)" == segment.split_source.layer().name

    # a picker gone (its dock deleted) lets go of the layers' renames
    from qtpy.QtCore import QCoreApplication, QEvent

    gone = LayerCombo(he_viewer, type(new))
    followed = gone._named
    assert len(followed) == len(he_viewer.layers)
    gone.deleteLater()
    QCoreApplication.sendPostedEvents(gone, QEvent.Type.DeferredDelete)
    assert followed == []
    he_viewer.layers["gt (renamed)"].name = "ground truth"
    he_viewer.layers.remove(new)  # and removals
    assert segment.split_source.currentText() == "ground truth"
    assert not messages.errors


def _add_models(registry, *names) -> None:
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    for name in names:
        registry.add(name, SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2))),
                     replace=True)


def test_segment_keeps_the_users_model_when_another_viewer_trains_one(make_napari_viewer):
    """The model registry is shared by every viewer: a model joining it (trained in another
    viewer, say) is chosen only where the user had not chosen another than the newest."""
    first, second = make_napari_viewer(), make_napari_viewer()
    _, chooser = docked(second, "Segment")
    _, follower = docked(first, "Segment")
    registry = chooser.registry
    names = ["choice test A", "choice test B", "choice test C", "choice test D"]
    try:
        _add_models(registry, *names[:2])
        assert chooser.model_combo.currentText() == follower.model_combo.currentText() == names[1]  # the newest
        chooser.model_combo.setCurrentText(names[0])  # the user's choice
        _add_models(registry, names[2])  # what the Train widget of the first viewer does at a round's end
        assert chooser.model_combo.currentText() == names[0]
        assert follower.model_combo.currentText() == names[2]  # no choice made there: the new model
        chooser.model_combo.setCurrentText(names[2])  # choosing the newest again follows new ones
        _add_models(registry, names[3])
        assert chooser.model_combo.currentText() == follower.model_combo.currentText() == names[3]
    finally:
        for name in names:
            registry.remove(name)


def test_a_run_without_probabilities_or_objects_drops_the_last_runs_unedited_ones(he_viewer, qtbot, messages):
    """The last run's probability maps and objects stayed beside the new segmentation they no
    longer matched; objects the user corrected are kept, renamed."""
    segment = _segment_he(he_viewer, probabilities=True, instances=True)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    assert {"H&E tissue probabilities", "H&E tissue instances"} <= {layer.name for layer in he_viewer.layers}
    segment.probabilities.setChecked(False)
    segment.instances.setChecked(False)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    names = [layer.name for layer in he_viewer.layers]
    assert "H&E tissue segmentation" in names
    assert not any(name.startswith("H&E tissue probabilities") or "instances" in name for name in names), names

    segment.instances.setChecked(True)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    objects = he_viewer.layers["H&E tissue instances"]
    # the user corrects the objects: erases one, or adds one where the random model found none
    objects.paint((10, 10), 0 if objects.data[10, 10] else 1)
    segment.instances.setChecked(False)
    segment.start()
    wait_idle(qtbot, segment, timeout=60_000)
    assert "H&E tissue instances (corrected)" in he_viewer.layers and "H&E tissue instances" not in he_viewer.layers


def test_a_prediction_split_while_training_writes_it_is_paintable_once_both_end(he_viewer, qtbot, monkeypatch):
    """Train and Separate objects each made the preview read-only and, when done, set what
    they had found: the split, begun while training held the layer, ended last and left the
    prediction the user is to correct read-only for good."""
    from test_widgets import tiny

    from napari_selfreg.widgets import segment_widget

    release = threading.Event()
    real = segment_widget._split_classes

    def held_back(*args, **kwargs):
        release.wait(180)  # the split ends after training (wait_idle gives training 120 s)
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(segment_widget, "_split_classes", held_back)
    train = train_widget_for(he_viewer)
    tiny(train, steps=40)
    train.start()
    qtbot.waitUntil(lambda: "H&E tissue prediction" in he_viewer.layers, timeout=60_000)
    prediction = he_viewer.layers["H&E tissue prediction"]
    assert not prediction.editable  # training writes previews into it
    _, segment = docked(he_viewer, "Segment")
    segment.split_source.select("H&E tissue prediction")
    assert segment.split_layer() is not None
    wait_idle(qtbot, train)
    assert not prediction.editable  # the split still reads it
    release.set()
    wait_idle(qtbot, segment, timeout=60_000)
    assert prediction.editable


def test_load_opens_where_the_copies_are_until_a_model_file_is_chosen(make_napari_viewer, tmp_path, model_copies,
                                                                     monkeypatch):
    """After napari was closed before Save…, the status line that named the copy is gone:
    Load… opens in the copies' folder; once a file is chosen, Load… and Save… open beside it."""
    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel
    from napari_selfreg.widgets import _common
    from napari_selfreg.widgets.model_registry import keep_copy

    monkeypatch.setattr(_common, "_last_model_folder", [])
    model = SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2)))
    opened, saved = [], []

    def open_dialog(parent, title, folder, filters):
        opened.append(folder)
        return (str(chosen) if chosen else "", filters)

    def save_dialog(parent, title, suggested, filters):
        saved.append(suggested)
        return ("", filters)

    monkeypatch.setattr(_common.QFileDialog, "getOpenFileName", open_dialog)
    monkeypatch.setattr(_common.QFileDialog, "getSaveFileName", save_dialog)
    train = train_widget_for(make_napari_viewer())
    chosen = None
    train._load_dialog()  # no copies yet: the working folder
    copy = keep_copy(model, "H&E tissue model")
    train._load_dialog()
    assert opened == ["", str(model_copies)]
    chosen = save_model(model, tmp_path / "project" / "nuclei.safetensors")
    train._load_dialog()  # loads it, and remembers its folder
    assert train.model_combo.currentText().startswith("nuclei")  # "nuclei (2)" beside an earlier test's
    chosen = None
    train._load_dialog()
    train._save_dialog()
    name = train.model_combo.currentText()
    assert opened[-1] == str(tmp_path / "project") and saved == [str(tmp_path / "project" / f"{name}.safetensors")]
    assert copy.is_file()
