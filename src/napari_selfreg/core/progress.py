"""Long operations are generators that yield progress and return their result."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

R = TypeVar("R")


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
