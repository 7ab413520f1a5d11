"""Fully unsupervised segmentation as the reference code scores it (``leopart eval --fully-unsupervised``).

The steps of experiments/fully_unsup_seg/fully_unsup_seg.py in the Leopart repository, on the tokens of a
train split and the scored split together (both standardised and projected to 50 dimensions as one set):

1. CBFE, cluster-based foreground extraction: spherical k-means (faiss's: normalised means of the raw tokens) of
   all tokens into ``cbfe_k`` = 200 clusters. Each cluster's precision against the attention foreground mask, per
   image and averaged over the images that hold the cluster, is computed at the scoring size (100 x 100). Sorted by
   precision, the cuts that send 55% to 75% of the clusters to the background are tried on the train split against
   its masks (foreground: every label but 0, 255 included; mean per-image IoU); the best cut's precision, rounded
   to a multiple of 0.05, is the threshold, and each split keeps as foreground the clusters whose precision on that
   split reaches it.
2. The foreground tokens, upsampled nearest to 100 x 100, are clustered into ``k`` parts (Euclidean k-means,
   every pixel a point); background is part ``k``.
3. CD, community detection: in every 100 x 100 part map of both splits, the parts at distances 1 and 2 in
   8 directions (skimage's greycomatrix offsets) are counted, the diagonal zeroed, rows normalised per image
   and averaged over the images where the part has neighbours. Two parts are joined when the weights both
   ways reach ``weight_threshold`` (edge weight: the smaller one); Infomap (two-level, ``markov_time``, the
   preferred number of modules = classes - 1) finds the objects, ``runs`` times with different seeds.
4. Every run maps the scored split's parts to their module ids (parts outside the graph: 0) and is scored
   with one-to-one Hungarian matching; the mean over runs is reported.

Infomap is the ``infomap`` package (``pip install infomap``), as in the reference; leopart's own CBFE + Louvain
pipeline (``--protocol cosine``, leopart.merge) needs only networkx.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .cluster import KMeansResult
from .errors import LeopartError
from .merge import graph_edges
from .metrics import hungarian_miou

CBFE_K = 200                # clusters of the CBFE k-means (the reference's k_fg_extraction)
CBFE_CUTS = (0.55, 0.75)    # shares of the CBFE clusters sent to the background by the cuts tried
THRESHOLD_STEP = 0.05       # the chosen precision is rounded to a multiple of this
CD_RUNS = 10                # Infomap runs (seeds) averaged
CD_DISTANCES = (1, 2)
# greycomatrix's angles as the reference passed them (4 pi / 3, not 5 pi / 4: its offsets are those below).
CD_ANGLES = (0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi, 4 * math.pi / 3, 3 * math.pi / 2,
             7 * math.pi / 4)
INFOMAP_MISSING = ("the reference protocol's community detection is Infomap, as in the reference code: "
                   "pip install infomap (or pip install 'leopart[reference]'); --protocol cosine runs leopart's own "
                   "CBFE + Louvain with networkx")


def reference_markov_time(patch_size: int) -> float:
    """The reference's Infomap markov time: 0.4 for ViT-B/8 parts, 2 for ViT-S/16 ones."""
    return 0.4 if patch_size == 8 else 2.0


def check_infomap() -> None:
    try:
        import infomap  # noqa: F401
    except ImportError:
        raise LeopartError(INFOMAP_MISSING) from None


def _round_half_away(x: float) -> int:
    return int(x + 0.5) if x > 0 else int(x - 0.5)  # skimage's round (int() truncates towards zero)


def cooccurrence_offsets(distances=CD_DISTANCES, angles=CD_ANGLES) -> list[tuple[int, int]]:
    """(row, column) offsets that skimage.feature.greycomatrix counts for these distances and angles."""
    return [(_round_half_away(math.sin(a) * d), _round_half_away(math.cos(a) * d)) for a in angles for d in distances]


def upsample_index(grid: tuple[int, int], size: int) -> torch.Tensor:
    """[size, size] index into a flattened grid: nearest upsampling, as F.interpolate(mode="nearest")."""
    h, w = grid
    flat = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    return F.interpolate(flat, size=(size, size), mode="nearest")[0, 0].long()


def upsampled(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token-grid maps [B, h, w] -> [B, size, size] through an upsample_index."""
    return maps.reshape(maps.shape[0], -1)[:, index.flatten()].view(-1, *index.shape)


def cluster_precisions(labels: torch.Tensor, foreground: torch.Tensor, k: int, pixels: torch.Tensor) -> np.ndarray:
    """Per cluster: the share of its pixels inside the foreground mask, per image, averaged over the images
    that hold it (0 for clusters in no image). labels, foreground [B, h, w] on the token grid; ``pixels`` [h, w]:
    how many pixels of the upsampled map each token covers."""
    b = labels.shape[0]
    index = (torch.arange(b)[:, None] * k + labels.reshape(b, -1)).flatten()
    weights = pixels.reshape(1, -1).expand(b, -1).flatten().double()
    total = torch.bincount(index, weights=weights, minlength=b * k).view(b, k)
    inside = torch.bincount(index, weights=weights * foreground.reshape(-1).double(), minlength=b * k).view(b, k)
    present = total > 0
    per_image = torch.where(present, inside / total.clamp_min(1), torch.zeros_like(total))
    held = present.sum(0)
    return torch.where(held > 0, per_image.sum(0) / held.clamp_min(1), torch.zeros(k, dtype=torch.float64)).numpy()


@dataclass
class CBFECut:
    threshold: float        # clusters with at least this precision are foreground
    cut: int                # clusters sent to the background by the best cut on the train split
    train_iou: float        # its mean per-image foreground IoU on the train split


def choose_cbfe_cut(precisions: np.ndarray, labels: torch.Tensor, targets: list[np.ndarray],
                    index: torch.Tensor) -> CBFECut:
    """Try the cuts of the precision-sorted clusters against the train masks; round the best one's precision.
    labels [B, h, w] token-grid clusters of the train split, targets [B] masks at the scoring size, index: the
    scoring-size map into the token grid (upsample_index)."""
    k = len(precisions)
    order = np.argsort(precisions, kind="stable")
    starts = range(int(CBFE_CUTS[0] * k), int(CBFE_CUTS[1] * k))
    if len(starts) == 0:
        raise LeopartError(f"CBFE with {k} clusters tries no cut between {CBFE_CUTS[0]:.0%} and {CBFE_CUTS[1]:.0%} "
                           "of them: use more clusters")
    # Per image and cluster: pixels, and pixels on a ground-truth foreground label (anything but 0).
    up = upsampled(labels, index).flatten(1).numpy()
    area = np.stack([np.bincount(u, minlength=k) for u in up]).astype(np.float64)
    on_object = np.stack([np.bincount(u[t.reshape(-1) != 0], minlength=k) for u, t in zip(up, targets)])
    object_area = np.array([(t != 0).sum() for t in targets], dtype=np.float64)
    best = None
    for start in starts:
        foreground = np.zeros(k, dtype=bool)
        foreground[order[start:]] = True
        inter = on_object[:, foreground].sum(1)
        union = object_area + area[:, foreground].sum(1) - inter
        iou = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
        if best is None or iou >= best[1]:  # ties: the later cut, as the reference's stable sort picks
            best = (start, iou)
    best_precision = precisions[order[best[0]]]
    threshold = min(np.arange(0, 1, THRESHOLD_STEP), key=lambda x: abs(x - best_precision))
    return CBFECut(float(threshold), best[0], best[1])


def part_maps(tokens: torch.Tensor, foreground: torch.Tensor, k: int, fit: Callable, seed: int,
              pixels: torch.Tensor) -> torch.Tensor:
    """Cluster the foreground tokens, each weighted by the pixels it covers, into k parts; background -> k.
    tokens [B, h, w, D], foreground [B, h, w] -> part labels [B, h, w]."""
    points = tokens[foreground]
    if points.shape[0] < k:
        raise LeopartError(f"CBFE left {points.shape[0]} foreground patches, fewer than the {k} parts to cluster")
    repeats = pixels.unsqueeze(0).expand(foreground.shape)[foreground]
    km: KMeansResult = fit(points, k, "euclidean", seed, repeats)
    labels = torch.full(foreground.shape, k, dtype=torch.long)
    labels[foreground] = km.labels.cpu()
    return labels


def cooccurrence_weights(labels: torch.Tensor, levels: int, index: torch.Tensor, chunk: int = 128) -> np.ndarray:
    """[levels, levels] mean row-normalised neighbour counts of the parts (nan for parts with no neighbour in
    any image). labels [B, h, w] on the token grid, upsampled through ``index`` to the scoring size."""
    size = index.shape[0]
    offsets = cooccurrence_offsets()
    total = np.zeros((levels, levels))
    appears = np.zeros(levels)
    for start in range(0, labels.shape[0], chunk):
        up = upsampled(labels[start:start + chunk], index).numpy()
        n = up.shape[0]
        image = np.arange(n)[:, None, None] * levels * levels
        counts = np.zeros(n * levels * levels, dtype=np.int64)
        for dr, dc in offsets:
            r0, r1, c0, c1 = max(0, -dr), min(size, size - dr), max(0, -dc), min(size, size - dc)
            a = up[:, r0:r1, c0:c1]
            b = up[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
            counts += np.bincount((image + a * levels + b).ravel(), minlength=n * levels * levels)
        counts = counts.reshape(n, levels, levels)
        counts[:, np.arange(levels), np.arange(levels)] = 0  # a part next to itself says nothing
        rows = counts.sum(2, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0).sum(0)
        appears += (rows[:, :, 0] > 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / appears[:, None]


def infomap_modules(edges: list[tuple[int, int, float]], markov_time: float, preferred_modules: int,
                    seed: int) -> dict[int, int]:
    """node -> module id (from 1) of a two-level undirected Infomap run."""
    import infomap

    im = infomap.Infomap(f"--two-level --silent --seed {seed} --markov-time {markov_time:g} "
                         f"--preferred-number-of-modules {preferred_modules}")
    im.add_links(edges)
    im.run()
    # Read back through a .clu file: walking infomap's tree goes through a SWIG iterator that crashes the process
    # when another SWIG module (faiss) is imported after infomap.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "modules.clu")
        im.write_clu(path)
        with open(path) as f:
            rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return {int(node): int(module) for node, module, *_ in rows}


def reference_protocol(train_tokens: torch.Tensor, train_fg: torch.Tensor, train_targets: list[np.ndarray],
                       tokens: torch.Tensor, fg: torch.Tensor, targets: list[np.ndarray], *, k: int, num_classes: int,
                       fit: Callable, cbfe_k: int = CBFE_K, weight_threshold: float, markov_time: float,
                       runs: int = CD_RUNS, seed: int = 0, mask_size: int = 100) -> dict:
    """Score the fully unsupervised segmentation of the scored split (tokens [B, h, w, D], attention
    foreground fg [B, h, w], targets at mask_size) as the reference does, with the train split's alongside.
    ``fit(points, k, metric, seed, repeats)`` -> KMeansResult labelling every point (repeats: pixels per point).
    Returns {"miou": mean, "runs": [...], ...details} with mIoU in percent."""
    check_infomap()
    n_train = train_tokens.shape[0]
    grid = tuple(tokens.shape[1:3])
    index = upsample_index(grid, mask_size)
    pixels = torch.bincount(index.flatten(), minlength=grid[0] * grid[1]).view(grid)
    both = torch.cat([train_tokens, tokens])
    # 1. CBFE on the clusters of both splits; the cut is chosen on the train split's masks.
    cbfe = fit(both, cbfe_k, "cosine", seed, None).labels.cpu().view(both.shape[:3])
    train_precisions = cluster_precisions(cbfe[:n_train], train_fg, cbfe_k, pixels)
    cut = choose_cbfe_cut(train_precisions, cbfe[:n_train], train_targets, index)
    val_precisions = cluster_precisions(cbfe[n_train:], fg, cbfe_k, pixels)
    keep = [torch.from_numpy(p >= cut.threshold) for p in (train_precisions, val_precisions)]
    foreground = torch.cat([keep[0][cbfe[:n_train]], keep[1][cbfe[n_train:]]])
    # 2. Parts of the foreground; 3. their co-occurrence graph over both splits.
    parts = part_maps(both, foreground, k, fit, seed, pixels)
    weights = cooccurrence_weights(parts, k + 1, index)
    edges = graph_edges(weights, weight_threshold)
    if not edges:
        raise LeopartError(f"no two parts co-occur with weight >= {weight_threshold} both ways: lower the weight "
                           "threshold")
    # 4. Infomap runs, each scored on the scored split.
    scored = upsampled(parts[n_train:], index).numpy()
    mious, n_objects = [], []
    for run in range(runs):
        # Infomap seeds start at 1; the preferred number of modules is the number of object classes.
        modules = infomap_modules(edges, markov_time, max(num_classes - 1, 1), seed + run + 1)
        to_object = np.zeros(k + 1, dtype=np.int64)
        for node, module in modules.items():
            to_object[node] = module
        miou = hungarian_miou((to_object[p] for p in scored), targets, n_classes=num_classes, many_to_one=False)[0]
        mious.append(100.0 * miou)
        n_objects.append(len(set(modules.values())))
    share = float(foreground[n_train:].double().mul(pixels).sum() / (pixels.sum() * len(targets)))
    return {"miou": float(np.mean(mious)), "runs": mious, "n_objects": n_objects,
            "cbfe_threshold": round(cut.threshold, 6), "cbfe_cut": cut.cut, "cbfe_train_iou": 100.0 * cut.train_iou,
            "fg_share": share, "n_edges": len(edges)}
