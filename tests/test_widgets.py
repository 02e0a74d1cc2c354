"""The dock widgets in a real viewer (run under Xvfb: ``xvfb-run -a python -m pytest -m gui``).

Settings are tiny (small patches, a narrow model) so the whole file runs in about two
minutes on a 2-core CPU; the flow test still asserts a Dice clearly above chance.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("LP_NUM_THREADS", "1")  # Mesa's software renderer: leave the cores to torch

pytest.importorskip("napari")

from napari_selfreg.core import allocator
from napari_selfreg.sample_data import he_arrays

PLUGIN = "napari-selfreg"


def test_widget_modules_do_not_import_torch():
    """Docking must not wait for torch: the widget modules import it only when work starts."""
    code = (
        "import sys\n"
        "import napari_selfreg.widgets.train_widget, napari_selfreg.widgets.segment_widget\n"
        "import napari_selfreg.widgets.redundancy_widget, napari_selfreg.sample_data, napari_selfreg.demo\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_demo_help():
    out = subprocess.run(
        [sys.executable, "-m", "napari_selfreg.demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--train" in out.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "napari_selfreg.demo", "--steps", "0"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "--steps must be at least 1" in refused.stderr


def test_demo_without_a_qt_binding_is_one_line():
    """A plain ``pip install napari-selfreg`` has no Qt binding: say what to install, exit 2."""
    hide = "import sys\nfor name in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6'):\n    sys.modules[name] = None\n"
    run = "from napari_selfreg.cli import main\nraise SystemExit(main(['demo']))\n"
    out = subprocess.run([sys.executable, "-c", hide + run], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "no Qt binding" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.gui
def test_closing_napari_right_after_docking_exits_cleanly():
    """A device-listing thread started at docking used to outlive a viewer closed at once and
    abort Python (exit 134) when it finished."""
    code = (
        "import napari\n"
        "viewer = napari.Viewer(show=True)\n"
        "viewer.window.add_plugin_dock_widget('napari-selfreg', 'Segment')\n"
        "viewer.window.add_plugin_dock_widget('napari-selfreg', 'Train SelfReg UNet')\n"
        "viewer.close()\n"
        "print('closed')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "closed", out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.gui
def test_exiting_while_the_final_prediction_runs_is_clean():
    """The end-of-round prediction outlived a viewer closed at once, and Python aborted (134)."""
    code = (
        "import time\n"
        "import napari\n"
        "from qtpy.QtWidgets import QApplication\n"
        "viewer = napari.Viewer(show=True)\n"
        "viewer.open_sample('napari-selfreg', 'he_tissue')\n"
        "_, train = viewer.window.add_plugin_dock_widget('napari-selfreg', 'Train SelfReg UNet')\n"
        "train.steps.setValue(3); train.patch_size.setValue(32); train.base_channels.setValue(8)\n"
        "train.device.setCurrentText('cpu')\n"
        "train.start()\n"
        "end = time.time() + 120\n"
        "while time.time() < end and not (train.worker is None and train.final_worker is not None):\n"
        "    QApplication.processEvents(); time.sleep(0.005)\n"
        "print('final prediction running:', train.final_worker is not None)\n"
        "viewer.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "final prediction running: True" in out.stdout, out.stderr[-2000:]
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- helpers


class Messages:
    """Collects the notifications a widget shows, by kind."""

    def __init__(self, monkeypatch, *modules) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.infos: list[str] = []
        for module in modules:
            monkeypatch.setattr(module, "show_error", self.errors.append, raising=False)
            monkeypatch.setattr(module, "show_warning", self.warnings.append, raising=False)
            monkeypatch.setattr(module, "show_info", self.infos.append, raising=False)


def tiny(widget, steps: int = 30) -> None:
    """Settings for a quick run on a CPU."""
    widget.steps.setValue(steps)
    widget.patch_size.setValue(64)
    widget.batch_size.setValue(4)
    widget.base_channels.setValue(16)
    widget.validation_every.setValue(10)
    widget.preview_every.setValue(1.0)
    widget.device.setCurrentText("cpu")


def wait_idle(qtbot, *widgets, timeout: int = 120_000) -> None:
    """Wait until no worker of the widgets runs (training, final preview, devices, instances,
    measurements)."""

    def idle() -> bool:
        for widget in widgets:
            for name in ("worker", "final_worker", "instance_worker", "measure_worker"):
                worker = getattr(widget, name, None)
                if worker is not None:  # the widgets reset these when their workers finish
                    return False
            if getattr(getattr(widget, "device", None), "worker", None) is not None:
                return False
        return True

    qtbot.waitUntil(idle, timeout=timeout)


def dice(labels: np.ndarray, truth: np.ndarray, cls: int = 2) -> float:
    p, g = labels == cls, truth == cls
    return float(2 * (p & g).sum() / (p.sum() + g.sum()))


def docked(viewer, title: str):
    """(dock, widget) as users get them: docked by napari from the manifest, which hands the
    widget a proxy of the viewer (each layer wrapped anew on every access)."""
    return viewer.window.add_plugin_dock_widget(PLUGIN, title)


def train_widget_for(viewer):
    _, widget = docked(viewer, "Train SelfReg UNet")
    widget.image_combo.select("H&E tissue")
    widget.labels_combo.select("strokes")
    return widget


# ----------------------------------------------------------------------------- opening


@pytest.mark.gui
def test_each_widget_opens_from_the_manifest(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widgets = {}
    for title in ("Train SelfReg UNet", "Segment", "Feature redundancy"):
        _, widgets[title] = viewer.window.add_plugin_dock_widget(PLUGIN, title)
        assert widgets[title] is not None
    train = widgets["Train SelfReg UNet"]
    wait_idle(qtbot, train)
    assert train.device.itemText(0) == "auto"
    assert "cpu" in [train.device.itemText(i) for i in range(train.device.count())]


@pytest.mark.gui
def test_demo_docks_widgets_with_sample(make_napari_viewer, qtbot):
    from napari_selfreg.demo import setup_demo

    viewer = make_napari_viewer()
    widgets = setup_demo(viewer, fluorescence=True)
    assert set(widgets) == {"Train SelfReg UNet", "Segment", "Feature redundancy"}
    assert {"H&E tissue", "strokes", "ground truth", "fluorescence nuclei"} <= {layer.name for layer in viewer.layers}
    train = widgets["Train SelfReg UNet"]
    assert train.labels_combo.currentText() == "strokes"
    assert train.class_names() == ["background", "nucleus"]
    wait_idle(qtbot, train, widgets["Segment"])


@pytest.mark.gui
def test_new_labels_layer_and_classes(he_viewer, qtbot):
    widget = train_widget_for(he_viewer)
    layer = widget.new_labels_layer()
    assert layer.data.shape == (256, 256) and layer.data.dtype == np.uint8
    assert layer.selected_label == 2 and layer.mode == "paint"
    assert widget.labels_combo.currentText() == layer.name
    widget.add_class("gland")
    widget.class_table.item(1, 1).setText("nuclei")
    assert widget.class_names() == ["background", "nuclei", "gland"]
    assert list(layer.features["class"]) == ["not painted", "background", "nuclei", "gland"]
    widget.class_table.selectRow(2)
    assert layer.selected_label == 3
    wait_idle(qtbot, widget)


# ----------------------------------------------------------------------------- the flow


@pytest.mark.gui
def test_flow_sample_train_stop_segment(he_viewer, qtbot, messages, tmp_path):
    """Sample -> train a few steps -> Stop -> Segment: a real segmentation, clearly above chance."""

    viewer = he_viewer
    train = train_widget_for(viewer)
    tiny(train, steps=1000)
    _, segment = docked(viewer, "Segment")
    train.start_button.click()
    assert train.running and train.start_button.text() == "Stop"
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 30, timeout=150_000)
    train.start_button.click()  # Stop
    wait_idle(qtbot, train)
    assert train.result is not None and train.result.stopped
    assert 30 <= train.result.steps < 1000
    assert "prediction" in " ".join(layer.name for layer in viewer.layers)
    assert not messages.errors

    segment.image_combo.select("H&E tissue")
    assert segment.model_combo.currentText() == train.model_combo.currentText()
    segment.instances.setChecked(True)
    segment.probabilities.setChecked(True)
    segment.tile_size.setValue(128)
    segment.device.setCurrentText("cpu")
    segment.run_button.click()
    wait_idle(qtbot, segment, timeout=60_000)
    labels = viewer.layers["H&E tissue segmentation"].data
    truth = viewer.layers["ground truth"].data
    score = dice(labels, truth)
    chance = dice(np.full_like(truth, 2), truth)  # "everything is nucleus"
    print(f"flow: {train.result.steps} steps, nucleus Dice {score:.3f} (all-nucleus {chance:.3f})")
    assert score > 0.45 > 2 * chance
    instances = viewer.layers["H&E tissue instances"].data
    assert instances.max() >= 20  # the sample has 55 nuclei
    probabilities = viewer.layers["H&E tissue probabilities"].data
    assert probabilities.shape == (256, 256) and 0 <= probabilities.min() <= probabilities.max() <= 1

    # save, load into the Segment widget, and get the same result
    path = train.save_model(tmp_path / "nuclei")
    assert path is not None and path.exists()
    name = segment.load_model(path)
    assert name is not None and segment.model_combo.currentText() == name
    segment.instances.setChecked(False)
    segment.run_button.click()
    wait_idle(qtbot, segment, timeout=60_000)
    assert np.array_equal(viewer.layers["H&E tissue segmentation"].data, labels)
    # "Average over flips" reaches the engine: the same labels as predict(..., flips=True)
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.core.predict import predict

    segment.flips.setChecked(True)
    segment.run_button.click()
    wait_idle(qtbot, segment, timeout=60_000)
    expected = predict(segment.registry.get(name), viewer.layers["H&E tissue"].data,
                       PredictConfig(tile_size=128, device="cpu", flips=True), probabilities=False).labels
    flipped = viewer.layers["H&E tissue segmentation"].data
    assert np.array_equal(flipped, expected) and not np.array_equal(flipped, labels)
    segment.flips.setChecked(False)

    # correction loop: the prediction becomes dense labels, strokes on top, and a second round continues
    from napari_selfreg.io import DIRECTION_KEY

    image_layer = viewer.layers["H&E tissue"]
    image_layer.metadata[DIRECTION_KEY] = [0.0, -1.0, 1.0, 0.0]  # as read from a rotated NIfTI
    corrected = train.use_prediction_as_labels()
    strokes = viewer.layers["strokes"].data
    assert corrected is not None and np.array_equal(corrected.data[strokes > 0], strokes[strokes > 0])
    assert corrected.metadata[DIRECTION_KEY] == image_layer.metadata[DIRECTION_KEY]  # saved labels overlay the file
    assert tuple(corrected.scale) == tuple(image_layer.scale) and tuple(corrected.translate) == tuple(
        image_layer.translate)
    assert train.labels_combo.currentText() == corrected.name
    assert train.selected_model() is train.registry.get(train.model_combo.currentText())
    # or train directly on the brushed prediction layer: it is renamed so previews do not overwrite it
    prediction = viewer.layers["H&E tissue prediction"]
    train.labels_combo.select(prediction.name)
    train.steps.setValue(3)
    train.start_button.click()
    assert prediction.name != "H&E tissue prediction" and train.labels_combo.currentText() == prediction.name
    wait_idle(qtbot, train)
    assert train.result is not None and train.result.steps == 3 and not messages.errors
    assert "H&E tissue prediction" in viewer.layers  # the new round's preview layer


@pytest.mark.gui
def test_stop_within_one_second(he_viewer, qtbot):
    """Stop ends training at the next step boundary, skipping the core's final validation.

    The step in flight always finishes (it cannot be cut), so the bound is one second
    plus that step: on a laptop a step takes ~0.1 s; on a busy shared 2-core test
    machine it can take seconds.
    """
    train = train_widget_for(he_viewer)
    tiny(train, steps=100_000)
    train.patch_size.setValue(32)  # laptop-sized steps even on a busy 2-core test machine
    train.batch_size.setValue(2)
    train.base_channels.setValue(8)
    train.validation_every.setValue(100_000)
    train.start()
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 3, timeout=60_000)
    qtbot.wait(1500)  # let a live preview begin: Stop must cut it short too
    started = time.perf_counter()
    train.stop()
    qtbot.waitUntil(lambda: not train.running, timeout=10_000)
    seconds = time.perf_counter() - started
    in_flight = train.result.history[-1].seconds_per_step
    print(
        f"stop latency: {train.last_stop_latency:.3f} s until the model was returned "
        f"({seconds:.3f} s until idle; the step in flight took {in_flight:.3f} s)"
    )
    assert train.result.stopped
    assert train.result.steps - train._steps_at_stop <= 1  # at most the step in flight
    assert train.last_stop_latency < 1.0 + in_flight
    assert train.model_combo.currentText() in train.registry  # the model so far is kept
    wait_idle(qtbot, train)


@pytest.mark.gui
def test_layer_removed_during_training_is_a_warning(he_viewer, qtbot, messages):
    viewer = he_viewer
    train = train_widget_for(viewer)
    tiny(train, steps=100_000)
    train.start()
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 2, timeout=60_000)
    viewer.layers.remove("strokes")
    viewer.layers.remove("H&E tissue")
    qtbot.waitUntil(lambda: len(messages.warnings) >= 2, timeout=5_000)
    assert "strokes" in messages.warnings[0] and "Stop" in messages.warnings[0]
    steps = len(train.plot.steps)
    qtbot.waitUntil(lambda: len(train.plot.steps) > steps, timeout=60_000)  # training went on
    train.stop()
    wait_idle(qtbot, train)
    assert train.result is not None and train.result.stopped and not messages.errors


@pytest.mark.gui
def test_a_prediction_layer_removed_during_training_comes_back_read_only(he_viewer, qtbot, messages):
    """Strokes painted on it would be overwritten by the previews that follow and not kept."""
    train = train_widget_for(he_viewer)
    tiny(train, steps=100_000)
    train.preview_every.setValue(0.1)
    train.start()
    name = "H&E tissue prediction"
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 2 and name in he_viewer.layers, timeout=60_000)
    he_viewer.layers.remove(name)
    qtbot.waitUntil(lambda: name in he_viewer.layers, timeout=60_000)
    again = he_viewer.layers[name]
    assert not again.editable
    train.stop()
    wait_idle(qtbot, train)
    assert again.editable and not messages.errors


@pytest.mark.gui
def test_a_prediction_layer_the_training_did_not_make_is_kept(he_viewer, qtbot, messages):
    """A "… prediction" opened from a file and corrected there: its edits were never seen, so
    it is the user's, not a layer for the previews to write into."""
    truth = np.asarray(he_viewer.layers["ground truth"].data)
    theirs = he_viewer.add_labels(truth.copy(), name="H&E tissue prediction")
    train = train_widget_for(he_viewer)
    tiny(train, steps=3)
    train.start()
    wait_idle(qtbot, train)
    assert theirs.name == "H&E tissue prediction (kept)" and "not made by this training" in messages.infos[0]
    np.testing.assert_array_equal(theirs.data, truth)
    ours = he_viewer.layers["H&E tissue prediction"]
    assert ours is not theirs and ours.data.any()
    train.start()  # the second round writes into its own layer again
    wait_idle(qtbot, train)
    assert he_viewer.layers["H&E tissue prediction"] is ours
    assert "H&E tissue prediction (kept) [1]" not in he_viewer.layers and not messages.errors


def _mid_round(train, qtbot):
    """Start a long round and return its worker once two steps are done."""
    tiny(train, steps=100_000)
    train.start()
    qtbot.waitUntil(lambda: len(train.plot.steps) >= 2, timeout=60_000)
    return train.worker


@pytest.mark.gui
def test_closing_the_viewer_during_training_ends_it_without_warnings(he_viewer, qtbot, messages):
    """Closing removes every layer before the window: that is no reason to warn about each."""
    train = train_widget_for(he_viewer)
    worker = _mid_round(train, qtbot)
    he_viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    qtbot.wait(200)
    assert messages.warnings == [] and messages.errors == []


def test_a_quit_worker_closes_its_generator(qtbot):
    """Every widget's worker comes from ``_common.create_worker``: quitting one (as a closing
    viewer does) runs its generator's clean-ups; a plain function still gets napari's worker."""
    from napari_selfreg.widgets._common import create_worker

    closed = threading.Event()

    def job():
        try:
            while True:
                yield 1
                time.sleep(0.01)
        finally:
            closed.set()

    worker = create_worker(job)
    with qtbot.waitSignal(worker.yielded, timeout=10_000):
        worker.start()
    worker.quit()
    assert closed.wait(10)
    assert type(create_worker(lambda: 1)).__name__ == "FunctionWorker"


@pytest.mark.gui
def test_closing_the_viewer_during_training_frees_what_training_held(he_viewer, qtbot, model_copies):
    """napari quits the workers of a closing viewer; a quit generator must not stay suspended
    with its model, its batch thread and the allocator setting for the rest of the process.
    The weights trained so far are copied to disk, not lost with the window."""
    from napari_selfreg.core.checkpoint import load_model

    train = train_widget_for(he_viewer)
    worker = _mid_round(train, qtbot)
    assert any(t.name.startswith("napari-selfreg-batches") for t in threading.enumerate())
    he_viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    assert worker.abort_requested  # napari's quit (its window's deletion sets our stop event too)
    assert worker._gen.gi_frame is None  # closed, not suspended
    qtbot.waitUntil(
        lambda: not any(t.name.startswith("napari-selfreg-batches") for t in threading.enumerate()), timeout=10_000
    )
    assert allocator._holders == 0
    copies = list(model_copies.glob("*.safetensors"))
    assert len(copies) == 1 and copies[0].name.startswith("H&E tissue model (at quit)-")
    assert load_model(copies[0]).info.history[-1]["step"] >= 2


@pytest.mark.gui
def test_closing_one_of_two_napari_windows_stops_its_training_and_keeps_its_model(
        make_napari_viewer, qtbot, messages, model_copies):
    """With a second window open, napari goes on and does not quit the closed window's workers:
    its training ran on unseen, warned in the other window that its layers were removed, and
    its model was copied only when the process ended."""
    from napari_selfreg.core.checkpoint import load_model

    closing, other = make_napari_viewer(), make_napari_viewer()
    closing.open_sample(PLUGIN, "he_tissue")
    train = train_widget_for(closing)
    worker = _mid_round(train, qtbot)
    closing.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    copies = list(model_copies.glob("*.safetensors"))
    assert len(copies) == 1 and copies[0].name.startswith("H&E tissue model-")  # a stopped round's copy
    assert load_model(copies[0]).info.history[-1]["stopped"] is True
    assert not [text for text in messages.warnings if "was removed while training" in text]
    assert len(other.layers) == 0


# ----------------------------------------------------------------------------- mistakes


@pytest.mark.gui
def test_mistakes_give_notifications(he_viewer, qtbot, messages):
    viewer = he_viewer
    train = train_widget_for(viewer)
    tiny(train, steps=5)

    viewer.layers.remove("strokes")
    viewer.layers.remove("ground truth")
    train.start()
    assert not train.running and "labels layer" in messages.errors[-1]

    viewer.add_labels(np.zeros((100, 120), np.uint8), name="wrong shape")
    train.labels_combo.select("wrong shape")
    train.start()
    assert not train.running and "New labels layer" in messages.errors[-1]

    layer = train.new_labels_layer()  # nothing painted: the core says so, from the worker
    train.start()
    wait_idle(qtbot, train)
    assert "nothing is painted" in messages.errors[-1]

    layer.data[10:20, 10:50] = 1  # one class only
    layer.refresh()
    train.start()
    wait_idle(qtbot, train)
    assert "at least one structure" in messages.errors[-1]
    assert train.result is None

    count = len(messages.errors)
    train.save_model("/nonexistent/model")  # "new model" is chosen: nothing to save
    assert len(messages.errors) == count + 1 and "Train or load" in messages.errors[-1]


@pytest.mark.gui
def test_bad_model_file_is_a_notification(make_napari_viewer, qtbot, messages, tmp_path):

    viewer = make_napari_viewer()
    _, widget = docked(viewer, "Segment")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x80\x02not a model")
    assert widget.load_model(bad) is None
    assert "pickle" in messages.errors[-1]
    widget.start()  # no image
    assert not widget.running
    wait_idle(qtbot, widget)


@pytest.mark.gui
def test_training_error_keeps_the_partial_model(he_viewer, qtbot, messages, monkeypatch, model_copies):
    """A failure mid-training (here a simulated GPU out-of-memory) keeps the model so far."""
    from napari_selfreg.core import losses

    real = losses.selfreg_total
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr("napari_selfreg.core.train.selfreg_total", failing)
    train = train_widget_for(he_viewer)
    tiny(train, steps=50)
    before = len(train.registry)
    train.start()
    wait_idle(qtbot, train)
    assert "out of memory" in messages.errors[-1] and "batch size" in messages.errors[-1]
    assert "kept" in messages.errors[-1]
    assert len(train.registry) == before + 1
    copy = Path(re.search(r"a copy is in (.+\.safetensors)", messages.errors[-1]).group(1))
    assert copy.parent == model_copies and "(partial)" in copy.name and copy.is_file()
    from napari_selfreg.core.checkpoint import load_model

    assert [(r["step"], r["round"]) for r in load_model(copy).info.history] == [(1, 1), (2, 1), (3, 1)]


@pytest.mark.gui
def test_every_trained_model_is_copied_to_disk_until_saved(he_viewer, qtbot, messages, monkeypatch, model_copies):
    """A model lived only in memory until Save…: closing napari, or a crash, lost every round."""
    import torch

    from napari_selfreg.core.checkpoint import load_model

    train = train_widget_for(he_viewer)
    tiny(train, steps=4)
    train.start()
    wait_idle(qtbot, train)
    copy = Path(re.search(r"A copy is in (.+\.safetensors)\.", train.status.text()).group(1))
    assert copy.parent == model_copies and copy.name.startswith("H&E tissue model-")
    kept = load_model(copy)
    model = train.registry.get(train.model_combo.currentText())
    assert kept.class_names == model.class_names
    for a, b in zip(kept.network.state_dict().values(), model.network.state_dict().values(), strict=True):
        assert torch.equal(a, b.cpu())

    monkeypatch.setenv("NAPARI_SELFREG_COPIES", "0")  # turned off: nothing written, nothing said
    train.start()
    wait_idle(qtbot, train)
    assert "copy" not in train.status.text() and len(list(model_copies.glob("*.safetensors"))) == 1

    blocked = model_copies / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv("NAPARI_SELFREG_COPIES", str(blocked))  # cannot be written: told, model still kept
    before = len(train.registry)
    train.start()
    wait_idle(qtbot, train)
    assert len(train.registry) == before + 1 and "ready for Segment" in train.status.text()
    assert any("could not be copied to disk" in text and "Save" in text for text in messages.warnings)



@pytest.mark.gui
def test_failed_previews_and_final_prediction_do_not_stall_training(he_viewer, qtbot, messages, monkeypatch):
    """A RuntimeError (a GPU out of memory) in the live preview vanished in superqt: Train stayed
    on "Stop" and the model was lost. A preview that fails is skipped with one warning; a failed
    end-of-round prediction is told and its worker let go."""
    import torch

    from napari_selfreg.core import predict as core_predict

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(core_predict, "predict", out_of_memory)
    train = train_widget_for(he_viewer)
    tiny(train, steps=12)
    train.patch_size.setValue(32)
    train.preview_every.setValue(0.1)
    before = len(train.registry)
    train.start()
    wait_idle(qtbot, train, timeout=60_000)
    assert train.result is not None and train.result.steps == 12 and len(train.registry) == before + 1
    assert train.start_button.text() == "Start training" and train.start_button.isEnabled()
    assert len([text for text in messages.warnings if "preview failed" in text]) == 1
    assert len(messages.errors) == 1 and "Prediction after training failed" in messages.errors[0]
    assert "out of memory" in messages.errors[0] and train._final_workers == []


@pytest.mark.gui
def test_previews_of_a_crop_are_scaled_by_the_whole_image(make_napari_viewer, qtbot, messages, monkeypatch):
    """A zoomed-in view of a 16-bit image was stretched by its own percentiles: background came
    out as structure, and for a slide that became the "… prediction" layer."""
    from napari_selfreg.core import predict as core_predict
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.sample_data import fluorescence_arrays
    from napari_selfreg.widgets import _workers, train_widget

    arrays = fluorescence_arrays()
    image, truth = arrays["image"], arrays["ground_truth"]
    assert image.dtype == np.uint16
    box = next(  # 48 x 48 of background, 8 px from any nucleus
        (slice(y, y + 48), slice(x, x + 48))
        for y in range(8, 200, 8) for x in range(8, 200, 8) if not truth[y - 8:y + 56, x - 8:x + 56].any()
    )
    monkeypatch.setattr(train_widget, "visible_box", lambda *args, **kwargs: box)  # the user zoomed in there
    monkeypatch.setattr(train_widget, "FULL_PREVIEW_PIXELS", 1000)  # a "slide": the end of round predicts the view
    viewer = make_napari_viewer()
    viewer.add_image(image, name="nuclei")
    viewer.add_labels(np.where(truth > 0, 2, 1).astype(np.uint8), name="nuclei labels")
    _, train = docked(viewer, "Train SelfReg UNet")
    train.image_combo.select("nuclei")
    train.labels_combo.select("nuclei labels")
    tiny(train, steps=40)
    train.seed.setValue(1)
    train.preview_every.setValue(0.1)
    predictions = []  # (model, live preview?, labels) of every prediction the widget made
    real = core_predict.predict

    def recording(model, crop, config, *args, **kwargs):
        prediction = real(model, crop, config, *args, **kwargs)
        live = config.tile_size == _workers.PREVIEW_TILE  # the end of round predicts in tiles of 512
        predictions.append((model, live, np.array(prediction.labels)))
        return prediction

    monkeypatch.setattr(core_predict, "predict", recording)
    train.start()
    wait_idle(qtbot, train)
    assert not messages.errors
    previews = [(model, labels) for model, live, labels in predictions if live]
    finals = [labels for _, live, labels in predictions if not live]
    assert previews and len(finals) == 1
    settings = PredictConfig(tile_size=512, device="cpu")
    whole = real(train.selected_model(), image, settings, probabilities=False).labels
    assert np.array_equal(finals[0], whole[box])
    assert np.array_equal(viewer.layers["nuclei prediction"].data[box], whole[box])
    model, labels = previews[-1]  # the live preview, as its snapshot of the weights predicts the whole image
    # (not pixel for pixel: a model still learning may differ at the edges of a crop it sees without context)
    assert (labels == real(model, image, settings, probabilities=False).labels[box]).mean() > 0.8


@pytest.mark.gui
def test_corrections_on_the_prediction_are_kept(he_viewer, qtbot, messages, monkeypatch):
    """Start again overwrote brush corrections on the "… prediction" layer, and so did the
    end-of-round prediction when they were painted while it ran."""
    from napari_selfreg.core import predict as core_predict
    from napari_selfreg.widgets._common import EDITED_KEY

    train = train_widget_for(he_viewer)
    tiny(train, steps=3)
    train.start()
    wait_idle(qtbot, train)
    prediction = he_viewer.layers["H&E tissue prediction"]
    assert prediction.editable and prediction.data.any()
    prediction.paint((10, 10), 3 - int(prediction.data[10, 10]))  # the brush: 1 <-> 2
    assert prediction.metadata.get(EDITED_KEY)
    corrected = np.array(prediction.data)

    gate = threading.Event()
    real = core_predict.predict

    def held(*args, **kwargs):
        if kwargs.get("stop") is None:  # the end-of-round prediction waits until the test looked
            gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(core_predict, "predict", held)
    train.start()  # the strokes are still chosen: the corrections must not become the preview
    qtbot.waitUntil(lambda: train.worker is None and train.final_worker is not None, timeout=60_000)
    fresh = he_viewer.layers["H&E tissue prediction"]
    assert not fresh.editable  # the end-of-round prediction is about to fill it
    gate.set()
    wait_idle(qtbot, train)
    kept = he_viewer.layers["H&E tissue prediction (corrected)"]
    assert np.array_equal(kept.data, corrected) and kept.editable
    assert fresh.editable and fresh.data.any()
    assert any("kept in 'H&E tissue prediction (corrected)'" in text for text in messages.infos)
    assert not messages.errors


@pytest.mark.gui
def test_a_failed_start_leaves_no_empty_prediction(he_viewer, qtbot, messages):
    """A training refused before its first step left an all-zero "… prediction" layer, which
    "Use prediction as labels" then took over the Segment output."""
    strokes = he_viewer.layers["strokes"].data
    truth = he_viewer.layers["ground truth"].data
    he_viewer.add_labels(np.where(strokes == 1, 1, 0).astype(np.uint8), name="only background")
    train = train_widget_for(he_viewer)
    train.labels_combo.select("only background")
    tiny(train, steps=3)
    train.start()
    wait_idle(qtbot, train)
    assert "at least one structure" in messages.errors[-1]
    assert "H&E tissue prediction" not in he_viewer.layers

    he_viewer.add_labels(np.zeros_like(truth), name="H&E tissue prediction")  # an empty one made elsewhere
    he_viewer.add_labels(np.where(truth > 0, 2, 1).astype(np.uint8), name="H&E tissue segmentation")
    train.labels_combo.select("strokes")
    layer = train.use_prediction_as_labels()
    assert "'H&E tissue segmentation'" in messages.infos[-1]
    assert np.array_equal(layer.data[strokes == 0], np.where(truth > 0, 2, 1)[strokes == 0])


@pytest.mark.gui
def test_bad_strokes_and_a_failed_save_are_notifications(he_viewer, qtbot, messages):
    """A negative id (-1 = "ignore" in some label files) and a write that safetensors refuses
    raised out of the button's slot instead of saying what to do."""
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.core.train import train_to_end

    strokes = he_viewer.layers["strokes"].data.astype(np.int32)
    strokes[0, 0] = -1
    he_viewer.add_labels(strokes, name="with ignore")
    train = train_widget_for(he_viewer)
    train.labels_combo.select("with ignore")
    assert train.start() is None and not train.running
    assert "negative id -1" in messages.errors[-1]

    sample = he_arrays()
    result = train_to_end(
        [sample["image"]], [sample["strokes"]], TrainConfig(steps=2, patch_size=32, batch_size=2, device="cpu"),
        ModelConfig(base_channels=4),
    )
    train.model_combo.setCurrentText(train.registry.add("tiny save test model", result.model))
    assert train.save_model("/proc/model") is None  # a folder no one may write to
    assert "Could not save the model" in messages.errors[-1] and "another folder" in messages.errors[-1]
    wait_idle(qtbot, train)


# ----------------------------------------------------------------------------- large images


@pytest.mark.gui
@pytest.mark.parametrize("pyramid", [False, True], ids=["flat", "pyramid"])
def test_segment_dask_image_into_memmap(make_napari_viewer, qtbot, messages, monkeypatch, pyramid):
    """A lazily loaded image (or a slide pyramid, segmented at full resolution) is read tile by
    tile; a large output goes to a memory map."""
    da = pytest.importorskip("dask.array")
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.core.train import train_to_end
    from napari_selfreg.widgets import segment_widget
    from napari_selfreg.widgets.model_registry import model_registry

    sample = he_arrays()
    # 30 seeded steps: enough to find nuclei (2 steps predicted background almost everywhere, so
    # labels compared below would be all 1 whatever tile went where)
    result = train_to_end(
        [sample["image"]], [sample["strokes"]],
        TrainConfig(steps=30, patch_size=32, batch_size=2, device="cpu", precision="float32", seed=0),
        ModelConfig(base_channels=4),
    )
    model_registry().add("tiny dask test model", result.best)
    monkeypatch.setattr(segment_widget, "MEMMAP_PIXELS", 100_000)
    big = da.from_array(np.tile(sample["image"], (3, 3, 1)), chunks=(256, 256, 3))  # 768 x 768
    viewer = make_napari_viewer()
    viewer.add_image([big, big[::2, ::2], big[::4, ::4]] if pyramid else big, name="big", rgb=True, multiscale=pyramid)
    _, widget = docked(viewer, "Segment")
    widget.model_combo.setCurrentText("tiny dask test model")
    widget.tile_size.setValue(256)
    widget.device.setCurrentText("cpu")
    widget.probabilities.setChecked(True)
    widget.instances.setChecked(True)
    widget.start()
    assert widget.running
    wait_idle(qtbot, widget, timeout=60_000)
    layer = viewer.layers["big segmentation"]
    assert isinstance(layer.data, np.memmap) and layer.data.shape == (768, 768)
    assert isinstance(widget.prediction.probabilities, np.memmap)
    assert set(np.unique(layer.data)) <= {1, 2} and widget.prediction.complete
    assert not messages.errors
    # the labels are the model's prediction of the whole image held in memory, tile for tile
    from napari_selfreg.core.config import PredictConfig
    from napari_selfreg.core.predict import predict

    expected = predict(model_registry().get("tiny dask test model"), np.asarray(big),
                       PredictConfig(tile_size=256, device="cpu"), probabilities=True)
    # both classes (about 8 % nuclei here), so the labels can tell a misplaced tile; the
    # probabilities below can whatever the model finds
    assert set(np.unique(expected.labels)) == {1, 2}, (expected.labels == 2).mean()
    np.testing.assert_array_equal(np.asarray(layer.data), expected.labels)
    # the float16 memory map of probabilities, and the layer that shows the nuclei's
    np.testing.assert_allclose(np.asarray(widget.prediction.probabilities, np.float32), expected.probabilities,
                               atol=1e-3)
    np.testing.assert_allclose(np.asarray(viewer.layers["big probabilities"].data, np.float32),
                               expected.probabilities[1], atol=1e-3)
    # the instances of a large image go to a memory map too: the whole map's objects, ids and all
    from napari_selfreg.core.instances import separate_instances

    instances = viewer.layers["big instances"].data
    assert isinstance(instances, np.memmap) and instances.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(instances), separate_instances(expected.labels))
    assert instances.max() > 20


def test_view_of_a_pyramid_is_given_in_full_resolution_pixels(make_napari_viewer, qtbot):
    """The train widget previews the visible part of a slide; napari reports it in the drawn level's pixels."""
    from napari_selfreg.widgets._common import visible_corners

    base = np.zeros((768, 768), np.uint8)
    viewer = make_napari_viewer()
    layer = viewer.add_image([base, base[::2, ::2], base[::4, ::4]], multiscale=True)
    layer.locked_data_level = 2
    viewer.reset_view()
    qtbot.waitUntil(lambda: layer.data_level == 2 and np.asarray(layer.corner_pixels)[1].max() > 0, timeout=10_000)
    assert np.array_equal(layer.corner_pixels, [[0, 0], [191, 191]])  # the level's own pixels
    assert np.array_equal(visible_corners(layer), [[0, 0], [767, 767]])
    flat = viewer.add_image(base, name="flat")
    assert visible_corners(flat) is flat.corner_pixels


def _blue_pixels(plot) -> int:
    """Pixels of the CE curve's colour (tab:blue) in what the plot widget shows."""
    from qtpy.QtGui import QImage

    image = plot.canvas.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)
    h, w = image.height(), image.width()
    bits = image.constBits()
    bits.setsize(h * image.bytesPerLine())
    pixels = np.frombuffer(bytes(bits), np.uint8)
    bgr = pixels.reshape(h, image.bytesPerLine() // 4, 4)[:, :w, :3].astype(int)
    return int((np.abs(bgr - (180, 119, 31)).sum(axis=-1) < 40).sum())


@pytest.mark.gui
def test_the_loss_plot_redraws_its_axes_only_when_the_limits_move(qtbot):
    """Between limit changes only the curves are drawn over the saved axes; the curves are
    on screen either way, and after a resize."""
    from types import SimpleNamespace

    from napari_selfreg.widgets._common import LossPlot

    plot = LossPlot(interval=0.0)
    qtbot.addWidget(plot)
    plot.resize(420, 260)
    plot.show()
    qtbot.waitExposed(plot)

    def report(step, ce, total=200):
        return SimpleNamespace(step=step, total_steps=total, ce=ce, dice=0.3, scr=0.01, ifd=0.002,
                               val_dice=0.6 if step % 10 == 0 else None)

    plot.add(report(1, 0.5))
    qtbot.wait(50)
    first = plot.full_draws
    for step in range(2, 151):
        plot.add(report(step, 0.5 - step / 1000))
        qtbot.wait(1)
    assert plot.full_draws - first <= 2  # 149 reports: axes redrawn only as x doubled, 50 -> 100 -> 200
    assert plot.axes.get_xlim() == (0.0, 200.0) and plot.axes.get_ylim() == pytest.approx((1e-3, 1.0))
    first = plot.full_draws
    assert _blue_pixels(plot) > 50  # the legend alone has about 16
    plot.add(report(151, 3.0))  # a loss above the top decade moves the limits
    qtbot.wait(50)
    assert plot.full_draws > first and plot.axes.get_ylim() == pytest.approx((1e-3, 10.0))
    assert _blue_pixels(plot) > 50  # the legend alone has about 16
    plot.resize(500, 300)
    qtbot.wait(100)
    assert _blue_pixels(plot) > 50  # redrawn whole after the resize, curves included
    plot.clear()
    for step in range(1, 31):  # a long round under a time budget: x follows the steps done
        plot.add(report(step, 0.5, total=100_000))
    assert plot.axes.get_xlim() == (0.0, 50.0)


def test_a_round_under_a_time_budget_ends_with_the_bar_full(he_viewer, qtbot):
    """The last step of a time budget reports a little under the budget: the bar stayed at 99 %
    beside "Training finished"."""
    train = train_widget_for(he_viewer)
    tiny(train, steps=100000)
    train.time_budget.setValue(3)
    train.start()
    wait_idle(qtbot, train)
    assert "Training finished" in train.status.text()
    assert train.progress.value() == train.progress.maximum() == 1000
