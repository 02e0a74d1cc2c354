"""Models available in this napari session, shared by the dock widgets.

The Train widget adds what it trains, the Segment and Feature-redundancy widgets list
and use them; loading a file adds it too. No torch import here, so docking stays fast.
"""

from __future__ import annotations

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
