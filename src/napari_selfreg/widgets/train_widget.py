"""The "Train SelfReg UNet" dock widget: paint strokes, train, watch, correct, train again.

A thin adapter: it copies arrays and settings out of layers, runs the core ``train``
generator in a napari thread worker, and updates layers from the worker's signals on
the main thread. Torch is imported only when training starts (or, for the device list,
in the background).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..core.config import ModelConfig, TrainConfig
from ..core.data import InputError, painted_ids
from ._common import (
    EDITED_KEY,
    DeviceCombo,
    LayerCombo,
    LossPlot,
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
    misaligned,
    model_folder,
    notify_error,
    placement,
    remember_model_file,
    same_layer,
    show_uncertainty,
    stack_problem,
    stop_when_closed,
    track_edits,
    uncertainty_name,
    visible_corners,
)
from ._workers import WorkerError, predict_region, run_training, visible_box
from .classes import DEFAULT_CLASSES, class_colormap, class_features, class_names_of
from .model_registry import model_registry

NEW_MODEL = "new model"
STATUS_SECONDS = 0.2  # the progress bar and status line change at most this often
FULL_PREVIEW_PIXELS = 4_000_000  # after training, predict the whole image when it is at most this big
CORRECTION_KEY = "napari_selfreg_correction"  # layer metadata: made by "Use prediction as labels"
PREVIEW_KEY = "napari_selfreg_preview"  # layer metadata: a prediction layer this widget made


def _spin(value: int, low: int, high: int, tip: str, step: int = 1, suffix: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    if suffix:
        box.setSuffix(suffix)
    return box


def _dspin(value: float, low: float, high: float, tip: str, decimals: int = 4, step: float = 0.001) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


CHOOSE = "(choose)"


class _PairRow(QWidget):
    """One extra (image, labels) pair for training on several images at once."""

    def __init__(self, viewer, on_remove) -> None:
        super().__init__()
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        # nothing chosen at first: a new row must not default to the main pair or the preview
        self.image = LayerCombo(viewer, Image, none_text=CHOOSE)
        self.image.setToolTip("Another image to train on")
        self.labels = LayerCombo(viewer, Labels, none_text=CHOOSE)
        self.labels.setToolTip("The strokes painted on that image")
        remove = QPushButton("✕")
        remove.setFixedWidth(28)
        remove.setToolTip("Do not train on this pair")
        remove.clicked.connect(lambda: on_remove(self))
        layout.addWidget(self.image)
        layout.addWidget(self.labels)
        layout.addWidget(remove)


class TrainWidget(QWidget):
    """Dock widget: pick image and strokes, set a few options, Start/Stop, see losses and a live preview."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.registry = model_registry()
        self.worker = None
        self._final_workers: list = []
        self.stop_event = threading.Event()
        self.result = None
        self._run_layers: list = []
        self._run_image = None
        self._last_status = 0.0
        self._prediction_name: str | None = None
        self._value_range = None  # the run image's, for the end-of-round prediction of a crop
        self._copied = None  # where the round's model was copied to disk (keep_copy)
        self._unfilled: list = []  # prediction layers made empty by this round, not yet written
        self._locked: list = []  # prediction layers not editable until the round's predictions end
        self._view_box = None
        self._stop_requested_at: float | None = None
        self.last_stop_latency: float | None = None
        self._closed = False  # the dock's ✕ was clicked: no new work starts for a widget no one sees
        self._build()
        connect_while_alive(
            self,
            (self.registry.changed, self._refresh_models),
            (self.viewer.layers.events.removed, self._on_layer_removed),
        )
        self._close_watcher = stop_when_closed(self, self._on_closed, self._stop_events)
        self.labels_combo.currentTextChanged.connect(self._show_classes_of_layer)
        self._refresh_models()
        self._show_classes_of_layer()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        layout = QVBoxLayout(self)

        data = QGroupBox("Image and strokes")
        form = QFormLayout(data)
        self.image_combo = LayerCombo(self.viewer, Image)
        self.image_combo.setToolTip("The image to learn from (RGB H&E, gray or 16-bit).")
        form.addRow("Image", self.image_combo)
        self.labels_combo = LayerCombo(self.viewer, Labels)
        self.labels_combo.setToolTip(
            "The labels layer with your strokes: 1 = background, 2, 3, ... = structures, 0 = not painted."
        )
        form.addRow("Strokes", self.labels_combo)
        self.new_labels_button = QPushButton("New labels layer for painting")
        self.new_labels_button.setToolTip(
            "Add an empty labels layer the size of the image, with the classes below, and select the brush."
        )
        self.new_labels_button.clicked.connect(self.new_labels_layer)
        form.addRow(self.new_labels_button)
        self.pairs_box = QVBoxLayout()
        form.addRow(self.pairs_box)
        self.extra_pairs: list[_PairRow] = []
        add_pair = QPushButton("+ another image / strokes pair")
        add_pair.setToolTip("Train on several painted images at once.")
        add_pair.clicked.connect(self.add_pair)
        form.addRow(add_pair)
        layout.addWidget(data)

        classes = QGroupBox("Classes (double-click a name to rename)")
        cl = QVBoxLayout(classes)
        self.class_table = QTableWidget(0, 2)
        self.class_table.setHorizontalHeaderLabels(["id", "class"])
        self.class_table.verticalHeader().setVisible(False)
        self.class_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.class_table.horizontalHeader().setStretchLastSection(True)
        self.class_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.class_table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.class_table.verticalHeader().setDefaultSectionSize(22)
        self.class_table.setMinimumHeight(4 * 22 + 6)
        self.class_table.setMaximumHeight(7 * 22 + 6)
        self.class_table.setToolTip(
            "1 = background; 2, 3, ... = structures. Click a row to paint with that class; "
            "double-click a name to rename it."
        )
        self.class_table.itemChanged.connect(self._class_renamed)
        self.class_table.itemSelectionChanged.connect(self._class_selected)
        cl.addWidget(self.class_table)
        add_class = QPushButton("Add class")
        add_class.setToolTip("Add a structure class with the next id.")
        add_class.clicked.connect(lambda: self.add_class())
        cl.addWidget(add_class)
        layout.addWidget(classes)

        model = QGroupBox("Model")
        mf = QFormLayout(model)
        self.model_combo = NameCombo()
        self.model_combo.setToolTip(
            "'new model' trains from scratch; a trained or loaded model continues training "
            "(same classes) - use it for the next round after correcting the prediction."
        )
        mf.addRow("Start from", self.model_combo)
        row = QHBoxLayout()
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load a napari-selfreg .safetensors model file to continue training or segment.")
        self.load_button.clicked.connect(self._load_dialog)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the model chosen above (weights, classes and settings in one file).")
        self.save_button.clicked.connect(self._save_dialog)
        row.addWidget(self.load_button)
        row.addWidget(self.save_button)
        mf.addRow(row)
        layout.addWidget(model)

        settings = QGroupBox("Training")
        sf = QFormLayout(settings)
        defaults = TrainConfig()
        self.steps = _spin(defaults.steps, 1, 1_000_000, "Number of optimisation steps (one batch of patches each).")
        sf.addRow("Steps", self.steps)
        self.time_budget = _spin(
            0, 0, 86_400, "Stop after this many seconds even if steps remain (0 = no time limit).", suffix=" s"
        )
        self.time_budget.setSpecialValueText("no limit")
        sf.addRow("Time budget", self.time_budget)
        self.selfreg = check_box(
            "SelfReg (SCR + IFD)",
            "Add the SelfReg losses: semantic consistency (SCR) and internal feature distillation (IFD). "
            "No cost at prediction time.",
            defaults.selfreg,
        )
        sf.addRow(self.selfreg)
        self.device = DeviceCombo()
        sf.addRow("Device", self.device)
        layout.addWidget(settings)

        advanced = QCollapsible("Advanced")
        inner = QWidget()
        af = QFormLayout(inner)
        self.patch_size = _spin(defaults.patch_size, 32, 1024, "Side of the square training patches, in pixels.", 16)
        af.addRow("Patch size", self.patch_size)
        self.batch_size = _spin(defaults.batch_size, 1, 256, "Patches per step; lower it if memory runs out.")
        af.addRow("Batch size", self.batch_size)
        self.learning_rate = _dspin(
            defaults.learning_rate, 1e-5, 1.0, "Peak learning rate (AdamW, warm-up then cosine decay).", 5, 1e-4
        )
        af.addRow("Learning rate", self.learning_rate)
        self.lambda_scr = _dspin(defaults.lambda_scr, 0.0, 10.0, "Weight of the SCR loss (paper: 0.015).")
        af.addRow("SCR weight", self.lambda_scr)
        self.lambda_ifd = _dspin(defaults.lambda_ifd, 0.0, 10.0, "Weight of the IFD loss (paper: 0.015).")
        af.addRow("IFD weight", self.lambda_ifd)
        self.base_channels = _spin(
            ModelConfig().base_channels, 4, 128,
            "Channels of the first block (doubling per level); 16 trains quickly on a CPU, 64 is the paper's.", 4,
        )
        af.addRow("Model width", self.base_channels)
        self.seed = _spin(0, -1, 2**31 - 1, "Random seed for reproducible runs (-1 = a different run each time).")
        self.seed.setSpecialValueText("random")
        af.addRow("Seed", self.seed)
        self.validation_every = _spin(
            defaults.validation_every, 1, 100_000, "Measure the Dice on held-out strokes every this many steps."
        )
        af.addRow("Validate every", self.validation_every)
        self.keep = QComboBox()
        self.keep.addItems(["last", "best"])
        self.keep.setCurrentText(defaults.keep)
        self.keep.setToolTip(
            "Which weights become the model: the last step's, or those with the best Dice on held-out strokes."
        )
        af.addRow("Keep weights", self.keep)
        self.preview_every = _dspin(
            3.0, 0.0, 600.0, "Seconds between live previews of the visible region (0 = no preview).", 1, 1.0
        )
        af.addRow("Preview every (s)", self.preview_every)
        self.uncertainty = check_box(
            "Show where the model is unsure",
            "After each round, also show the '… uncertainty' layer, from the same end-of-round prediction: "
            "bright where the model hesitates between classes (0 = sure, 1 = the classes tie). Mistakes are "
            "3-4 times as dense there, mostly along the outlines; a third of them are made with confidence and "
            "stay dark (BENCHMARKS.md). Live previews stay labels only.",
            False,  # measured: painting where it is bright helped no more than painting anywhere
        )
        af.addRow(self.uncertainty)
        advanced.addWidget(inner)
        layout.addWidget(advanced)

        self.start_button = QPushButton("Start training")
        self.start_button.setToolTip("Start training; while it runs, the same button stops it (the model is kept).")
        self.start_button.clicked.connect(self.toggle)
        layout.addWidget(self.start_button)
        self.progress = QProgressBar()
        self.progress.setToolTip("Steps done (or time used, with a time budget).")
        layout.addWidget(self.progress)
        self.status = QLabel("Paint strokes, then press Start.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.plot = LossPlot()
        self.plot.setToolTip("Training losses (log scale, left) and Dice on held-out strokes (right, 0..1).")
        layout.addWidget(self.plot)

        self.correct_button = QPushButton("Use prediction as labels for the next round")
        self.correct_button.setToolTip(
            "Copy the prediction (with your brush corrections) into a new labels layer, your strokes on top, "
            "and choose it for training. Then press Start again."
        )
        self.correct_button.clicked.connect(self.use_prediction_as_labels)
        layout.addWidget(self.correct_button)
        layout.addStretch(1)

    # ------------------------------------------------------------------ classes

    def class_names(self) -> list[str]:
        return [self.class_table.item(row, 1).text() for row in range(self.class_table.rowCount())]

    def set_class_names(self, names) -> None:
        self.class_table.blockSignals(True)
        self.class_table.setRowCount(0)
        for name in names:
            self._append_class_row(name)
        self.class_table.blockSignals(False)

    def _append_class_row(self, name: str) -> None:
        row = self.class_table.rowCount()
        self.class_table.insertRow(row)
        id_item = QTableWidgetItem(str(row + 1))
        id_item.setFlags(id_item.flags() & ~Qt.ItemIsEditable)
        self.class_table.setItem(row, 0, id_item)
        self.class_table.setItem(row, 1, QTableWidgetItem(name))

    def add_class(self, name: str | None = None) -> None:
        """Add a structure class with the next id and write the names to the strokes layer."""
        self.class_table.blockSignals(True)
        self._append_class_row(name or f"structure {self.class_table.rowCount()}")
        self.class_table.blockSignals(False)
        self._write_classes()

    def _class_renamed(self, *_) -> None:
        self._write_classes()

    def _write_classes(self) -> None:
        layer = self.labels_combo.layer()
        if layer is not None:
            layer.features = class_features(self.class_names())

    def _class_selected(self) -> None:
        rows = self.class_table.selectionModel().selectedRows()
        layer = self.labels_combo.layer()
        if rows and layer is not None:
            layer.selected_label = rows[0].row() + 1

    def _show_classes_of_layer(self, *_) -> None:
        layer = self.labels_combo.layer()
        names = class_names_of(layer) if layer is not None else None
        if names is None and self.class_table.rowCount() == 0:
            names = list(DEFAULT_CLASSES)
        if names is not None:
            self.set_class_names(names)

    # ------------------------------------------------------------------ layers

    def new_labels_layer(self):
        """An empty uint8 labels layer the size of the image, ready for the brush."""
        image = self.image_combo.layer()
        if image is None:
            show_error("Open or choose an image first; the labels layer is made to fit it.")
            return None
        if stack_problem(image):
            show_error(stack_problem(image))
            return None
        shape = image_shape_2d(image)
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint8),
            name=f"{image.name} strokes",
            features=class_features(self.class_names()),
            colormap=class_colormap(),
            **placement(image),
            opacity=1.0,
        )
        layer.brush_size = max(3, min(shape) // 100)
        layer.selected_label = 2
        layer.mode = "paint"
        self.labels_combo.select(layer.name)
        self.viewer.layers.selection.active = layer
        show_info("Paint background with label 1 and each structure with 2, 3, ...; then press Start.")
        return layer

    def add_pair(self) -> _PairRow:
        row = _PairRow(self.viewer, self._remove_pair)
        self.extra_pairs.append(row)
        self.pairs_box.addWidget(row)
        return row

    def _remove_pair(self, row: _PairRow) -> None:
        self.extra_pairs.remove(row)
        row.setParent(None)
        row.deleteLater()

    def _pairs(self) -> list[tuple]:
        pairs = [(self.image_combo.layer(), self.labels_combo.layer())]
        extra = [(row.image.layer(), row.labels.layer()) for row in self.extra_pairs]
        return pairs + [pair for pair in extra if pair != (None, None)]  # an untouched row is no pair

    # ------------------------------------------------------------------ models

    def _refresh_models(self) -> None:
        self.model_combo.set_names([NEW_MODEL, *self.registry.names()])

    def selected_model(self):
        name = self.model_combo.currentText()
        return self.registry.get(name) if name in self.registry else None

    def load_model(self, path: str | Path) -> str | None:
        """Load a model file into the session and choose it for continuing training."""
        from ..core.checkpoint import ModelFileError

        try:
            name = self.registry.load_file(path)
        except ModelFileError as error:
            show_error(f"Could not load the model: {error}")
            return None
        model = self.registry.get(name)
        self.model_combo.setCurrentText(name)
        # the model names its own ids; classes the strokes have beyond them keep their names
        self.set_class_names([*model.class_names, *self.class_names()[len(model.class_names):]])
        self._write_classes()
        self.apply_settings(model.info.training)
        self.base_channels.setValue(model.config.base_channels)
        show_info(f"Loaded {name}: classes {', '.join(model.class_names)}. Start continues training it.")
        return name

    def save_model(self, path: str | Path) -> Path | None:
        """Save the chosen model (weights + classes + settings, no pickle)."""
        model = self.selected_model()
        if model is None:
            show_error("Train or load a model first, then choose it under 'Start from' to save it.")
            return None
        from safetensors import SafetensorError

        from ..core.checkpoint import save_model

        try:
            written = save_model(model, path)
        except (OSError, SafetensorError) as error:  # safetensors reports a failed write its own way
            show_error(f"Could not save the model: {error}; choose another folder.")
            return None
        show_info(f"Model saved to {written}")
        return written

    def _load_dialog(self) -> None:
        path = ask_model_file(self)
        if path:
            self.load_model(path)

    def _save_dialog(self) -> None:
        name = self.model_combo.currentText()
        suggested = str(Path(model_folder(loading=False)) / f"{name}.safetensors")
        path, _ = QFileDialog.getSaveFileName(self, "Save model", suggested, "napari-selfreg model (*.safetensors)")
        if path:
            remember_model_file(path)
            self.save_model(path)

    # ------------------------------------------------------------------ settings

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps.value(),
            time_budget=float(self.time_budget.value()) or None,
            patch_size=self.patch_size.value(),
            batch_size=self.batch_size.value(),
            learning_rate=self.learning_rate.value(),
            selfreg=self.selfreg.isChecked(),
            lambda_scr=self.lambda_scr.value(),
            lambda_ifd=self.lambda_ifd.value(),
            validation_every=self.validation_every.value(),
            keep=self.keep.currentText(),
            device=self.device.currentText(),
            seed=None if self.seed.value() < 0 else self.seed.value(),
        )

    def apply_settings(self, training: dict) -> None:
        """Show a loaded model's last training settings, so the next round trains as it did.

        The device stays this machine's choice; settings the file lacks keep their current
        values, and a document that is no valid ``TrainConfig`` changes nothing.
        """
        try:
            config = TrainConfig.from_dict(training)
        except (TypeError, ValueError):
            return
        given = set(training)
        spins = {
            "steps": self.steps, "patch_size": self.patch_size, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "lambda_scr": self.lambda_scr, "lambda_ifd": self.lambda_ifd,
            "validation_every": self.validation_every,
        }
        for key, spin in spins.items():
            if key in given:
                spin.setValue(getattr(config, key))
        if "time_budget" in given:
            self.time_budget.setValue(round(config.time_budget or 0))
        if "seed" in given:
            self.seed.setValue(-1 if config.seed is None else config.seed)
        if "selfreg" in given:
            self.selfreg.setChecked(bool(config.selfreg))
        if "keep" in given:
            self.keep.setCurrentText(config.keep)

    def model_config(self) -> ModelConfig:
        return ModelConfig(base_channels=self.base_channels.value())

    # ------------------------------------------------------------------ training

    @property
    def running(self) -> bool:
        return self.worker is not None

    def toggle(self) -> None:
        if self.running:
            self.stop()
        else:
            self.start()

    def _on_closed(self) -> None:
        """The dock's ✕: training stops as with Stop, and so do end-of-round predictions, which
        would otherwise go on for minutes on a CPU with nothing left to show them. The stopped
        training's model is still kept, but no end-of-round prediction starts after it."""
        self._stop_events()
        self.stop()

    def _stop_events(self) -> None:
        """Its napari window is gone (another one goes on): training stops after this step and
        its model is copied to disk as a finished round's; no Qt object may be touched here."""
        self._closed = True
        self.stop_event.set()
        for worker in self._final_workers:
            worker.stop_event.set()

    def stop(self) -> None:
        """Ask the worker to stop after the current step; the model so far is kept."""
        if self.worker is None:
            return
        self._stop_requested_at = time.perf_counter()
        self._steps_at_stop = len(self.plot.steps)
        self.stop_event.set()
        self.start_button.setEnabled(False)
        self.status.setText("Stopping after this step…")

    def start(self):
        """Copy the painted data and settings, then train in a thread worker."""
        self._closed = False  # started again (docked anew, or from code): its round ends as usual
        self._close_watcher.watch_window()
        self.status.setText("")  # no earlier run's status beside this run's errors
        pairs = self._pairs()
        for row, (image, labels) in enumerate(pairs):
            if image is None:
                where = "" if row == 0 else f" in extra pair {row}"
                show_error(f"Choose an image layer to train on{where} (open an image or load the sample data).")
                return None
            if labels is None:
                if row:
                    show_error(f"Choose the labels layer with the strokes on '{image.name}' (extra pair {row}).")
                else:
                    show_error("Choose the labels layer with your strokes, or click 'New labels layer for painting'.")
                return None
            if stack_problem(image):
                show_error(stack_problem(image))
                return None
            if image_shape_2d(image) != tuple(np.shape(layer_data(labels))[-2:]):
                show_error(
                    f"'{labels.name}' has shape {tuple(np.shape(layer_data(labels)))} but '{image.name}' is "
                    f"{image_shape_2d(image)}; click 'New labels layer for painting' to make one that fits."
                )
                return None
            if misaligned(labels, image):
                show_error(
                    f"'{labels.name}' is moved or scaled against '{image.name}' (its translate or scale "
                    "differ), so the strokes do not sit on the pixels they cover on screen; click 'New labels "
                    "layer for painting' for one that fits, or give both layers the same scale and translate."
                )
                return None
        try:
            config = self.train_config()
            model_config = self.model_config()
        except ValueError as error:
            show_error(f"Check the settings: {error}")
            return None
        images = [layer_data(image) for image, _ in pairs]  # lazy: training reads only the painted windows
        labels = [np.array(layer_data(lbl), copy=True) for _, lbl in pairs]  # a snapshot: painting may go on
        highest = max(int(np.max(lbl, initial=0)) for lbl in labels)
        initial = self.selected_model()
        known = max(len(self.class_names()), initial.config.num_classes if initial is not None else 0)
        if highest > known:
            show_error(
                f"The labels hold id {highest} but there are {known} classes. Ids run 1 = background, "
                "2, 3, ... = structures: add classes (+), or, for a mask or an instance image, map it to "
                "1 and 2 first."
            )
            return None
        try:
            painted = painted_ids(labels)
        except InputError as error:
            show_error(f"Check the strokes: {error}")
            return None
        unpainted = [(i, name) for i, name in enumerate(self.class_names(), 1) if i > 1 and i not in painted]
        if unpainted and highest >= 2:
            listed = ", ".join(f"'{name}' ({i})" for i, name in unpainted)
            show_warning(
                f"No strokes of {listed}: this training does not teach "
                f"{'that class' if len(unpainted) == 1 else 'those classes'}. Paint some, or remove the class."
            )
        preview_name = f"{pairs[0][0].name} prediction"
        for _, lbl in pairs:  # renamed only once Start is sure to train: a refused Start renames nothing
            if lbl.name == preview_name:  # the edited prediction as labels: previews must not overwrite it
                lbl.name = f"{pairs[0][0].name} corrected"
                show_info(f"Training on '{lbl.name}' (the edited prediction); previews go to a new layer.")
        self.labels_combo.select(pairs[0][1].name)
        self._run_layers = [layer for pair in pairs for layer in pair]
        self._run_image = pairs[0][0]
        self._prediction_name = f"{self._run_image.name} prediction"
        for worker in self._final_workers:  # the last round's picture of this image would land on this one's previews
            if getattr(worker, "prediction_name", None) == self._prediction_name:
                worker.stop_event.set()
        self._keep_corrections(self._prediction_name)
        names = self.class_names()
        self._write_classes()
        if self.preview_every.value() > 0:  # made now, not mid-training: napari takes 0.3-0.4 s for it
            self._lock(self._prediction_layer(self._run_image, self._prediction_name))
        self._value_range = None
        self._copied = None  # where this round's model is copied (keep_copy), once it is
        self.stop_event = threading.Event()
        self._stop_requested_at = None
        self.result = None
        self.plot.start_round()
        self._update_view_box()
        self.worker = create_worker(
            run_training,
            images,
            labels,
            config,
            model_config,
            names,
            initial,
            self.stop_event,
            view=lambda: self._view_box,
            preview_image=images[0],
            preview_every=self.preview_every.value(),
            copy_name=f"{self._run_image.name} model",
            _ignore_errors=True,
        )
        self.worker.yielded.connect(self._on_yielded)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.progress.setRange(0, config.steps if not config.time_budget else 1000)
        self.progress.setValue(0)
        self._config = config
        self.start_button.setText("Stop")
        loaded = "torch" in sys.modules  # the first round of a session imports it: seconds on a laptop
        self.status.setText("Preparing…" if loaded else "Preparing (the first step also loads torch)…")
        self.worker.start()
        return self.worker

    def _update_view_box(self) -> None:
        image = self._run_image
        if image is None or image not in self.viewer.layers:
            return
        self._view_box = visible_box(visible_corners(image), image_shape_2d(image))

    def _on_yielded(self, item) -> None:
        kind, value = item
        if kind == "report":
            report = value
            self.plot.add(report)
            now = time.monotonic()
            last = report.step >= report.total_steps or report.stopped
            if now - self._last_status < STATUS_SECONDS and not last:
                return  # a progress bar repaints at once: at most a few times a second
            self._last_status = now
            if self._config.time_budget:
                fraction = max(report.step / report.total_steps, report.elapsed / self._config.time_budget)
                self.progress.setValue(int(min(1.0, fraction) * 1000))
            else:
                self.progress.setValue(report.step)
            val = "" if report.best_val_dice is None else f", best held-out Dice {report.best_val_dice:.3f}"
            if not self.stop_event.is_set():
                self.status.setText(
                    f"Step {report.step}/{report.total_steps}: loss {report.loss:.3f}{val}, "
                    f"{report.seconds_per_step:.2f} s/step, about {report.eta_seconds:.0f} s left"
                )
            self._update_view_box()
        elif kind == "preview":
            box, labels = value
            self._show_prediction(box, labels)
        elif kind == "value_range":
            self._value_range = value
        elif kind == "preview_failed":
            show_warning(f"A live preview failed and was skipped; training goes on. The cause: {explain(value)}")
        elif kind == "copied":
            self._copied = value
        elif kind == "copy_failed":
            self._copied = None
            show_warning(f"The trained model could not be copied to disk ({explain(value)}); use Save… to keep it.")

    def _keep_corrections(self, name: str) -> None:
        """A prediction the user painted on is theirs, and so is a layer of that name this
        widget did not make (one opened from a file, say, whose edits it never saw): renamed
        out of the previews' way."""
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if not isinstance(layer, Labels):
            return
        if layer.metadata.get(EDITED_KEY):
            layer.name = free_name(self.viewer, f"{name} (corrected)")
            show_info(f"Your corrections are kept in '{layer.name}'; previews go to a new layer.")
        elif not layer.metadata.get(PREVIEW_KEY):
            layer.name = free_name(self.viewer, f"{name} (kept)")
            show_info(f"'{name}' was not made by this training: it is kept as '{layer.name}'; "
                      "previews go to a new layer.")

    def _lock(self, layer) -> None:
        """Not paintable while previews and the end-of-round prediction overwrite it."""
        if layer is not None:
            hold_read_only(layer)
            self._locked.append(layer)

    def _after_round(self) -> None:
        """Once training and its end-of-round predictions are over: the prediction layers are
        paintable again, and one this round made but never wrote into (a failed start) goes."""
        if self.worker is not None or self._final_workers:
            return
        for layer in self._locked:
            let_go(layer)
        for layer in self._unfilled:
            if self._present(layer):
                self.viewer.layers.remove(layer)
        self._locked, self._unfilled = [], []

    def _present(self, layer) -> bool:
        return any(same_layer(layer, other) for other in self.viewer.layers)

    def _prediction_layer(self, image, name: str):
        """The prediction layer of ``image``, created (or re-created) when missing."""
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Labels):
            layer = self.viewer.layers[name]
            names = self.class_names()
            if class_names_of(layer) != names:  # classes renamed or added since it was made
                layer.features = class_features(names)
            track_edits(layer)
            return layer
        shape = image_shape_2d(image) if image is not None else None
        if shape is None:
            return None
        layer = self.viewer.add_labels(
            np.zeros(shape, np.uint8),
            name=name,
            features=class_features(self.class_names()),
            colormap=class_colormap(show_background=False),
            **placement(image),
            opacity=0.6,
        )
        layer.metadata[PREVIEW_KEY] = True
        track_edits(layer)
        self._unfilled.append(layer)
        if self.worker is not None or self._final_workers:  # re-made mid-round: the next preview overwrites it
            self._lock(layer)
        return layer

    def _show_prediction(self, box, labels, image=None, name: str | None = None) -> None:
        """Into the prediction layer of ``image`` (default: the running round's image)."""
        if image is None:
            image, name = self._run_image, self._prediction_name
        if image is None or image not in self.viewer.layers:
            return
        layer = self._prediction_layer(image, name)
        if layer is None or layer.data.shape[-2:] != image_shape_2d(image):
            return
        layer.data[box[0], box[1]] = labels
        layer.metadata[EDITED_KEY] = False  # a fresh prediction: the user's corrections are not in it
        self._unfilled = [other for other in self._unfilled if not same_layer(other, layer)]
        layer.refresh()

    def _on_returned(self, result) -> None:
        self.result = result
        if self._stop_requested_at is not None:
            self.last_stop_latency = time.perf_counter() - self._stop_requested_at
        self.plot.flush()
        if not result.history:
            self.status.setText("Training stopped before the first step; no model was made.")
            show_warning("Training stopped before the first step; no model was made.")
            return
        name = self.registry.add(f"{self._run_image.name if self._run_image else 'model'} model", result.model)
        self.model_combo.setCurrentText(name)
        last = result.history[-1]
        best = "" if last.best_val_dice is None else f"; best held-out Dice {last.best_val_dice:.3f}"
        how = "stopped" if result.stopped else "finished"
        if not result.stopped:  # a time budget's last step reports a little under the budget: 99 %
            self.progress.setValue(self.progress.maximum())
        copied = f" A copy is in {self._copied}." if self._copied is not None else ""
        self.status.setText(
            f"Training {how} after {result.steps} steps ({last.elapsed:.0f} s){best}. "
            f"Model '{name}' is ready for Segment; Start again continues from it.{copied}"
        )
        show_info(f"Training {how}: model '{name}' is ready (Segment widget, or Save…).")
        if not self._closed:  # a closed dock's prediction would run for minutes, shown to no one
            self._final_preview(result.model)

    def _final_preview(self, model) -> None:
        """Predict the whole image (small ones) with the trained model, for the correction loop."""
        image = self._run_image
        if image is None or image not in self.viewer.layers:
            return
        h, w = image_shape_2d(image)
        box = (slice(0, h), slice(0, w)) if h * w <= FULL_PREVIEW_PIXELS else self._view_box
        if box is None:
            return
        from ..core.config import PredictConfig

        config = PredictConfig(tile_size=512, device=self._config.device)
        # this round's image and layer: the next round may have started on another image by now
        name = self._prediction_name
        self._lock(self._prediction_layer(image, name))
        # a crop is scaled by the whole image's range, as training and previews scale it
        stop = threading.Event()
        worker = create_worker(
            _predict_labels, model, layer_data(image), box, config, self._value_range, self.uncertainty.isChecked(),
            stop, _ignore_errors=True,
        )
        worker.stop_event = stop  # set when the dock closes, or a new round on this image starts
        worker.prediction_name = name
        worker.returned.connect(lambda prediction: self._on_final_prediction(prediction, box, image, name, stop))
        worker.errored.connect(self._on_final_error)
        worker.finished.connect(lambda: self._on_final_finished(worker))
        self._final_workers.append(worker)
        worker.start()

    def _on_final_prediction(self, prediction, box, image, name: str, stop) -> None:
        """The end-of-round labels into the prediction layer, and the uncertainty of the same pass
        into the "… uncertainty" layer; a stopped prediction shows nothing. Without the option
        this widget's last map goes: it was of an older model."""
        if prediction is None or stop.is_set() or image not in self.viewer.layers:
            return
        self._show_prediction(box, prediction.labels, image, name)
        if prediction.uncertainty is None:
            drop_uncertainty(self.viewer, image, "Train")
            return
        show_uncertainty(self.viewer, image, prediction.uncertainty, "Train", box=box)
        if self.worker is None:  # still the round's status line
            self.status.setText(f"{self.status.text()} '{uncertainty_name(image)}' shows where the model is unsure.")

    def _on_final_finished(self, worker) -> None:
        self._final_workers.remove(worker)
        self._after_round()

    @property
    def final_worker(self):
        """The latest end-of-round prediction still running, if any."""
        return self._final_workers[-1] if self._final_workers else None

    def _on_final_error(self, error) -> None:
        notify_error(error, "Prediction after training failed")

    def _on_errored(self, error: BaseException) -> None:
        partial = getattr(error, "partial", None)
        cause = error.error if isinstance(error, WorkerError) else error
        message = explain(cause)
        if partial is not None:
            name = self.registry.add(f"{self._run_image.name if self._run_image else 'model'} model (partial)", partial)
            self.model_combo.setCurrentText(name)
            message += f". The model trained so far is kept as '{name}'"
            copied = getattr(error, "copied", None)
            message += f" (a copy is in {copied})." if copied is not None else "."
        show_error(f"Training failed: {message}")
        self.status.setText(f"Training failed: {message}")

    def _on_finished(self) -> None:
        self.worker = None
        self.start_button.setText("Start training")
        self.start_button.setEnabled(True)
        self._after_round()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if self.worker is None:
            return
        if any(same_layer(layer, used) for used in self._run_layers):
            message = (
                f"'{layer.name}' was removed while training. Training goes on with the copy taken at Start "
                "and the model will be kept; press Stop to end it now."
            )
            QTimer.singleShot(0, lambda: self._tell_removed(show_warning, message))
        elif layer.name == self._prediction_name:
            message = "The prediction layer was removed; it comes back with the next preview."
            QTimer.singleShot(0, lambda: self._tell_removed(show_info, message))

    def _tell_removed(self, show, message: str) -> None:
        """Told a moment later: closing the viewer removes every layer, then quits our worker
        (the last window) or closes its window (another one goes on)."""
        if self.worker is not None and not self.worker.abort_requested and not self._close_watcher.window_closing:
            show(message)

    # ------------------------------------------------------------------ correction loop

    def use_prediction_as_labels(self):
        """Dense labels from the (corrected) prediction, the user's strokes on top, for the next round."""
        image = self.image_combo.layer()
        if image is None:
            show_error("Choose the image whose prediction you want to correct.")
            return None
        # the chosen image's own prediction: the live preview of training, else the Segment output
        names = [f"{image.name} prediction", f"{image.name} segmentation"]
        if same_layer(image, self._run_image) and self._prediction_name:
            names.insert(0, self._prediction_name)
        # an all-zero layer (a round that never predicted) holds no prediction to correct
        names = [n for n in names if n in self.viewer.layers and np.any(layer_data(self.viewer.layers[n]))]
        # the one the user corrected, whichever it is; else the newest kind (the live preview)
        edited = [n for n in names if self.viewer.layers[n].metadata.get(EDITED_KEY)]
        name = (edited or names or [None])[0]
        if name is None:
            show_error(f"There is no prediction of '{image.name}' yet: train (or segment it) first, then correct it.")
            return None
        prediction = self.viewer.layers[name]
        if tuple(prediction.data.shape) != image_shape_2d(image):
            show_error(f"'{name}' does not have the shape of '{image.name}'; segment the image again.")
            return None
        data = np.array(prediction.data, copy=True)
        strokes = self.labels_combo.layer()
        # strokes go on top; an earlier correction (ours, or any dense layer) would hide the new
        # prediction, made from it: over a large image ours covers only the view it was made in
        earlier = strokes is not None and bool(strokes.metadata.get(CORRECTION_KEY))
        if strokes is not None and not earlier and not same_layer(strokes, prediction) \
                and strokes.data.shape == data.shape:
            painted = np.asarray(strokes.data) > 0
            if not painted.all():
                data[painted] = np.asarray(strokes.data)[painted]
        layer = self.viewer.add_labels(
            data,
            name=free_name(self.viewer, f"{image.name} corrected"),
            features=class_features(self.class_names()),
            colormap=class_colormap(show_background=False),
            opacity=0.6,
            **placement(image),  # with the image file's direction, so the saved labels overlay it elsewhere
        )
        layer.metadata[CORRECTION_KEY] = True
        layer.mode = "paint"
        self.labels_combo.select(layer.name)
        self.viewer.layers.selection.active = layer
        show_info(f"Copied from '{name}' into '{layer.name}'. Correct mistakes with the brush there, then press "
                  "Start to train the next round.")
        return layer


def _predict_labels(model, image, box, config, value_range, uncertainty, stop):
    """The end-of-round prediction of ``image[box]`` (labels, and the uncertainty if asked, in one
    pass), None if stopped (a module function: tests hold it back, reaching ``stop`` as the last
    argument)."""
    return predict_region(model, image, box, config, value_range, stop, uncertainty=uncertainty)

