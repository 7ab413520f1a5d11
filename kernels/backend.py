"""Which implementation runs: Triton on CUDA tensors, plain torch otherwise.

``backend="auto" | "triton" | "torch"`` on every kernel; the environment variable
``LEOPART_KERNELS=torch|triton`` overrides it for the whole process (handy for A/B runs and debugging).
Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported) runs the kernels on CPU
tensors: that is how the CPU test suite checks them.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import LeopartError

BACKENDS = ("auto", "triton", "torch")

# Compile options every launch passes. FP fusion (a * b + c as one FMA) is what the kernels were tested and
# timed with; Triton 3.9 warns at the first compile that its default turns it off in 3.10, so it is pinned.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend: str, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for these tensors, honouring LEOPART_KERNELS."""
    forced = os.environ.get("LEOPART_KERNELS", "").strip().lower()
    if forced:
        if forced not in ("torch", "triton"):
            raise LeopartError(f"LEOPART_KERNELS must be 'torch' or 'triton', not '{forced}'")
        backend = forced
    if backend not in BACKENDS:
        raise LeopartError(f"backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise LeopartError("the Triton backend needs the triton package (pip install triton)")
        if not on_cuda and not interpreting():
            raise LeopartError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to interpret them on CPU)")
    return backend


def on_input_device(launcher):
    """Decorate a function that launches Triton kernels on its first argument's GPU: Triton launches on the
    current device, not the tensors' (tensors on cuda:1 while cuda:0 is current are refused), so that GPU is
    made current while it runs. CPU tensors (the interpreter) change nothing."""
    @functools.wraps(launcher)
    def run_on_input_device(x, *args, **kwargs):
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return launcher(x, *args, **kwargs)

    return run_on_input_device


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
