"""Generators the widgets run in napari thread workers (Qt-free, so they are testable alone).

They wrap the core generators: training reports pass straight through, and at most every
``preview_every`` seconds a cheap prediction of the visible region is computed on a
snapshot of the weights, so the user sees the model learn while training goes on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np

from .model_registry import keep_copy

PREVIEW_MAX_SIDE = 384
PREVIEW_TILE = 192  # small tiles: a stop request is seen between them
PREVIEW_SHARE = 0.2  # previews may take at most this share of the training time


def visible_box(corners, shape: tuple[int, int], max_side: int = PREVIEW_MAX_SIDE) -> tuple[slice, slice]:
    """The visible part of the image (from napari's ``corner_pixels``), at most ``max_side`` wide.

    A view larger than that is cut to its central part: the preview must stay cheap.
    """
    h, w = shape
    if corners is None or np.asarray(corners).size < 4:
        y0, x0, y1, x1 = 0, 0, h, w
    else:
        corners = np.asarray(corners)[:, -2:]
        y0, x0 = np.clip(corners[0], 0, (h, w))
        y1, x1 = np.clip(corners[1] + 1, 0, (h, w))
        if y1 - y0 < 16 or x1 - x0 < 16:
            y0, x0, y1, x1 = 0, 0, h, w
    spans = []
    for low, high, size in ((y0, y1, h), (x0, x1, w)):
        low, high = int(low), int(high)
        if high - low > max_side:
            centre = (low + high) // 2
            low = max(0, centre - max_side // 2)
            high = min(size, low + max_side)
        spans.append(slice(low, high))
    return spans[0], spans[1]


class WorkerError(Exception):
    """An error raised in a worker generator, with the model trained so far when there is one.

    Deliberately not a RuntimeError: superqt's GeneratorWorker takes a RuntimeError from
    the generator for "worker deleted" and drops it silently (no errored, no finished),
    and torch raises RuntimeError for CUDA out-of-memory and many other failures.
    """

    def __init__(self, error: BaseException, partial=None) -> None:
        super().__init__(str(error))
        self.error = error
        self.partial = partial
        self.copied: Path | None = None  # where the partial model was copied (``keep_copy``)


def run_training(
    images: list,
    labels: list,
    config,
    model_config,
    class_names: list[str],
    initial,
    stop: threading.Event,
    view: Callable[[], tuple[slice, slice] | None] | None = None,
    preview_image=None,
    preview_every: float = 3.0,
    copy_name: str | None = None,
) -> Generator[tuple[str, object], None, object]:
    """Yield ("report", TrainReport) per step and ("preview", (box, labels)) now and then.

    Previews come at most every ``preview_every`` seconds (never for 0), and never take more than
    ``PREVIEW_SHARE`` of the time: on a slow CPU they thin out on their own. A preview's crop is
    scaled by the whole image's value range, as in training; it is computed once and yielded as
    ("value_range", range) for the end-of-round prediction. A failed preview is skipped (the
    first failure is yielded as ("preview_failed", error)): it must not end training.
    Returns the core's TrainResult. On Stop the core generator returns before its next
    step, with the weights the settings keep (last, or best held-out so far). Every error
    leaves as ``WorkerError`` (a RuntimeError would vanish in superqt), after the first step
    carrying a copy of the model trained so far, so nothing is lost. With ``copy_name`` the
    model (or the partial one) is also written to disk by ``keep_copy``: ("copied", path) is
    yielded last, or ("copy_failed", error); a failed error's copy is its ``copied``. When
    napari quits mid-round (the worker is closed, not stopped) the weights of the last step
    are copied too, as NAME (at quit).
    """
    steps = _train_with_previews(
        images, labels, config, model_config, class_names, initial, stop, view, preview_image, preview_every
    )
    live, reports = None, []  # the model of the last report (whole between steps), and the reports
    try:
        while True:
            try:
                item = next(steps)
            except StopIteration as done:
                result = done.value
                break
            if item[0] == "report":
                live = item[1].model or live
                reports.append(item[1])
            yield item
    except GeneratorExit:
        steps.close()  # the core lets go of its threads and memory first
        if copy_name is not None and live is not None:
            with contextlib.suppress(Exception):  # napari is closing: nothing to tell anyone
                keep_copy(_with_history(live.clone(), reports), copy_name, " (at quit)")
        raise
    except WorkerError as error:
        if error.partial is not None:
            _with_history(error.partial, reports)
            if copy_name is not None:
                with contextlib.suppress(Exception):  # the training error is the one to report
                    error.copied = keep_copy(error.partial, copy_name, " (partial)")
        raise
    except Exception as error:
        raise WorkerError(error) from error
    if copy_name is not None and result.history:
        try:
            copied = keep_copy(result.model, copy_name)
        except Exception as error:  # a full disk must not lose the model in memory
            yield "copy_failed", error
        else:
            if copied is not None:
                yield "copied", copied
    return result


def _train_with_previews(
    images, labels, config, model_config, class_names, initial, stop, view, preview_image, preview_every
):
    from ..core.train import train

    generator = train(images, labels, config, model_config, class_names, initial, stop)
    last_preview = time.monotonic()
    interval = preview_every
    model = None
    value_range = None
    failed = False
    while True:
        try:  # after a Stop the core returns before its next step
            report = next(generator)
        except StopIteration as done:
            return done.value
        except Exception as error:
            raise WorkerError(error, _copy_of(model)) from error
        model = report.model or model
        yield "report", report
        if preview_image is None or view is None or preview_every <= 0 or stop.is_set() or model is None:
            continue
        if time.monotonic() - last_preview < interval:
            continue
        box = view()
        began = time.monotonic()
        if box is not None:
            try:
                if value_range is None:
                    value_range = _whole_value_range(preview_image, model)
                    yield "value_range", value_range
                labels = _preview(model, preview_image, box, value_range, config.device, stop)
            except Exception as error:  # out of memory, NaN in the view, ...: training goes on
                labels = None
                if not failed:
                    failed = True
                    yield "preview_failed", error
            if labels is not None:
                yield "preview", (box, labels)
        last_preview = time.monotonic()
        interval = max(preview_every, (last_preview - began) / PREVIEW_SHARE)


def _with_history(model, reports: list):
    """``model`` with this round's steps so far in its history, as a finished round records them."""
    from ..core.train import history_records

    model.info.history = history_records(model.info.history, reports)
    return model


def _copy_of(model):
    """A copy of the model trained so far, or None: copying must not raise a second error."""
    try:
        return model.clone() if model is not None else None
    except Exception:
        return None


def _whole_value_range(image, model):
    """The value range the model scales ``image`` by, from the whole image (as training does), so
    that a crop of it is not stretched by its own percentiles."""
    from ..core.predict import value_range_of

    return value_range_of(image, model.info.normalization)


def _preview(model, image, box, value_range, device, stop):
    """Labels of ``image[box]`` from a snapshot of the weights, or None when stopped."""
    from ..core.config import PredictConfig
    from ..core.predict import predict

    crop = np.asarray(image[box[0], box[1]])
    settings = PredictConfig(tile_size=PREVIEW_TILE, overlap=0.25, batch_size=1, device=device)
    prediction = predict(model.clone(), crop, settings, probabilities=False, stop=stop, value_range=value_range)
    return prediction.labels if prediction.complete else None


def predict_region(model, image, box, config, value_range, stop=None, uncertainty: bool = False):
    """The core ``Prediction`` of ``image[box]`` (labels, and with ``uncertainty`` the map of
    where the model is unsure, from the same pass) scaled by the whole image's value range
    (computed when None), or None when ``stop`` ended it early; errors as ``WorkerError``, so
    a RuntimeError reaches the widget."""
    from ..core.predict import predict

    try:
        if value_range is None:
            value_range = _whole_value_range(image, model)
        crop = np.asarray(image[box[0], box[1]])
        prediction = predict(
            model, crop, config, probabilities=False, stop=stop, value_range=value_range, uncertainty=uncertainty
        )
    except Exception as error:
        raise WorkerError(error) from error
    return prediction if prediction.complete else None


def run_prediction(model, image, config, probabilities: bool, out_labels, out_probabilities, out_uncertainty, stop):
    """The core's tiled prediction: yields PredictProgress, returns Prediction; errors as WorkerError.
    ``out_uncertainty`` (or None) is filled with the map of where the model is unsure. ``stop``
    stays the last argument: tests reach it as ``args[-1]``."""
    from ..core.predict import predict_tiled

    try:
        return (
            yield from predict_tiled(
                model, image, config, probabilities=probabilities,
                out_labels=out_labels, out_probabilities=out_probabilities, stop=stop,
                out_uncertainty=out_uncertainty,
            )
        )
    except Exception as error:
        raise WorkerError(error) from error
