"""``run_inspect`` writes the files it promises: names, dtypes, shapes, JSON keys, and the values
the module documents (indices, scales, maps) rather than placeholders of the right shape."""

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


STRIDES = {"E1": 1, "E2": 2, "E3": 4, "D2": 2, "D1": 1}
WINDOW = 16  # run_inspect's default, in block pixels


def _check_maps(folder, shape):
    for name in BLOCKS:
        for kind in ("redundancy", "scr", "ifd"):
            data = tifffile.imread(folder / f"{name}_{kind}.tif")
            assert data.dtype == np.float32 and data.shape == shape, (name, kind)
            assert data.min() >= 0.0 and data.max() <= 1.0
            # a redundancy map varies only where the image spans several windows (E3's are 64 px)
            if kind != "redundancy" or STRIDES[name] * WINDOW < min(shape):
                assert data.max() - data.min() > 1e-3, (name, kind, "a constant map")
        with Image.open(folder / f"{name}_features.png") as rgb:
            assert rgb.size == (shape[1], shape[0]) and rgb.mode == "RGB"
            assert np.ptp(np.asarray(rgb)) > 10, (name, "a constant rendering")


def _reference(model_path, image_path, region=None):
    """What the report's numbers should be: the model's redundancy computed here, in memory."""
    from napari_selfreg.core.checkpoint import load_model
    from napari_selfreg.core.redundancy import RedundancyConfig, redundancy_report

    model = load_model(model_path)
    image = np.asarray(Image.open(image_path))
    return model, image, redundancy_report(model, image, RedundancyConfig(device="cpu"), region)


def _check_maps_equal_report(folder, blocks, report):
    """Each written map is the report's map of its block and kind, divided by the JSON's scale."""
    for block in blocks:
        for kind in ("redundancy", "scr", "ifd"):
            written = tifffile.imread(folder / block["files"][kind])
            expected = report.image_map(block["name"], kind, block.get(f"{kind}_scale"))
            np.testing.assert_allclose(written, expected, atol=1e-6, err_msg=f"{block['name']} {kind}")


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
        # 8 x 5.1 inches at 110 dpi: bars over one heatmap per block, not a blank canvas
        assert abs(figure.size[0] - 880) <= 2 and abs(figure.size[1] - 561) <= 2, figure.size
        pixels = np.asarray(figure.convert("RGB"))
    assert (out / "redundancy.png").stat().st_size > 10_000
    assert (pixels.min(axis=-1) < 200).mean() > 0.1  # a tenth of the figure is drawn
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # heatmap colours, not a few flat ones

    # the numbers, against what they are documented to be
    from napari_selfreg.core.redundancy import block_features, channel_similarity, redundancy_index

    model, image, reference = _reference(files["model"], files["image"])
    indices = [block["redundancy_index"] for block in document["blocks"]]
    assert all(0.0 < v < 1.0 for v in indices) and len(set(indices)) == len(indices), indices
    features = block_features(model, image, device="cpu")
    teacher = features["D1"].mean(axis=0)  # the final features' channel mean
    for block in document["blocks"]:
        name = block["name"]
        # mean |cosine similarity| between the block's channels over the whole image
        assert block["redundancy_index"] == pytest.approx(redundancy_index(channel_similarity(features[name])),
                                                          abs=1e-6), name
        if reference.block(name).stride == 1:  # at image resolution: SCR by its definition, no interpolation
            raw = ((features[name] - teacher) ** 2).mean(axis=0)
            assert block["scr_mean"] == pytest.approx(raw.mean(), rel=1e-5)
            assert block["scr_scale"] == pytest.approx(np.percentile(raw, 99.0), rel=1e-5)
            np.testing.assert_allclose(tifffile.imread(out / f"{name}_scr.tif"),
                                       np.clip(raw / block["scr_scale"], 0, 1), atol=1e-5)
        for kind in ("scr", "ifd"):  # the 99th percentile of the raw distances
            cells = reference.region_cells(name, kind)
            assert block[f"{kind}_scale"] == pytest.approx(np.percentile(cells, 99.0), rel=1e-6), (name, kind)
    assert sum(reference.block(n).stride == 1 for n in BLOCKS) == 2  # E1 and D1 were checked by definition
    _check_maps_equal_report(out, document["blocks"], reference)


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
    # each folder holds its own model's maps, on the shared scale
    *_, first = _reference(files["model"], files["image"], (5, 7, 40, 60))
    *_, second = _reference(files["other"], files["image"], (5, 7, 40, 60))
    assert [b["redundancy_index"] for b in document["blocks"]] == pytest.approx(list(first.indices().values()))
    assert [b["redundancy_index"] for b in document["compare"]["blocks"]] == pytest.approx(
        list(second.indices().values()))
    assert first.indices() != second.indices()
    shared = document["blocks"]
    _check_maps_equal_report(out, shared, first)
    _check_maps_equal_report(out / "compare", document["compare"]["blocks"], second)
    for block in shared:
        for kind in ("scr", "ifd"):
            scale = max(np.percentile(r.region_cells(block["name"], kind), 99.0) for r in (first, second))
            assert block[f"{kind}_scale"] == pytest.approx(scale, rel=1e-6)


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


def test_a_rerun_replaces_the_earlier_reports_maps_and_leaves_other_files(files, tmp_path):
    """A deeper model, compared with another, then a shallower one alone into the same folder:
    the deeper model's extra blocks and the compared maps go, so every map file there belongs
    to the report beside it; a file of the user's with a report-like name stays."""
    out = tmp_path / "report"
    deep = _save_tiny(tmp_path / "deep.safetensors", 2, depth=3)
    deep_other = _save_tiny(tmp_path / "deep_other.safetensors", 3, depth=3)
    run_inspect(deep, files["image"], out, compare_path=deep_other, device="cpu")
    assert (out / "E4_scr.tif").exists() and (out / "compare" / "E4_scr.tif").exists()
    (out / "E9_scr.tif").write_bytes(b"mine")  # not listed by the report: the user's
    (out / "notes.txt").write_text("mine")
    path = run_inspect(files["model"], files["image"], out, device="cpu")
    listed = {name for block in json.loads(path.read_text())["blocks"] for name in block["files"].values()}
    maps = {p.name for p in out.iterdir() if p.suffix in (".tif", ".png") and p.name != "redundancy.png"}
    assert maps == listed | {"E9_scr.tif"}
    assert not (out / "compare").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "E9_scr.tif").read_bytes() == b"mine"


def test_a_crafted_report_cannot_make_a_rerun_delete_files_outside_its_maps(files, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    victim = tmp_path / "precious.tif"
    victim.write_bytes(b"keep")
    (out / "redundancy.json").write_text(json.dumps(
        {"blocks": [{"files": {"scr": "../precious.tif", "x": str(victim)}}], "compare": "nonsense"}))
    run_inspect(files["model"], files["image"], out, device="cpu")
    assert victim.read_bytes() == b"keep"
