"""Device and precision selection."""

from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import ConfigError, warn
from ..models.common import CPU_NATIVE_BF16


def select_device(device: str | int | torch.device | None = "") -> torch.device:
    """``""``/None → CUDA if present, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``0``, ``"mps"``."""
    if isinstance(device, torch.device):
        return device
    spec = "" if device is None else str(device).strip().lower()
    if spec == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec.isdigit():
        spec = f"cuda:{spec}"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device; use '', 'cpu', 'cuda', 'cuda:0' or 'mps'") from None
    if dev.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: torch names them, segany does not run there
        raise ConfigError(f"device={device!r}: segany runs on 'cpu', 'cuda' ('cuda:0', ...) or 'mps', not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asks for CUDA but no CUDA GPU is available here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} asks for MPS but it is not available here; use device='cpu'")
    if dev.type == "cpu":
        return torch.device("cpu")  # cpu:0 is the CPU: one device, compared equal
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())  # as '' picks it: 'cuda' and 'cuda:0' agree
    return dev


def autocast(device: torch.device, half: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``half`` on a GPU or on a CPU with bf16 units (AVX512-BF16/AMX); fp32
    otherwise: a CPU without them emulates bf16 products, 8× slower than fp32 (2-core AVX2 EPYC)."""
    if not half:
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_native_bf16():
        _warn_half_ignored()
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (a function so tests can pretend it does)."""
    return CPU_NATIVE_BF16


@functools.cache  # once a process: every encode and decode would repeat it
def _warn_half_ignored() -> None:
    warn("half=True is ignored on this CPU: it has no bf16 units (AVX512-BF16 or AMX), where bf16 "
         "would run several times slower than fp32; running in fp32")
