"""leopart: dense, part-aware patch features with Leopart Vision Transformers (Ziegler & Asano, CVPR 2022)."""
from .embed import embed
from .errors import LeopartError
from .hub import from_pretrained
from .model import LeopartConfig, LeopartOutput, LeopartViT

__version__ = "0.1.0"
__all__ = ["LeopartConfig", "LeopartError", "LeopartOutput", "LeopartViT", "embed", "from_pretrained"]
