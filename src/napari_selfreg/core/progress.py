"""Long operations are generators that yield progress and return their result."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import numpy as np

R = TypeVar("R")

StopRequest = Callable[[], bool] | threading.Event | bool | None


def stop_requested(stop: StopRequest) -> bool:
    """Whether a stop was asked for: an Event set by a widget, or a callable polled by a script."""
    if stop is None or isinstance(stop, bool | np.bool_):
        return bool(stop)
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def drain(generator: Generator[Any, Any, R], on_progress: Callable[[Any], None] | None = None) -> R:
    """Run a progress generator to its end and return its return value.

    Scripts, tests and the command line use this; the widgets wrap the same generators
    in napari thread workers instead.
    """
    while True:
        try:
            item = next(generator)
        except StopIteration as done:
            return done.value
        if on_progress is not None:
            on_progress(item)
