"""The "Segment" dock widget: a trained or loaded model + an image layer -> Labels layers.

The core's tiled prediction runs in a thread worker; the output layer is added first and
refreshed as rows of tiles finish, so large images (dask, zarr) fill in while the viewer
stays responsive. Outputs that would not fit comfortably in memory are memory maps.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.config import PredictConfig
from ._common import (
    EDITED_KEY,
    OURS_KEY,
    UNCERTAINTY_KEY,
    DeviceCombo,
    LayerCombo,
    NameCombo,
    ask_model_file,
    check_box,
    connect_while_alive,
    create_worker,
    drop_uncertainty,
    explain,
    free_name,
    hold_read_only,
    image_shape_2d,
    layer_data,
    let_go,
    placement,
    same_layer,
    show_uncertainty,
    stack_problem,
    stop_when_closed,
    track_edits,
)
from ._workers import run_prediction
from .classes import class_colormap, class_features, class_names_of
from .measurement_colours import colour_by_values, colour_table, follow_column, measurement_columns, scale_text
from .model_registry import model_registry

MEMMAP_PIXELS = 64_000_000  # outputs above this many pixels go to memory-mapped files
REFRESH_SECONDS = 0.5


PARTIAL_KEY = "napari_selfreg_partial"  # layer metadata: its run has not completed
INSTANCES_KEY = "napari_selfreg_instances"  # layer metadata: object ids, not classes
MEASUREMENTS_KEY = "napari_selfreg_measurements"  # layer metadata of objects: their ObjectTable
STALE_KEY = "napari_selfreg_measurements_stale"  # layer metadata: painted on since it was measured
CLASSES_KEY = "napari_selfreg_classes_layer"  # layer metadata of objects: the name of their class map
NAMES_KEY = "napari_selfreg_object_classes"  # layer metadata of objects: the class names of their table
PICTURE_KEY = "napari_selfreg_objects_image"  # layer metadata of objects: the image layer they were measured on
COLOURED_BY_KEY = "napari_selfreg_coloured_by"  # layer metadata of objects: the measurement their colours show
OWN_COLOURS_KEY = "napari_selfreg_own_colours"  # layer metadata of objects coloured by one: the colormap they had
OWN_COLOURS = "their own colours"  # the first entry of Colour objects by
LARGEST_ID_WITHOUT_NUMBA = 2**16  # napari draws a DirectLabelColormap of larger ids only with numba


def _edited(layer) -> bool:
    """Whether a segmentation layer holds the user's work: painted on since Segment made it, or
    not made by Segment at all."""
    return not layer.metadata.get(OURS_KEY) or bool(layer.metadata.get(EDITED_KEY))


def _counts(split, class_names: list[str]) -> str:
    """"55 objects", or "70 objects: 55 nucleus, 15 gland" where there are several classes."""
    text = f"{split.count} objects"
    if len(split.per_class) < 2:
        return text
    named = [f"{n} {class_names[c - 1] if 0 < c <= len(class_names) else f'class {c}'}"
             for c, n in split.per_class.items()]
    return f"{text}: {', '.join(named)}"


def _mark_edits(layer) -> None:
    layer.metadata[OURS_KEY] = True
    track_edits(layer)


class SegmentWidget(QWidget):
    """Dock widget: choose a model and an image; get class labels, instances and probabilities."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = model_registry()
        self.worker = None
        self.instance_worker = None
        self.stop_event = threading.Event()
        self._instance_stop = threading.Event()
        self._held = None  # the layer whose objects are being split: read-only until then
        self.output_layer = None
        self._previous_name = ""  # the last segmentation, kept under this name while a new run goes
        self.prediction = None
        self._last_refresh = 0.0
        self._tempdir: tempfile.TemporaryDirectory | None = None
        self._newest: str | None = None  # the registry's newest model at the last refresh
        self._last_measured = None  # the objects layer measured last
        self.measure_worker = None  # measuring a corrected objects layer again before saving it
        self._watched = weakref.WeakSet()  # measured layers whose paint marks their table stale
        self._table_folder = ""  # where the last table was saved
        self._build()
        connect_while_alive(
            self, (self.registry.changed, self._refresh_models),
            (self.viewer.layers.events.removed, self._measured_changed),
            (self.viewer.layers.events.inserted, self._watch_inserted),
            (self.viewer.layers.selection.events.active, self._measured_changed),
        )
        self._close_watcher = stop_when_closed(self, lambda: self.running and self.stop(), self._stop_events)
        self._refresh_models()
        self._update_colour_choices()

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.model_combo = NameCombo()
        self.model_combo.setToolTip("A model trained in this viewer (Train widget) or loaded from a file.")
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        load = QPushButton("Load…")
        load.setToolTip("Load a napari-selfreg .safetensors model file.")
        load.clicked.connect(self._load_dialog)
        row.addWidget(load)
        form.addRow("Model", row)
        self.image_combo = LayerCombo(self.viewer, Image)
        self.image_combo.setToolTip("The image to segment (any size; dask and zarr images are read tile by tile).")
        form.addRow("Image", self.image_combo)
        defaults = PredictConfig()
        self.tile_size = QSpinBox()
        self.tile_size.setRange(64, 4096)
        self.tile_size.setSingleStep(64)
        self.tile_size.setValue(defaults.tile_size)
        self.tile_size.setToolTip(
            "Side of the square tiles the image is cut into; larger is faster but needs more memory."
        )
        form.addRow("Tile size", self.tile_size)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.5)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(defaults.overlap)
        self.overlap.setToolTip("Share of a tile overlapping its neighbours; tiles are blended so seams vanish.")
        form.addRow("Overlap", self.overlap)
        self.device = DeviceCombo()
        form.addRow("Device", self.device)
        self.flips = check_box(
            "Average over flips (4x slower)",
            "Predict each tile four times (as is and flipped) and average: smoother, usually slightly more "
            "accurate outlines.",
            defaults.flips,
        )
        form.addRow(self.flips)
        self.instances = check_box(
            "Separate touching objects (instances)",
            "Also add a labels layer with one id per object, splitting touching nuclei by a distance-transform "
            "watershed.",
        )
        form.addRow(self.instances)
        self.probabilities = check_box(
            "Probability map", "Also add the per-class probabilities as an image layer (0..1)."
        )
        form.addRow(self.probabilities)
        self.uncertainty = check_box(
            "Uncertainty map",
            "Also add a map of how unsure the model is (0 = sure, 1 = the classes tie). Mistakes are 3-4 times "
            "as dense where it is bright, mostly along the outlines; a third of them are made with confidence "
            "and stay dark (BENCHMARKS.md).",
        )
        form.addRow(self.uncertainty)
        layout.addLayout(form)
        self.run_button = QPushButton("Segment")
        self.run_button.setToolTip("Segment the image; while it runs, the same button stops it.")
        self.run_button.clicked.connect(self.toggle)
        layout.addWidget(self.run_button)
        self.progress = QProgressBar()
        self.progress.setToolTip("Tiles done.")
        layout.addWidget(self.progress)
        self.status = QLabel("Train a model (or load one), choose an image, press Segment.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        # the objects of any class map: a segmentation the user corrected, or one made elsewhere
        split_form = QFormLayout()
        row = QHBoxLayout()
        self.split_source = LayerCombo(self.viewer, Labels)
        self.split_source.setToolTip(
            "A labels layer of classes (1 = background, 2.. = structures), e.g. a segmentation you corrected; "
            "or a layer of objects (e.g. a saved objects file opened again), which is measured as it is."
        )
        row.addWidget(self.split_source, 1)
        self.split_button = QPushButton("Separate objects")
        self.split_button.setToolTip("Add a labels layer with one id per object of this layer's structure classes, "
                                     "measured; a layer that holds objects already is measured as it is.")
        self.split_button.clicked.connect(self.split_layer)
        row.addWidget(self.split_button)
        split_form.addRow("Objects of", row)
        self.pixel_size = QDoubleSpinBox()
        self.pixel_size.setRange(0.0, 10_000.0)
        self.pixel_size.setDecimals(4)
        self.pixel_size.setSingleStep(0.05)
        self.pixel_size.setSuffix(" µm")
        self.pixel_size.setSpecialValueText("the layer's scale")  # shown at 0
        self.pixel_size.setToolTip(
            "The side of a pixel, for areas in µm² and diameters, perimeters and axes in µm beside those in "
            "pixels (e.g. 0.25 at 40x, 0.5 at 20x). At 0 the objects layer's scale is used where it is not 1."
        )
        self.pixel_size.valueChanged.connect(self._pixel_size_changed)
        split_form.addRow("Pixel size", self.pixel_size)
        self.colour_by = QComboBox()
        self.colour_by.setToolTip(
            "Colour the objects of the selected objects layer (else the last one measured) by one of their "
            "measurements, from dark (low) to bright (high) on the viridis scale between the 2nd and 98th "
            "percentiles, which the status line gives; grey: no value; magenta: painted since they were measured "
            "(Save measurements… measures them). The first entry gives the objects their own colours back."
        )
        self.colour_by.currentIndexChanged.connect(self._colour_chosen)
        split_form.addRow("Colour objects by", self.colour_by)
        layout.addLayout(split_form)
        self.save_table_button = QPushButton("Save measurements…")
        self.save_table_button.setToolTip(
            "Write the measurements of the selected objects layer (else the last one measured) as a CSV table: "
            "one row per object with its class, sizes, shape (perimeter, ellipse, circularity, solidity), "
            "centroid, bounding box, whether it touches the image edge, and its colours where it was measured "
            "on an image."
        )
        self.save_table_button.clicked.connect(self._save_table_dialog)
        self.save_table_button.setEnabled(False)
        layout.addWidget(self.save_table_button)
        layout.addStretch(1)

    # ------------------------------------------------------------------ models

    def _refresh_models(self, *_) -> None:
        """List the session's models. A model just trained or loaded is the likely next choice,
        unless the user chose another than the newest: the registry is shared by every viewer,
        and a model trained elsewhere must not replace their choice."""
        names = self.registry.names()
        shown = self.model_combo.currentText()
        listed = {self.model_combo.itemText(i) for i in range(self.model_combo.count())}
        following = not shown or shown == self._newest  # nothing chosen, or still the newest
        self.model_combo.set_names(names)
        newest = names[-1] if names else None
        if newest is not None and newest not in listed and following:
            self.model_combo.setCurrentText(newest)
        self._newest = newest

    def load_model(self, path: str | Path) -> str | None:
        from ..core.checkpoint import ModelFileError

        try:
            name = self.registry.load_file(path)
        except ModelFileError as error:
            show_error(f"Could not load the model: {error}")
            return None
        self.model_combo.setCurrentText(name)
        return name

    def _load_dialog(self) -> None:
        path = ask_model_file(self)
        if path:
            self.load_model(path)

    # ------------------------------------------------------------------ run

    @property
    def running(self) -> bool:
        return self.worker is not None or self.instance_worker is not None

    def toggle(self) -> None:
        if self.running:
            self.stop()
        else:
            self.start()

    def _stop_events(self) -> None:
        """Its napari window is gone: stop the work without touching any Qt object."""
        self.stop_event.set()
        self._instance_stop.set()

    def stop(self) -> None:
        self._stop_events()  # each split makes its own event: setting an idle one is harmless
        self.status.setText("Stopping…")

    def _outputs(self, shape: tuple[int, int], classes: int, probabilities: bool, uncertainty: bool):
        """Output arrays (labels, probabilities or None, uncertainty or None): in memory, or
        memory-mapped files for very large images."""
        h, w = shape
        if h * w <= MEMMAP_PIXELS:
            labels = np.zeros(shape, np.uint8)
            probs = np.zeros((classes, h, w), np.float32) if probabilities else None
            unsure = np.zeros(shape, np.float32) if uncertainty else None
            return labels, probs, unsure
        self._tempdir = _temporary_folder()
        folder = Path(self._tempdir.name)
        labels = _mapped_file(folder, "labels", np.uint8, shape)
        probs = None
        if probabilities:
            probs = _mapped_file(folder, "probabilities", np.float16, (classes, h, w))
        unsure = _mapped_file(folder, "uncertainty", np.float16, shape) if uncertainty else None
        show_info(f"The image is large: outputs are kept in memory-mapped files under {folder}.")
        return labels, probs, unsure

    def start(self):
        self._close_watcher.watch_window()
        name = self.model_combo.currentText()
        if name not in self.registry:
            show_error("Choose a model: train one with 'Train SelfReg UNet' or Load… a model file.")
            return None
        image = self.image_combo.layer()
        if image is None:
            show_error("Choose an image layer to segment.")
            return None
        if stack_problem(image):
            show_error(stack_problem(image))
            return None
        model = self.registry.get(name)
        try:
            config = PredictConfig(
                tile_size=self.tile_size.value(), overlap=self.overlap.value(), device=self.device.currentText(),
                flips=self.flips.isChecked(),
            )
        except ValueError as error:
            show_error(f"Check the settings: {error}")
            return None
        shape = image_shape_2d(image)
        data = layer_data(image)
        labels, probs, unsure = self._outputs(
            shape, model.config.num_classes, self.probabilities.isChecked(), self.uncertainty.isChecked()
        )
        layer_name = f"{image.name} segmentation"
        # the last result stays, renamed, until this run completes: a stopped or failed run
        # must not cost the user a segmentation; one they edited is kept for good
        previous_name = f"{layer_name} (previous)"
        last = self.viewer.layers[layer_name] if layer_name in self.viewer.layers else None
        if last is not None and last.metadata.get(PARTIAL_KEY) and previous_name in self.viewer.layers:
            # a stopped or failed run's part: the complete result before it stays the previous one
            self._drop_unless_edited(last)
        elif last is not None:  # the last result becomes the previous one (a removed one does not)
            if previous_name in self.viewer.layers:
                self._drop_unless_edited(self.viewer.layers[previous_name])
            if _edited(last):
                self._keep_edited(last)
            else:
                last.name = previous_name
        self._previous_name = previous_name
        self.output_layer = self.viewer.add_labels(
            labels,
            name=layer_name,
            features=class_features(model.class_names),
            colormap=class_colormap(show_background=False),
            **placement(image),
            opacity=0.6,
        )
        _mark_edits(self.output_layer)
        self.output_layer.metadata[PARTIAL_KEY] = True
        # strokes painted while the tiles fill in would be overwritten: editable again at the end
        hold_read_only(self.output_layer)
        self._image = image
        self._model = model
        self.stop_event = threading.Event()
        self.worker = create_worker(
            run_prediction, model, data, config, probs is not None, labels, probs, unsure, self.stop_event,
            _ignore_errors=True,
        )
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.run_button.setText("Stop")
        self.progress.setValue(0)
        self.status.setText(f"Segmenting {image.name} with {name}…")
        self._started = time.perf_counter()
        self.worker.start()
        return self.worker

    def _on_progress(self, progress) -> None:
        self.progress.setRange(0, progress.total)
        self.progress.setValue(progress.done)
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_SECONDS and self.output_layer in self.viewer.layers:
            self._last_refresh = now
            self.output_layer.refresh()

    def _drop_unless_edited(self, layer) -> None:
        if _edited(layer):
            self._keep_edited(layer)
        else:
            self.viewer.layers.remove(layer)

    def _keep_edited(self, layer) -> None:
        """A segmentation the user painted on is theirs: renamed out of the way, never removed."""
        name = free_name(self.viewer, layer.name.removesuffix(" (previous)") + " (corrected)")
        layer.name = name
        show_info(f"Your edits are kept in '{name}'.")

    def _on_returned(self, prediction) -> None:
        self.prediction = prediction
        if self.output_layer is not None and self.output_layer in self.viewer.layers:
            self.output_layer.refresh()
        else:
            kept = self._kept_note()
            show_warning(f"The segmentation layer was removed; press Segment again to remake it.{kept}")
            self.status.setText(f"The segmentation layer was removed during the run.{kept}")
            return
        seconds = time.perf_counter() - self._started
        kept = self._kept_note()
        if not prediction.complete:
            self.status.setText(f"Stopped; the rows finished so far are kept in the segmentation layer.{kept}")
            show_info(f"Segmentation stopped; the part done so far is kept.{kept}")
            return
        self.output_layer.metadata[PARTIAL_KEY] = False
        self.split_source.select(self.output_layer.name)  # Separate objects acts on this result next
        if kept:
            self._drop_unless_edited(self.viewer.layers[self._previous_name])
        self.status.setText(f"Done in {seconds:.1f} s: '{self.output_layer.name}'.")
        image = self._image
        self._drop_stale(
            image, prediction.probabilities is not None, self.instances.isChecked(), prediction.uncertainty is not None
        )
        if prediction.probabilities is not None:
            self._add_probabilities(image, prediction.probabilities, self._model.class_names)
        if prediction.uncertainty is not None:
            show_uncertainty(self.viewer, image, prediction.uncertainty, "Segment")
        if self.instances.isChecked():
            self.status.setText(f"{self.status.text()} Separating touching objects (read-only until then)…")
            self._start_instances(prediction.labels, image, self.output_layer)

    def _drop_stale(self, image, probabilities: bool, instances: bool, uncertainty: bool) -> None:
        """The last run's probability maps, uncertainty map and objects of this image that this
        run does not remake: they belong to the segmentation just replaced. Objects the user
        edited stay, renamed; layers the user made or renamed are not ours and stay as they are,
        and so does an uncertainty map Train made (of its own prediction)."""
        base = f"{image.name} probabilities"
        if not probabilities:
            for layer in [layer for layer in self.viewer.layers if layer.name.startswith(base)]:
                if layer.metadata.get(OURS_KEY):
                    self.viewer.layers.remove(layer)
        if not uncertainty:
            drop_uncertainty(self.viewer, image, "Segment")
        name = f"{image.name} instances"
        if not instances and name in self.viewer.layers and self.viewer.layers[name].metadata.get(INSTANCES_KEY):
            self._drop_unless_edited(self.viewer.layers[name])

    def _add_probabilities(self, image, probabilities, class_names: list[str]) -> None:
        """One 2-D layer per structure class, named after it ("… probabilities" alone for a
        single structure); a stack would add an unnamed slider and turn the viewer 3-D."""
        base = f"{image.name} probabilities"
        for layer in [layer for layer in self.viewer.layers if layer.name.startswith(base)]:
            if layer.metadata.get(OURS_KEY):
                self.viewer.layers.remove(layer)  # replaced, as the segmentation is; the user's own stay
        structures = list(range(1, len(probabilities)))
        place = placement(image)
        for k in structures:
            name = base if len(structures) == 1 else f"{base}: {class_names[k]}"
            self.viewer.add_image(
                probabilities[k],
                name=name,
                colormap="magma",
                contrast_limits=(0.0, 1.0),
                blending="additive",
                visible=False,
                **{**place, "metadata": {**place["metadata"], OURS_KEY: True}},
            )

    def split_layer(self):
        """Separate the objects of the chosen labels layer (a corrected segmentation, say); a
        layer that holds objects already (ours, or more ids than classes can be) is measured
        as it is instead, so objects saved and opened again can be hovered, coloured and saved."""
        layer = self.split_source.layer()
        if layer is None:
            show_error("Choose the labels layer whose objects to separate (a segmentation, corrected or not).")
            return None
        if self.running:
            show_error("Segment is still running: wait for it (or press Stop), then separate the objects.")
            return None
        problem = stack_problem(layer)
        if problem:
            show_error(problem)
            return None
        # ours, or measured as objects before (not marked ours: Segment would drop it with its outputs)
        objects = bool(layer.metadata.get(INSTANCES_KEY)) or layer.metadata.get(MEASUREMENTS_KEY) is not None
        doing = "Measuring" if objects else "Separating"
        self.status.setText(f"{doing} the objects of '{layer.name}' (read-only until then)…")
        return self._start_instances(layer_data(layer), layer, layer, check_ids=True, picture=self._image_under(layer),
                                     objects=objects)

    def _image_under(self, layer):
        """The one image a layer of classes can have been made on, for the objects' colours:
        the user's image layers of its shape (not probability or uncertainty maps), if one."""
        shape = image_shape_2d(layer)
        found = [
            other for other in self.viewer.layers
            if isinstance(getattr(other, "__wrapped__", other), Image) and not other.metadata.get(OURS_KEY)
            and not other.metadata.get(UNCERTAINTY_KEY) and _picture_of(other, shape) is not None
        ]
        return found[0] if len(found) == 1 else None

    def _start_instances(self, labels, source, classes, check_ids: bool = False, picture=None, objects=False):
        """Split ``labels`` into objects in a worker; the layer is named after ``source`` and
        placed as it is; ``classes`` is the labels layer whose class names the counts take;
        ``picture`` the image layer whose colours the objects are measured in (default: ``source``
        when it is an image).
        ``check_ids``: measure a map of ids beyond painting's as objects, without a split, as for
        ``objects`` (checked in the worker, since reading a slide's ids takes seconds)."""
        self._instance_stop = threading.Event()
        # A stroke painted now would reach the windows split later and not those split
        # before: objects lost or split in two. Read-only until the split ends.
        self._held = classes
        hold_read_only(classes)
        # this run's layers and names, not whichever the next Segment has made current
        output_name, names = classes.name, class_names_of(classes) or []
        picture = picture if picture is not None else source
        pixels = _picture_of(picture, labels.shape)  # Segment's image: the objects' colours too
        picture_name = picture.name if pixels is not None else None
        worker = create_worker(
            _split_classes, labels, self._instance_output(labels.shape), self._instance_stop,
            source.name if check_ids else None, bool(names), pixels, objects, _ignore_errors=True,
        )
        worker.yielded.connect(self._on_instance_progress)
        worker.returned.connect(
            lambda result: self._add_instances(*result, source, output_name, names, picture_name)
        )
        worker.errored.connect(self._on_instances_error)
        worker.finished.connect(self._on_instances_finished)
        self.instance_worker = worker
        self.run_button.setText("Stop")  # the split of a slide takes minutes: Stop reaches it too
        self.progress.setValue(0)
        worker.start()
        return worker

    def _instance_output(self, shape: tuple[int, int]):
        """The instance ids: in memory, or a memory-mapped file beside the labels of a large image."""
        if shape[0] * shape[1] <= MEMMAP_PIXELS:
            return None  # split_instances allocates it
        if self._tempdir is None:
            self._tempdir = _temporary_folder()
        return _mapped_file(Path(self._tempdir.name), "instances", np.int32, shape)

    def _on_instance_progress(self, progress) -> None:
        self.progress.setRange(0, progress.total)
        self.progress.setValue(progress.done)

    def _on_instances_error(self, error) -> None:
        message = f"Instance separation failed: {explain(error)}"
        show_error(message)
        self.status.setText(message)

    def _on_instances_finished(self) -> None:
        self.instance_worker = None
        if self._held is not None:
            layer, self._held = self._held, None
            let_go(layer)
        if self.worker is None:
            self.run_button.setText("Segment")

    def _add_instances(self, split, table, source, output_name: str, class_names: list[str],
                       picture_name: str | None = None) -> None:
        if split is None:  # the source held objects: measured as they are
            self._add_measured_objects(source, table, picture_name)
            return
        name = f"{source.name} instances"
        if name in self.viewer.layers:
            self._drop_unless_edited(self.viewer.layers[name])  # instances the user corrected stay
        place = placement(source)
        layer = self.viewer.add_labels(
            split.instances, name=name, **{**place, "metadata": {**place["metadata"], INSTANCES_KEY: True}}
        )
        _mark_edits(layer)
        if not split.complete:
            self.status.setText(f"Instance separation stopped: '{name}' holds the {split.count} objects of the "
                                "windows done so far.")
            return
        done = f"Done: '{output_name}' and '{name}' ({_counts(split, class_names)})."
        if table is None:
            self.status.setText(f"{done} Measuring them was stopped.")
        else:
            self._attach_table(layer, table, output_name, picture_name, class_names)
            self.status.setText(f"{done} Hover an object for its measurements; Save measurements… writes them.")
        if split.truncated:
            show_warning(f"{split.truncated} groups of objects are wider than the widest window of the split; "
                         "they are split only near where they start.")

    def _add_measured_objects(self, layer, table, picture_name: str | None) -> None:
        """A layer of objects measured as it is: its table, its hover, its colours by measurement."""
        if not any(same_layer(layer, other) for other in self.viewer.layers):
            return  # removed meanwhile
        if table is None:
            self.status.setText(f"Measuring the objects of '{layer.name}' was stopped.")
            return
        self._attach_table(layer, table, None, picture_name, [])  # no class map: each object's class is 0
        self.status.setText(f"'{layer.name}' holds objects already: measured its {len(table)} objects as they are. "
                            "Hover an object for its measurements; Save measurements… writes them.")

    # ------------------------------------------------------------------ measurements

    def _attach_table(self, layer, table, classes_name: str | None, picture_name: str | None,
                      class_names: list[str]) -> None:
        """A new objects table on ``layer``, with what measuring it again needs: the names of its
        class map and image layers; painting on the layer then makes the table stale."""
        layer.metadata[CLASSES_KEY] = classes_name
        layer.metadata[PICTURE_KEY] = picture_name if table.intensity is not None else None
        self._set_table(layer, table, class_names)
        self._watch(layer)

    def measured_layer(self):
        """The objects layer whose table Save measurements… writes: the selected layer when it
        has one, else the last one measured while it is still in the viewer."""
        active = self.viewer.layers.selection.active
        if active is not None and active.metadata.get(MEASUREMENTS_KEY) is not None:
            return active
        last = self._last_measured
        if last is not None and any(same_layer(last, layer) for layer in self.viewer.layers):
            return last
        self._last_measured = None  # removed: its table goes with it
        return None

    def _watch(self, layer) -> None:
        """Painting on a measured layer makes its table stale (measured again on save)."""
        layer = getattr(layer, "__wrapped__", layer)  # docked, the viewer hands out a new proxy each time
        if layer not in self._watched:
            self._watched.add(layer)
            layer.events.paint.connect(lambda _event: layer.metadata.__setitem__(STALE_KEY, True))

    def _watch_inserted(self, event) -> None:
        """A measured layer napari duplicated carries the table in its metadata, not the watch."""
        layer = event.value
        if layer.metadata.get(MEASUREMENTS_KEY) is not None:
            self._watch(layer)

    def _set_table(self, layer, table, class_names: list[str]) -> str | None:
        """Show a new table; the colours' scale when the objects are coloured by a measurement."""
        layer.metadata[STALE_KEY] = False
        scale = self._show_table(layer, table, class_names)
        self._last_measured = layer
        self._measured_changed()
        return scale

    def _show_table(self, layer, table, class_names: list[str]) -> str | None:
        """The table in the pixel size set (or the layer's scale), as the layer's features; objects
        coloured by a measurement take its new values (the colours' scale is returned)."""
        spacing, unit = self._pixel_size_of(layer)
        table = dataclasses.replace(table, spacing=spacing, unit=unit)
        layer.features = measurement_features(table, class_names)  # shown on hover in the status bar
        layer.metadata[MEASUREMENTS_KEY] = table
        layer.metadata[NAMES_KEY] = list(class_names)
        column = layer.metadata.get(COLOURED_BY_KEY)
        return None if column is None else self._colour_objects(layer, column)

    def _pixel_size_of(self, layer) -> tuple[tuple[float, float] | None, str | None]:
        side = self.pixel_size.value()
        if side > 0:
            return (side, side), "um"
        scale = tuple(float(v) for v in layer.scale[-2:])
        return (None, None) if np.allclose(scale, 1.0) else (scale, _unit_of(layer))

    def _pixel_size_changed(self, *_) -> None:
        """Sizes follow the setting at once: only the units change, nothing is measured again.
        Objects coloured by a size keep it, in the new unit."""
        measured = self.measured_layer()
        for layer in self.viewer.layers:
            table = layer.metadata.get(MEASUREMENTS_KEY)
            if table is not None:
                scale = self._show_table(layer, table, layer.metadata.get(NAMES_KEY, []))
                if scale and same_layer(layer, measured):
                    self.status.setText(scale)
        self._update_colour_choices()

    def _update_save_button(self, *_) -> None:
        self.save_table_button.setEnabled(self.measured_layer() is not None and self.measure_worker is None)

    def _measured_changed(self, *_) -> None:
        """Another layer selected, one removed, or a table made: the buttons and choices of the
        measured layer."""
        self._update_save_button()
        self._update_colour_choices()

    # ------------------------------------------------------------------ colour objects by a measurement

    def _update_colour_choices(self) -> None:
        """Colour objects by lists the measured layer's measurements, with the one its objects show."""
        layer = self.measured_layer()
        table = None if layer is None else layer.metadata.get(MEASUREMENTS_KEY)
        names = list(measurement_columns(table.columns())) if table is not None and len(table) else []
        chosen = layer.metadata.get(COLOURED_BY_KEY) if names else None
        self.colour_by.blockSignals(True)  # listing is not choosing
        self.colour_by.clear()
        self.colour_by.addItem(OWN_COLOURS, None)
        for name in names:
            self.colour_by.addItem(name, name)
        self.colour_by.setCurrentIndex(names.index(chosen) + 1 if chosen in names else 0)
        self.colour_by.blockSignals(False)
        self.colour_by.setEnabled(bool(names))

    def _colour_chosen(self, index: int) -> None:
        layer = self.measured_layer()
        if layer is None or index < 0:
            return
        column = self.colour_by.itemData(index)
        scale = self._colour_objects(layer, column)
        if layer.metadata.get(COLOURED_BY_KEY) != column:
            self._update_colour_choices()  # refused: the objects keep their own colours
        self.status.setText(scale or f"The objects of '{layer.name}' have their own colours.")

    def _colour_objects(self, layer, column: str | None) -> str | None:
        """Colour ``layer``'s objects by ``column`` of its table (the same measurement in the
        pixel size's unit when that relabelled it), and say how to read the colours; with None,
        or a measurement the table no longer has, give them back the colours they had."""
        layer = getattr(layer, "__wrapped__", layer)  # not a proxy's colormap kept in the metadata
        table = layer.metadata.get(MEASUREMENTS_KEY)
        columns = measurement_columns(table.columns()) if column is not None and table is not None else {}
        found = follow_column(column, list(columns)) if columns else None
        if found is not None and _needs_numba(table.ids):
            show_error(f"'{layer.name}' has object ids above {LARGEST_ID_WITHOUT_NUMBA}: napari colours such ids one "
                       "by one only with numba. Install it (pip install numba) to colour these objects.")
            found = None
        if found is None:
            own = layer.metadata.pop(OWN_COLOURS_KEY, None)
            layer.metadata.pop(COLOURED_BY_KEY, None)
            if own is not None:
                layer.colormap = own
            return None
        coloured = colour_by_values(columns[found], _viridis())
        if OWN_COLOURS_KEY not in layer.metadata:
            layer.metadata[OWN_COLOURS_KEY] = layer.colormap
        layer.metadata[COLOURED_BY_KEY] = found
        layer.colormap = _direct_colormap(colour_table(table.ids, coloured.colours))
        painted = "; magenta: painted since they were measured" if layer.metadata.get(STALE_KEY) else ""
        return f"'{layer.name}' coloured by {scale_text(found, coloured)}{painted}."

    def save_measurements(self, path: str | Path):
        """Write the measured layer's table as CSV; an unwritable place is an error message, not a
        traceback. Objects painted on since they were measured are measured again first, in a
        worker (returned; the file is written when it ends): the table is of what the user sees."""
        layer = self.measured_layer()
        if layer is None:
            show_error("Separate objects first (Segment with 'Separate touching objects', or Separate objects): "
                       "their measurements are what is saved.")
            return None
        if self.measure_worker is not None:
            show_error("The objects are being measured again: wait for it, then save.")
            return None
        if layer.metadata.get(STALE_KEY):
            return self._measure_again(layer, Path(path))
        return self._write_table(layer, path)

    def _measure_again(self, layer, path: Path):
        """Measure the corrected objects with their class map as it is now (its layer may be
        corrected too); without it, each object keeps the class it was measured with."""
        table = layer.metadata[MEASUREMENTS_KEY]
        classes_name = layer.metadata.get(CLASSES_KEY)
        classes_layer = self.viewer.layers[classes_name] if classes_name in self.viewer.layers else None
        classes = None
        if classes_layer is not None and image_shape_2d(classes_layer) == image_shape_2d(layer):
            classes = layer_data(classes_layer)
        names = (class_names_of(classes_layer) if classes is not None else None) or layer.metadata.get(NAMES_KEY, [])
        picture_name = layer.metadata.get(PICTURE_KEY)
        picture = None
        if picture_name in self.viewer.layers:
            picture = _picture_of(self.viewer.layers[picture_name], image_shape_2d(layer))
        held = [layer] + ([classes_layer] if classes is not None else [])
        for each in held:
            hold_read_only(each)  # a stroke painted mid-measure would be half in the table
        worker = create_worker(_measure, layer_data(layer), classes, table, picture, _ignore_errors=True)
        worker.yielded.connect(self._on_instance_progress)

        def measured(new_table) -> None:
            if not any(same_layer(layer, other) for other in self.viewer.layers):
                return  # removed meanwhile: nothing to save
            scale = self._set_table(layer, new_table, names)
            if self._write_table(layer, path, again=True) is not None and scale:
                self.status.setText(f"{self.status.text()} {scale}")

        def failed(error) -> None:
            message = f"Measuring the objects again failed: {explain(error)}"
            show_error(message)
            self.status.setText(message)

        def finished() -> None:
            self.measure_worker = None
            for each in held:
                let_go(each)
            self._update_save_button()

        worker.returned.connect(measured)
        worker.errored.connect(failed)
        worker.finished.connect(finished)
        self.measure_worker = worker
        self._update_save_button()
        self.status.setText(f"Measuring the objects of '{layer.name}' again: they were painted on since…")
        worker.start()
        return worker

    def _write_table(self, layer, path, again: bool = False) -> Path | None:
        from ..core.measurements import write_csv

        table = layer.metadata[MEASUREMENTS_KEY]
        try:
            written = write_csv(table, path)
        except OSError as error:
            message = f"Could not save the measurements: {error.strerror or error}: {path}; choose another folder."
            show_error(message)
            self.status.setText(message)
            return None
        self._table_folder = str(written.parent)
        again = " (measured again after your corrections)" if again else ""
        self.status.setText(f"Wrote the measurements of {len(table)} objects of '{layer.name}'{again} to {written}.")
        return written

    def _save_table_dialog(self) -> None:
        layer = self.measured_layer()
        if layer is None:
            self._update_save_button()
            return
        suggested = str(Path(self._table_folder) / f"{layer.name}.csv")
        path, _ = QFileDialog.getSaveFileName(self, "Save measurements", suggested, "CSV table (*.csv)")
        if path:
            self.save_measurements(path if path.lower().endswith(".csv") else f"{path}.csv")

    def _kept_note(self) -> str:
        if self._previous_name and self._previous_name in self.viewer.layers:
            return f" The last result is kept as '{self._previous_name}'."
        return ""

    def _on_errored(self, error: BaseException) -> None:
        message = explain(error)
        kept = self._kept_note()
        show_error(f"Segmentation failed: {message}{kept}")
        self.status.setText(f"Segmentation failed: {message}{kept}")

    def _on_finished(self) -> None:
        self.worker = None
        if self.output_layer is not None:
            let_go(self.output_layer)  # (a split of its objects holds it until that ends)
        self.run_button.setText("Stop" if self.instance_worker is not None else "Segment")


def _viridis() -> np.ndarray:
    """napari's viridis, dark to bright: (256, 4) RGBA."""
    from napari.utils.colormaps import ensure_colormap

    return np.asarray(ensure_colormap("viridis").colors)


def _needs_numba(ids: np.ndarray) -> bool:
    """Whether napari can colour these ids one by one only with numba: without it, its
    ``DirectLabelColormap`` maps ids through an array, and refuses ids above 2**16 when it draws."""
    import importlib.util

    return bool(ids.size) and int(ids.max()) > LARGEST_ID_WITHOUT_NUMBA and importlib.util.find_spec("numba") is None


def _direct_colormap(colours: dict):
    """napari's ``DirectLabelColormap`` of ``{id: RGBA}`` (with the None and 0 entries). Its
    validator converts colours one by one, a quarter of a second for 50 000 objects; these are
    float32 RGBA already, the form it makes, so the map is made with the two special entries and
    the objects' colours go in before anything reads the map (and caches what it read)."""
    from napari.utils.colormaps import DirectLabelColormap

    colormap = DirectLabelColormap(color_dict={key: colours[key] for key in (None, 0)})
    colormap.color_dict.update(colours)
    return colormap


def _temporary_folder() -> tempfile.TemporaryDirectory:
    # Windows cannot delete a file a kept layer still maps: the folder is then left behind
    return tempfile.TemporaryDirectory(prefix="napari-selfreg-", ignore_cleanup_errors=True)


def _mapped_file(folder: Path, stem: str, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new memory-mapped file: never one a kept layer maps (a fixed name was truncated and
    overwritten by the next split, objects the user had corrected included)."""
    handle, path = tempfile.mkstemp(prefix=f"{stem}-", suffix=f".{np.dtype(dtype).str[1:]}", dir=folder)
    os.close(handle)
    return np.memmap(path, dtype, "w+", shape=shape)


def measurement_features(table, class_names: list[str]):
    """napari's features of an objects layer: one row per object id (the "index" column), so
    hovering an object shows its measurements. Not a "class" column: that holds a layer's class
    names (``class_names_of``), and the writer would save object rows as class names. The sizes,
    the circularity and the edge flag come first: napari's status bar shows the columns in order,
    and cuts the line at the window's width."""
    import pandas as pd

    columns = table.columns()
    features = {"index": columns.pop("id")}
    if class_names:
        features["class_name"] = [class_names[c - 1] if 0 < c <= len(class_names) else f"class {c}"
                                  for c in table.class_ids.tolist()]
    first = [name for name in columns if "area" in name or "diameter" in name] + ["circularity", "touches_edge"]
    features |= {name: columns.pop(name) for name in first}
    return pd.DataFrame(features | columns)


def _unit_of(layer) -> str | None:
    """The unit of a layer's scale where napari knows one (0.6 and later), "um" for micrometres."""
    units = getattr(layer, "units", None)
    if not units:
        return None
    text = f"{units[-1]:~}" if hasattr(units[-1], "dimensionality") else str(units[-1])
    if text in ("", "px", "pixel", "pixels"):
        return None
    return text.replace("µ", "u").replace("μ", "u")


def _picture_of(layer, shape: tuple[int, int]):
    """An image layer's pixels, (H, W) or (H, W, C), where they lie under objects of ``shape``;
    else None (a labels layer, a stack, channels first): the table then has no colours."""
    if not isinstance(getattr(layer, "__wrapped__", layer), Image):
        return None
    from ..core.measurements import image_under

    return image_under(layer_data(layer), shape)


def _measure(objects, classes, before, picture=None):
    """The worker's measurement of corrected objects. Without a class map each object keeps the
    class ``before`` gave it (a new id, painted by the user, gets 0: unknown)."""
    from ..core.measurements import measure_objects

    table = yield from measure_objects(objects, classes, image=picture)
    if classes is None:
        known = dict(zip(before.ids.tolist(), before.class_ids.tolist(), strict=True))
        table.class_ids = np.array([known.get(i, 0) for i in table.ids.tolist()], np.int64)
    return table


def _split_classes(labels, out, stop, check_name: str | None, named: bool = False, picture=None,
                   objects: bool = False):
    """The worker's split, then the objects' measurements in pixels, with the colours of
    ``picture`` when given (None when stopped). A map of ``objects``, or with ``check_name``
    one whose ids go beyond painting's, is measured as it is: (None, table). With
    ``check_name``, a map with 0 as background (a GlaS annotation of 9 glands, a 0/1 mask),
    where id 1 would be taken for background and its object lost, is refused unless ``named``
    classes say it is a class map."""
    from ..core.data import InputError
    from ..core.instances import id_counts, split_instances
    from ..core.measurements import measure_objects
    from ..core.metrics import MAX_PAINTING_ID

    if check_name is not None and not objects:
        counts = id_counts(labels)
        objects = counts.largest > MAX_PAINTING_ID
        if counts.zero_background and not named and not objects:
            raise InputError(
                f"'{check_name}' looks like a mask or objects with 0 as background (0 covers more of it than 1, "
                "and 1 is used). Choose a layer of classes (1 = background, 2.. = structures), e.g. a segmentation."
            )
    if objects:
        table = yield from measure_objects(labels, None, stop=stop, image=picture)
        return None, table if table.complete else None
    split = yield from split_instances(labels, out, stop=stop)
    if not split.complete:
        return split, None
    table = yield from measure_objects(split.instances, labels, stop=stop, image=picture)
    return split, table if table.complete else None
