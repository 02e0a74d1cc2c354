"""glibc keeps freed memory for the next step once ``keep_freed_memory`` has run."""

import os
import platform
import subprocess
import sys

import pytest

from napari_selfreg.core import allocator

CHURN = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from napari_selfreg.core.allocator import keep_freed_memory
    assert keep_freed_memory()
def churn():  # a step's pattern: blocks of a few sizes, allocated, written and freed
    blocks = [np.ones(n << 18, np.float32) for n in (2, 12, 5, 40, 9)]
    del blocks
churn(); churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""
PAGES_PER_ROUND = (2 + 12 + 5 + 40 + 9) * 256

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


def _faults_per_round(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "NAPARI_SELFREG_KEEP_MEMORY"}
    done = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    plain = _faults_per_round("plain")
    if plain < 0.05 * PAGES_PER_ROUND:
        pytest.skip(f"this glibc keeps the memory by itself ({plain:.0f} faults a round)")
    assert _faults_per_round("keep") < 0.01 * PAGES_PER_ROUND


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "NAPARI_SELFREG_KEEP_MEMORY"])
def test_user_settings_win(monkeypatch, name):
    monkeypatch.setenv(name, "0")
    assert allocator._apply() is False
