"""One command to try the plugin: napari with the H&E sample loaded and the widgets docked.

``napari-selfreg demo`` (or ``python -m napari_selfreg.demo``); ``--train`` starts
training at once, e.g. for screenshots.
"""

from __future__ import annotations

import argparse
import sys

PLUGIN = "napari-selfreg"
WIDGETS = ("Train SelfReg UNet", "Segment", "Feature redundancy")


def setup_demo(viewer, start_training: bool = False, steps: int | None = None, fluorescence: bool = False) -> dict:
    """Load the samples and dock the widgets into ``viewer``; returns the widgets by name."""
    from napari.utils.notifications import show_warning

    if fluorescence:  # below the H&E sample, hidden: available to the widgets
        viewer.open_sample(PLUGIN, "fluorescence_nuclei")
        for layer in viewer.layers:
            layer.visible = False
    viewer.open_sample(PLUGIN, "he_tissue")
    widgets = {}
    for title in WIDGETS:
        try:
            _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, title, tabify=title != WIDGETS[0])
        except Exception as error:  # a widget that fails to load must not stop the demo
            show_warning(f"Could not open the '{title}' widget: {error}")
            continue
        widgets[title] = widget
    train = widgets.get(WIDGETS[0])
    if train is not None:
        train.image_combo.select("H&E tissue")
        train.labels_combo.select("strokes")
        if steps is not None:
            train.steps.setValue(steps)
        if start_training:
            train.start()
        dock = train.parentWidget()
        while dock is not None and not hasattr(dock, "setFloating"):  # the QDockWidget around it
            dock = dock.parentWidget()
        if dock is not None:  # after napari's own tab handling has run
            from qtpy.QtCore import QTimer

            QTimer.singleShot(200, dock.raise_)
    return widgets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="napari-selfreg demo",
        description="Open napari with the H&E sample (strokes painted) and the napari-selfreg widgets docked.",
    )
    parser.add_argument("--train", action="store_true", help="start training at once")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the widget's)")
    parser.add_argument("--fluorescence", action="store_true", help="also load the fluorescence sample")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        import qtpy.QtCore  # noqa: F401  (napari's own error would come as a long traceback)
    except ImportError:
        print(
            "napari-selfreg demo: error: no Qt binding is installed; install one, e.g. "
            "pip install 'napari[pyqt6]', and try again",
            file=sys.stderr,
        )
        return 2

    import napari

    try:
        viewer = napari.Viewer(title="napari-selfreg demo")
        setup_demo(viewer, start_training=args.train, steps=args.steps, fluorescence=args.fluorescence)
        napari.run()
    except KeyboardInterrupt:  # Ctrl-C in the terminal: close quietly
        print("napari-selfreg demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
