"""Keep freed memory in the process instead of handing it back to the OS after every step.

glibc's malloc returns freed blocks to the OS once they pass a small, self-adjusting
threshold, and serves blocks above another one with fresh ``mmap`` pages. A training step
or a tiled prediction frees and re-allocates the same few hundred megabytes every time,
so each one pays for its pages again as page faults: about 8,500 a step for the default
model and 55,000 for a 1000 x 1000 prediction, which then takes 14-20 % longer on a
2-core CPU (BENCHMARKS.md, speed section). Raising both thresholds once keeps that memory
for the next step. Elsewhere (macOS, Windows, musl) this is a no-op, as it is when the
user has set glibc's own ``MALLOC_*`` variables: theirs win.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # blocks up to this come from the reusable heap
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it goes back to the OS

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds, once per process. True when they are raised."""
    return _apply()


def _apply() -> bool:
    if os.environ.get("NAPARI_SELFREG_KEEP_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
