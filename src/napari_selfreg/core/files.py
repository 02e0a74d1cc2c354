"""Replacing a file by a finished copy, as every writer here does (labels, images, models)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def replace_keeping_mode(new: str | Path, target: str | Path) -> None:
    """Rename ``new`` over ``target``, giving it ``target``'s permissions first: a labels file
    a lab keeps group-writable stays so after a save (the copy was made with the umask's mode).
    Hard links to the old file still see the old file; a rename cannot keep them."""
    with contextlib.suppress(OSError):  # no file there, or a filesystem without modes
        old = os.stat(target)
        if stat.S_ISREG(old.st_mode):
            os.chmod(new, stat.S_IMODE(old.st_mode))
    os.replace(new, target)
