"""Training step speed and how much of it is Leopart's own overhead, in one run.

    python -m benchmarks.train [--device cuda] [--recipe vits16 | cpu-small] [--steps 10]

For a recipe it measures, on the same pre-built multi-crop batch (so data loading is not in the step):
  leopart step:          Learner.step, the whole optimisation step (teacher forward with attention, Sinkhorn,
                         foreground masks, RoI-align, loss, backward, AdamW, EMA);
  backbone fwd+bwd:      the floor: the teacher backbone's forward on the global crops and the student
                         backbone's forward and backward on every crop, under the same autocast;
  + projection head:     the same with the 3-layer projection head and prototypes (part of the model: the
                         head's 2048-wide MLP runs on every patch token, so it weighs more for small ViTs);
and reports overhead = 1 - backbone / step (target: <= 15%); the gap between the second row and the step is
what Leopart's objective adds (Sinkhorn, foreground masks, RoI-align, loss, AdamW, EMA). A third row times the data loader alone
(decode + multi-crop augmentation with --workers processes), to show whether it can keep up.
Weights are random (no network here): speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import sync, timeit, write_results
from leopart import data
from leopart.device import autocast
from leopart.train import Learner, TrainConfig, build_model

RECIPES = {
    # the paper's ViT-S/16 recipe: 32 images, 2 x 224 px + 4 x 96 px crops, 300 prototypes
    "vits16": dict(arch="vit_small_patch16_224", batch_size=32, global_size=224, local_size=96),
    "vits16-queue": dict(arch="vit_small_patch16_224", batch_size=32, global_size=224, local_size=96,
                         queue_length=8192),
    # small enough for a 2-core CPU
    "cpu-small": dict(arch="vit_tiny_patch16_224", batch_size=8, global_size=128, local_size=64),
}


def make_batch(cfg: TrainConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(n)]
    dataset = data.MultiCropDataset(images, cfg.crops(), seed=seed)  # load_image takes PIL images too
    return data.collate_views([dataset[(0, i)] for i in range(n)])


def network_only(learner: Learner, crops: list[torch.Tensor], n_global: int, device: torch.device, heads: bool):
    """The network work a step cannot avoid: teacher forward (globals), student forward + backward (all);
    the backbone alone, or with the projection head and prototypes (``heads``)."""
    model, teacher = learner.model, learner.teacher

    def run(net, x):
        return net(x).scores if heads else net.forward_features(x)

    with autocast(device):
        with torch.no_grad():
            run(teacher, torch.cat(crops[:n_global]))
        loss = 0.0
        for size in dict.fromkeys(c.shape[-1] for c in crops):
            batch = torch.cat([c for c in crops if c.shape[-1] == size])
            loss = loss + run(model, batch).float().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()


def time_loader(cfg: TrainConfig, workers: int, n_images: int) -> float:
    """Images per second out of the DataLoader (JPEG decode + views), like train() builds it: the first batch of
    every worker is start-up, then three batches per worker are timed (the files repeat over epochs)."""
    import tempfile
    from pathlib import Path

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_images):
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(Path(tmp) / f"{i}.jpg")
        files = data.list_training_images(tmp)
        dataset = data.MultiCropDataset(files, cfg.crops())
        sampler = data.EpochSampler(len(files), cfg.batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                             num_workers=workers, collate_fn=data.collate_views)
        batches = iter(loader)
        for _ in range(max(1, workers)):  # worker start-up is not throughput
            next(batches)
        t0 = time.perf_counter()
        n_batches = 3 * max(1, workers)
        for _ in range(n_batches):
            next(batches)
        return n_batches * cfg.batch_size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--recipe", nargs="+", default=None, choices=sorted(RECIPES))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    device = torch.device(args.device)
    recipes = args.recipe or (["vits16", "vits16-queue"] if device.type == "cuda" else ["cpu-small"])
    rows = []
    for name in recipes:
        torch.manual_seed(0)
        cfg = TrainConfig(init="random", progress=False, **RECIPES[name])
        learner = Learner(build_model(cfg), cfg, device)
        crops, boxes, _ = make_batch(cfg, cfg.batch_size)
        crops = [c.to(device) for c in crops]
        if learner.queue is not None:
            learner.queue_filled = learner.queue_length  # time the step with a full queue, as in steady state
        total = 1000
        losses = []
        t_step = timeit(lambda: losses.append(learner.step(crops, boxes, len(losses), total)), args.device,
                        warmup=2, repeat=args.steps)
        t_backbone = timeit(lambda: network_only(learner, crops, cfg.n_global, device, heads=False), args.device,
                            warmup=2, repeat=args.steps)
        t_network = timeit(lambda: network_only(learner, crops, cfg.n_global, device, heads=True), args.device,
                           warmup=2, repeat=args.steps)
        sync(args.device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else "-"
        label = f"{name}: {cfg.arch}, batch {cfg.batch_size}, {cfg.n_global}x{cfg.global_size}+" \
                f"{cfg.n_local}x{cfg.local_size} px, K={learner.model.config.num_prototypes}, queue {cfg.queue_length}"
        rows.append({"recipe": label, "what": "backbone fwd+bwd (floor)", "ms/step": t_backbone * 1e3,
                     "images/s": cfg.batch_size / t_backbone})
        rows.append({"recipe": label, "what": "backbone + projection head fwd+bwd", "ms/step": t_network * 1e3,
                     "images/s": cfg.batch_size / t_network, "overhead": f"{1 - t_backbone / t_network:.1%}"})
        rows.append({"recipe": label, "what": "leopart step", "ms/step": t_step * 1e3, "steps/s": 1 / t_step,
                     "images/s": cfg.batch_size / t_step, "overhead": f"{1 - t_backbone / t_step:.1%}",
                     "peak GiB": peak, "loss": losses[-1]})
        loader_rate = time_loader(cfg, args.workers, 4 * cfg.batch_size)
        rows.append({"recipe": label, "what": f"data loader, {args.workers} workers", "images/s": loader_rate})
        del learner
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    write_results(f"train_{device.type}", args.device, rows,
                  ["recipe", "what", "ms/step", "steps/s", "images/s", "overhead", "peak GiB", "loss"],
                  note="Median of the timed steps after 2 warm-up steps, random init; overhead = share of the step "
                       "outside the backbone's forward and backward (target <= 15%). bf16 autocast on CUDA.")


if __name__ == "__main__":
    main()
