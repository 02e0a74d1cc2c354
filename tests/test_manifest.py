"""The npe2 manifest: valid, complete, and every command it names can be imported."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_selfreg" / "napari.yaml"


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_file(MANIFEST)


def test_manifest_loads_and_names_the_package(manifest):
    assert manifest.name == "napari-selfreg"


def test_widgets(manifest):
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Train SelfReg UNet",
        "Segment",
        "Feature redundancy",
    }
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands["napari-selfreg.redundancy_widget"] == "napari_selfreg.widgets.redundancy_widget:RedundancyWidget"


def test_sample_data(manifest):
    keys = {s.key for s in manifest.contributions.sample_data}
    assert keys == {"he_tissue", "fluorescence_nuclei"}


def test_readers_and_writers(manifest):
    (reader,) = manifest.contributions.readers
    for pattern in ("*.tif", "*.tiff", "*.nii", "*.nii.gz", "*.mha", "*.mhd", "*.nrrd"):
        assert pattern in reader.filename_patterns
    (writer,) = manifest.contributions.writers
    assert [str(t) for t in writer.layer_types] == ["labels"]
    # every format write_image writes labels in and the reader opens (.mhd with its .raw)
    assert {".tif", ".tiff", ".png", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"} <= set(writer.filename_extensions)
    # PNG keeps the ids only: the menu must not promise class names and place for it
    assert writer.display_name == "labels, class names and place (PNG: ids only)"


def test_every_command_imports(manifest):
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.python_name


def test_npe2_validate_command():
    """``npe2 validate`` on the installed plugin (the entry point) and on the file."""
    exe = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    for target in ("napari-selfreg", str(MANIFEST)):
        out = subprocess.run([exe, "validate", target], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "valid" in out.stdout + out.stderr


def test_plugin_is_discovered_through_its_entry_point():
    pm = npe2.PluginManager()
    pm.discover(include_npe1=False)
    assert "napari-selfreg" in pm._manifests
