"""Pieces shared by the dock widgets: layer pickers, device picker, error messages, loss plot.

Nothing here imports torch at module level, so opening a dock widget stays fast; the
device list is filled when it is first opened, which imports torch once.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import sys
import time
import weakref
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QThreadPool
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QSizePolicy, QVBoxLayout, QWidget

from ..core.data import InputError
from ..io import DIRECTION_KEY

DEVICE_TOOLTIP = (
    "Where the network runs. 'auto' picks a CUDA or Apple GPU when there is one, else the CPU. "
    "Only devices present on this machine are listed."
)


EXIT_WAIT_MS = 30_000  # the longest Python's exit waits for a running worker (a final prediction)


@atexit.register
def _let_workers_finish() -> None:
    """A worker still running when Python exits (the end-of-round prediction of a viewer just
    closed) emits into Qt objects already deleted, which aborts the process (exit 134)."""
    QThreadPool.globalInstance().waitForDone(EXIT_WAIT_MS)


def create_worker(func, *args, **kwargs):
    """napari's ``create_worker``, whose generator is closed when napari quits the worker.

    A closing viewer quits every worker. superqt then stops iterating and leaves the
    generator suspended: training kept its model, optimiser, images, batch thread and the
    process-wide allocator setting, and a prediction its output files, for as long as the
    worker object lived. Closed, the generator runs its clean-ups at once, in the worker's
    thread.
    """
    from napari.qt.threading import create_worker as napari_create_worker

    if inspect.isgeneratorfunction(func):
        kwargs.setdefault("_worker_class", _closing_generator_worker())
    return napari_create_worker(func, *args, **kwargs)


_CLOSING_WORKER: list[type] = []  # made once, on first use: napari's threading module loads late


def _closing_generator_worker() -> type:
    if not _CLOSING_WORKER:
        from napari.qt.threading import GeneratorWorker

        class ClosingGeneratorWorker(GeneratorWorker):
            def work(self):
                try:
                    return super().work()
                finally:
                    if self.abort_requested:
                        try:
                            self._gen.close()
                        except Exception:  # the viewer is gone: nowhere to show it but the log
                            logging.getLogger(__name__).exception("closing a quit worker's generator failed")

        _CLOSING_WORKER.append(ClosingGeneratorWorker)
    return _CLOSING_WORKER[0]


def check_box(text: str, tip: str, checked: bool = False) -> QCheckBox:
    box = QCheckBox(text)
    box.setChecked(checked)
    box.setToolTip(tip)
    return box


def connect_while_alive(widget, *pairs) -> None:
    """Connect (signal, slot) pairs and disconnect them when the Qt widget is destroyed.

    The viewer and the model registry outlive dock widgets; without this, a signal
    after the widget was closed would call into deleted Qt objects.
    """
    for signal, slot in pairs:
        signal.connect(slot)

    def disconnect(*_):
        for signal, slot in pairs:
            try:
                signal.disconnect(slot)
            except (RuntimeError, TypeError, ValueError):
                pass

    widget.destroyed.connect(disconnect)


class _CloseWatcher(QObject):
    """Watches a dock widget for its ✕ and, once shown, its napari window for closing."""

    def __init__(self, widget, on_closed, on_window_gone) -> None:
        super().__init__(widget)
        self._widget = widget
        self._on_closed = on_closed
        self._on_window_gone = on_window_gone
        self._window = lambda: None  # a weak reference: the window's wrapper holds napari's viewer
        self.window_closing = False  # its window got a Close (teardown removes its layers next)

    def eventFilter(self, watched, event) -> bool:
        kind = event.type()
        if watched is self._widget:
            if kind == QEvent.ParentChange and watched.parent() is None:
                self._on_closed()
            elif kind == QEvent.Show:  # docked in its window by now: watch that window
                self.watch_window()
        elif kind == QEvent.Close:
            self.window_closing = True
        elif kind == QEvent.Show:
            self.window_closing = False  # the close was cancelled, or the window is back
        return False

    def watch_window(self) -> None:
        """Watch the window the widget is in now (on Show, and when a run starts: a viewer
        made with show=False shows nothing)."""
        window = self._widget.window()
        while window.parentWidget() is not None:  # a floating dock's window is the dock itself
            window = window.parentWidget().window()
        if window is self._window() or window is self._widget:
            return
        if self._window() is not None:
            with contextlib.suppress(RuntimeError, TypeError):
                self._window().removeEventFilter(self)
                self._window().destroyed.disconnect(self._gone)
        self._window = weakref.ref(window)
        window.installEventFilter(self)
        # through a weak reference: the window's signal must not keep the widget, and with it
        # the viewer, alive after the window closed
        watcher = weakref.ref(self)

        def gone(*_) -> None:
            alive = watcher()
            if alive is not None:
                alive._on_window_gone()

        self._gone = gone
        window.destroyed.connect(gone)


def stop_when_closed(widget, on_closed, on_window_gone=None):
    """Call ``on_closed`` when the dock's ✕ is clicked. napari then detaches the widget
    (``setParent(None)``) without deleting it, so a running worker would go on, invisible
    and out of reach of its Stop button. ``on_window_gone`` (default ``on_closed``) runs when
    the napari window holding the dock is deleted: with a second napari window open, the
    application, and so its workers, go on. The widget is being deleted then: it may set
    stop events, but not touch any Qt object. Returns the watcher (``window_closing``)."""
    watcher = _CloseWatcher(widget, on_closed, on_window_gone or on_closed)
    widget.installEventFilter(watcher)
    return watcher


_last_model_folder: list[str] = []  # the folder of the last model file chosen in this session


def model_folder(loading: bool) -> str:
    """Where Load… and Save… open: the folder of the last model file chosen in this session;
    else, for Load…, the folder of the trained models' copies when it holds any (napari was
    closed before Save…, and the status line that named the copy is gone); else the
    working folder ("")."""
    if _last_model_folder:
        return _last_model_folder[-1]
    from .model_registry import copies_folder

    copies = copies_folder() if loading else None
    if copies is not None and any(copies.glob("*.safetensors")):
        return str(copies)
    return ""


def remember_model_file(path: str) -> None:
    _last_model_folder[:] = [str(Path(path).parent)]


def ask_model_file(parent) -> str | None:
    """A file dialog for napari-selfreg model files; None when cancelled."""
    path, _ = QFileDialog.getOpenFileName(
        parent, "Load model", model_folder(loading=True), "napari-selfreg model (*.safetensors)")
    if path:
        remember_model_file(path)
    return path or None


def layer_data(layer) -> object:
    """The full-resolution array of a layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def visible_corners(layer) -> np.ndarray | None:
    """napari's ``corner_pixels`` in full-resolution pixels.

    For a pyramid napari gives them in the pixels of the level it draws, which would put a
    zoomed-out view of a slide at a fraction of its true place and size.
    """
    corners = getattr(layer, "corner_pixels", None)
    if corners is None or not getattr(layer, "multiscale", False):
        return corners
    factors = np.asarray(layer.downsample_factors[layer.data_level], dtype=float)
    corners = np.asarray(corners, dtype=float)
    return np.stack([np.floor(corners[0] * factors), np.ceil((corners[1] + 1) * factors) - 1]).astype(int)


def stack_problem(layer) -> str | None:
    """What to do when an image layer is a stack of planes (napari shows a slider), not one
    2-D image: a 3- or 4-plane stack must not pass for RGB(A)."""
    if layer is None or layer.ndim <= 2:
        return None
    return (
        f"'{layer.name}' is a stack of 2-D planes {tuple(layer_data(layer).shape)}, not one 2-D or RGB "
        "image; add the plane you want as its own layer (or open an RGB image) and try again."
    )


OURS_KEY = "napari_selfreg_segmentation"  # layer metadata: made by Segment (labels, probabilities)
MAP_FLAG = "napari_selfreg_redundancy"  # layer metadata of the redundancy maps: the name they were given
EDITED_KEY = "napari_selfreg_edited"  # layer metadata: painted on, filled or erased by the user
TRACKED_KEY = "napari_selfreg_tracked"  # layer metadata: its paint events set EDITED_KEY
UNCERTAINTY_KEY = "napari_selfreg_uncertainty"  # layer metadata of an uncertainty map: the widget that made it


def track_edits(layer) -> None:
    """Note in the layer's metadata when the user paints, fills or erases on it. napari's paint
    event covers all three, at no cost on a slide-sized layer (a digest of 0.9 GB took 1.1 s)."""
    if layer.metadata.get(TRACKED_KEY):
        return
    layer.metadata[TRACKED_KEY] = True
    layer.events.paint.connect(lambda _event: layer.metadata.__setitem__(EDITED_KEY, True))


# layers made read-only by running jobs: layer -> [jobs holding it, its editable before the first]
_READ_ONLY_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hold_read_only(layer) -> None:
    """Read-only while a job writes into the layer or reads it window by window. Several jobs
    may hold one layer (training's previews and a split of its objects, say): each restoring
    what it found left the layer locked, or paintable mid-write, depending on who ended last."""
    layer = getattr(layer, "__wrapped__", layer)
    entry = _READ_ONLY_HOLDS.setdefault(layer, [0, layer.editable])
    entry[0] += 1
    layer.editable = False


def let_go(layer) -> None:
    """One job is done with the layer: the last one gives it back as it was before the first."""
    layer = getattr(layer, "__wrapped__", layer)
    entry = _READ_ONLY_HOLDS.get(layer)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] <= 0:
        del _READ_ONLY_HOLDS[layer]
        layer.editable = entry[1]


def free_name(viewer, base: str) -> str:
    """``base``, else ``base 2``, ``base 3``, ...: the first that no layer has (napari would
    otherwise append its own ``[1]``)."""
    name, n = base, 2
    while name in viewer.layers:
        name, n = f"{base} {n}", n + 1
    return name


def placement(image) -> dict:
    """Where a layer made from ``image`` goes: its plane's scale and translate, and its file's
    direction (metadata), so labels saved from the layer overlay the image file elsewhere too."""
    direction = image.metadata.get(DIRECTION_KEY)
    return {
        "scale": tuple(image.scale[-2:]),
        "translate": tuple(image.translate[-2:]),
        "metadata": {DIRECTION_KEY: direction} if direction is not None else {},
    }


def same_layer(layer, other) -> bool:
    """Whether two references name the same layer. A widget docked through napari gets a
    proxy of the viewer that hands out a new proxy of a layer on every access, so ``is``
    alone never matches there."""
    if layer is None or other is None:
        return False
    return getattr(layer, "__wrapped__", layer) is getattr(other, "__wrapped__", other)


def misaligned(layer, other) -> bool:
    """Whether two layers' planes are scaled or moved against each other: pixels paired by
    index would then not be the pixels that overlap on screen."""
    return not (
        np.allclose(layer.scale[-2:], other.scale[-2:]) and np.allclose(layer.translate[-2:], other.translate[-2:])
    )


def image_shape_2d(layer) -> tuple[int, int]:
    """(H, W) of an image layer, RGB or gray."""
    shape = tuple(layer_data(layer).shape)
    if getattr(layer, "rgb", False):
        shape = shape[:-1]
    return int(shape[-2]), int(shape[-1])


def uncertainty_name(image) -> str:
    return f"{image.name} uncertainty"


def _our_uncertainty(viewer, image):
    """The image's uncertainty layer this plugin made, or None (a user's layer of that name is not ours)."""
    from napari.layers import Image

    name = uncertainty_name(image)
    layer = viewer.layers[name] if name in viewer.layers else None
    ours = isinstance(layer, Image) and layer.metadata.get(OURS_KEY) and layer.metadata.get(UNCERTAINTY_KEY)
    return layer if ours else None


def uncertainty_colormap():
    """Inferno whose opacity grows as the square of the value: transparent where the model is
    sure, opaque where the classes tie. Additive blending washed a bright H&E slide out and
    could not show anything on its pale glass; this marks the boundaries the model hesitates
    on in yellow over bright and dark images alike, and leaves the tissue beneath visible."""
    from napari.utils import Colormap
    from napari.utils.colormaps import ensure_colormap

    inferno = ensure_colormap("inferno")
    colors = np.array(inferno.colors, copy=True)
    colors[:, 3] = np.asarray(inferno.controls) ** 2
    return Colormap(colors, name="inferno fading", controls=inferno.controls)


def show_uncertainty(viewer, image, data, maker: str, box=None):
    """Show ``data``, an (H, W) map in [0, 1] of where the model is unsure (``core.predict.
    uncertainty_of``), as the image's one "… uncertainty" layer, which Segment and Train share.

    Visible (the user asked for it), in ``uncertainty_colormap``. Ours is
    updated in place, so the opacity or visibility the user chose stays from one run to the
    next; a layer of that name the user made is renamed out of the way, never overwritten.
    ``maker`` ("Segment", "Train") is recorded: each widget drops only its own map
    (``drop_uncertainty``). ``box`` (row and column slices) places a map of part of the image
    over that part: a slide's map of the view, without a slide-sized array around it.
    """
    name = uncertainty_name(image)
    place = placement(image)
    if box is not None:
        offset = np.array([box[0].start or 0, box[1].start or 0]) * np.asarray(place["scale"])
        place["translate"] = tuple(float(t) for t in np.asarray(place["translate"]) + offset)
    layer = _our_uncertainty(viewer, image)
    if layer is None and name in viewer.layers:
        theirs = viewer.layers[name]
        theirs.name = free_name(viewer, f"{name} (kept)")
        show_info(f"'{name}' was not made by napari-selfreg: it is kept as '{theirs.name}'.")
    if layer is None:
        metadata = {**place.pop("metadata"), OURS_KEY: True, UNCERTAINTY_KEY: maker}
        return viewer.add_image(
            data, name=name, colormap=uncertainty_colormap(), contrast_limits=(0.0, 1.0), blending="translucent",
            opacity=0.8, metadata=metadata, **place,
        )
    layer.data = data
    layer.scale, layer.translate = place["scale"], place["translate"]
    layer.metadata.update({**place["metadata"], UNCERTAINTY_KEY: maker})
    return layer


def drop_uncertainty(viewer, image, maker: str) -> None:
    """Remove the image's uncertainty map if ``maker`` made it: a run of that widget completed
    without one, so its map is stale. The other widget's map (of another model's result), a
    user's layer of that name and a renamed map stay."""
    layer = _our_uncertainty(viewer, image)
    if layer is not None and layer.metadata.get(UNCERTAINTY_KEY) == maker:
        viewer.layers.remove(layer)


def _made_image(layer) -> bool:
    """An image layer the plugin computed (probabilities, redundancy maps): no input to choose."""
    from napari.layers import Image

    return isinstance(layer, Image) and bool(layer.metadata.get(OURS_KEY) or layer.metadata.get(MAP_FLAG))


def _stop_following(layer, on_renamed) -> None:
    try:
        layer.events.name.disconnect(on_renamed)
    except (RuntimeError, TypeError, ValueError):  # already gone
        pass


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of one kind, kept in step with the layer list.

    It follows the chosen layer itself, not its name: a renamed layer stays chosen, and a
    removed one leaves nothing chosen (rather than silently another layer of the kind). Every
    layer's renames refresh the list, so the text always names the chosen layer and a choice
    made with the wheel or the keyboard picks the layer shown.
    """

    def __init__(self, viewer, layer_type, none_text: str | None = None, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.none_text = none_text
        self._chosen = None  # the layer object last chosen
        self._emptied = False  # the chosen layer was removed and nothing chosen since
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setMinimumContentsLength(12)
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        events = viewer.layers.events
        connect_while_alive(self, (events.inserted, self._on_inserted), (events.removed, self._on_removed),
                            (events.moved, self.refresh))
        self._named: list = []  # the layers whose name events this combo follows (napari's own objects)
        for layer in viewer.layers:
            self._follow_name(layer)
        named, on_renamed = self._named, self._on_renamed

        def unfollow(*_) -> None:  # a layer outlives the combo: its renames must not call into a deleted widget
            for layer in named:
                _stop_following(layer, on_renamed)
            named.clear()

        self.destroyed.connect(unfollow)
        self.currentTextChanged.connect(self._remember)
        self.refresh()

    def _follow_name(self, layer) -> None:
        layer = getattr(layer, "__wrapped__", layer)  # a proxy of the layer hands out a new one on each access
        if not any(layer is other for other in self._named):
            layer.events.name.connect(self._on_renamed)
            self._named.append(layer)

    def _unfollow_name(self, layer) -> None:
        layer = getattr(layer, "__wrapped__", layer)
        if any(layer is other for other in self._named):
            self._named[:] = [other for other in self._named if other is not layer]
            _stop_following(layer, self._on_renamed)

    def _on_inserted(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            self._follow_name(layer)
        self.refresh()

    def _on_removed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            self._unfollow_name(layer)
        self.refresh()

    def _on_renamed(self, *_) -> None:
        self.refresh()

    def names(self) -> list[str]:
        return [layer.name for layer in self.viewer.layers if isinstance(layer, self.layer_type)]

    def _present(self, layer) -> bool:
        return layer is not None and any(same_layer(layer, other) for other in self.viewer.layers)

    def _remember(self, name: str) -> None:
        if name and self._present(self._chosen) and self._chosen.name == name:
            return  # still the chosen layer (a name napari is about to make unique may be shared a moment)
        layer = self.viewer.layers[name] if name and name in self.viewer.layers else None
        self._chosen = layer if isinstance(layer, self.layer_type) else None
        if self._chosen is not None:
            self._emptied = False

    def refresh(self, *_) -> None:
        """Rebuild the list, keeping the chosen layer when it still exists (under any name)."""
        current = self.currentText()
        had_choice = self._chosen is not None
        names = self.names()
        self.blockSignals(True)
        self.clear()
        if self.none_text is not None:
            self.addItem(self.none_text)
        self.addItems(names)
        if self._present(self._chosen):
            self.setCurrentText(self._chosen.name)
        elif had_choice or self._emptied:  # the chosen layer was removed: the user chooses again
            self._chosen, self._emptied = None, True
            self.setCurrentIndex(0 if self.none_text is not None else -1)
        elif current in names:
            self.setCurrentText(current)
        elif self.none_text is None and names:
            # nothing chosen yet: the layer the user selected last, else the first one; never a
            # probability or redundancy map the plugin added (napari makes each new layer active)
            active = self.viewer.layers.selection.active
            inputs = [name for name in names if not _made_image(self.viewer.layers[name])]
            if active is not None and active.name in names and not _made_image(active):
                self.setCurrentText(active.name)
            elif inputs:
                self.setCurrentText(inputs[0])
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())
        elif self._chosen is None:
            self._remember(self.currentText())

    def layer(self):
        """The chosen layer, or None (nothing chosen, or it was removed)."""
        if self._present(self._chosen):
            return self._chosen
        name = self.currentText()
        if not name or name == self.none_text or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        return layer if isinstance(layer, self.layer_type) else None

    def select(self, name: str) -> None:
        self.refresh()
        self.setCurrentText(name)
        self._remember(self.currentText())


class NameCombo(QComboBox):
    """A combo box of names (e.g. session models) that keeps the user's choice across refreshes."""

    def set_names(self, names: list[str]) -> None:
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())


_DEVICES: list[str] = []  # found once per session


class DeviceCombo(QComboBox):
    """'auto' plus the devices torch finds, listed once torch is imported anyway, or when the
    list is opened, focused or asked for a device it does not show yet.

    Listing imports torch (a second or two, once per session). A background thread did it
    at docking before, and a viewer closed within that time aborted Python: the thread
    outlived the widget whose signals it was to emit.
    """

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.addItems(["auto", "cpu"])
        self.setToolTip(DEVICE_TOOLTIP)
        if _DEVICES or "torch" in sys.modules:
            self._fill(_DEVICES or _list_devices())

    def _ensure_listed(self) -> None:
        if not _DEVICES:
            self._fill(_list_devices())

    def showPopup(self) -> None:
        self._ensure_listed()
        super().showPopup()

    def focusInEvent(self, event) -> None:  # the keyboard and wheel reach every device too
        self._ensure_listed()
        super().focusInEvent(event)

    def setCurrentText(self, text: str) -> None:
        if self.findText(text) < 0:
            self._ensure_listed()
        super().setCurrentText(text)

    def _fill(self, devices: list[str]) -> None:
        _DEVICES[:] = devices
        current = self.currentText()
        self.clear()
        self.addItems(["auto", *devices])
        self.setCurrentText(current if current in ("auto", *devices) else "auto")
        self.setToolTip(f"{DEVICE_TOOLTIP}\nFound here: {', '.join(devices)} ('auto' = {devices[0]}).")


def _list_devices() -> list[str]:
    from ..core.device import available_devices

    return available_devices()


def explain(error: BaseException) -> str:
    """A message for the user that says what to do, without a traceback."""
    error = getattr(error, "error", error)  # unwrap a WorkerError
    text = str(error) or type(error).__name__
    if isinstance(error, InputError):
        return text
    if type(error).__name__ == "ModelFileError":
        return text
    lowered = text.lower()
    if "out of memory" in lowered or type(error).__name__ == "OutOfMemoryError":
        return (
            "the GPU ran out of memory; lower the batch size, the patch size or the tile size, "
            "or choose device 'cpu', and start again"
        )
    if isinstance(error, ValueError):
        return text
    return f"{type(error).__name__}: {text}"


def notify_error(error: BaseException, what: str) -> None:
    show_error(f"{what}: {explain(error)}")


def notify_warning(message: str) -> None:
    show_warning(message)


class LossPlot(QWidget):
    """Live curves of CE, Dice, SCR and IFD losses and the validation Dice.

    Lines are created once and only their data change; redraws come at most every
    ``interval`` seconds, so a fast training loop cannot flood the main thread. The axes,
    ticks and legend are drawn only when the limits move (they step by whole decades of
    loss and by the round's length in steps); in between only the curves are drawn over a
    saved background (blitting), a few ms instead of about 40 on a laptop CPU.
    """

    CURVES = (("ce", "CE"), ("dice", "Dice loss"), ("scr", "SCR"), ("ifd", "IFD"))
    COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")

    def __init__(self, parent=None, interval: float = 1.0) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.interval = interval
        self._last_draw = 0.0
        self.figure = Figure(figsize=(3.2, 2.2), dpi=90)
        self.figure.subplots_adjust(left=0.2, right=0.84, bottom=0.2, top=0.95)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        ax = self.axes = self.figure.add_subplot(111)
        vax = self.val_axes = ax.twinx()
        self.lines = {
            key: ax.plot([], [], label=label, color=colour, lw=1, animated=True)[0]
            for (key, label), colour in zip(self.CURVES, self.COLOURS, strict=True)
        }
        self.val_line = vax.plot([], [], "k.-", label="val Dice", lw=1, animated=True)[0]
        ax.set_yscale("log")
        vax.set_ylim(0, 1)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        vax.set_ylabel("validation Dice", fontsize=8)
        ax.tick_params(labelsize=7)
        vax.tick_params(labelsize=7)
        ax.legend(handles=[*self.lines.values(), self.val_line], fontsize=6, loc="lower left", framealpha=0.6)
        self._background = None
        self.full_draws = 0  # how often the axes were redrawn (the costly part)
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {key: [] for key, _ in self.CURVES}
        self.val_steps: list[int] = []
        self.val_dice: list[float] = []
        self.offset = 0
        self._round_end = 0
        self._draw(force=True)

    def start_round(self) -> None:
        """Continue the x axis when a new training round starts (correction loop)."""
        self.offset = self.steps[-1] if self.steps else 0

    def add(self, report) -> None:
        step = self.offset + report.step
        self._round_end = self.offset + int(getattr(report, "total_steps", 0) or 0)
        self.steps.append(step)
        for key, _ in self.CURVES:
            self.values[key].append(float(getattr(report, key)))
        if report.val_dice is not None:
            self.val_steps.append(step)
            self.val_dice.append(float(report.val_dice))
        self._draw()

    def flush(self) -> None:
        self._draw(force=True)

    def _limits(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """x doubling from 50 steps as training goes, up to the round's last step (a round of
        100000 steps under a time budget must not squash the curves at the left); y in whole
        decades of the losses."""
        last = self.steps[-1] if self.steps else 0
        right = 50.0
        while right < last:
            right *= 2
        if self._round_end:
            right = min(right, max(float(self._round_end), float(last)))
        positive = [v for key in self.values for v in self.values[key] if v > 0]
        if not positive:
            return (0.0, right), (1e-3, 1.0)
        low, high = min(positive), max(positive)
        return (0.0, right), (10.0 ** np.floor(np.log10(low)), 10.0 ** np.ceil(np.log10(high) + 1e-9))

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        steps = np.asarray(self.steps)
        for key, line in self.lines.items():
            values = np.asarray(self.values[key], float)
            shown = values > 0  # a log axis: a switched-off term (SelfReg off) is not drawn
            line.set_data(steps[shown], values[shown])
        self.val_line.set_data(self.val_steps, self.val_dice)
        xlim, ylim = self._limits()
        if self._background is None or xlim != self.axes.get_xlim() or ylim != self.axes.get_ylim():
            self.axes.set_xlim(*xlim)
            self.axes.set_ylim(*ylim)
            self._background = None
            self.canvas.draw_idle()  # the axes moved: everything, then the curves (_on_full_draw)
        else:
            self._blit_curves()

    def _on_full_draw(self, _event) -> None:
        """After any full draw (limits moved, a resize, an expose): keep the background, then
        draw the curves on it."""
        self.full_draws += 1
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_curves()

    def _blit_curves(self) -> None:
        self.canvas.restore_region(self._background)
        self._draw_curves()
        self.canvas.blit(self.figure.bbox)

    def _draw_curves(self) -> None:
        for line in self.lines.values():
            self.axes.draw_artist(line)
        self.val_axes.draw_artist(self.val_line)


def viewer_camera(viewer):
    """The viewer's camera: ``viewer.scene.camera`` from napari 0.9 (``viewer.camera`` is
    deprecated there), ``viewer.camera`` before."""
    scene = getattr(viewer, "scene", None)
    return getattr(scene, "camera", None) or viewer.camera
