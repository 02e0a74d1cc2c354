"""How long does "Colour objects by" take on a slide's worth of objects?

Makes a map of about 50 000 objects of varied sizes and shapes (a grid of 226 x 226 cells
of 12 x 12 pixels, each holding one rectangle of random sides), separates and measures them
with the Segment widget's Separate objects as a user would, then times choosing measurements
in Colour objects by:

- ``values``: the pure part, values -> one RGBA per id (``colour_by_values`` + ``colour_table``);
- ``choose``: the whole choice in the widget: the column read, the colours, napari's
  ``DirectLabelColormap`` built and set on the layer;
- ``draw``: the next repaint of the canvas (a screenshot), which maps the ids to colours on the
  CPU and uploads the texture, minus a repaint without a change.

    xvfb-run -a python benchmarks/bench_measurement_colours.py          # prints a JSON summary
    xvfb-run -a python benchmarks/bench_measurement_colours.py --out benchmarks/results/measurement_colours.json
    xvfb-run -a python benchmarks/bench_measurement_colours.py --cells 100 --repeats 3   # quicker

Under Xvfb napari draws with Mesa's software OpenGL: read ``draw`` as an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NAPARI_SELFREG_COPIES", "0")


def objects_map(cells: int, side: int = 12, seed: int = 0) -> np.ndarray:
    """A class map (1 background, 2 objects): one rectangle of 4..side-1 by 4..side-1 pixels per
    cell of a cells x cells grid (at least the 16 pixels Separate objects keeps), so neighbours
    never touch."""
    rng = np.random.default_rng(seed)
    classes = np.ones((cells * side, cells * side), np.uint8)
    heights = rng.integers(4, side, (cells, cells))
    widths = rng.integers(4, side, (cells, cells))
    rows = np.arange(side)[:, None]
    cols = np.arange(side)[None, :]
    inside = (rows[None, None] < heights[..., None, None]) & (cols[None, None] < widths[..., None, None])
    classes.reshape(cells, side, cells, side)[...] = np.where(inside, 2, 1).transpose(0, 2, 1, 3)
    return classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=226, help="cells per side: about cells^2 objects")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_selfreg.widgets.classes import class_features
    from napari_selfreg.widgets.measurement_colours import colour_by_values, colour_table, measurement_columns
    from napari_selfreg.widgets.segment_widget import MEASUREMENTS_KEY, _viridis

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer()
    _, segment = viewer.window.add_plugin_dock_widget("napari-selfreg", "Segment")
    classes = objects_map(args.cells)
    viewer.add_labels(classes, name="classes", features=class_features(["background", "nucleus"]))
    segment.split_source.select("classes")
    start = time.perf_counter()
    segment.split_layer()
    while segment.instance_worker is not None:
        app.processEvents()
        time.sleep(0.01)
    separated = time.perf_counter() - start
    layer = viewer.layers["classes instances"]
    table = layer.metadata[MEASUREMENTS_KEY]
    viewer.reset_view()
    app.processEvents()

    def repaint() -> float:
        began = time.perf_counter()
        viewer.screenshot(canvas_only=True, flash=False)
        return time.perf_counter() - began

    columns = [name for name in ("area_px", "circularity", "eccentricity", "perimeter_px")
               if segment.colour_by.findText(name) >= 0]
    values, choose, draw = [], [], []
    repaint()
    for k in range(args.repeats):
        for name in columns:
            began = time.perf_counter()
            coloured = colour_by_values(measurement_columns(table.columns())[name], _viridis())
            colour_table(table.ids, coloured.colours)
            values.append(time.perf_counter() - began)
            segment.colour_by.setCurrentIndex(0)
            repaint()
            unchanged = repaint()
            began = time.perf_counter()
            segment.colour_by.setCurrentText(name)
            choose.append(time.perf_counter() - began)
            draw.append(repaint() - unchanged)
            if k == 0 and name == columns[0]:
                print(segment.status.text())

    def summary(seconds: list[float]) -> dict:
        return {"median_s": round(float(np.median(seconds)), 4), "max_s": round(float(np.max(seconds)), 4)}

    result = {
        "objects": len(table), "image": list(classes.shape), "columns": columns, "repeats": args.repeats,
        "separate_and_measure_s": round(separated, 2),
        "values": summary(values), "choose": summary(choose), "draw_extra": summary(draw),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "napari": napari.__version__,
    }
    text = json.dumps({"command": "xvfb-run -a python benchmarks/bench_measurement_colours.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]), **result}, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
