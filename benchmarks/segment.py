"""Upsampling part scores to a photo's full size: leopart's candidate-pruned argmax vs interpolating every channel.

    python -m benchmarks.segment [--device cuda] [--height 3000 --width 4000]

Part scores come from the same source as in `leopart segment`: a ViT-S/16 (random weights: no network here)
embeds 16 synthetic 448 px scenes, k-means fits K parts on their patches, and the scores of one scene's
28 x 28 patches against the K centroids are upsampled to the photo size. The baseline is the previous
implementation: bilinear-interpolate every channel (a slice at a time, running max), then take the argmax.
Rows "segment one photo" time the whole `leopart.segment` call on a photo of that size with a K-part segmenter
(decode, model, parts, objects), once with each upsampling. How many channels survive the pruning depends
on the features: the mean per source cell is reported.
"""
from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import leopart
from benchmarks.common import random_vits16, timeit, write_results
from leopart.segment import _source_cells, cell_candidates, dense_features, fit_segmenter, upsample_argmax
from leopart.synthetic import make_scene

segment_module = importlib.import_module("leopart.segment")  # leopart.segment is the function


def interpolate_every_channel(scores: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 25):
    """The baseline (leopart before the pruning): every channel upsampled, a slice at a time, running max."""
    maps = scores.permute(2, 0, 1)[None].float()
    step = max(1, max_elements // (size[0] * size[1]))
    best = best_idx = None
    for start in range(0, maps.shape[1], step):
        val, idx = F.interpolate(maps[:, start:start + step], size=size, mode="bilinear", align_corners=False)[0].max(0)
        if best is None:
            best, best_idx = val, idx
        else:
            better = val > best
            best, best_idx = torch.where(better, val, best), torch.where(better, idx + start, best_idx)
    return best_idx


def value_gap(scores: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference between the interpolated scores of the channels ``a`` and ``b`` pick, where they differ."""
    ys, xs = (a != b).nonzero(as_tuple=True)
    if not len(ys):
        return 0.0
    h, w, _ = scores.shape
    y0, ly = _source_cells(a.shape[0], h, scores.device)
    x0, lx = _source_cells(a.shape[1], w, scores.device)
    y0, ly, x0, lx = y0[ys], ly[ys, None], x0[xs], lx[xs, None]
    y1, x1 = (y0 + 1).clamp_max(h - 1), (x0 + 1).clamp_max(w - 1)
    picked = torch.stack([a[ys, xs], b[ys, xs]], 1)

    def at(yy, xx):
        return scores[yy, xx].gather(1, picked)

    values = (1 - ly) * ((1 - lx) * at(y0, x0) + lx * at(y0, x1)) + ly * ((1 - lx) * at(y1, x0) + lx * at(y1, x1))
    return float((values[:, 0] - values[:, 1]).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 21, 149])
    args = ap.parse_args()
    size = (args.height, args.width)
    rng = np.random.default_rng(0)
    scenes = [Image.fromarray(make_scene(rng, 448)[0]) for _ in range(16)]
    photo = scenes[0].resize((args.width, args.height), Image.BICUBIC)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = random_vits16(Path(tmp) / "model")
        model = model.to(args.device).eval()
        dense = dense_features(scenes, model, 448, device=args.device, progress=False)
        for k in args.ks:
            segmenter, _ = fit_segmenter(dense, k, device=args.device, progress=False)
            scores = segmenter.part_scores(dense.features[0]).to(args.device)
            ours = timeit(lambda: upsample_argmax(scores, size), args.device)
            baseline = timeit(lambda: interpolate_every_channel(scores, size), args.device)
            a, b = upsample_argmax(scores, size), interpolate_every_channel(scores, size)
            task = f"upsample {k} part scores 28x28 -> {args.height}x{args.width}"
            rows += [{"task": task, "impl": "leopart (pruned)", "seconds": ours, "speed-up": baseline / ours,
                      "candidates per cell": float(cell_candidates(scores)[2].float().mean()),
                      "pixels differing": int((a != b).sum()), "value gap there": value_gap(scores, a, b)},
                     {"task": task, "impl": "interpolate every channel", "seconds": baseline, "speed-up": 1.0}]

            def run():
                return leopart.segment(photo, model=model, segmenter=segmenter, device=args.device)

            ours = timeit(run, args.device, repeat=1)
            real = segment_module.upsample_argmax
            segment_module.upsample_argmax = interpolate_every_channel
            try:
                baseline = timeit(run, args.device, repeat=1)
            finally:
                segment_module.upsample_argmax = real
            task = f"leopart.segment one {args.height}x{args.width} photo, {k} parts"
            rows += [{"task": task, "impl": "leopart (pruned)", "seconds": ours, "speed-up": baseline / ours},
                     {"task": task, "impl": "interpolate every channel", "seconds": baseline, "speed-up": 1.0}]
    write_results(f"segment_{'cuda' if args.device.startswith('cuda') else 'cpu'}", args.device, rows,
                  ["task", "impl", "seconds", "speed-up", "candidates per cell", "pixels differing",
                   "value gap there"],
                  note="Median of 3 runs after a warm-up (upsampling), 1 run after a warm-up (whole call). Part "
                       "scores: k-means centroids of a random-weight ViT-S/16's patch tokens on synthetic "
                       "scenes. 'pixels differing': where the two pick different channels, and the largest difference of those channels' interpolated scores there (0: ties).")


if __name__ == "__main__":
    main()
