"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent); every test
that opens a napari viewer is marked ``gui``, so ``-m "not gui"`` runs without a display, and
every test that reads the real data (through ``shared_data``, at any depth) is marked ``data``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

_DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHARED_DATA = Path(os.environ.get("SELFREG_SHARED_DATA", _DEFAULT_DATA))


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "make_napari_viewer" in fixtures:
            item.add_marker(pytest.mark.gui)
        if "shared_data" in fixtures:
            item.add_marker(pytest.mark.data)


@pytest.fixture(autouse=True)
def model_copies(tmp_path_factory, monkeypatch) -> Path:
    """Trained models are copied to disk by the Train widget: into a fresh folder per test,
    never into the user's data folder."""
    folder = tmp_path_factory.mktemp("model-copies")
    monkeypatch.setenv("NAPARI_SELFREG_COPIES", str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "monuseg").is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA} (set SELFREG_SHARED_DATA)")
    return SHARED_DATA.resolve()


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


@pytest.fixture(scope="session")
def monuseg_pair(shared_data):
    """One real MoNuSeg training image (1000x1000 RGB) and its binary nuclei mask."""
    from PIL import Image

    stem = "TCGA-A7-A13E-01Z-00-DX1"
    image = _read_rgb(shared_data / "monuseg" / "train" / "images" / f"{stem}.png")
    with Image.open(shared_data / "monuseg" / "train" / "masks" / f"{stem}.png") as m:
        mask = np.array(m) > 0
    return image, mask


@pytest.fixture(scope="session")
def glas_pair(shared_data):
    """One real GlaS test A image and its binary gland mask."""
    from PIL import Image

    image = _read_rgb(shared_data / "glas" / "test" / "images" / "testA_1.png")
    with Image.open(shared_data / "glas" / "test" / "masks" / "testA_1_anno.png") as m:
        mask = np.array(m) > 0
    return image, mask


@pytest.fixture
def messages(monkeypatch):
    """The notifications the widgets show, recorded (``test_widgets.Messages``)."""
    from test_widgets import Messages

    from napari_selfreg.widgets import _common, segment_widget, train_widget

    return Messages(monkeypatch, train_widget, segment_widget, _common)


@pytest.fixture
def he_viewer(make_napari_viewer):
    """A real viewer with the packaged H&E sample: the image, its strokes and its truth."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-selfreg", "he_tissue")
    return viewer
