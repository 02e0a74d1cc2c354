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
RECORD = ".napari-selfreg-copies.jsonl"  # the copies keep_copy wrote: nothing else is ever removed
RECORD_LINES = 1000  # the record is rewritten without its removed copies past this many lines
STALE_PART_S = 86_400  # an unfinished copy this old was left by a napari killed while writing it
NAME_BYTES = 150  # of the layer's name in a copy's name: with marker, time and suffixes under 255
_COPY_NAME = re.compile(r"[^/\\]+-\d{8}-\d{6}(-\d+)?\.safetensors")  # NAME[MARKER]-TIME[-N]
_relative: dict[str, Path] = {}  # a relative folder, made absolute once: a later chdir does not move it


def copies_folder() -> Path | None:
    """Where trained models are copied: ``$NAPARI_SELFREG_COPIES``, else the user's data folder
    (``~/.local/share/napari-selfreg/trained`` on Linux); None when turned off."""
    chosen = os.environ.get(COPIES_ENV)
    if chosen is not None:
        if chosen.strip() in ("", "0"):
            return None
        return _relative.setdefault(chosen, Path(chosen).expanduser().absolute())
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-selfreg", appauthor=False)) / "trained"


def keep_copy(model: SegmentationModel, name: str, marker: str = "") -> Path | None:
    """Write ``model`` to ``copies_folder()`` as NAME[MARKER]-TIME.safetensors and remove the
    oldest copies beyond ``KEEP_COPIES``; returns the file (None when copies are off). Raises
    OSError when it cannot be written. Runs in the training worker, so a large model costs
    the viewer nothing. A long NAME is shortened, never the MARKER (" (partial)").

    Only files listed in the folder's record, and unchanged since (size and modification
    time), are removed: a model the user saved there, even under a copy's name, stays.
    """
    from ..core.checkpoint import save_model

    folder = copies_folder()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = _reserve(folder, _short(re.sub(r'[<>:"/\\|?*\x00-\x1f]+', "_", name)).strip(" .") or "model", marker)
    try:
        save_model(model, path)
    except BaseException:
        path.unlink(missing_ok=True)  # the empty file that held the name
        raise
    with contextlib.suppress(OSError, ValueError):  # the copy is written; a broken record only stops the removal
        written = path.stat()
        with open(folder / RECORD, "a") as record:  # a short line per append: others' lines stay whole
            record.write(json.dumps({"name": path.name, "mtime_ns": written.st_mtime_ns, "size": written.st_size})
                         + "\n")
        _remove_oldest(folder)
    return path


def _short(name: str) -> str:
    """``name`` cut to ``NAME_BYTES`` bytes of UTF-8 (file names are limited in bytes)."""
    while len(name.encode("utf-8")) > NAME_BYTES:
        name = name[:-1]
    return name


def _reserve(folder: Path, stem: str, marker: str) -> Path:
    """A new file NAME-TIME[-N].safetensors, created empty: two napari processes finishing a
    round in the same second get two names (and two temporary files)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = folder / f"{stem}{marker}-{stamp}{'' if n == 1 else f'-{n}'}.safetensors"
        try:
            path.open("xb").close()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {stem}{marker} in {folder}")


def _remove_oldest(folder: Path) -> None:
    """Remove the recorded copies beyond the newest ``KEEP_COPIES``. The record is only
    appended to, so copies recorded by another napari meanwhile are never lost from it; past
    ``RECORD_LINES`` lines it is rewritten without the copies that are gone."""
    lines = (folder / RECORD).read_text(errors="replace").splitlines()
    entries: dict[str, dict] = {}
    for line in lines:
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
    for part in folder.glob("*.safetensors.part"):  # a napari killed while writing a copy left it
        with contextlib.suppress(OSError):
            stale = time.time() - part.stat().st_mtime > STALE_PART_S
            if stale and _COPY_NAME.fullmatch(part.name.removesuffix(".part")):
                part.unlink()
    if len(lines) > RECORD_LINES:  # rare; a copy another napari records during this rewrite stays unremoved
        handle, partial = tempfile.mkstemp(prefix=RECORD, dir=folder)
        with os.fdopen(handle, "w") as record:
            record.write("".join(json.dumps(entry) + "\n" for entry in reversed(kept)))
        os.replace(partial, folder / RECORD)

