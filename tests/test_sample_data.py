"""The shipped sample data: small, consistent, and what scripts/make_sample_data.py makes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_selfreg.core.data import MAX_CLASSES
from napari_selfreg.sample_data import SAMPLE_DIR, fluorescence_arrays, fluorescence_nuclei, he_arrays, he_tissue
from napari_selfreg.widgets.classes import class_colormap

ROOT = Path(__file__).resolve().parents[1]


def test_files_are_small():
    files = [p for p in SAMPLE_DIR.iterdir() if p.is_file()]
    assert len(files) >= 5
    assert sum(p.stat().st_size for p in files) < 1024 * 1024


def test_he_sample_layers():
    layers = he_tissue()
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "labels", "labels"]
    (image, meta, _), (truth, truth_meta, _), (strokes, strokes_meta, _) = layers
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and meta["rgb"]
    assert strokes_meta["name"] == "strokes" and truth_meta["visible"] is False
    assert list(strokes_meta["features"]["class"]) == ["not painted", "background", "nucleus"]
    assert truth.shape == strokes.shape == (256, 256)


def test_strokes_are_trainable_and_agree_with_the_truth():
    arrays = he_arrays()
    strokes, truth = arrays["strokes"], arrays["ground_truth"]
    assert set(np.unique(strokes)) == {0, 1, 2}
    assert set(np.unique(truth)) == {1, 2}
    painted = strokes > 0
    assert np.array_equal(strokes[painted], truth[painted])  # every stroke is on its true class
    for cls in (1, 2):  # several strokes per class, so some can be held out for validation
        assert ndimage.label(strokes == cls, structure=np.ones((3, 3)))[1] >= 5
    assert 0.01 < painted.mean() < 0.05  # a few strokes, not a dense mask


def test_he_colours_look_like_hematoxylin_and_eosin():
    arrays = he_arrays()
    image, truth = arrays["image"].astype(float), arrays["ground_truth"]
    nuclei, stroma = image[truth == 2].mean(0), image[truth == 1].mean(0)
    assert nuclei.sum() < stroma.sum() - 150  # nuclei are dark
    assert nuclei[2] > nuclei[1] and stroma[0] > stroma[1]  # blue-purple nuclei, pink stroma


def test_fluorescence_sample():
    arrays = fluorescence_arrays()
    image, instances = arrays["image"], arrays["ground_truth"]
    assert image.dtype == np.uint16 and image.ndim == 2
    assert instances.shape == image.shape and instances.max() >= 30
    assert image[instances > 0].mean() > 3 * image[instances == 0].mean()
    (_, meta, kind), (_, truth_meta, truth_kind) = fluorescence_nuclei()
    assert truth_meta["visible"] is False
    assert kind == "image" and truth_kind == "labels" and meta["colormap"] == "gray"


def test_generator_reproduces_the_shipped_files(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    if spec is None:
        pytest.skip("scripts/ is not available (installed package)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    module.main()
    for path in SAMPLE_DIR.iterdir():
        if path.is_file():
            from napari_selfreg.io import read_image

            assert np.array_equal(read_image(tmp_path / path.name), read_image(path)), path.name


def test_every_class_id_has_its_own_visible_colour():
    """Ids past the fixed palette used to wrap round to the background's yellow."""
    strokes = class_colormap()
    ids = range(1, MAX_CLASSES + 1)
    colours = [strokes[label_id] for label_id in ids]
    assert "transparent" not in colours
    assert len(set(colours)) == MAX_CLASSES
    prediction = class_colormap(show_background=False)
    assert prediction[1] == "transparent"
    assert [prediction[label_id] for label_id in ids[1:]] == colours[1:]
