"""``run_inspect`` writes the files it promises: names, dtypes, shapes, JSON keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_selfreg.core.checkpoint import ModelFileError, save_model
from napari_selfreg.core.config import ModelConfig, ModelInfo
from napari_selfreg.core.data import InputError
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.inspect_report import run_inspect
from napari_selfreg.io import ImageFileError

BLOCKS = ["E1", "E2", "E3", "D2", "D1"]


def _save_tiny(path, seed, depth=2):
    torch.manual_seed(seed)
    model = SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=depth)))
    return save_model(model, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(45, 67, 3)).astype(np.uint8)
    image_path = folder / "tissue.png"
    Image.fromarray(image).save(image_path)
    return {
        "folder": folder,
        "image": image_path,
        "model": _save_tiny(folder / "a.safetensors", 0),
        "other": _save_tiny(folder / "b.safetensors", 1),
    }


def _check_maps(folder, shape):
    for name in BLOCKS:
        for kind in ("redundancy", "scr", "ifd"):
            data = tifffile.imread(folder / f"{name}_{kind}.tif")
            assert data.dtype == np.float32 and data.shape == shape, (name, kind)
            assert data.min() >= 0.0 and data.max() <= 1.0
        with Image.open(folder / f"{name}_features.png") as rgb:
            assert rgb.size == (shape[1], shape[0]) and rgb.mode == "RGB"


def test_writes_json_maps_and_figure(files, tmp_path):
    out = tmp_path / "report"
    path = run_inspect(files["model"], files["image"], out, device="cpu")
    assert path == out / "redundancy.json"
    document = json.loads(path.read_text())
    assert [b["name"] for b in document["blocks"]] == BLOCKS
    for block in document["blocks"]:
        assert 0.0 <= block["redundancy_index"] <= 1.0
        assert block["scr_scale"] > 0 and block["ifd_scale"] > 0
        assert set(block["files"]) == {"redundancy", "scr", "ifd", "features"}
    assert document["map_shape"] == [45, 67] and "scaling" in document and "compare" not in document
    _check_maps(out, (45, 67))
    with Image.open(out / "redundancy.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 400


def test_the_command_prints_where_the_report_went(files, tmp_path, capsys):
    from napari_selfreg.cli import main

    out = tmp_path / "report"
    assert main(["inspect", "--model", str(files["model"]), "--image", str(files["image"]), "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = {"folder": out, "report": out / "redundancy.json", "figure": out / "redundancy.png"}
    assert printed == {key: str(path) for key, path in expected.items()}
    assert all(Path(path).exists() for path in printed.values())


def test_compare_and_region(files, tmp_path):
    out = tmp_path / "pair"
    path = run_inspect(files["model"], files["image"], out, compare_path=files["other"], device="cpu",
                       region=(5, 7, 40, 60))
    document = json.loads(path.read_text())
    assert [b["name"] for b in document["compare"]["blocks"]] == BLOCKS
    # both models share one scale per block, so paired maps are comparable
    assert [b["scr_scale"] for b in document["blocks"]] == [b["scr_scale"] for b in document["compare"]["blocks"]]
    _check_maps(out, (35, 53))
    _check_maps(out / "compare", (35, 53))


def test_user_errors(files, tmp_path):
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError):
        run_inspect(bad_model, files["image"], tmp_path / "x", device="cpu")
    with pytest.raises(ImageFileError):
        run_inspect(files["model"], tmp_path / "missing.png", tmp_path / "x", device="cpu")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 30, 30), np.uint16))
    with pytest.raises(ImageFileError, match=r"is a stack \(pages=5\)"):  # from the file's header
        run_inspect(files["model"], stack, tmp_path / "x", device="cpu")
    with pytest.raises(InputError):
        run_inspect(files["model"], files["image"], tmp_path / "x", device="cpu", region=(100, 100, 200, 200))


def test_inputs_the_report_would_overwrite_are_refused(files, tmp_path, capsys):
    import shutil

    from napari_selfreg.cli import main

    out = tmp_path / "report"
    (out / "compare").mkdir(parents=True)
    image = shutil.copy(files["image"], out / "redundancy.png")
    before = (out / "redundancy.png").read_bytes()
    assert main(["inspect", "--model", str(files["model"]), "--image", str(image), "--out", str(out)]) == 2
    assert "--image" in capsys.readouterr().err and (out / "redundancy.png").read_bytes() == before
    shutil.copy(files["image"], out / "compare" / "E1_features.png")
    with pytest.raises(InputError, match="would be overwritten"):
        run_inspect(files["model"], out / "compare" / "E1_features.png", out, compare_path=files["other"])
    # other files in the folder are no reason to refuse it
    path = run_inspect(files["model"], shutil.copy(files["image"], out / "tissue.png"), out, device="cpu")
    assert path == out / "redundancy.json" and (out / "tissue.png").exists()


def test_models_of_other_depths_are_refused_before_computing(files, tmp_path, monkeypatch):
    from napari_selfreg.core import progress

    deeper = _save_tiny(tmp_path / "deep.safetensors", 2, depth=3)
    monkeypatch.setattr(progress, "drain", lambda *a: pytest.fail("computed before refusing"))
    with pytest.raises(InputError, match="depths 2 and 3"):
        run_inspect(files["model"], files["image"], tmp_path / "x", compare_path=deeper, device="cpu")
