"""Parts to objects with no labels (paper section 4): CBFE, then community detection.

1. CBFE, cluster-based foreground extraction: every part cluster gets the share of its patches that fall
   inside a (noisy) attention foreground mask; the clusters with the lowest shares are background, as many
   as it takes for a target share of all patches (``bg_share``) to be background.
2. CD, community detection: for each image count how often two foreground clusters are 8-neighbours in the
   patch grid, row-normalise, and average over the images in which each cluster has neighbours; two parts
   are joined when the weights both ways reach ``weight_threshold`` (the edge weighs the smaller, as in the
   reference code); the Louvain communities (networkx, seeded) of that graph are objects.

The result is a ``Segmenter``: centroids + part -> object map (0 = background), saved like a model
(config.json + model.safetensors) so it can live on the Hub beside one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F

from . import serialization
from .cluster import KMeansResult, check_metric
from .errors import LeopartError, integer, number, plural

# 8-neighbourhood: each unordered neighbour pair once; counted in both directions below.
NEIGHBOUR_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass
class Segmenter:
    """Parts and the objects they form (from ``leopart.merge``): a patch goes to its nearest part centroid, a
    part to its object (0 = background). Saved and loaded like a model (``save_pretrained``, ``from_pretrained``,
    ``push_to_hub``); ``leopart.segment(image, segmenter=...)`` applies it."""

    centroids: torch.Tensor        # [K, D] part centroids
    part_to_object: torch.Tensor   # [K] int64, 0 = background
    foreground: torch.Tensor       # [K] bool
    metric: str = "cosine"
    params: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def n_objects(self) -> int:
        return int(self.part_to_object.max()) if self.k else 0

    def part_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., K] similarity to each part (cosine, or minus squared distance): higher is closer."""
        c = self.centroids.to(features.device, torch.float32)
        x = features.float()
        if self.metric == "cosine":
            return F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T
        return 2 * x @ c.T - (c * c).sum(-1) - (x * x).sum(-1, keepdim=True)

    def objects(self, parts: torch.Tensor) -> torch.Tensor:
        return self.part_to_object.to(parts.device)[parts]

    # ------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path, *, repo_id: str | None = None) -> Path:
        """Write config.json + model.safetensors + README.md card into ``folder``; the card's example loads
        ``repo_id`` when given (push_to_hub passes it)."""
        config = {"leopart_kind": "segmenter", "metric": self.metric, "k": self.k,
                  "n_objects": self.n_objects, "params": self.params}
        tensors = {"centroids": self.centroids.float(), "part_to_object": self.part_to_object.long(),
                   "foreground": self.foreground.to(torch.uint8)}
        return serialization.save_folder(folder, config, tensors, _card(self, repo_id))

    @classmethod
    def from_pretrained(cls, name: str | Path) -> "Segmenter":
        config, t = serialization.fetch_folder(name, "segmenter",
                                               missing=f"no segmenter folder {name} (and it is not an org/repo Hub id)")
        missing = {"centroids", "part_to_object", "foreground"} - set(t)
        if missing:
            raise LeopartError(f"{name} lacks {', '.join(sorted(missing))}")
        return cls(t["centroids"], t["part_to_object"].long(), t["foreground"].bool(),
                   config.get("metric", "cosine"), config.get("params", {}))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload leopart segmenter") -> str:
        model = self.params.get("model")
        if model and Path(model).is_absolute():  # as `leopart cluster` records a local model
            warnings.warn(f"this segmenter names its model by a local path ({model}), which users of {repo_id} "
                          "cannot load: push the model too and set params['model'] to its repo id first",
                          stacklevel=2)
        return serialization.push_folder(self.save_pretrained, repo_id, private=private, token=token,
                                         commit_message=commit_message)


def _card(seg: Segmenter, repo_id: str | None = None) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(seg.params.items()))
    return f"""---
library_name: leopart
pipeline_tag: image-segmentation
tags:
- leopart
- unsupervised-segmentation
---
# leopart segmenter

{plural(seg.k, 'part cluster')} merged into {plural(seg.n_objects, 'object')} ({plural(int(seg.foreground.sum()), 'foreground part')}),
fitted without labels by CBFE + community detection (Ziegler & Asano, CVPR 2022, section 4).

| parameter | value |
|---|---|
{rows}

```python
import leopart
# model and resolution default to the ones its parts were clustered with (parameters model, image_resolution);
# pass model= where that model is a local path that does not exist on your machine
mask = leopart.segment("image.jpg", segmenter="{repo_id or '<this repo or folder>'}")
```
"""


# ---------------------------------------------------------------------- CBFE
def cluster_foreground_scores(labels: Sequence[torch.Tensor], foreground: Sequence[torch.Tensor],
                              k: int) -> tuple[np.ndarray, np.ndarray]:
    """(share of each cluster's patches inside the foreground masks, patch count per cluster)."""
    inside = np.zeros(k, dtype=np.int64)
    total = np.zeros(k, dtype=np.int64)
    for lab, fg in zip(labels, foreground, strict=True):
        lab = torch.as_tensor(lab).flatten().cpu().numpy()
        fg = torch.as_tensor(fg).flatten().cpu().numpy().astype(bool)
        if lab.shape != fg.shape:
            raise LeopartError(f"a label grid has {lab.size} cells but its foreground mask {fg.size}")
        total += np.bincount(lab, minlength=k)[:k]
        inside += np.bincount(lab[fg], minlength=k)[:k]
    share = np.divide(inside, total, out=np.zeros(k), where=total > 0)
    return share, total


def cbfe(labels, foreground, k: int, bg_share: float | None = None) -> tuple[np.ndarray, dict]:
    """Foreground flag per cluster, and what was chosen (share, threshold)."""
    share, total = cluster_foreground_scores(labels, foreground, k)
    n = total.sum()
    if n == 0:
        raise LeopartError("no patches to merge")
    if bg_share is None:
        # Unsupervised default: as much background as the attention masks show, within the paper's sweep.
        fg_cells = sum(int(torch.as_tensor(f).sum()) for f in foreground)
        bg_share = float(np.clip(1.0 - fg_cells / n, 0.55, 0.75))
    if not 0.0 <= bg_share <= 1.0:
        raise LeopartError(f"bg_share must lie in [0, 1], not {bg_share}")
    order = np.lexsort((np.arange(k), share))  # ascending foreground share, ties by id
    cum = np.concatenate([[0.0], np.cumsum(total[order]) / n])  # cum[j]: share of patches in order[:j]
    j = int(np.argmin(np.abs(cum - bg_share)))
    fg = np.ones(k, dtype=bool)
    fg[order[:j]] = False
    threshold = float(share[order[j - 1]]) if j > 0 else -1.0
    return fg, {"bg_share": bg_share, "bg_share_actual": float(cum[j]), "fg_threshold": threshold}


# ------------------------------------------------------------------------ CD
def cooccurrence(labels: Sequence[torch.Tensor], fg: np.ndarray) -> np.ndarray:
    """[K, K] 8-neighbour co-occurrence of distinct foreground clusters, row-normalised per image and
    averaged over the images where each cluster has foreground neighbours."""
    k = len(fg)
    acc = np.zeros((k, k), dtype=np.float64)
    present = np.zeros(k, dtype=np.int64)
    for lab in labels:
        grid = torch.as_tensor(lab).cpu().numpy().astype(np.int64)
        if grid.ndim != 2:
            raise LeopartError(f"label grids must be [h, w], got shape {grid.shape}")
        h, w = grid.shape
        counts = np.zeros(k * k, dtype=np.int64)
        for dy, dx in NEIGHBOUR_OFFSETS:  # dy >= 0: cell (y, x) and its neighbour (y + dy, x + dx)
            a = grid[: h - dy, max(0, -dx): w - max(0, dx)]
            b = grid[dy:, max(0, dx): w - max(0, -dx)]
            a, b = a.ravel(), b.ravel()
            keep = fg[a] & fg[b] & (a != b)
            counts += np.bincount(a[keep] * k + b[keep], minlength=k * k)
            counts += np.bincount(b[keep] * k + a[keep], minlength=k * k)
        c = counts.reshape(k, k).astype(np.float64)
        rows = c.sum(axis=1)
        nz = rows > 0
        acc[nz] += c[nz] / rows[nz, None]
        present += nz
    return np.divide(acc, present[:, None], out=np.zeros_like(acc), where=present[:, None] > 0)


def graph_edges(weights: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Edges (i, j, w), i < j, where both directions weigh at least ``threshold``; w is the smaller (the
    reference's rule). NaN weights (parts never seen with a neighbour) make no edge."""
    both = np.fmin(weights, weights.T)
    keep = np.triu((weights >= threshold) & (weights.T >= threshold), k=1)
    return [(int(i), int(j), float(both[i, j])) for i, j in zip(*np.nonzero(keep))]


def communities(weights: np.ndarray, fg: np.ndarray, weight_threshold: float = 0.07, resolution: float = 1.0,
                seed: int = 0) -> np.ndarray:
    """part -> object ids (1..M; 0 for background parts) from Louvain communities of the weight graph."""
    k = len(fg)
    graph = nx.Graph()
    graph.add_nodes_from(int(i) for i in np.flatnonzero(fg))
    for i, j, w in graph_edges(weights, max(weight_threshold, 1e-12)):  # a zero weight is no edge
        if fg[i] and fg[j]:
            graph.add_edge(i, j, weight=w)
    if graph.number_of_edges():
        found = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    else:  # no edges: every part is its own object (networkx 3.0's Louvain divides by the zero total weight)
        found = [{n} for n in graph.nodes]
    found = sorted((sorted(c) for c in found), key=lambda c: (-len(c), c[0]))
    part_to_object = np.zeros(k, dtype=np.int64)
    for obj, members in enumerate(found, start=1):
        part_to_object[members] = obj
    return part_to_object


def check_weight_threshold(value) -> float:
    """A co-occurrence edge cut: a number in [0, 1], as the edge weights are row-normalised counts."""
    if not 0.0 <= number(value, "weight_threshold") <= 1.0:
        raise LeopartError(f"weight_threshold must lie in [0, 1], not {value!r}")
    return float(value)


def reference_weight_threshold(patch_size: int) -> float:
    """The reference's CD edge threshold: 0.07 for ViT-B/8 parts, 0.09 for ViT-S/16 ones."""
    return 0.07 if patch_size == 8 else 0.09


def merge(centroids: torch.Tensor | KMeansResult, labels: Sequence[torch.Tensor], foreground: Sequence[torch.Tensor],
          *, bg_share: float | None = None, weight_threshold: float = 0.07, resolution: float = 1.0, seed: int = 0,
          metric: str = "cosine", params: dict | None = None) -> Segmenter:
    """Fit a Segmenter from part clusters.

    centroids: [K, D] part centroids, or the KMeansResult of ``leopart.cluster`` (its metric is used).
    labels: per-image [h, w] part-id grids (or one [B, h, w] tensor).
    foreground: matching boolean foreground masks (e.g. from a DINO ViT-S/16's attention).
    bg_share: share of patches to call background (None: the masks' own share, clipped to [0.55, 0.75]).
    weight_threshold: co-occurrence edges below it are cut before community detection; the reference used
        0.07 for ViT-B/8 parts and 0.09 for ViT-S/16 ones (``reference_weight_threshold(patch_size)``, which
        `leopart merge` and ``segment.fit_segmenter`` apply: they know the patch size, labels alone do not).
    resolution: Louvain resolution: higher finds more, smaller objects.
    """
    if isinstance(centroids, KMeansResult):
        metric = centroids.metric
        centroids = centroids.centroids
    centroids = torch.as_tensor(centroids)
    if centroids.ndim != 2:
        raise LeopartError(f"centroids must be [K, D], got shape {tuple(centroids.shape)}")
    check_metric(metric)
    weight_threshold, resolution = check_weight_threshold(weight_threshold), number(resolution, "resolution")
    bg_share, seed = number(bg_share, "bg_share") if bg_share is not None else None, integer(seed, "seed")
    if not resolution > 0:
        raise LeopartError(f"the Louvain resolution must be positive, not {resolution}")
    labels, foreground = [torch.as_tensor(lab) for lab in labels], list(foreground)
    if len(labels) != len(foreground):
        raise LeopartError(f"{len(labels)} label grids but {len(foreground)} foreground masks")
    if not labels:
        raise LeopartError("merge needs at least one image's labels")
    if any(lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool for lab in labels):
        raise LeopartError("labels must be integer part ids (e.g. leopart.cluster's labels)")
    k = centroids.shape[0]
    filled = [lab for lab in labels if lab.numel()]
    if not filled:
        raise LeopartError("no patches to merge")
    low, top = min(int(lab.min()) for lab in filled), max(int(lab.max()) for lab in filled)
    if low < 0 or top >= k:
        raise LeopartError(f"labels hold part ids {low}..{top}, but the {k} centroids allow 0..{k - 1}")
    fg, chosen = cbfe(labels, foreground, k, bg_share)
    weights = cooccurrence(labels, fg)
    part_to_object = communities(weights, fg, weight_threshold, resolution, seed)
    all_params = {**(params or {}), **chosen, "k": k, "weight_threshold": weight_threshold,
                  "resolution": resolution, "seed": seed, "n_images": len(labels)}
    return Segmenter(centroids.float().cpu(), torch.from_numpy(part_to_object), torch.from_numpy(fg), metric,
                     all_params)

