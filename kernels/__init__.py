"""Triton kernels for Leopart's hot spots, each beside its plain-torch reference.

Dispatch: ``backend="auto"`` runs Triton on CUDA tensors and torch otherwise; ``LEOPART_KERNELS=torch|triton``
forces one for the whole process; ``TRITON_INTERPRET=1`` (set before triton is imported) runs the Triton
kernels on CPU tensors through Triton's interpreter.
"""
from .similarity import nearest_prototype, patch_prototype_similarity
from .sinkhorn import sinkhorn

__all__ = ["nearest_prototype", "patch_prototype_similarity", "sinkhorn"]
