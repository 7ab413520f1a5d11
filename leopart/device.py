"""Where the work runs: the device a user names (checked to exist) and the precision used there."""
from __future__ import annotations

import contextlib

import torch

from .errors import LeopartError


def default_device(device=None) -> torch.device:
    """``device`` as a torch.device, checked to exist here; None means cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LeopartError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LeopartError(f"device '{device}' asked for, but torch sees no CUDA GPU here: use cpu")
        if device.index is not None and device.index >= count:
            raise LeopartError(f"no device '{device}': torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LeopartError(f"device '{device}' asked for, but torch sees no MPS device here: use cpu")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
