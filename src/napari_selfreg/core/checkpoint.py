"""Model files: safetensors weights with the model's JSON document in the header.

One file, no pickle: loading never executes anything from the file. A file that is not
a napari-selfreg model (a pickle, a truncated download, another architecture) fails with
a clear ``ModelFileError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from .config import ModelInfo
from .model import SegmentationModel

METADATA_KEY = "napari_selfreg"
FORMAT_VERSION = "1"


class ModelFileError(ValueError):
    """The file is not a usable napari-selfreg model."""


def save_model(model: SegmentationModel, path: str | Path) -> Path:
    """Write the model; the write goes through a temporary file so a crash loses nothing."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors") if path.suffix == "" else path
    path.parent.mkdir(parents=True, exist_ok=True)
    model.info.package_version = __version__
    document = {"format": FORMAT_VERSION, **model.info.to_dict()}
    metadata = {METADATA_KEY: json.dumps(document)}
    tmp = path.with_name(path.name + ".part")
    save_file(model.state_dict_cpu(), str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_model_info(path: str | Path) -> ModelInfo:
    """Only the JSON document, without loading the weights."""
    return _open(Path(path))[0]


def _open(path: Path) -> tuple[ModelInfo, dict]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise ModelFileError(
            f"{path.name} is a pickle/torch.save file, which could run code when loaded; "
            "napari-selfreg only loads its own .safetensors model files"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(
            f"{path.name} is not a readable napari-selfreg model file (truncated or another format): {error}"
        ) from None
    if METADATA_KEY not in metadata:
        raise ModelFileError(f"{path.name} is a safetensors file but not a napari-selfreg model (no model document)")
    try:
        document = json.loads(metadata[METADATA_KEY])
        info = ModelInfo.from_dict(document)
    except (ValueError, TypeError) as error:
        raise ModelFileError(f"{path.name} has a damaged model document: {error}") from None
    if str(document.get("format", "")) != FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name} uses model-file format {document.get('format')!r}; this napari-selfreg "
            f"reads format {FORMAT_VERSION}; update napari-selfreg"
        )
    return info, tensors


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a model file; raises ``ModelFileError`` with a clear message on any problem."""
    path = Path(path)
    info, tensors = _open(path)
    model = SegmentationModel.create(info)
    try:
        model.network.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else "mismatched weights"
        raise ModelFileError(
            f"{path.name}: the weights do not fit the architecture its document describes ({first})"
        ) from None
    model.network.to(device).eval()
    return model
