"""Does napari stay responsive while the plugin works? Main-thread stalls, measured.

A QTimer fires every 10 ms on napari's main thread; every gap between two ticks beyond
that is time in which the viewer could not pan, zoom or repaint. The script docks the
widgets as napari does (from the manifest), then records the gaps in three phases:

- ``train``: the Train widget trains the default model on a MoNuSeg image with simulated
  strokes (the synthetic H&E sample without ../shared/data), live preview on;
- ``redundancy``: the Feature redundancy widget computes and adds its maps for that model;
- ``segment``: the Segment widget segments the image with probabilities and instances.

    xvfb-run -a python benchmarks/bench_gui.py                 # 150 steps -> benchmarks/results/gui.json
    xvfb-run -a python benchmarks/bench_gui.py --steps 20 --out /tmp/gui.json   # a quick run

Under Xvfb napari draws with Mesa's software OpenGL, so repaints cost more than on a
desktop with a GPU: read the figures as an upper bound.
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

# the runs' trained models are not copied into the user's folder (nor timed)
os.environ.setdefault("NAPARI_SELFREG_COPIES", "0")

HERE = Path(__file__).resolve().parent
TICK_MS = 10
PLUGIN = "napari-selfreg"


class GapRecorder:
    """Gaps between the ticks of a 10 ms timer on the main thread, per phase."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def run(self, app, until, timeout: float) -> dict:
        self.ticks = [time.perf_counter()]
        self.timer.start()
        end = time.perf_counter() + timeout
        while not until() and time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)
        self.timer.stop()
        if not until():
            raise TimeoutError("the phase did not finish in time")
        return summary(np.diff(self.ticks))


def summary(gaps: np.ndarray) -> dict:
    late = gaps[gaps > 0.1]
    return {
        "seconds": float(gaps.sum()),
        "ticks": int(len(gaps)),
        "median_gap_ms": float(np.median(gaps) * 1000),
        "p99_gap_ms": float(np.percentile(gaps, 99) * 1000),
        "max_gap_ms": float(gaps.max() * 1000),
        "gaps_over_100ms": int(len(late)),
        "gaps_over_250ms": int((gaps > 0.25).sum()),
        "seconds_in_gaps_over_100ms": float(late.sum()),
    }


def image_and_strokes() -> tuple[np.ndarray, np.ndarray, str]:
    sys.path.insert(0, str(HERE))
    from bench_speed import real_pair

    pair = real_pair()
    if pair is not None:
        return pair
    from napari_selfreg.sample_data import he_arrays

    data = he_arrays()
    return data["image"], data["strokes"], "synthetic H&E sample"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gui.json")
    args = parser.parse_args(argv)

    import napari

    from napari_selfreg.widgets.redundancy_widget import MAP_FLAG

    image, strokes, source = image_and_strokes()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(image, name="image")
    viewer.add_labels(strokes.astype(np.uint8), name="strokes")
    app = napari.qt.get_qapp()
    recorder = GapRecorder()
    phases = {}
    idle_until = time.perf_counter() + 2.0
    phases["idle"] = recorder.run(app, lambda: time.perf_counter() > idle_until, 10)

    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train SelfReg UNet")
    train.image_combo.select("image")
    train.labels_combo.select("strokes")
    train.steps.setValue(args.steps)
    train.device.setCurrentText("cpu")
    started = time.perf_counter()
    train.start()
    phases["train"] = recorder.run(app, lambda: train.worker is None and train.final_worker is None, 1800)
    phases["train"]["steps"] = len(train.plot.steps)
    phases["train"]["training_seconds"] = time.perf_counter() - started

    _, maps = viewer.window.add_plugin_dock_widget(PLUGIN, "Feature redundancy")
    maps.model_box.setCurrentText(maps.model_box.itemText(0))
    maps.image_box.setCurrentText("image")
    maps.view_only.setChecked(False)
    maps.compute()
    phases["redundancy"] = recorder.run(app, lambda: not maps.running, 900)
    phases["redundancy"]["layers"] = sum(1 for layer in viewer.layers if layer.metadata.get(MAP_FLAG))

    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image_combo.select("image")
    segment.probabilities.setChecked(True)
    segment.instances.setChecked(True)
    segment.device.setCurrentText("cpu")
    segment.start()
    phases["segment"] = recorder.run(
        app, lambda: segment.worker is None and getattr(segment, "instance_worker", None) is None, 900
    )

    doc = {
        "command": " ".join(["xvfb-run -a python", *sys.argv]),
        "image_source": source,
        "image_shape": list(image.shape),
        "environment": {
            "python": platform.python_version(),
            "napari": napari.__version__,
            "logical_cpus": os.cpu_count(),
            "display": os.environ.get("DISPLAY", ""),
            "load_average_at_start": os.getloadavg(),
        },
        "tick_ms": TICK_MS,
        "phases": phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for name, phase in phases.items():
        print(f"{name:11s} {phase['seconds']:6.1f} s: median gap {phase['median_gap_ms']:.0f} ms, "
              f"p99 {phase['p99_gap_ms']:.0f} ms, max {phase['max_gap_ms']:.0f} ms, "
              f"{phase['gaps_over_100ms']} gaps > 100 ms ({phase['seconds_in_gaps_over_100ms']:.2f} s)")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
