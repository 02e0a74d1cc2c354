"""Keep freed memory in the process while training or predicting, and hand it back after.

glibc's malloc returns freed blocks to the OS once they pass a small, self-adjusting
threshold, and serves blocks above another one with fresh ``mmap`` pages. A training step
or a tiled prediction frees and re-allocates the same few hundred megabytes every time,
so each one pays for its pages again as page faults: about 8,500 a step for the default
model and 55,000 for a 1000 x 1000 prediction, which then takes 14-20 % longer on a
2-core CPU (BENCHMARKS.md, speed section). Raising both thresholds keeps that memory for
the next step.

napari is a long-lived process, so the raised thresholds last only while some training or
prediction runs and for ``RELEASE_AFTER`` seconds after the last one ends (a user who
predicts again soon finds the memory warm; a 1000 x 1000 prediction that pays its page
faults again takes about 0.35 s instead of 0.26 s at 2 threads). Then glibc's defaults
are set back and the freed memory is returned (``malloc_trim``): a 3000 x 3000 prediction
had left about 500 MiB more resident without that. Elsewhere (macOS, Windows, musl) this
is a no-op, as it is when the user has set glibc's own ``MALLOC_*`` variables: theirs win.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # blocks up to this come from the reusable heap
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it goes back to the OS
# glibc's documented initial values for both; its sliding of the mmap threshold stays off
# once mallopt has set it, as it does whenever a user sets MALLOC_MMAP_THRESHOLD_.
DEFAULT_THRESHOLD = 128 << 10

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

RELEASE_AFTER = 30.0  # seconds without training or prediction before the memory goes back

_lock = threading.Lock()
_holders = 0  # training runs and predictions inside ``freed_memory_kept`` right now
_raised = False
_release_timer: threading.Timer | None = None


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory for reuse while the block runs; yields True when glibc was told to.

    Nested and concurrent blocks (a prediction while training in another thread) share one
    setting; ``RELEASE_AFTER`` seconds after the last one ends, it is set back.
    """
    global _holders, _raised, _release_timer
    with _lock:
        _holders += 1
        if _release_timer is not None:
            _release_timer.cancel()
            _release_timer = None
        if not _raised:
            _raised = _allowed() and _set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
        kept = _raised
    try:
        yield kept
    finally:
        with _lock:
            _holders -= 1
            # A block can end while the interpreter shuts down: a training generator left
            # unfinished is closed then. No thread can start at that point (Python 3.11
            # waits for it forever, later versions raise), and the memory goes back anyway.
            if _holders == 0 and _raised and not sys.is_finalizing():
                _release_timer = threading.Timer(RELEASE_AFTER, release_freed_memory)
                _release_timer.daemon = True  # never holds up the interpreter's exit
                _release_timer.start()


def release_freed_memory() -> bool:
    """Set glibc's thresholds back and return freed memory now, unless a block is running.

    True when memory was released.
    """
    global _raised
    with _lock:
        if _holders or not _raised:
            return False
        _set_thresholds(DEFAULT_THRESHOLD, DEFAULT_THRESHOLD)
        _libc().malloc_trim(0)
        _raised = False
        return True


def trim_freed_memory() -> bool:
    """Return freed heap memory to the system now (``malloc_trim``), unless a block keeps it.

    For work in steps whose buffers are freed and allocated again, such as the tiles of a
    map whose memory a user bounds: glibc would otherwise keep each step's freed buffers and
    the process would grow past the bound. True when memory was trimmed.
    """
    with _lock:
        if _holders or _libc() is None:
            return False
        return bool(_libc().malloc_trim(0))


def _allowed() -> bool:
    if os.environ.get("NAPARI_SELFREG_KEEP_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    return _libc() is not None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    mallopt = _libc().mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
