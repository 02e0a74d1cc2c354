"""Models available in this napari session, shared by the dock widgets.

The Train widget adds what it trains, the Segment and Feature-redundancy widgets list
and use them; loading a file adds it too. Every model a round trains is also copied to
disk (``keep_copy``), so closing napari, or a crash, before Save… loses nothing. No torch
import here, so docking stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from psygnal import Signal

if TYPE_CHECKING:
    from ..core.model import SegmentationModel


class ModelRegistry:
    changed = Signal()

    def __init__(self) -> None:
        self._models: dict[str, SegmentationModel] = {}

    def add(self, name: str, model: SegmentationModel, replace: bool = False) -> str:
        """Store a model; returns the name used (made unique unless ``replace``)."""
        unique = name
        if not replace:
            n = 2
            while unique in self._models:
                unique = f"{name} ({n})"
                n += 1
        self._models[unique] = model
        self.changed.emit()
        return unique

    def load_file(self, path: str | Path) -> str:
        """Load a model file and add it under its file name; raises ``ModelFileError``."""
        from ..core.checkpoint import load_model

        name = Path(path).name
        return self.add(name.removesuffix(".safetensors") or name, load_model(path))

    def get(self, name: str) -> SegmentationModel:
        return self._models[name]

    def names(self) -> list[str]:
        return list(self._models)

    def remove(self, name: str) -> None:
        if self._models.pop(name, None) is not None:
            self.changed.emit()

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)


_REGISTRY = ModelRegistry()


def model_registry() -> ModelRegistry:
    """The session-wide registry (one napari process, one set of models)."""
    return _REGISTRY


COPIES_ENV = "NAPARI_SELFREG_COPIES"  # a folder for the copies; "0" or "" turns them off
KEEP_COPIES = 20  # the newest copies kept; older ones are removed as new ones come


def copies_folder() -> Path | None:
    """Where trained models are copied: ``$NAPARI_SELFREG_COPIES``, else the user's data folder
    (``~/.local/share/napari-selfreg/trained`` on Linux); None when turned off."""
    chosen = os.environ.get(COPIES_ENV)
    if chosen is not None:
        return None if chosen.strip() in ("", "0") else Path(chosen).expanduser().absolute()
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-selfreg", appauthor=False)) / "trained"


RECORD = ".napari-selfreg-copies.jsonl"  # the copies keep_copy wrote: nothing else is ever removed


def keep_copy(model: SegmentationModel, name: str) -> Path | None:
    """Write ``model`` to ``copies_folder()`` as NAME-TIME.safetensors and remove the oldest
    copies beyond ``KEEP_COPIES``; returns the file (None when copies are off). Raises OSError
    when it cannot be written. Runs in the training worker, so a large model costs the viewer
    nothing.

    Only files listed in the folder's record, and unchanged since (size and modification
    time), are removed: a model the user saved there, even under a copy's name, stays.
    """
    from ..core.checkpoint import save_model

    folder = copies_folder()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = _reserve(folder, re.sub(r'[<>:"/\\|?*\x00-\x1f]+', "_", name).strip(" .")[:80] or "model")
    try:
        save_model(model, path)
    except BaseException:
        path.unlink(missing_ok=True)  # the empty file that held the name
        raise
    written = path.stat()
    with open(folder / RECORD, "a") as record:  # one short line per append: other processes' lines stay whole
        record.write(json.dumps({"name": path.name, "mtime_ns": written.st_mtime_ns, "size": written.st_size}) + "\n")
    _remove_oldest(folder)
    return path


def _reserve(folder: Path, stem: str) -> Path:
    """A new file NAME-TIME[-N].safetensors, created empty: two napari processes finishing a
    round in the same second get two names (and two temporary files)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = folder / (f"{stem}-{stamp}.safetensors" if n == 1 else f"{stem}-{stamp}-{n}.safetensors")
        try:
            path.open("xb").close()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {stem} in {folder}")


def _remove_oldest(folder: Path) -> None:
    entries: dict[str, dict] = {}
    for line in (folder / RECORD).read_text().splitlines():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            entry = json.loads(line)
            name, stamp, size = entry.get("name"), entry.get("mtime_ns"), entry.get("size")
            if isinstance(name, str) and _COPY_NAME.fullmatch(name) and all(isinstance(v, int) for v in (stamp, size)):
                entries[name] = entry
    kept = []
    for entry in sorted(entries.values(), key=lambda e: e["mtime_ns"], reverse=True):
        path = folder / entry["name"]
        try:
            now = path.stat()
        except OSError:  # removed by the user, or by another napari
            continue
        if (now.st_mtime_ns, now.st_size) != (entry["mtime_ns"], entry["size"]):
            continue  # written over since: the user's file now, not a copy
        if len(kept) < KEEP_COPIES:
            kept.append(entry)
        else:
            path.unlink(missing_ok=True)
    handle, partial = tempfile.mkstemp(prefix=RECORD, dir=folder)
    with os.fdopen(handle, "w") as record:
        record.write("".join(json.dumps(entry) + "\n" for entry in reversed(kept)))
    os.replace(partial, folder / RECORD)


_COPY_NAME = re.compile(r"[^/\\]+-\d{8}-\d{6}(-\d+)?\.safetensors")
