"""Foreground masks from a ViT's last-layer CLS attention, as Leopart's training and CBFE use them.

Average the heads, blur with a Gaussian (sigma 0.6 patches), keep the patches that hold the top 60% of the
attention mass, and drop connected components of at most 2 patches.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur [B, h, w] maps with a separable Gaussian (radius ceil(3 sigma)), replicate padding."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def keep_mass(maps: torch.Tensor, share: float) -> torch.Tensor:
    """Boolean [B, h, w]: the smallest set of highest-valued cells that holds ``share`` of each map's mass."""
    flat = maps.flatten(1)
    values, order = flat.sort(dim=1)  # ascending
    cum = values.cumsum(dim=1) / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    keep_sorted = cum > (1.0 - share)
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep.view_as(maps)


def remove_small_components(masks: torch.Tensor, max_size: int) -> torch.Tensor:
    """Drop 8-connected components of at most ``max_size`` cells from boolean [B, h, w] masks."""
    if max_size <= 0:
        return masks
    out = masks.cpu().numpy().copy()
    structure = np.ones((3, 3), dtype=bool)
    for m in out:
        labels, n = ndimage.label(m, structure=structure)
        if n:
            sizes = np.bincount(labels.ravel())
            small = sizes <= max_size
            small[0] = False
            m[small[labels]] = False
    return torch.from_numpy(out).to(masks.device)


def foreground_mask(attention: torch.Tensor, keep: float = 0.6, sigma: float = 0.6,
                    min_component: int = 3) -> torch.Tensor:
    """attention [B, heads, h, w] (or [B, h, w]) -> boolean foreground [B, h, w]."""
    maps = attention.float().mean(dim=1) if attention.ndim == 4 else attention.float()
    masks = keep_mass(gaussian_blur(maps, sigma), keep)
    return remove_small_components(masks, min_component - 1)
