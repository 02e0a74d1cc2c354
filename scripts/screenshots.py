"""Screenshots of the widgets in use, for the README (docs/images/*.png).

Run under a virtual display large enough for the window:

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py

It opens the demo (H&E sample with strokes, widgets docked), trains for a while,
segments (with the objects measured; the status bar shows the largest one's measurements, as
when the pointer hovers it), computes the feature-redundancy maps, and grabs the window at each stage.
Images over 300 KiB are reduced to a 256-colour palette.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("LP_NUM_THREADS", "1")
# no copies of the trained models: they would fill the user's folder, and the status line in
# the pictures would show this machine's path
os.environ.setdefault("NAPARI_SELFREG_COPIES", "0")

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
MAX_BYTES = 300 * 1024


def _wait(condition, timeout: float) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if condition():
            return True
        time.sleep(0.02)
    return False


def _pause(seconds: float) -> None:
    _wait(lambda: False, seconds)


def _dock_of(widget):
    from qtpy.QtWidgets import QDockWidget

    parent = widget
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def _close_notifications(window) -> None:
    """Toasts (e.g. napari's PyQt5 deprecation notice) would hide part of the canvas."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in window.findChildren(NapariQtNotification):
        toast.close()


def _save(image, path: Path) -> None:
    """Write an RGBA array as PNG, palette-reduced when it would exceed MAX_BYTES."""
    from PIL import Image

    picture = Image.fromarray(image[..., :3])
    picture.save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    shown = path.relative_to(OUT.parents[1]) if path.is_relative_to(OUT.parents[1]) else path  # --out elsewhere
    print(f"{shown}: {image.shape[1]}x{image.shape[0]}, {path.stat().st_size // 1024} KiB")


def _shot(viewer, path: Path) -> None:
    _close_notifications(viewer.window._qt_window)
    _pause(0.3)
    _save(viewer.screenshot(canvas_only=False, flash=False), path)


def _grab(widget):
    """A QWidget as an RGBA array (the dock panels, without the canvas)."""
    import numpy as np
    from qtpy.QtGui import QImage

    pixmap = widget.grab()
    qimage = pixmap.toImage().convertToFormat(QImage.Format.Format_RGB32)  # an enum, not an int, for PyQt6
    width, height = qimage.width(), qimage.height()
    pointer = qimage.bits()
    pointer.setsize(height * qimage.bytesPerLine())
    array = np.frombuffer(pointer, np.uint8).reshape(height, qimage.bytesPerLine() // 4, 4)[:, :width]
    return array[..., [2, 1, 0, 3]].copy()  # BGRA -> RGBA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-seconds", type=float, default=90.0, help="how long to train before stopping")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari

    from napari_selfreg.demo import setup_demo

    viewer = napari.Viewer(title="napari-selfreg")
    window = viewer.window._qt_window
    window.resize(1500, 940)
    widgets = setup_demo(viewer)
    train, segment = widgets["Train SelfReg UNet"], widgets["Segment"]
    _pause(2)
    _close_notifications(window)

    # 1. painting: the sample strokes over the tissue, the class table
    viewer.layers.selection.active = viewer.layers["strokes"]
    viewer.layers["strokes"].mode = "paint"
    _shot(viewer, args.out / "paint_strokes.png")

    # 2. training: live losses and the preview of the visible region
    train.steps.setValue(100_000)
    train.patch_size.setValue(64)  # quick steps, so that a busy CPU still shows learning
    train.time_budget.setValue(int(args.train_seconds))
    train.start()
    _wait(lambda: train.result is not None or not train.running, args.train_seconds * 0.6)
    if train.running:
        _shot(viewer, args.out / "train_live.png")
    _wait(lambda: not train.running and train.final_worker is None, args.train_seconds + 120)
    _pause(1)
    _save(_grab(_dock_of(train)), args.out / "train_panel.png")

    # 3. segmentation with instances
    _dock_of(segment).raise_()
    segment.image_combo.select("H&E tissue")
    segment.instances.setChecked(True)
    segment.probabilities.setChecked(True)
    segment.start()
    _wait(lambda: not segment.running and segment.instance_worker is None, 120)
    _pause(1)
    for name in ("strokes", "H&E tissue prediction", "H&E tissue segmentation", "H&E tissue probabilities"):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    objects = viewer.layers["H&E tissue instances"]
    viewer.layers.selection.active = objects
    if len(objects.features):  # the pointer over the largest object: the status bar shows its measurements
        largest = objects.features.sort_values("area_px").iloc[-1]
        viewer.cursor.position = (float(largest["centroid_row"]), float(largest["centroid_col"]))
    _shot(viewer, args.out / "segment_instances.png")
    if segment.colour_by.findText("circularity") > 0:  # the same objects coloured by how round they are
        segment.colour_by.setCurrentText("circularity")
        _pause(1)
        _shot(viewer, args.out / "segment_circularity.png")
        segment.colour_by.setCurrentIndex(0)

    # 4. feature redundancy of the trained model
    redundancy = widgets.get("Feature redundancy")
    if redundancy is not None:
        _dock_of(redundancy).raise_()
        redundancy.image_box.setCurrentText("H&E tissue")
        if redundancy.compute() is not None:
            _wait(lambda: not redundancy.running, 180)
            _pause(1)
            viewer.layers["H&E tissue instances"].visible = False
            _shot(viewer, args.out / "feature_redundancy.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
