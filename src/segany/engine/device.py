"""Device and precision selection."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError


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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asks for CUDA but no CUDA GPU is available here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r} asks for MPS but it is not available here; use device='cpu'")
    return dev


def autocast(device: torch.device, half: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``half`` (GPU, or CPUs with native bf16); fp32 otherwise."""
    if not half:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
