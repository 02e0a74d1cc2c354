"""Model files: safetensors weights with the model's JSON document in the header.

One file, no pickle: loading never executes anything from the file. A file that is not
a napari-selfreg model (a pickle, a truncated download, another architecture) fails with
a clear ``ModelFileError``.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
from collections import deque
from pathlib import Path

import torch

from .. import __version__
from .config import ModelInfo
from .data import MAX_CLASSES
from .device import resolve_device
from .files import replace_keeping_mode
from .model import SegmentationModel

METADATA_KEY = "napari_selfreg"
FORMAT_VERSION = "1"
PICKLE_SNIFF_BYTES = 64 << 20  # larger files that fail to open are not parsed as pickles
NORMALIZATION_KEYS = ("mode", "low_percentile", "high_percentile", "channels")  # every file since the first


class ModelFileError(ValueError):
    """The file is not a usable napari-selfreg model."""


def save_model(model: SegmentationModel, path: str | Path) -> Path:
    """Write the model; the write goes through a temporary file so a crash loses nothing.

    The bytes are written by Python's ``open``, so a new file's mode follows the umask as any
    file the user writes (safetensors' own writer makes it 0600, and setting the mode after
    needs the umask, which can only be read by changing it for every thread); a file written
    over keeps its own mode.
    """
    from safetensors.torch import save

    if Path(path).is_dir():  # else "models/" would quietly become "models.safetensors" beside it
        example = Path(path) / "model.safetensors"
        raise ModelFileError(f"{path} is a folder; give the model a file name, such as {example}")
    path = model_path(path)
    model.info.package_version = __version__
    document = {"format": FORMAT_VERSION, **model.info.to_dict()}
    problem = _document_problem(document, model.info)
    if problem:  # a file that would not load again is not written
        raise ModelFileError(f"cannot save the model: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(model.state_dict_cpu(), metadata={METADATA_KEY: json.dumps(document)})
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not land before the bytes do
        replace_keeping_mode(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def model_path(path: str | Path) -> Path:
    """The file a model saved as ``path`` goes to: ``.safetensors`` is added unless the name
    ends so already ("nuclei_v1.5" -> "nuclei_v1.5.safetensors"), so Load... finds it."""
    path = Path(path)
    return path if path.suffix.lower() == ".safetensors" else path.with_name(path.name + ".safetensors")


def read_model_info(path: str | Path) -> ModelInfo:
    """Only the JSON document, without loading the weights."""
    return _open(_saved_as(Path(path)), weights=False)[0]


def _saved_as(path: Path) -> Path:
    """``path``, or the file a model saved as ``path`` went to ("m1" -> "m1.safetensors")."""
    return model_path(path) if not path.exists() and model_path(path).is_file() else path


def _open(path: Path, weights: bool = True) -> tuple[ModelInfo, dict]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelFileError(f"{path} is a folder, not a model file; give the .safetensors file in it")
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as error:
        raise ModelFileError(f"cannot read {path}: {error.strerror or error}") from None
    # safetensors: an 8-byte little-endian header length, then the JSON header
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise _pickle_refused(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if weights else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        if _is_pickle(path):
            raise _pickle_refused(path) from None
        raise ModelFileError(
            f"{path.name} is not a readable napari-selfreg model file (truncated or another format): {error}"
        ) from None
    if METADATA_KEY not in metadata:
        raise ModelFileError(f"{path.name} is a safetensors file but not a napari-selfreg model (no model document)")
    try:
        document = json.loads(metadata[METADATA_KEY])
        info = ModelInfo.from_dict(document)
    except (ValueError, TypeError, AttributeError) as error:
        raise ModelFileError(f"{path.name} has a damaged model document: {error}") from None
    except RecursionError:  # JSON nested thousands deep
        raise ModelFileError(f"{path.name} has a damaged model document: nested too deep") from None
    if "format" not in document:
        raise ModelFileError(f"{path.name} has a damaged model document: it names no model-file format")
    if str(document["format"]) != FORMAT_VERSION:
        raise ModelFileError(
            f"{path.name} uses model-file format {document.get('format')!r}; this napari-selfreg "
            f"reads format {FORMAT_VERSION}; update napari-selfreg"
        )
    if len(info.class_names) != info.model.num_classes:
        raise ModelFileError(
            f"{path.name} has a damaged model document: {len(info.class_names)} class names "
            f"for {info.model.num_classes} classes"
        )
    problem = _document_problem(document, info)
    if problem:
        raise ModelFileError(f"{path.name} has a damaged model document: {problem}")
    return info, tensors


def _pickle_refused(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{path.name} is a pickle/torch.save file, which could run code when loaded; "
        "napari-selfreg only loads its own .safetensors model files"
    )



def _is_pickle(path: Path) -> bool:
    """Whether the file parses as one whole pickle opcode stream. Protocols 0 and 1 have no
    magic bytes to sniff; ``pickletools`` reads the opcodes without executing any of them."""
    try:
        if path.stat().st_size > PICKLE_SNIFF_BYTES:
            return False
        stream = io.BytesIO(path.read_bytes())
        last = deque(pickletools.genops(stream), maxlen=1)
    except Exception:  # anything unparsable is simply not a pickle
        return False
    return bool(last) and last[0][0].name == "STOP" and stream.tell() == len(stream.getbuffer())


def _document_problem(document: dict, info: ModelInfo) -> str | None:
    """What in the document would fail only later, deep in prediction, or silently change it."""
    names = document.get("class_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return "class_names must be a list of names"
    history = document.get("history", [])
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        return "history must be a list of step records"  # continued training reads it
    if not all(isinstance(r.get("round", 1), int) and not isinstance(r.get("round"), bool) for r in history):
        return "history rounds must be whole numbers"
    stored = {**info.model.to_dict(), **(document.get("model") or {})}  # as written, before from_dict's ints
    whole = {f"model.{k}": stored[k] for k in info.model.to_dict()} | {
        "normalization.channels": (document.get("normalization") or {}).get("channels", info.normalization.channels)}
    broken = [k for k, v in whole.items() if not isinstance(v, int) or isinstance(v, bool)]
    if broken:  # 16.0 channels build no network; 1.0 passed every check and failed in prediction
        return f"{broken[0]} must be a whole number"
    missing = [k for k in NORMALIZATION_KEYS if k not in (document.get("normalization") or {})]
    if missing:  # a default would silently scale the images another way than training did
        return f"normalization names no {missing[0]}"
    if not 2 <= info.model.num_classes <= MAX_CLASSES:  # predictions hold 8-bit ids
        return f"{info.model.num_classes} classes; a model has background and 1 to {MAX_CLASSES - 1} structures"
    norm = info.normalization
    if norm.mode not in ("uint8", "percentile"):
        return f"unknown normalisation {norm.mode!r} (uint8 or percentile)"
    if norm.channels != info.model.in_channels:
        return f"normalisation for {norm.channels} channel(s) but a network for {info.model.in_channels}"
    low, high = norm.low_percentile, norm.high_percentile
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not 0 <= low < high <= 100:
        return f"normalisation percentiles {low!r}, {high!r} must be numbers with 0 <= low < high <= 100"
    return None


def _check_shapes(path: Path, info: ModelInfo, tensors: dict) -> None:
    """Compare the weights with the architecture the document describes, built on the meta
    device: a crafted document (depth 30, width 100000) must not allocate its network."""
    from .unet import SelfRegUNet

    try:
        with torch.device("meta"):
            described = SelfRegUNet(info.model).state_dict()
        expected = {k: tuple(v.shape) for k, v in described.items()}
    except (ValueError, TypeError, RuntimeError) as error:
        raise ModelFileError(f"{path.name} describes an architecture that cannot be built: {error}") from None
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise ModelFileError(
            f"{path.name}: the weights do not fit the architecture its document describes (first mismatch: {wrong[0]})"
        )
    # a float where the network has one (any precision), the counters' own type elsewhere:
    # int8 or bool weights were cast to float and predicted nothing of what was trained
    wrong = [k for k, v in tensors.items() if _kind(v.dtype) != _kind(described[k].dtype)]
    if wrong:
        k = wrong[0]
        raise ModelFileError(f"{path.name}: weight {k} is {tensors[k].dtype} where the network holds "
                             f"{_kind(described[k].dtype)}; the file was not written by napari-selfreg")


def _kind(dtype: torch.dtype) -> str:
    return "a float" if dtype.is_floating_point else str(dtype)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a model file; raises ``ModelFileError`` with a clear message on any problem."""
    path = _saved_as(Path(path))
    info, tensors = _open(path)
    _check_shapes(path, info, tensors)
    broken = next((name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()), None)
    if broken is not None:  # it would predict background everywhere, without a word
        raise ModelFileError(
            f"{path.name} holds NaN or infinite weights ({broken}); the training that wrote it diverged"
        )
    try:
        model = SegmentationModel.from_weights(info, tensors)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else "mismatched weights"
        raise ModelFileError(
            f"{path.name}: the weights do not fit the architecture its document describes ({first})"
        ) from None
    model.network.to(resolve_device(device) if isinstance(device, str) else device).eval()
    return model
