"""Copies of trained models on disk: named, loadable, the oldest removed, the user's files never."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from napari_selfreg.core.checkpoint import load_model
from napari_selfreg.core.config import ModelConfig, ModelInfo, TrainConfig
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.widgets import model_registry
from napari_selfreg.widgets.model_registry import copies_folder, keep_copy


def _model() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2), class_names=["bg", "n"]))


def test_a_copy_loads_as_the_model_and_its_name_survives_any_layer_name(model_copies):
    model = _model()
    path = keep_copy(model, 'run 2: "H&E" / slide?')
    assert path.parent == model_copies and path.name.startswith("run 2_ _H&E_ _ slide_-")
    loaded = load_model(path)
    for a, b in zip(loaded.network.state_dict().values(), model.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert keep_copy(model, 'run 2: "H&E" / slide?') != path  # the same second: a second file, not over it


def test_only_the_newest_copies_stay_and_other_files_are_never_removed(model_copies, monkeypatch):
    """A user's own model in the folder stays, even under a copy's name or saved over a copy."""
    import time

    from napari_selfreg.core.checkpoint import save_model

    monkeypatch.setattr(model_registry, "KEEP_COPIES", 3)
    mine = model_copies / "my nuclei model.safetensors"
    lookalike = model_copies / "H&E tissue model-20240101-120000.safetensors"  # a loaded copy saved again
    model = _model()
    for path in (mine, lookalike):
        save_model(model, path)
    made = []
    for n in range(6):
        made.append(keep_copy(model, f"round {n}"))
        time.sleep(0.02)  # distinct modification times on any file system
        if n == 1:
            save_model(model, made[0])  # the user saved a model over the first copy: theirs now
    left = {p.name for p in model_copies.glob("*.safetensors")}
    assert left == {mine.name, lookalike.name, made[0].name, *(p.name for p in made[3:])}
    assert not any(p.exists() for p in made[1:3])


def test_copies_can_be_turned_off_and_default_to_the_user_data_folder(monkeypatch):
    for off in ("0", ""):
        monkeypatch.setenv("NAPARI_SELFREG_COPIES", off)
        assert copies_folder() is None and keep_copy(_model(), "m") is None
    monkeypatch.setenv("NAPARI_SELFREG_COPIES", "trained")  # relative: fixed now, not at each later copy
    assert copies_folder() == Path.cwd() / "trained"
    monkeypatch.delenv("NAPARI_SELFREG_COPIES")
    folder = copies_folder()
    assert folder.name == "trained" and folder.parent.name == "napari-selfreg"


def test_the_training_worker_yields_the_copy_last():
    from napari_selfreg.sample_data import he_arrays
    from napari_selfreg.widgets._workers import run_training

    data = he_arrays()
    config = TrainConfig(steps=3, patch_size=48, batch_size=2, seed=0)
    run = run_training([data["image"]], [data["strokes"]], config, ModelConfig(base_channels=4, depth=2),
                       ["background", "nuclei"], None, threading.Event(), copy_name="H&E tissue model")
    events = []
    with pytest.raises(StopIteration) as done:
        while True:
            events.append(next(run))
    assert [kind for kind, _ in events] == ["report"] * 3 + ["copied"]
    copied = load_model(events[-1][1])
    result = done.value.value
    for a, b in zip(copied.network.state_dict().values(), result.model.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_long_names_are_cut_by_bytes_and_keep_their_marker(model_copies):
    """An image named in 76 CJK characters (224 bytes) made every copy fail ('File name too
    long'), and a long name lost its ' (at quit)' marker to the cut."""
    name = "病理切片" * 19 + " model"
    path = keep_copy(_model(), name, " (at quit)")
    assert path.is_file() and len((path.name + ".part").encode()) <= 255
    assert " (at quit)-" in path.name and path.name.startswith("病理切片")


def test_copies_written_at_once_by_two_sessions_are_all_recorded(model_copies, monkeypatch):
    """The record was rewritten on each removal, dropping lines another writer appended
    meanwhile: those copies stayed forever (23-24 of 20 left)."""
    monkeypatch.setattr(model_registry, "KEEP_COPIES", 5)
    model = _model()

    def rounds(tag):
        for n in range(12):
            keep_copy(model, f"{tag} {n}")

    threads = [threading.Thread(target=rounds, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(list(model_copies.glob("*.safetensors"))) == 5


def test_a_broken_record_does_not_turn_a_written_copy_into_a_failure(model_copies):
    (model_copies / ".napari-selfreg-copies.jsonl").mkdir()
    path = keep_copy(_model(), "m")
    assert path.is_file() and load_model(path).class_names == ["bg", "n"]


def test_a_relative_folder_stays_where_it_was_first_meant(tmp_path, monkeypatch):
    monkeypatch.setattr(model_registry, "_relative", {})
    monkeypatch.setenv("NAPARI_SELFREG_COPIES", "relative-copies")
    monkeypatch.chdir(tmp_path)
    first = keep_copy(_model(), "m")
    monkeypatch.chdir(first.parent.parent.parent)
    assert keep_copy(_model(), "m").parent == first.parent == tmp_path / "relative-copies"


def test_a_copy_left_unfinished_by_a_killed_napari_is_removed_a_day_later(model_copies):
    import os
    import time

    old = model_copies / "round 1-20240101-120000.safetensors.part"
    fresh = model_copies / "round 2-20240101-120000.safetensors.part"  # another napari writing it now
    other = model_copies / "my model.safetensors.part"
    for path in (old, fresh, other):
        path.write_bytes(b"half a model")
    day_ago = time.time() - 2 * 86_400
    for path in (old, other):
        os.utime(path, (day_ago, day_ago))
    keep_copy(_model(), "m")
    assert not old.exists() and fresh.exists() and other.exists()
