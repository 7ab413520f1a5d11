"""Foreground masks from a ViT's last-layer CLS attention, as Leopart's training and CBFE use them.

Average the heads, blur with a Gaussian (sigma 0.6 patches, 7 x 7, reflect padding), keep the patches that hold
the top 60% of the attention mass (CBFE's cue: 65%, ``segment.CBFE_ATTENTION_MASS``), and drop connected
components of at most 2 patches.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def gaussian_blur(maps: torch.Tensor, sigma: float, kernel_size: int = 7) -> torch.Tensor:
    """Blur [B, h, w] maps as torchvision's GaussianBlur(kernel_size, sigma) does (the reference's): a separable
    Gaussian, reflect padding (replicate where a map is too small to reflect)."""
    if sigma <= 0:
        return maps
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode=mode)
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


def _neighbour_count(masks: torch.Tensor) -> torch.Tensor:
    """Number of 8-neighbours set, per cell of boolean [B, h, w] masks (as float)."""
    x = masks.float()[:, None]
    ones = torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device)
    return (F.conv2d(x, ones, padding=1) - x)[:, 0]


def remove_small_components(masks: torch.Tensor, max_size: int) -> torch.Tensor:
    """Drop 8-connected components of at most ``max_size`` cells from boolean [B, h, w] masks.

    Sizes 1 and 2 (the only ones Leopart uses) need no labelling and stay on the masks' device, so the
    training step never waits for the host: a set cell is alone if it has no set neighbour, and in a pair
    if it has exactly one set neighbour that in turn has exactly one (which can only be the cell itself).
    Larger sizes are labelled with scipy on the CPU.
    """
    if max_size <= 0:
        return masks
    if max_size <= 2:
        n = _neighbour_count(masks)
        small = masks & (n == 0)
        if max_size == 2:
            single_link = masks & (n == 1)
            small |= single_link & (_neighbour_count(single_link) >= 1)
        return masks & ~small
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
