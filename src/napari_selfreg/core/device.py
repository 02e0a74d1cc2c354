"""One place that turns "auto" into a torch device and decides on mixed precision."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch


def available_devices() -> list[str]:
    """Device names usable on this machine, best first ("cpu" always last)."""
    names = []
    if torch.cuda.is_available():
        names.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then MPS, then CPU; an unavailable explicit choice is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and "mps" not in available_devices():
        raise ValueError("MPS was requested but is not available; use --device auto or cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    try:
        device = torch.device(name)
    except RuntimeError:  # "cuda:x", "cudaa"
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps (or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()  # a wrong index failed only at the first tensor, deep in training
        raise ValueError(f"{name} was requested but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


@lru_cache(maxsize=1)
def cpu_has_fast_bfloat16() -> bool:
    """True when the CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX).

    Without such support bfloat16 is emulated and slower than float32, so "auto"
    precision stays float32 there.
    """
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = ""
    if "AVX512" not in capability.upper() and "AMX" not in capability.upper():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype for autocast, or None for plain float32."""
    precision = (precision or "auto").lower()
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        return torch.float16 if device.type in ("cuda", "mps") else torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose auto, float32, bfloat16, float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bfloat16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context manager for mixed precision, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def network_on(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The network on ``device`` without moving the caller's: itself when its weights are
    there, else a copy. Maps computed on the GPU must not pull a model that trains on the
    CPU (or the other way round) away from its optimiser."""
    parameter = next(network.parameters(), None)
    here = None if parameter is None else parameter.device
    if here is None or (here.type == device.type and device.index in (None, here.index)):  # "cuda" is "cuda:0"
        return network
    import copy

    return copy.deepcopy(network).to(device)
