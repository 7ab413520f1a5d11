"""k-means over patch features, streamed in chunks: ``leopart.cluster``.

Spherical (cosine) k-means by default, as Leopart's evaluation uses: features and centroids live on the
unit sphere, a point goes to the centroid of highest cosine, a centroid is the normalised mean of its
points, and the inertia is sum(1 - cos). ``raw_means=True`` is faiss's spherical k-means instead: a centroid is
the normalised mean of its points as they are, so each point weighs by its norm (in the inertia too, sum |x| (1 -
cos), which ranks runs as faiss's summed inner products do). ``metric="euclidean"`` is Lloyd's k-means with squared
distances.

Assignment uses ``leopart.kernels.nearest_prototype`` (Triton on GPU, chunked matmul+argmax on CPU), so
the N x K distance matrix never exists; sums are accumulated chunk by chunk. N = 1.1M, D = 384, K = 500
needs the features (1.7 GB in fp32) plus tens of MB on the CPU (2,048-row chunks: fresh temporaries of hundreds
of MB are paged in anew every time, which nearly doubled the time of each pass). On a GPU the features move
there when they fit; when they do not (ViT-B/8 tokens of PASCAL VOC val at 448 px are 14 GB), they stay in
host memory and each chunk is copied over as it is used.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .device import default_device
from .errors import LeopartError, integer, positive_int
from .kernels import nearest_prototype
from .kernels.similarity import chunk_rows
from .progress import progress_bar

METRICS = ("cosine", "euclidean")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise LeopartError(f"metric must be one of {', '.join(METRICS)}, not '{metric}'")


@dataclass
class KMeansResult:
    """What ``leopart.cluster`` found; ``predict(features)`` assigns new features [..., D] to its centroids."""

    centroids: torch.Tensor  # [K, D] fp32 (unit norm for cosine)
    labels: torch.Tensor     # [N] int64
    inertia: float           # sum of (1 - cos) for cosine, of squared distances for euclidean
    n_iter: int              # iterations run by the best init (fewer than asked when it converged)
    metric: str

    def predict(self, features: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        x = as_matrix(features)
        if x.shape[1] != self.centroids.shape[1]:
            raise LeopartError(f"features of dimension {x.shape[1]}, but the centroids have {self.centroids.shape[1]}")
        return _assign(x, self.centroids.to(x.device), self.metric, chunk_size or chunk_rows(x.device))[0]


def as_matrix(features) -> torch.Tensor:
    """[N, D] / [..., D] tensor or array, or an iterable of such batches -> one [N, D] tensor."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if isinstance(features, (str, os.PathLike)):  # characters are iterable too: never recurse into them
        raise LeopartError(f"cannot cluster a path ({features}): pass the features, e.g. leopart.embed's output, or "
                           "a `leopart embed -o` file once loaded (numpy.load, or safetensors.torch.load_file(path)"
                           "[\"features\"])")
    if not isinstance(features, torch.Tensor):
        if isinstance(features, Iterable):
            batches = [as_matrix(b) for b in features]
            if not batches:
                raise LeopartError("no features to cluster")
            dims = {b.shape[1] for b in batches}
            if len(dims) > 1:
                raise LeopartError(f"feature batches have different dimensions: {sorted(dims)}")
            features = torch.cat(batches)
        else:
            raise LeopartError(f"cannot cluster a {type(features).__name__}")
    if features.ndim < 2:
        raise LeopartError(f"features must be [N, D] or [..., D], got shape {tuple(features.shape)}")
    features = features.reshape(-1, features.shape[-1])
    if not features.is_floating_point():
        features = features.float()
    return features


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _place(x: torch.Tensor, device: torch.device, headroom: int = 1 << 30) -> torch.Tensor:
    """``x`` on ``device`` if it fits there with ``headroom`` bytes to spare, else ``x`` where it is (then each
    chunk goes over as it is used)."""
    if device.type == "cuda" and x.device != device:
        free, _ = torch.cuda.mem_get_info(device)
        if x.numel() * x.element_size() + headroom > free:
            return x
    return x.to(device)


def _assign(x: torch.Tensor, centroids: torch.Tensor, metric: str, chunk_size: int,
            sums: torch.Tensor | None = None, raw_means: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [N] and per-point distance [N] on the centroids' device, where the work runs (``x`` may be
    elsewhere); optionally accumulate per-cluster sums into ``sums`` (cosine: of unit vectors, or of the points
    as they are with ``raw_means``, which also weighs each distance by the point's norm)."""
    device = centroids.device
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=device)
    if metric == "euclidean":
        # argmin |x - c|^2 = argmax x.c - |c|^2 / 2: append a constant 1 to x and -|c|^2/2 to c.
        aug = torch.cat([centroids, -0.5 * (centroids * centroids).sum(1, keepdim=True)], dim=1)
    for start, stop in _chunks(x.shape[0], chunk_size):
        xc = x[start:stop].to(device, torch.float32)
        if metric == "cosine":
            idx, cos = nearest_prototype(xc, centroids, normalize=True)
            dist[start:stop] = (1.0 - cos) * xc.norm(dim=1) if raw_means else 1.0 - cos
            if sums is not None:
                sums.index_add_(0, idx, xc if raw_means else F.normalize(xc, dim=1))
        else:
            ones = torch.ones(xc.shape[0], 1, device=device)
            idx, score = nearest_prototype(torch.cat([xc, ones], 1), aug, normalize=False)
            dist[start:stop] = ((xc * xc).sum(1) - 2.0 * score).clamp_min(0.0)
            if sums is not None:
                sums.index_add_(0, idx, xc)
        labels[start:stop] = idx
    return labels, dist


def _kmeans_pp(x: torch.Tensor, k: int, metric: str, generator: torch.Generator, sample_size: int,
               device: torch.device) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) on ``device``, on a random subsample of at most ``sample_size`` points."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=generator)[:sample_size] if n > sample_size else torch.arange(n)
    pts = x[pick.to(x.device)].to(device, torch.float32)
    if metric == "cosine":
        pts = F.normalize(pts, dim=1)
    # One buffer for the k differences: a fresh [sample_size, D] temporary per step made seeding 6x slower
    # on the CPU (k = 500: 9.7 s -> 1.4 s for 10,000 points), with bit-identical results.
    diff = torch.empty_like(pts)

    def d2_to(i: int) -> torch.Tensor:
        return torch.sub(pts, pts[i], out=diff).square_().sum(1)

    chosen = [int(torch.randint(len(pts), (1,), generator=generator))]
    d2 = d2_to(chosen[0])
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: take any not yet chosen
            probs = torch.ones_like(d2).cpu()
        else:
            probs = (d2 / total).cpu()
        chosen.append(int(torch.multinomial(probs.double(), 1, generator=generator)))
        torch.minimum(d2, d2_to(chosen[-1]), out=d2)
    return pts[chosen]


def _init_centroids(x, k, metric, init, generator, device) -> torch.Tensor:
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.shape[1]):
            raise LeopartError(f"init centroids must be [{k}, {x.shape[1]}], got {tuple(init.shape)}")
        c = init.to(device, torch.float32)
    elif init == "k-means++":
        c = _kmeans_pp(x, k, metric, generator, sample_size=max(20 * k, 10_000), device=device)
    elif init == "random":
        c = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].to(device, torch.float32)
    else:
        raise LeopartError(f"init must be 'k-means++', 'random' or a [K, D] tensor, not {init!r}")
    return F.normalize(c, dim=1) if metric == "cosine" else c


def cluster(features, k: int, iters: int = 50, n_init: int = 1, seed: int = 0, metric: str = "cosine",
            init: str | torch.Tensor = "k-means++", device=None, chunk_size: int | None = None,
            progress: bool | None = None, raw_means: bool = False) -> KMeansResult:
    """k-means of ``features`` ([N, D], [B, h, w, D], an array, or an iterable of batches) into ``k`` clusters.

    Runs on ``device`` (default: where the features are). Deterministic for a seed on CPU (on GPU, up to the
    float rounding of atomic sums). Empty clusters are re-seeded with the points farthest from their
    centroids. Stops early once no label changes. ``chunk_size``: rows assigned at a time (default 2,048 on
    the CPU, 65,536 on a GPU: ``kernels.similarity.chunk_rows``); a memory and speed matter, the result on
    the CPU is the same for any. ``raw_means`` (cosine only): centroids average the points as they are, then
    are normalised, as faiss's spherical k-means (default: the unit vectors are averaged).
    """
    check_metric(metric)
    if raw_means and metric != "cosine":
        raise LeopartError("raw_means is an option of spherical k-means: it needs metric='cosine'")
    x = as_matrix(features)
    n, d = x.shape
    k = positive_int(k, "k")
    if k > n:
        raise LeopartError(f"k={k} is larger than the number of feature vectors ({n})")
    iters, n_init, seed = integer(iters, "iters", minimum=0), positive_int(n_init, "n_init"), integer(seed, "seed")
    # Chunk by chunk: one bool mask of all N x D (422 MB at 1.1M x 384) took 3 s to page in on the CPU.
    if not all(torch.isfinite(x[start:stop]).all() for start, stop in _chunks(n, 16384)):
        raise LeopartError("features contain NaN or infinite values")
    device = default_device(device) if device is not None else x.device
    x = _place(x, device)
    chunk_size = chunk_size or chunk_rows(device)
    best: KMeansResult | None = None
    for run in range(n_init):
        generator = torch.Generator().manual_seed(seed + run)
        result = _lloyd(x, k, iters, metric, _init_centroids(x, k, metric, init, generator, device), chunk_size,
                        progress, desc=f"k-means k={k}" + (f" init {run + 1}/{n_init}" if n_init > 1 else ""),
                        raw_means=raw_means)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def _lloyd(x, k, iters, metric, centroids, chunk_size, progress, desc, raw_means=False) -> KMeansResult:
    labels = None
    n_iter = 0
    bar = progress_bar(total=iters, desc=desc, unit="it", progress=progress, leave=False)
    for n_iter in range(iters):
        sums = torch.zeros_like(centroids)
        new_labels, dist = _assign(x, centroids, metric, chunk_size, sums=sums, raw_means=raw_means)
        counts = torch.bincount(new_labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            # Re-seed each empty cluster with one of the points that are currently worst served.
            far = x[dist.topk(len(empty)).indices.to(x.device)].to(sums.device, torch.float32)
            sums[empty] = far if metric == "euclidean" else F.normalize(far, dim=1)
            counts[empty] = 1
        centroids = sums / counts[:, None].to(sums.dtype)
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=1)
        bar.set_postfix(inertia=f"{dist.sum().item():.4g}", refresh=False)
        bar.update(1)
        converged = labels is not None and len(empty) == 0 and torch.equal(new_labels, labels)
        labels = new_labels
        if converged:
            break
    bar.close()
    labels, dist = _assign(x, centroids, metric, chunk_size, raw_means=raw_means)
    # A point on its centroid can come out a hair below 0 (a cosine rounded above 1): no inertia is negative.
    inertia = float(dist.double().clamp_min(0).sum())
    if not math.isfinite(inertia):
        raise LeopartError("k-means diverged (non-finite inertia)")
    return KMeansResult(centroids.cpu(), labels.cpu(), inertia, n_iter + 1 if iters else 0, metric)
