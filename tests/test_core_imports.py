"""The core is numpy + torch only: importing any core module must not pull in Qt, napari or magicgui."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import napari_selfreg.core

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")


def test_core_modules_never_import_gui_packages():
    modules = sorted(f"napari_selfreg.core.{m.name}" for m in pkgutil.iter_modules(napari_selfreg.core.__path__))
    assert "napari_selfreg.core.train" in modules and "napari_selfreg.core.predict" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in {GUI_MODULES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"core imported GUI packages: {out.stdout.strip()}"
