"""leopart: dense, part-aware patch features with Leopart Vision Transformers (Ziegler & Asano, CVPR 2022)."""
from . import metrics
from .cluster import KMeansResult, cluster
from .embed import embed, iter_embeddings
from .errors import LeopartError
from .hub import from_pretrained
from .merge import Segmenter, merge
from .model import LeopartConfig, LeopartOutput, LeopartViT
from .probe import ProbeHead, probe
from .segment import segment
from .train import TrainConfig, train

__version__ = "0.1.0"
__all__ = ["KMeansResult", "LeopartConfig", "LeopartError", "LeopartOutput", "LeopartViT", "ProbeHead", "Segmenter",
           "TrainConfig", "cluster", "embed", "from_pretrained", "iter_embeddings", "merge", "metrics", "probe",
           "segment", "train"]
