"""Where the work runs: the device a user names (checked to exist) and the precision used there."""
from __future__ import annotations

import contextlib
import os

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


def host_memory_available(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes a new host allocation can still get (Linux: MemAvailable + SwapFree), or None where unknown."""
    fields = {}
    try:
        with open(meminfo) as f:
            for line in f:
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in fields:
        return None
    return fields["MemAvailable"] + fields.get("SwapFree", 0)


def check_host_memory(n_bytes: int, what: str, advice: str) -> None:
    """Fail at once, rather than be killed for memory hours in, when ``what`` cannot fit in host memory."""
    available = host_memory_available()
    if available is not None and n_bytes > available:
        raise LeopartError(f"{what} take {n_bytes / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of "
                           f"memory available here: {advice}")


def autocast(device: torch.device, full_precision: bool = False):
    """bf16 autocast on CUDA unless ``full_precision``; full precision elsewhere (CPU bf16 is slower and less
    exact)."""
    if uses_bf16(device, full_precision):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_bf16(device: torch.device, full_precision: bool = False) -> bool:
    return device.type == "cuda" and not full_precision


def launched_processes() -> int:
    """How many processes a launcher such as torchrun started for this job (its WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def rng_state(device: torch.device) -> dict:
    """The random generators a resumed job continues from: the CPU's and, on a GPU, that GPU's. Only this process's
    GPU: under torchrun every process draws the same numbers in the same order (one seed, the same shapes), so each
    resumes from the first process's, which the checkpoint keeps."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict | torch.Tensor, device: torch.device) -> None:
    """Restore what ``rng_state`` saved, or what checkpoints kept before it: the CPU's state alone (a tensor: probe
    checkpoints) or every GPU's state as the first process saw them (``"cuda"``: training checkpoints)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def precision_key(device: torch.device, full_precision: bool = False) -> tuple[str, ...]:
    """Cache-key settings for features computed on ``device``: ("bf16",) under autocast, none in float32 (so
    float32 caches keep the names they had before precision was a setting)."""
    return ("bf16",) if uses_bf16(device, full_precision) else ()
