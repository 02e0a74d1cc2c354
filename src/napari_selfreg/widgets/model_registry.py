"""Models available in this napari session, shared by the dock widgets.

The Train widget adds what it trains, the Segment and Feature-redundancy widgets list
and use them; loading a file adds it too. Every model a round trains is also copied to
disk (``keep_copy``), so closing napari, or a crash, before Save… loses nothing. No torch
import here, so docking stays fast.
"""

from __future__ import annotations

import os
import re
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
        return None if chosen.strip() in ("", "0") else Path(chosen).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-selfreg", appauthor=False)) / "trained"


def keep_copy(model: SegmentationModel, name: str) -> Path | None:
    """Write ``model`` to ``copies_folder()`` as NAME-TIME.safetensors and remove the oldest
    copies beyond ``KEEP_COPIES``; returns the file (None when copies are off). Raises OSError
    when it cannot be written. Runs in the training worker, so a large model costs the viewer
    nothing."""
    from ..core.checkpoint import save_model

    folder = copies_folder()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r'[<>:"/\\|?*\x00-\x1f]+', "_", name).strip(" .")[:80] or "model"  # no OS refuses the rest
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{stem}-{stamp}.safetensors", 2
    while path.exists():
        path, n = folder / f"{stem}-{stamp}-{n}.safetensors", n + 1
    save_model(model, path)
    _remove_oldest(folder)
    return path


_COPY_NAME = re.compile(r".+-\d{8}-\d{6}(-\d+)?\.safetensors")  # only files keep_copy names are ever removed


def _remove_oldest(folder: Path) -> None:
    copies = []
    for path in folder.iterdir():
        if _COPY_NAME.fullmatch(path.name):
            try:
                copies.append((path.stat().st_mtime, path))
            except OSError:  # removed meanwhile (another napari)
                continue
    for _, old in sorted(copies, reverse=True)[KEEP_COPIES:]:
        old.unlink(missing_ok=True)
