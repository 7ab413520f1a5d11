"""Segmentation scores for unsupervised predictions: match clusters to classes, then mIoU.

Everything goes through a confusion matrix [clusters, classes] that is accumulated image by image
(``Confusion.update``), so a whole dataset never sits in memory.

Matching, as in Leopart's reference evaluation code:
- one-to-one (Hungarian, scipy): the assignment of clusters to distinct classes that maximises the sum of
  the matched (cluster, class) IoUs; clusters left without a class (more clusters than classes) are
  merged into class 0, the background (``unmatched_class``; None counts them as wrong everywhere);
- many-to-one (over-clustering): every cluster goes to the class it overlaps most, i.e. the class that
  makes the cluster's precision highest.
Then IoU_c = TP / (TP + FP + FN) per class; mIoU is the mean over classes that occur in the targets or the
matched predictions. Pixels whose target is ``ignore_index`` count nowhere.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import LeopartError


class Confusion:
    """Streaming [n_clusters, n_classes] pixel counts; grows as larger ids appear."""

    def __init__(self, n_clusters: int = 0, n_classes: int = 0, ignore_index: int | None = 255):
        self.counts = np.zeros((n_clusters, n_classes), dtype=np.int64)
        self.ignore_index = ignore_index

    def update(self, pred, target) -> "Confusion":
        pred, target = _as_int_array(pred, "prediction"), _as_int_array(target, "target")
        if pred.shape != target.shape:
            raise LeopartError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
        keep = target != self.ignore_index if self.ignore_index is not None else np.ones(target.shape, bool)
        pred, target = pred[keep], target[keep]
        if pred.size == 0:
            return self
        if pred.min() < 0 or target.min() < 0:
            raise LeopartError("predictions and targets must be non-negative integer ids")
        rows = max(self.counts.shape[0], int(pred.max()) + 1)
        cols = max(self.counts.shape[1], int(target.max()) + 1)
        if (rows, cols) != self.counts.shape:
            grown = np.zeros((rows, cols), dtype=np.int64)
            grown[: self.counts.shape[0], : self.counts.shape[1]] = self.counts
            self.counts = grown
        self.counts += np.bincount(pred * cols + target, minlength=rows * cols).reshape(rows, cols)
        return self

    def match(self, many_to_one: bool = False, n_classes: int | None = None, identity: bool = False,
              unmatched_class: int | None = 0) -> np.ndarray:
        """cluster -> class map (-1 for clusters that count as wrong everywhere). ``identity``: predictions
        already are class ids (supervised read-outs), so cluster i is class i."""
        counts = self._with_classes(n_classes)
        mapping = np.full(counts.shape[0], -1, dtype=np.int64)
        if counts.shape[0] == 0 or counts.shape[1] == 0:
            return mapping
        if identity:
            ids = np.arange(counts.shape[0])
            mapping[ids < counts.shape[1]] = ids[ids < counts.shape[1]]
        elif many_to_one:
            mapping[:] = counts.argmax(axis=1)
        else:
            cluster_sizes, class_sizes = counts.sum(axis=1, keepdims=True), counts.sum(axis=0, keepdims=True)
            union = cluster_sizes + class_sizes - counts
            iou = np.divide(counts, union, out=np.zeros(counts.shape), where=union > 0)
            rows, cols = linear_sum_assignment(iou, maximize=True)
            if unmatched_class is not None:
                mapping[:] = unmatched_class
            mapping[rows] = cols
        return mapping

    def miou(self, many_to_one: bool = False, n_classes: int | None = None, identity: bool = False,
             unmatched_class: int | None = 0) -> tuple[float, np.ndarray]:
        counts = self._with_classes(n_classes)
        mapping = self.match(many_to_one, n_classes, identity, unmatched_class)
        n_cls = counts.shape[1]
        matched = np.zeros((n_cls, n_cls), dtype=np.int64)  # [predicted class, true class]
        for cluster, cls in enumerate(mapping):
            if cls >= 0:
                matched[cls] += counts[cluster]
        tp = np.diag(matched).astype(np.float64)
        fp = matched.sum(axis=1) - tp
        fn = counts.sum(axis=0) - tp  # unmatched clusters' pixels are missed, never correct
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, tp / denom, np.nan)
        present = denom > 0
        return (float(np.mean(iou[present])) if present.any() else float("nan")), iou

    def _with_classes(self, n_classes: int | None) -> np.ndarray:
        if n_classes is None or n_classes == self.counts.shape[1]:
            return self.counts
        if n_classes < self.counts.shape[1]:
            raise LeopartError(f"targets hold class ids up to {self.counts.shape[1] - 1}, "
                               f"more than n_classes={n_classes}")
        return np.pad(self.counts, ((0, 0), (0, n_classes - self.counts.shape[1])))


def hungarian_miou(preds, targets, n_classes: int | None = None, many_to_one: bool = False,
                   ignore_index: int | None = 255, unmatched_class: int | None = 0) -> tuple[float, np.ndarray]:
    """mIoU of cluster ids ``preds`` against class ids ``targets`` after matching clusters to classes.

    preds and targets: same-shape integer arrays / tensors, or equally long iterables of them (consumed one
    pair at a time). ``unmatched_class``: where one-to-one matching puts the clusters it leaves over (the
    reference: class 0, background; None: nowhere, they are wrong everywhere).
    Returns (miou, per-class IoU array; NaN for classes absent from both sides).
    """
    confusion = Confusion(ignore_index=ignore_index)
    if _is_single(preds) and _is_single(targets):
        confusion.update(preds, targets)
    else:
        sentinel = object()
        pred_iter, target_iter = iter(preds), iter(targets)
        while True:
            p, t = next(pred_iter, sentinel), next(target_iter, sentinel)
            if p is sentinel or t is sentinel:
                if p is not t:
                    raise LeopartError("preds and targets hold different numbers of images")
                break
            confusion.update(p, t)
    return confusion.miou(many_to_one=many_to_one, n_classes=n_classes, unmatched_class=unmatched_class)


def _is_single(x) -> bool:
    return hasattr(x, "shape") and not isinstance(x, (list, tuple))


def _as_int_array(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iub":
        raise LeopartError(f"{what} must hold integer ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)

