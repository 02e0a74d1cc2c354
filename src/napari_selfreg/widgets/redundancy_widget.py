"""Feature-redundancy dock widget: per-block maps over the image, the index chart, the heatmap.

A thin adapter: it gathers a model (or two, to compare), an image layer and settings, runs
``core.redundancy.compute_redundancy`` in a napari thread worker, and turns the reports
into Image layers and a matplotlib chart. torch is imported only inside the worker, so
docking the widget is fast.

Each layer holds a block's grid as the core keeps it (one value per grid cell, not per
image pixel), scaled and moved so that every value sits at its cell centre over the image,
and napari interpolates it linearly on screen. That is the picture of
``RedundancyReport.image_map`` (bilinear between cell centres, clamped at the edges) at a
fraction of the memory: a slide's maps at image pixels would not fit in RAM. A layer
reaches past the region by up to a cell and a half, to the edges of the cells it needs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ._common import (
    MAP_FLAG,
    LayerCombo,
    NameCombo,
    ask_model_file,
    create_worker,
    image_shape_2d,
    layer_data,
    placement,
    same_layer,
    stack_problem,
    stop_when_closed,
    viewer_camera,
)
from .model_registry import model_registry

if TYPE_CHECKING:
    import napari

KIND_LABELS = {"redundancy": "redundancy", "scr": "SCR", "ifd": "IFD", "features": "features"}
COLORMAP = "magma"
OPACITY = 0.6


@dataclass
class LayerSpec:
    """One layer to add or update: built in the worker, applied on the main thread.

    ``data`` is a block's grid (cells of ``cell`` image pixels); ``centre`` is the image
    pixel position (row, col; pixel centres at whole numbers, as napari has them) of the
    centre of ``data[0, 0]``'s cell, so the layer can be placed over the image layer.
    """

    name: str
    data: np.ndarray
    cell: int = 1
    centre: tuple[float, float] = (0.0, 0.0)
    rgb: bool = False
    visible: bool = False


@dataclass
class ComputeResult:
    reports: list
    labels: list[str]
    region: tuple[int, int, int, int]
    layers: list[LayerSpec] = field(default_factory=list)
    scales: dict = field(default_factory=dict)


def layer_name(tag: str, block: str, kind: str) -> str:
    """'<model>: E3 redundancy' - the model tag is the common prefix of a group of layers."""
    return f"{tag}: {block} {KIND_LABELS[kind]}"


WINDOW = 16  # side of the redundancy windows, in block pixels (the core's default)


def block_stride(name: str) -> int:
    """Image pixels per block pixel, from the block's name (E1..E(depth+1), D(depth)..D1 number
    the UNet's levels): the memory check needs it before any feature is computed."""
    return 2 ** (int(name[1:]) - 1)


def _support(start: int, stop: int, origin: int, cell: int, n: int) -> slice:
    """The cells of one grid axis that the pixels ``start..stop-1`` interpolate from, as
    ``core.redundancy.upsample_grid`` weighs them: the grid runs up to an alignment step
    (hundreds of pixels) past a region, and a layer cut to the region's own cells would
    clamp its edge pixels to the wrong values."""
    first = (start + 0.5 - origin) / cell - 0.5  # grid coordinate of the first pixel centre
    last = (stop - 0.5 - origin) / cell - 0.5
    lo = int(np.clip(np.floor(first), 0, n - 1))
    hi = int(np.clip(np.ceil(last), 0, n - 1))
    return slice(lo, hi + 1)


def grid_layer(report, name: str, kind: str, scale: float | None = None) -> tuple[np.ndarray, int, tuple[float, float]]:
    """(values, cell, centre) of one map over the report's region, for a ``LayerSpec``.

    The values are the block's grid cells that the region's pixels interpolate from; cell
    (i, j) of the grid starts at image pixel ``grid_origin + (i, j) * cell``, so its centre is
    at ``grid_origin + ((i, j) + 0.5) * cell - 0.5`` in pixel-centre coordinates, where
    ``upsample_grid`` gives it weight 1. ``scale`` divides and clips SCR/IFD into [0, 1] as
    ``image_map`` does, but per cell, before napari interpolates: the values then equal
    ``image_map`` at cell centres and stay in [0, 1], and the picture differs only between a
    cell above the scale (the top 1 %) and its neighbours. Features are the uint8 RGB
    rendering at block resolution.
    """
    block = report.block(name)
    if kind == "features":
        if block.features_rgb is None:
            raise ValueError("features were not rendered (render_features=False)")
        grid, cell = block.features_rgb, block.stride
    else:
        grid, cell = block.grid(kind), block.cell(kind, report.window)
    top, left, bottom, right = report.region
    oy, ox = report.grid_origin
    rows = _support(top, bottom, oy, cell, grid.shape[0])
    cols = _support(left, right, ox, cell, grid.shape[1])
    if kind == "features":
        data = np.ascontiguousarray(grid[rows, cols])
    else:
        data = np.array(grid[rows, cols], np.float32)  # a copy: the layer may outlive the report
        if scale is not None:
            data = np.clip(data / (scale if scale > 0 else 1.0), 0.0, 1.0, out=data)
    centre = (oy + (rows.start + 0.5) * cell - 0.5, ox + (cols.start + 0.5) * cell - 0.5)
    return data, cell, centre


def redundancy_job(models, labels, image, similarity, kinds, region, window=WINDOW, stop=None):
    """Generator run in the worker: yields (done, total, text); returns a ``ComputeResult``, or
    None when ``stop`` (a ``threading.Event``) is set.

    Errors leave as ``WorkerError``: superqt drops a RuntimeError from a generator silently.
    Stopping goes through ``stop``, not the worker's quit: a quit worker leaves its generator
    suspended, holding the block features and the model's training mode for the session.
    """
    from ._workers import WorkerError

    try:
        return (yield from _redundancy_job(models, labels, image, similarity, kinds, region, window, stop))
    except Exception as error:
        raise WorkerError(error) from error


def _redundancy_job(models, labels, image, similarity, kinds, region, window, stop):
    from ..core.redundancy import RedundancyConfig, compute_redundancy, map_scale

    config = RedundancyConfig(similarity=similarity, window=window, render_features="features" in kinds)
    reports = []
    for i, (model, label) in enumerate(zip(models, labels, strict=True)):
        gen = compute_redundancy(model, image, config, region)
        while True:
            if stop is not None and stop.is_set():
                gen.close()  # runs its clean-up: the model's mode restored, the features freed
                return None
            try:
                step = next(gen)
            except StopIteration as done:
                reports.append(done.value)
                break
            yield i * step.total + step.done, len(models) * step.total, f"{label}: {step.stage}"
    if len(reports) == 2 and reports[0].names != reports[1].names:
        from ..core.data import InputError

        raise InputError("the two models have different blocks; compare models of the same depth")
    result = ComputeResult(reports, list(labels), reports[0].region)
    names = reports[0].names
    for kind in ("scr", "ifd"):
        result.scales[kind] = {n: map_scale(reports, n, kind) for n in names}
    for name in names:  # block by block, then map kind, then model: paired layers sit together
        if stop is not None and stop.is_set():  # a Stop pressed now still adds nothing
            return None
        for kind in kinds:
            for report, label in zip(reports, labels, strict=True):
                scale = result.scales[kind][name] if kind in result.scales else None
                data, cell, centre = grid_layer(report, name, kind, scale)
                result.layers.append(
                    LayerSpec(layer_name(label, name, kind), data, cell, centre, rgb=kind == "features")
                )
    yield len(models), len(models), "done"
    return result


REPORT_BYTES_PER_PIXEL = 29  # a report's own grids and maps, per model (BENCHMARKS.md, redundancy)


def maps_bytes(
    shape: tuple[int, int], image_shape: tuple[int, int], strides: list[int], kinds: list[str], models: int,
    window: int = WINDOW,
) -> int:
    """Memory the maps of a run over ``shape`` (the region's rows, cols) take: every layer is
    a float32 (or RGB uint8) grid, one value per cell of its block (``stride`` image pixels,
    ``stride * window`` for redundancy), at most the region's cells plus the neighbours its
    edge pixels interpolate from, and never more than the whole image's grid; each model's
    report keeps its own grids besides (``REPORT_BYTES_PER_PIXEL``)."""
    layers = 0
    for stride in strides:
        for kind in kinds:
            cell = stride * window if kind == "redundancy" else stride
            rows, cols = (min(-(-n // cell) + 2, -(-whole // cell))
                          for n, whole in zip(shape, image_shape, strict=True))
            layers += rows * cols * (3 if kind == "features" else 4)
    return models * (layers + shape[0] * shape[1] * REPORT_BYTES_PER_PIXEL)


def available_memory() -> int | None:
    """Bytes the system can still give (napari depends on psutil); None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, AttributeError):
        return None


class _SourceImageCombo(LayerCombo):
    """The viewer's image layers, less the redundancy maps this widget adds."""

    def __init__(self, viewer) -> None:
        from napari.layers import Image

        super().__init__(viewer, Image)

    def names(self) -> list[str]:
        return [name for name in super().names() if not self.viewer.layers[name].metadata.get(MAP_FLAG)]


class RedundancyWidget(QWidget):
    """Pick a model (and optionally a second one to compare) and an image layer; Compute adds
    one layer per block and map kind and draws the index per block and a block's heatmap."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = model_registry()
        self.worker = None
        self._stopping = False
        self._stop_event = threading.Event()
        self.result: ComputeResult | None = None
        self._close_watcher = stop_when_closed(self, lambda: self._stop_event.set())  # each run makes its own event

        form = QFormLayout()
        self.model_box = NameCombo()
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load a napari-selfreg .safetensors model file")
        row = QHBoxLayout()
        row.addWidget(self.model_box, 1)
        row.addWidget(self.load_button)
        form.addRow("Model", row)
        self.compare_check = QCheckBox("Compare with")
        self.compare_box = NameCombo()
        self.compare_box.setEnabled(False)
        form.addRow(self.compare_check, self.compare_box)
        self.image_box = _SourceImageCombo(self.viewer)
        form.addRow("Image", self.image_box)
        self.similarity_box = QComboBox()
        self.similarity_box.addItems(["cosine", "pearson"])
        self.similarity_box.setToolTip("Pearson centres each channel first (ignores a shared offset)")
        form.addRow("Similarity", self.similarity_box)
        kinds = QHBoxLayout()
        self.kind_checks = {}
        for kind, checked in (("redundancy", True), ("scr", True), ("ifd", True), ("features", False)):
            box = QCheckBox(KIND_LABELS[kind])
            box.setChecked(checked)
            self.kind_checks[kind] = box
            kinds.addWidget(box)
        form.addRow("Maps", kinds)
        self.view_only = QCheckBox("Only the region in view (large images)")
        form.addRow(self.view_only)

        self.run_button = QPushButton("Compute")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.block_box = QComboBox()
        self.block_box.setEnabled(False)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.5, 5.5), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(360)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        heat = QHBoxLayout()
        heat.addWidget(QLabel("Heatmap of block"))
        heat.addWidget(self.block_box, 1)
        layout.addLayout(heat)
        layout.addWidget(self.canvas, 1)

        self.load_button.clicked.connect(self._choose_file)
        self.compare_check.toggled.connect(self.compare_box.setEnabled)
        self.run_button.clicked.connect(self._run_or_stop)
        self.block_box.currentTextChanged.connect(self._draw)
        self.registry.changed.connect(self._refresh_models)
        self._refresh_models()

    # ------------------------------------------------------------------ choices

    def _refresh_models(self, *_) -> None:
        try:
            self._fill_model_boxes()
        except RuntimeError:  # the dock was closed: its Qt widgets are gone
            self.registry.changed.disconnect(self._refresh_models)

    def _fill_model_boxes(self) -> None:
        names = self.registry.names()
        for box in (self.model_box, self.compare_box):
            box.set_names(names)
        if len(names) > 1 and self.compare_box.currentText() == self.model_box.currentText():
            self.compare_box.setCurrentIndex(1 if self.model_box.currentIndex() == 0 else 0)

    def _choose_file(self) -> None:
        path = ask_model_file(self)
        if path:
            self.load_model_file(path)

    def load_model_file(self, path: str | Path) -> str | None:
        """Load a model file into the shared registry and select it; errors go to the status line."""
        from ..core.checkpoint import ModelFileError

        try:
            name = self.registry.load_file(path)
        except ModelFileError as error:
            self.status.setText(str(error))
            return None
        self.model_box.setCurrentText(name)
        return name

    def view_region(self, layer) -> tuple[int, int, int, int] | None:
        """The image pixels (top, left, bottom, right) in view, or None if the view shows it all.
        With the image out of view the region is empty (bottom <= top or right <= left)."""
        camera = viewer_camera(self.viewer)
        zoom = max(camera.zoom, 1e-9)
        half = max(self.viewer.canvas.size) / zoom / 2  # generous: the longer side in both directions
        centre = np.asarray(camera.center)[-2:]
        corners = [centre + np.array([dy, dx]) * half for dy in (-1, 1) for dx in (-1, 1)]
        points = np.array([np.asarray(layer.world_to_data(c))[-2:] for c in corners])
        h, w = image_shape_2d(layer)
        top, left = np.floor(points.min(0)).astype(int)
        bottom, right = np.ceil(points.max(0)).astype(int) + 1
        region = (max(0, int(top)), max(0, int(left)), min(h, int(bottom)), min(w, int(right)))
        if region == (0, 0, h, w):
            return None
        return region

    # ------------------------------------------------------------------ running

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _run_or_stop(self) -> None:
        if self.worker is not None:
            self._stop_event.set()
            self._stopping = True
            self.status.setText("stopping…")
            return
        self.compute()

    def compute(self):
        """Start the computation in a thread worker and return the worker (None if inputs are missing)."""
        names = [self.model_box.currentText()]
        if self.compare_check.isChecked():
            names.append(self.compare_box.currentText())
        if not all(names) or any(n not in self.registry for n in names):
            self.status.setText("choose a model: train one, or load a model file with 'Load…'")
            return None
        if len(names) == 2 and names[0] == names[1]:
            self.status.setText("choose two different models to compare")
            return None
        layer = self.image_box.layer()
        if layer is None:
            self.status.setText("choose an image layer")
            return None
        if stack_problem(layer):
            self.status.setText(stack_problem(layer))
            return None
        kinds = [k for k, box in self.kind_checks.items() if box.isChecked()]
        if not kinds:
            self.status.setText("tick at least one kind of map")
            return None
        image = layer_data(layer)
        region = self.view_region(layer) if self.view_only.isChecked() else None
        if region is not None and (region[0] >= region[2] or region[1] >= region[3]):
            self.status.setText(f"'{layer.name}' is not in view; pan to it or untick 'Only the region in view'")
            return None
        models = [self.registry.get(n) for n in names]
        too_big = self._memory_problem(models, kinds, region, image_shape_2d(layer))
        if too_big:
            self.status.setText(too_big)
            return None
        labels = _short_labels(names)
        self._image_layer = layer
        self._stop_event = threading.Event()
        self._close_watcher.watch_window()
        worker = create_worker(
            redundancy_job, models, labels, image, self.similarity_box.currentText(), kinds, region,
            stop=self._stop_event, _start_thread=False, _ignore_errors=True,  # errors go to the status line
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setText("Stop")
        self.status.setText("computing…")
        self.progress.setRange(0, 0)
        worker.start()
        return worker

    def _memory_problem(self, models, kinds, region, shape) -> str | None:
        """Refuse a run whose maps would not fit: the system would kill napari, and unsaved
        labels with it, long before a MemoryError could be reported."""
        top, left, bottom, right = region if region is not None else (0, 0, *shape)
        strides = [block_stride(name) for name in models[0].network.block_names]
        needed = maps_bytes((bottom - top, right - left), shape, strides, kinds, len(models))
        free = available_memory()
        if free is None or needed <= 0.8 * free:
            return None
        where = "the region in view" if region is not None else "this image"
        return (
            f"the maps of {where} ({bottom - top} x {right - left} pixels) would take about {needed / 2**30:.1f} GB "
            f"and {free / 2**30:.1f} GB is free: tick 'Only the region in view' and zoom in, or tick fewer maps"
        )

    def _on_progress(self, step) -> None:
        done, total, text = step
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.status.setText(text)

    def _on_error(self, error: Exception) -> None:
        from ..core.checkpoint import ModelFileError
        from ..core.data import InputError
        from ._workers import WorkerError

        if isinstance(error, WorkerError):
            error = error.error

        if isinstance(error, InputError | ModelFileError):
            self.status.setText(str(error))
        elif isinstance(error, MemoryError):
            self.status.setText("out of memory: tick 'Only the region in view' and zoom in, then compute again")
        else:
            self.status.setText(f"redundancy failed: {type(error).__name__}: {error}")

    def _on_finished(self) -> None:
        if self._stopping:
            self.status.setText("Stopped; no maps were added.")
        self._stopping = False
        self.worker = None
        self.run_button.setText("Compute")
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self.result is not None else 0)

    def _on_result(self, result: ComputeResult | None) -> None:
        if result is None:  # stopped
            return
        self._stopping = False  # the maps came in before the stop took effect
        self.result = result
        image = self._image_layer
        gone = not any(same_layer(image, layer) for layer in self.viewer.layers)
        added = 0 if gone else len(result.layers)
        if not gone:
            self._apply_layers(result)
        result.layers = []  # the layers hold the maps now; a deleted layer must free its memory
        names = result.reports[0].names
        self.block_box.blockSignals(True)
        current = self.block_box.currentText()
        self.block_box.clear()
        self.block_box.addItems(names)
        self.block_box.setCurrentText(current if current in names else names[len(names) // 2])
        self.block_box.setEnabled(True)
        self.block_box.blockSignals(False)
        self._draw()
        seconds = sum(r.seconds for r in result.reports)
        if gone:  # maps over an image that is no longer there would mislead: the chart only
            self.status.setText(f"'{image.name}' was deleted while its maps were computed: no map layers were "
                                f"added; the chart shows its {len(names)} blocks ({seconds:.1f} s)")
            return
        self.status.setText(f"{added} layers from {len(names)} blocks in {seconds:.1f} s")

    def _apply_layers(self, result: ComputeResult) -> None:
        """Add (or update in place) the layers, aligned with the image layer, kept adjacent; maps
        of earlier runs that this one does not remake go, so the layers match the chart. A map
        the user renamed is theirs and stays; a layer of theirs under a map's name is kept as
        "… (kept)".

        A grid value goes where the image layer shows its cell centre: one step of the
        layer is ``cell`` image pixels, and its pixel (0, 0) lands on image pixel
        ``spec.centre`` (both composed with the image layer's own scale and translate)."""
        image = self._image_layer
        made = {spec.name for spec in result.layers}
        for layer in [layer for layer in self.viewer.layers if _ours(layer)]:
            if layer.name not in made:
                self.viewer.layers.remove(layer)
        where = placement(image)
        image_scale = np.asarray(where["scale"], float)
        image_translate = np.asarray(where["translate"], float)
        first = True
        for spec in result.layers:
            visible = first and not spec.rgb
            first = first and spec.rgb
            scale = image_scale * spec.cell
            translate = image_translate + image_scale * np.asarray(spec.centre, float)
            if spec.name in self.viewer.layers:
                layer = self.viewer.layers[spec.name]
                if _ours(layer):
                    layer.data = spec.data
                    layer.scale = scale
                    layer.translate = translate
                    continue
                layer.name = f"{spec.name} (kept)"
            kwargs = {"rgb": True} if spec.rgb else {"colormap": COLORMAP, "contrast_limits": (0.0, 1.0)}
            self.viewer.add_image(
                spec.data, name=spec.name, scale=scale, translate=translate, opacity=OPACITY,
                blending="translucent", visible=visible, metadata={MAP_FLAG: spec.name}, interpolation2d="linear",
                **kwargs,
            )

    # ------------------------------------------------------------------ chart

    def _draw(self, *_) -> None:
        from ..inspect_report import plot_index_bars, plot_similarity

        self.figure.clear()
        if self.result is None:
            self.canvas.draw_idle()
            return
        reports, labels = self.result.reports, self.result.labels
        grid = self.figure.add_gridspec(2, len(reports), height_ratios=[1, 1.3])
        plot_index_bars(self.figure.add_subplot(grid[0, :]), reports, labels)
        name = self.block_box.currentText() or reports[0].names[0]
        for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
            block = report.block(name)
            title = f"{label}: {name} ({block.channels} ch), index {block.redundancy_index:.2f}"
            ax = self.figure.add_subplot(grid[1, i])
            plot_similarity(ax, block.similarity, title, colorbar=i == len(reports) - 1)
        self.canvas.draw_idle()




def _short_labels(names: list[str]) -> list[str]:
    """Names short enough for the chart and the layer names, cut in the middle: two models
    named after one image differ at the end ("… model" and "… model (2)")."""
    labels = [n if len(n) <= 28 else n[:13] + "…" + n[-14:] for n in names]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (A)", f"{labels[1]} (B)"]
    return labels


def _ours(layer) -> bool:
    """A map this widget added that still has the name it was given (renamed, it is the user's)."""
    return layer.metadata.get(MAP_FLAG) == layer.name
