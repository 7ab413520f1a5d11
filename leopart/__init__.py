"""leopart: dense, part-aware patch features with Leopart Vision Transformers (Ziegler & Asano, CVPR 2022).

The public names load on first use, so ``import leopart`` is instant and ``leopart --help`` does not wait
for torch and timm to import (5 s on a 2-core machine); ``leopart.embed`` and the rest import what they need
when first touched.
"""
# Underscored, so that dir(leopart) and tab completion show the API rather than these helpers.
import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_API = {
    "KMeansResult": "cluster", "cluster": "cluster",
    "embed": "embed", "iter_embeddings": "embed",
    "LeopartError": "errors",
    "evaluate": "evaluate",
    "from_pretrained": "hub",
    "Segmenter": "merge", "merge": "merge",
    "LeopartConfig": "model", "LeopartOutput": "model", "LeopartViT": "model",
    "ProbeHead": "probe", "probe": "probe",
    "segment": "segment",
    "TrainConfig": "train", "train": "train",
}
__all__ = sorted([*_API, "metrics"])

if _TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import metrics
    from .cluster import KMeansResult, cluster
    from .embed import embed, iter_embeddings
    from .errors import LeopartError
    from .evaluate import evaluate
    from .hub import from_pretrained
    from .merge import Segmenter, merge
    from .model import LeopartConfig, LeopartOutput, LeopartViT
    from .probe import ProbeHead, probe
    from .segment import segment
    from .train import TrainConfig, train


def __getattr__(name: str):
    if name in _API:
        value = getattr(_importlib.import_module(f"{__name__}.{_API[name]}"), name)
    else:  # a submodule: leopart.metrics, leopart.data, leopart.kernels, ...
        try:
            value = _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """Python binds each submodule on its package once it has loaded (``leopart.cluster`` = the module).
    Where a public function shares its module's name (cluster, embed, evaluate, merge, probe, segment, train), the
    function is what ``leopart.<name>`` means, whichever module happened to load first."""

    def __setattr__(self, name, value):
        if isinstance(value, _types.ModuleType) and _API.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
