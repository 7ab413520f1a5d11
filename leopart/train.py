"""Fine-tune a ViT with the Leopart objective: ``leopart.train`` / ``leopart train``.

The story of one step (Ziegler & Asano, CVPR 2022; every default below is the paper's):
  1. renormalise the prototypes of student and teacher;
  2. the teacher (an EMA of the student) scores the global crops' patches against its prototypes;
     Sinkhorn-Knopp turns each global crop's scores (optionally after a queue of past teacher patch
     embeddings) into balanced soft assignments, the targets;
  3. the student scores every crop; for every (global crop g, other crop v) pair, g's targets and v's
     scores are RoI-aligned (7x7) onto their overlap box, and the loss is the cross-entropy between the
     targets and softmax(scores / 0.1), over positions the teacher's attention marks as foreground;
  4. AdamW step (cosine lr and weight decay per step, optional gradient clipping), then the EMA teacher update.

Checkpoints (model, teacher, optimizer, queue, RNG, step) are written atomically every ``save_every`` steps
and on Ctrl-C; ``resume=True`` continues exactly where a run stopped, data order included.
Under ``torchrun`` it trains with DistributedDataParallel and distributed Sinkhorn: the loss equals the
single-process loss on the same global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from . import data
from .augment import CROP_REDRAW, PHOTOMETRIC, CropConfig
from .device import autocast, default_device, launched_processes, rng_state, set_rng_state
from .errors import LeopartError, check_kinds, plural
from .foreground import foreground_mask
from .hub import from_pretrained
from .kernels import sinkhorn
from .model import LeopartConfig, LeopartViT
from .progress import progress_bar
from .serialization import CONFIG_NAME, WEIGHTS_NAME, atomic_path, read_config, write_text

LOSS_MASKS = ("all", "fg", "bg")
# A run's output folder: config.json, metrics.jsonl (eval.jsonl), CHECKPOINT_NAME, once finished MODEL_NAME/, and
# IMAGE_LIST_NAME when leopart.train was given a Python list of paths.
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model"
IMAGE_LIST_NAME = "images.txt"
RANDOM_ARCH = "vit_small_patch16_224"  # the ViT of init="random" unless arch says otherwise
QUEUE_PER_IMAGE = 10  # teacher embeddings a step adds to the queue per image (and global crop), as the reference
# What runs recorded before these settings existed trained with (their checkpoints lack them).
LEGACY_DEFAULTS = {"photometric": "dino", "hue": 0.1, "grad_clip": 3.0, "eval_resolution": None, "crop_redraw": "all"}
# Settings a resumed run may change; everything else must match the checkpoint.
RESUMABLE_OVERRIDES = {"steps", "epochs", "save_every", "workers", "device", "eval_data", "eval_every", "eval_k",
                       "eval_resolution", "output", "data", "progress"}


@dataclass
class TrainConfig:
    """Every setting of a training run (the keyword arguments of ``leopart.train``); the defaults are the
    paper's recipe (learning rates by the model's patch size, as its configs), but for the queue, which is off
    unless asked."""

    data: str = ""
    output: str = "runs/leopart"
    init: str = "dino-vits16"            # alias | org/repo | path | "random"
    arch: str | None = None              # timm name: init="random"'s ViT (default RANDOM_ARCH), or an init
                                         # weights file's, where its weights do not tell (DINOv3, EVA)
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)  # timm overrides for init="random"
    proj_hidden_dim: int = 2048          # projection head, for init="random"
    proj_dim: int = 256
    steps: int | None = None             # total steps of the run; default: epochs
    epochs: int = 50
    batch_size: int = 32                 # global batch (split over processes)
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.25, 1.0)  # crop area as a share of the image
    local_scale: tuple[float, float] = (0.05, 0.25)
    jitter: bool = True                  # colour jitter, grayscale and blur (flips always)
    hue: float = 0.2                     # largest hue shift of the jitter
    blur: bool = True                    # Gaussian blur in the jitter
    photometric: str = "reference"       # jitter strengths and blur odds: "reference" or "dino" (augment.PHOTOMETRIC)
    crop_redraw: str = "each"            # crops redrawn one at a time until they overlap (the reference's) or "all"
    num_prototypes: int | None = None    # default: the init model's own (300 for DINO and random init)
    lr_backbone: float | None = None     # default: the reference's for the model (learning_rates)
    lr_heads: float | None = None
    final_lr: float = 0.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.5
    momentum_teacher: float = 0.9995
    momentum_teacher_end: float = 1.0
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    temperature: float = 0.1
    queue_length: int = 0                # past teacher embeddings per global crop (over all processes); 0: none
    loss_mask: str = "fg"                # all | fg | bg
    roi_size: int = 7
    drop_path: float = 0.1
    train_last_blocks: int | None = None
    grad_clip: float | None = None       # gradient norm clipping (the reference did not clip)
    save_every: int = 500
    workers: int = 4
    device: str | None = None
    seed: int = 0
    eval_data: str | None = None
    eval_every: int = 1000
    eval_k: tuple[int, ...] = (500, 300, 21)  # k-means k scored during training (the reference's)
    eval_resolution: int | None = 448    # their input side (the reference's); None: global_size
    progress: bool | None = None

    def __post_init__(self):
        # JSON (config.json, checkpoints) turns tuples into lists: keep one form so resumed configs compare equal.
        self.global_scale, self.local_scale = tuple(self.global_scale), tuple(self.local_scale)
        self.eval_k = tuple(self.eval_k) if isinstance(self.eval_k, (list, tuple)) else (self.eval_k,)

    @property
    def eval_size(self) -> int:
        """Input side of the evaluations during training."""
        return self.eval_resolution or self.global_size

    def crops(self) -> CropConfig:
        return CropConfig(global_size=self.global_size, local_size=self.local_size, n_global=self.n_global,
                          n_local=self.n_local, global_scale=self.global_scale, local_scale=self.local_scale,
                          jitter=self.jitter, hue=self.hue, blur=self.blur, photometric=self.photometric,
                          redraw=self.crop_redraw)

    def check(self):
        """One line naming the first setting out of its range, before any work (not a torch error mid-run)."""
        check_kinds(self)
        if self.loss_mask not in LOSS_MASKS:
            raise LeopartError(f"loss_mask must be one of {', '.join(LOSS_MASKS)}, not '{self.loss_mask}'")
        if self.photometric not in PHOTOMETRIC:
            raise LeopartError(f"photometric must be one of {', '.join(PHOTOMETRIC)}, not '{self.photometric}'")
        if self.crop_redraw not in CROP_REDRAW:
            raise LeopartError(f"crop_redraw must be one of {', '.join(CROP_REDRAW)}, not '{self.crop_redraw}'")
        for name in ("batch_size", "global_size", "local_size", "n_global", "num_prototypes", "save_every", "steps",
                     "epochs", "sinkhorn_iters", "roi_size", "eval_every", "eval_resolution"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LeopartError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("n_local", "queue_length", "lr_backbone", "lr_heads", "final_lr", "weight_decay",
                     "weight_decay_end"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise LeopartError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        ranges = {"momentum_teacher": (0, 1), "momentum_teacher_end": (0, 1), "hue": (0, 0.5)}
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise LeopartError(f"{name} must lie in [{low}, {high}], not {getattr(self, name)!r}")
        if not 0 <= self.drop_path < 1:
            raise LeopartError(f"drop_path must lie in [0, 1), not {self.drop_path!r}")
        for name in ("epsilon", "temperature") + (("grad_clip",) if self.grad_clip is not None else ()):
            if not getattr(self, name) > 0:
                raise LeopartError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("global_scale", "local_scale"):
            scale = getattr(self, name)
            numbers_ = len(scale) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scale)
            if not (numbers_ and 0 < scale[0] <= scale[1] <= 1):
                raise LeopartError(f"{name} must be (low, high) with 0 < low <= high <= 1, not {scale}")
        if not self.eval_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.eval_k):
            raise LeopartError(f"eval_k must be positive integers, not {self.eval_k!r}")
        if self.n_global + self.n_local < 2:
            raise LeopartError("the loss needs at least two crops per image (n_global + n_local >= 2)")


# ------------------------------------------------------------------- schedules
def cosine(start: float, end: float, step: int, total: int) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at step ``total``."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


# ---------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> LeopartViT:
    if cfg.init == "random":
        model = LeopartViT(LeopartConfig(arch=cfg.arch or RANDOM_ARCH, img_size=cfg.global_size,
                                         num_prototypes=cfg.num_prototypes or LeopartConfig.num_prototypes,
                                         proj_hidden_dim=cfg.proj_hidden_dim, proj_dim=cfg.proj_dim,
                                         backbone_kwargs=dict(cfg.backbone_kwargs)))
    else:
        model = from_pretrained(cfg.init, arch=cfg.arch)  # arch matters only to a weights file
        # A Leopart model keeps its trained prototypes unless another count is asked for.
        if cfg.num_prototypes is not None and model.config.num_prototypes != cfg.num_prototypes:
            model.config.num_prototypes = cfg.num_prototypes
            model.prototypes = nn.Linear(model.config.proj_dim, cfg.num_prototypes, bias=False)
            nn.init.trunc_normal_(model.prototypes.weight, std=0.02)
    if cfg.loss_mask != "all":  # the teacher's CLS attention picks the patches the loss counts
        model.check_attention()
    p = model.patch_size
    crops = {"global_size": cfg.global_size, "local_size": cfg.local_size}
    bad = [f"{name} {size}" for name, size in crops.items() if size % p]
    if bad:  # e.g. the paper's 96 px local crops for a patch-14 model
        raise LeopartError(f"crop sides must be multiples of the model's patch size {p}, not {', '.join(bad)}: e.g. "
                           f"--global-size {max(1, round(224 / p)) * p} --local-size {max(1, round(96 / p)) * p}")
    set_drop_path(model, cfg.drop_path)
    if cfg.train_last_blocks is not None:
        n = cfg.train_last_blocks
        blocks = model.backbone.blocks
        if not 0 <= n <= len(blocks):
            raise LeopartError(f"train_last_blocks must lie in 0..{len(blocks)}")
        # The final norm belongs to the last block's output: it trains with it (0 blocks: backbone frozen).
        trained = tuple(f"blocks.{i}." for i in range(len(blocks) - n, len(blocks))) + (("norm.",) if n else ())
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(name.startswith(trained))
    model.normalize_prototypes()
    return model


def set_drop_path(model: LeopartViT, rate: float):
    """Stochastic depth, linearly increasing over the blocks (as timm builds it), on a built model."""
    from timm.layers import DropPath

    blocks = model.backbone.blocks
    for i, blk in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(blk, attr):
                setattr(blk, attr, DropPath(p) if p > 0 else nn.Identity())


def learning_rates(cfg: TrainConfig, patch_size: int) -> tuple[float, float]:
    """(backbone, heads) learning rates: those asked for, else the reference's COCO configs' for the patch size,
    1e-5 and 1e-4, or 5e-6 and 5e-5 for patch 8 (its ViT-B/8; its ViT-S/16 and ViT-B/16 share the first)."""
    backbone, heads = (5e-6, 5e-5) if patch_size == 8 else (1e-5, 1e-4)
    return (backbone if cfg.lr_backbone is None else cfg.lr_backbone,
            heads if cfg.lr_heads is None else cfg.lr_heads)


def param_groups(model: LeopartViT, cfg: TrainConfig) -> list[dict]:
    """Backbone and heads get their own lr; biases and norms (1-d parameters) get no weight decay."""
    groups = {(part, decay): [] for part in ("backbone", "heads") for decay in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "heads"
        groups[(part, p.ndim > 1 and not name.endswith(".bias"))].append(p)
    lr = dict(zip(("backbone", "heads"), learning_rates(cfg, model.patch_size)))
    return [{"params": ps, "base_lr": lr[part], "lr": lr[part], "decay": decay,
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (part, decay), ps in groups.items() if ps]


class MultiCrop(nn.Module):
    """Runs the model once per crop size, so DistributedDataParallel sees one forward per step.

    Returns the prototype scores [B, h, w, K] of every crop, in the order of ``crops``.
    """

    def __init__(self, model: LeopartViT):
        super().__init__()
        self.model = model

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [c.shape[-1] for c in crops]
        scores: list[torch.Tensor] = [None] * len(crops)
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            out = self.model(torch.cat([crops[i] for i in idx])).scores
            for j, chunk in zip(idx, out.chunk(len(idx))):
                scores[j] = chunk
        return scores


# ----------------------------------------------------------------------- loss
def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rois(boxes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 4] pixel boxes -> roi_align's [B, 5] (batch index, x0, y0, x1, y1) in patch units."""
    idx = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None]
    return torch.cat([idx, boxes / patch_size], dim=1)


def leopart_loss(student: nn.Module, teacher: LeopartViT, crops: list[torch.Tensor], boxes: torch.Tensor,
                 cfg: TrainConfig, queue: torch.Tensor | None = None):
    """The Leopart objective on one (per-process) batch.

    student: a MultiCrop (optionally DDP-wrapped); teacher: the EMA model; crops: n_crops tensors [B, 3, S, S];
    boxes: [B, n_global, n_crops, 2, 4] from augment.make_views; queue: [n_global, L, proj_dim] or None, past
    teacher embeddings scored with the student's prototypes and prepended to the teacher's scores before Sinkhorn.
    Returns (loss to backpropagate, the single-process loss on the global batch as a 0-d tensor, per global
    crop the teacher embeddings this batch adds to the queue: none without one).
    """
    rank, world_size = world()
    ng, n_crops = cfg.n_global, len(crops)
    b = crops[0].shape[0]
    p = teacher.patch_size
    k = teacher.config.num_prototypes
    student_prototypes = getattr(student, "module", student).model.prototypes.weight  # under DDP, its module
    with torch.no_grad():
        t_out = teacher(torch.cat(crops[:ng]), attention=cfg.loss_mask != "all")
        h, w = t_out.scores.shape[1:3]
        targets = []
        for gi in range(ng):
            scores = t_out.scores[gi * b:(gi + 1) * b].reshape(-1, k).float()
            if queue is not None:  # scored with the student's prototypes, as the reference did
                scores = torch.cat([queue[gi].to(scores) @ student_prototypes.float().T, scores])
            q = sinkhorn(scores, cfg.epsilon, cfg.sinkhorn_iters, distributed=world_size > 1)[-b * h * w:]
            targets.append(q.view(b, h, w, k).permute(0, 3, 1, 2))
        masks = None
        if cfg.loss_mask != "all":
            masks = foreground_mask(t_out.attention).float().to(crops[0].device)
            if cfg.loss_mask == "bg":
                masks = 1.0 - masks
            masks = masks[:, None]
        new_embeddings = []
        if cfg.queue_length:
            # What the queue keeps of this batch, as in the reference: 10 teacher embeddings per image, drawn at
            # random among the positions the loss counts (the foreground, or the background with loss_mask="bg").
            # A random key plus the mask ranks counted positions first: a fixed size, so no wait on the GPU.
            keep = min(QUEUE_PER_IMAGE * b, b * h * w)
            for gi in range(ng):
                emb = t_out.embeddings[gi * b:(gi + 1) * b].reshape(-1, t_out.embeddings.shape[-1])
                key = torch.rand(len(emb), device=emb.device)
                if masks is not None:
                    key = key + masks[gi * b:(gi + 1) * b].flatten()
                new_embeddings.append(emb[key.topk(keep).indices].float())

    outputs = student(crops)
    maps = [o.float().permute(0, 3, 1, 2) for o in outputs]  # [B, K, h_v, w_v]
    sums, counts = [], []
    for gi in range(ng):
        for v in range(n_crops):
            if v == gi:
                continue
            box_g, box_v = boxes[:, gi, v, 0], boxes[:, gi, v, 1]
            has_overlap = ((box_g[:, 2] - box_g[:, 0]) > 0) & ((box_g[:, 3] - box_g[:, 1]) > 0)
            rois_g, rois_v = _rois(box_g, p), _rois(box_v, p)
            target = roi_align(targets[gi], rois_g, cfg.roi_size, aligned=True)
            pred = roi_align(maps[v], rois_v, cfg.roi_size, aligned=True)
            ce = -(target * F.log_softmax(pred / cfg.temperature, dim=1)).sum(dim=1)  # [B, 7, 7]
            weight = has_overlap[:, None, None].float().expand_as(ce)
            if masks is not None:
                aligned = roi_align(masks[gi * b:(gi + 1) * b], rois_g, cfg.roi_size, aligned=True)[:, 0]
                weight = weight * (aligned >= 1.0 - 1e-6).float()  # positions fully inside the mask
            sums.append((ce * weight).sum())
            counts.append(weight.sum().detach())
    # Each (g, v) pair's term is its mean over the counted positions of the *global* batch; the loss is the
    # mean over pairs that count any position. All on the device: no host sync before the backward.
    counts = torch.stack(counts)
    if world_size > 1:
        dist.all_reduce(counts)
    valid = (counts > 0).float()
    terms = torch.stack(sums) / counts.clamp_min(1.0)
    n_valid = valid.sum().clamp_min(1.0)
    local = (terms * valid).sum() / n_valid
    value = local.detach().clone()
    if world_size > 1:
        dist.all_reduce(value)  # per-pair terms already divide by the global count: their sum is the loss
    # DDP averages gradients over processes; scale so the average is the gradient of the global loss.
    return local * world_size, value, new_embeddings


# ------------------------------------------------------------------- training
def save_checkpoint(path: Path, **state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """mmap: map the tensors instead of reading them (cheap when only the step and config are wanted)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same problem for the user
        raise LeopartError(f"cannot read checkpoint {path}: {e}") from None


def _resolve_config(cfg: TrainConfig, ckpt: dict | None, overrides: dict) -> TrainConfig:
    if ckpt is None:
        return cfg
    recorded = {**LEGACY_DEFAULTS, **ckpt["config"]}  # a run from before a default changed keeps its old one
    saved = TrainConfig(**{k: v for k, v in recorded.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    clash = {k: (getattr(saved, k), v) for k, v in overrides.items()
             if k not in RESUMABLE_OVERRIDES and getattr(saved, k) != v}
    if clash:
        desc = ", ".join(f"{k}={new!r} (checkpoint: {old!r})" for k, (old, new) in clash.items())
        raise LeopartError(f"cannot resume with changed settings: {desc}")
    return dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES})


def _training_paths(images) -> list[Path]:
    """Absolute image paths from a Python list of image paths, folders and .txt lists (training reads files:
    each worker decodes its own, and a resumed run must find the same ones)."""
    if not isinstance(images, Iterable):
        raise LeopartError(f"training data must be a folder, a text file listing images or a list of image paths, "
                           f"not a {type(images).__name__}")
    paths = []
    for item in data.expand_inputs(images):
        if not isinstance(item, Path):
            raise LeopartError(f"training reads images from files: give paths, not {type(item).__name__} objects")
        paths.append(item.absolute())  # the list is kept in the output folder, away from relative paths' base
    if not paths:
        raise LeopartError("the list of training images is empty")
    return paths


def _trim_metrics(path: Path, last_step: int):
    """Keep metrics lines up to ``last_step`` so a resumed run never logs a step twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))


def _process_device(requested: str | None, world_size: int, local_rank: int) -> torch.device:
    """This process's device: ``requested`` (None: cuda when available), where a GPU without an index is the
    one of this process's LOCAL_RANK, so that torchrun's processes each take their own."""
    device = default_device(requested)
    if device.type != "cuda":
        return device
    if world_size > 1 and device.index is not None:
        raise LeopartError(f"--device {requested} under torchrun: each process trains on the GPU of its LOCAL_RANK, "
                           f"pass --device cuda (or leave it out)")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise LeopartError(f"process LOCAL_RANK {index} has no GPU: torch sees {torch.cuda.device_count()} GPUs here, "
                           f"start at most that many processes per machine (--nproc_per_node)")
    return torch.device("cuda", index)


EVAL_WAIT = timedelta(hours=2)  # how long the other processes wait for an evaluation under torchrun


def _setup_distributed(cfg: TrainConfig) -> tuple[torch.device, bool]:
    """This process's device, and whether this call started the process group (which train() then ends)."""
    started = launched_processes() > 1 and not dist.is_initialized()
    world_size = launched_processes() if started else world()[1]
    if cfg.batch_size % world_size:  # before any group starts: an error here leaves nothing to end
        raise LeopartError(f"batch size {cfg.batch_size} does not split evenly over {world_size} processes")
    device = _process_device(cfg.device, world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts, so each process's communicator is on its own GPU
    if started:
        # With --eval-data the first process evaluates while the others wait in their next collective, which NCCL
        # gives up on after 10 minutes by default; scoring VOC val with a ViT-B/8 can take longer.
        timeout = {"timeout": EVAL_WAIT} if cfg.eval_data else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout)
    return device, started


class Learner:
    """Everything one training step changes: student, EMA teacher, optimiser and queue.

    ``step(crops, boxes, step, total)`` is one optimisation step (sections 1-4 of the module docstring);
    train() calls it in its loop and benchmarks/train.py times it.
    """

    def __init__(self, model: LeopartViT, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.model = model.to(device).train()
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg))
        # Each process keeps its share of the queue; distributed Sinkhorn sees all of them, as the reference did.
        self.queue_length = max(1, cfg.queue_length // world()[1]) if cfg.queue_length else 0
        self.queue = (torch.zeros(cfg.n_global, self.queue_length, model.config.proj_dim, device=device)
                      if cfg.queue_length else None)
        self.queue_filled = 0
        self.student = MultiCrop(model)
        if world()[1] > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        self.device = device

    def state_dict(self) -> dict:
        """Every process calls it: the queue is gathered from all of them, [processes, n_global, length, dim]."""
        queue = None
        if self.queue is not None:
            shares = [self.queue]
            if world()[1] > 1:
                shares = [torch.empty_like(self.queue) for _ in range(world()[1])]
                dist.all_gather(shares, self.queue)
            queue = torch.stack(shares).cpu()
        return {"student": self.model.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "queue_filled": self.queue_filled, "queue": queue}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("queue")
        if self.queue is not None and saved is not None:
            rank, world_size = world()
            if saved.ndim == 3:  # checkpoints before 2026-11-29 kept the first process's share alone: all take it
                saved = saved.expand(world_size, *saved.shape)
            if saved.shape[0] != world_size or saved.shape[1:] != self.queue.shape:
                raise LeopartError(f"the checkpoint's queue is split over {saved.shape[0]} process(es), "
                                   f"{saved.shape[2]} embeddings each; this run {world_size} x {self.queue.shape[1]}: "
                                   f"resume with the number of processes it had")
            self.queue.copy_(saved[rank])
            self.queue_filled = int(state["queue_filled"])

    def step(self, crops: list[torch.Tensor], boxes: torch.Tensor, step: int, total: int) -> float:
        cfg, optimizer = self.cfg, self.optimizer
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        boxes = boxes.to(self.device)
        # 1. schedules and normalised prototypes
        lr_scale = cosine(1.0, 0.0, step, total)
        for group in optimizer.param_groups:
            group["lr"] = cfg.final_lr + (group["base_lr"] - cfg.final_lr) * lr_scale
            if group["decay"]:
                group["weight_decay"] = cosine(cfg.weight_decay, cfg.weight_decay_end, step, total)
        self.model.normalize_prototypes()
        self.teacher.normalize_prototypes()
        # 2-3. targets from the teacher, predictions from the student, the loss
        full = self.queue is not None and self.queue_filled >= self.queue_length
        with autocast(self.device):
            loss, loss_value, embeddings = leopart_loss(self.student, self.teacher, crops, boxes, cfg,
                                                        self.queue if full else None)
        # 4. optimiser step, then the EMA teacher
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            m = cosine(cfg.momentum_teacher, cfg.momentum_teacher_end, step, total)
            t_params, s_params = list(self.teacher.parameters()), list(self.model.parameters())
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, s_params, alpha=1 - m)
        if self.queue is not None:  # newest embeddings first, oldest fall off the end
            for gi, emb in enumerate(embeddings):
                n = min(len(emb), self.queue_length)
                self.queue[gi] = torch.cat([emb[-n:].to(self.queue), self.queue[gi, :self.queue_length - n]])
            self.queue_filled = min(self.queue_length, self.queue_filled + len(embeddings[0]))
        loss_value = float(loss_value)  # the step's only host sync, after all its work is queued
        if not math.isfinite(loss_value):
            raise LeopartError(f"the loss became {loss_value} at step {step}: lower the learning rates")
        return loss_value


def train(data_source: str | os.PathLike | Sequence[str | os.PathLike] = "", output: str | os.PathLike = "runs/leopart",
          resume: bool = False, **overrides) -> LeopartViT:
    """Fine-tune with the Leopart objective on a folder of images, a text file of paths, or a Python list of
    image paths (and folders), which is written to ``<output>/images.txt`` so the run's config and resume
    command name one file.

    Keyword overrides are TrainConfig fields (init, arch, steps, epochs, batch_size, ...). Returns the trained
    student; the final model is also saved to ``<output>/model`` (load it with ``leopart.from_pretrained``).
    """
    out = Path(output)
    image_paths = None
    if not isinstance(data_source, (str, os.PathLike)):
        image_paths, data_source = _training_paths(data_source), (out / IMAGE_LIST_NAME).absolute()
    explicit = {**overrides, "data": str(data_source), "output": str(output)}
    unknown = set(explicit) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise LeopartError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if ckpt_path.is_file():
        if not resume:
            raise LeopartError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --output")
        ckpt = load_checkpoint(ckpt_path)
    cfg = _resolve_config(TrainConfig(**explicit), ckpt, explicit)
    cfg.check()
    if image_paths is not None:  # every process writes the same list, atomically: none reads a partial file
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / IMAGE_LIST_NAME, "".join(f"{p}\n" for p in image_paths))
    device, started_group = _setup_distributed(cfg)
    model = _train(cfg, ckpt, device)
    if started_group:  # every process got here: end the group this call started (after an error, the exit does)
        # The barrier lets gloo's threads drop the last collectives' tensors first: destroying the group joins those
        # threads while holding the GIL, and torch 2.4 deadlocked there when one still had a tensor to free.
        dist.barrier()
        dist.destroy_process_group()
    return model


def _train(cfg: TrainConfig, ckpt: dict | None, device: torch.device) -> LeopartViT:
    """train()'s loop on this process's device, once the process group (under torchrun) is up."""
    out, ckpt_path = Path(cfg.output), Path(cfg.output) / CHECKPOINT_NAME
    rank, world_size = world()
    is_main = rank == 0
    torch.manual_seed(cfg.seed)

    files = data.list_training_images(cfg.data)
    dataset = data.MultiCropDataset(files, cfg.crops(), seed=cfg.seed)
    sampler = data.EpochSampler(len(files), cfg.batch_size, rank, world_size, cfg.seed, start_step=0)
    total = cfg.steps or cfg.epochs * sampler.steps_per_epoch

    learner = Learner(build_model(cfg), cfg, device)
    # config.json and the checkpoint record the model actually trained, not the defaults of init="random"
    built = learner.model.config
    cfg.arch, cfg.num_prototypes, cfg.backbone_kwargs = built.arch, built.num_prototypes, dict(built.backbone_kwargs)
    cfg.proj_hidden_dim, cfg.proj_dim = built.proj_hidden_dim, built.proj_dim
    cfg.lr_backbone, cfg.lr_heads = learning_rates(cfg, learner.model.patch_size)
    if cfg.eval_data:  # a bad folder or k fails now, not at the first evaluation, maybe hours in
        _check_eval_data(cfg, learner.model.patch_size)
    step, skipped = 0, set()
    if ckpt is not None:
        learner.load_state_dict(ckpt)
        step, skipped = int(ckpt["step"]), set(ckpt.get("skipped", []))
        set_rng_state(ckpt["rng"], device)
        if step >= total:
            raise LeopartError(f"the checkpoint is already at step {step} of {total}: raise --steps to go on")

    sampler.start_step = step
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size // world_size, sampler=sampler,
                                         num_workers=cfg.workers, collate_fn=data.collate_views,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         # its own generator: creating the iterator must not draw from the
                                         # global RNG, or a resumed run's dropout would drift from the original
                                         generator=torch.Generator().manual_seed(cfg.seed))
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out / "metrics.jsonl", step)
        write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    def checkpoint():
        state = learner.state_dict()  # on every process: it gathers their queues
        if is_main:
            save_checkpoint(ckpt_path, config=dataclasses.asdict(cfg), step=step, total=total, rng=rng_state(device),
                            skipped=sorted(skipped), model_config=dataclasses.asdict(learner.model.config), **state)

    if is_main and cfg.progress:  # what was understood, before the first progress line (a minute in, in a log)
        epoch = f"{plural(sampler.steps_per_epoch, 'step')} of {cfg.batch_size} per epoch"
        plan = f"resuming at step {step} of {total}" if step else plural(total, "step")
        print(f"train: {plan} ({plural(len(files), 'image')}, {epoch}) on {device}, lr {cfg.lr_backbone:g} backbone / "
              f"{cfg.lr_heads:g} heads", file=sys.stderr)
    bar = progress_bar(total=total, initial=step, desc="train", unit="step",
                       progress=cfg.progress if is_main else False)
    batches = iter(loader)
    stop = _GracefulStop()
    try:
        while step < total:
            t0 = time.perf_counter()
            crops, boxes, bad = next(batches)
            skipped.update(bad)
            loss_value = learner.step(crops, boxes, step, total)
            step += 1
            seconds = time.perf_counter() - t0
            if is_main:
                groups = learner.optimizer.param_groups
                record = {"step": step, "loss": loss_value, "lr": groups[0]["lr"],
                          "wd": next(g["weight_decay"] for g in groups if g["decay"]),
                          "images_per_s": cfg.batch_size / seconds}
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({"loss": f"{loss_value:.4f}", **({"skipped": len(skipped)} if skipped else {})},
                                refresh=False)
                bar.update(1)
            if step % cfg.save_every == 0 or step == total:
                checkpoint()
            if cfg.eval_data and is_main and (step % cfg.eval_every == 0 or step == total):
                _evaluate_during_training(learner.model, cfg, step, out, device)
            if stop.requested(device) and step < total:
                checkpoint()
                bar.close()
                if is_main:
                    print(f"Interrupted at step {step}: checkpoint saved in {ckpt_path}")
                raise KeyboardInterrupt
    finally:
        stop.restore()
        bar.close()
        del batches
    model = learner.model
    if is_main:
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s), e.g. {sorted(skipped)[0]}")
        from .hub import save_converted

        save_converted(model.cpu(), out / MODEL_NAME)
    return model


# ---------------------------------------------------------------- run folders
@dataclass
class RunInfo:
    """Where a `leopart train` output folder stands, read from its checkpoint's step and config and its logs."""

    folder: Path
    config: dict              # the run's TrainConfig, as its checkpoint saved it
    step: int                 # the checkpoint's
    total: int | None         # None only for checkpoints from before they recorded it, trained by --epochs
    last_logged: dict | None  # the last line of metrics.jsonl (a step past the checkpoint if it was killed)
    last_eval: dict | None    # the last line of eval.jsonl, with --eval-data

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_NAME

    @property
    def finished(self) -> bool:
        """The checkpoint reached the run's total and the final model folder is there."""
        done = self.total is None or self.step >= self.total
        return done and all((self.model_dir / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME))

    @property
    def resume_command(self) -> str:
        data_source = shlex.quote(str(self.config.get("data"))) if self.config.get("data") else "DATA"
        return f"leopart train {data_source} --output {shlex.quote(str(self.folder))} --resume"


def is_run_folder(path: str | os.PathLike) -> bool:
    """A `leopart train` output folder: a checkpoint beside the run's config.json (a saved model's or segmenter's
    config names its leopart_kind; a probe's output folder has a checkpoint but no config)."""
    path = Path(path)
    config = path / CONFIG_NAME
    return (path / CHECKPOINT_NAME).is_file() and config.is_file() and "leopart_kind" not in read_config(config)


def read_run(folder: str | os.PathLike) -> RunInfo:
    folder = Path(folder)
    ckpt = load_checkpoint(folder / CHECKPOINT_NAME, mmap=True)
    if not isinstance(ckpt, dict) or "step" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise LeopartError(f"{folder / CHECKPOINT_NAME} is not a `leopart train` checkpoint")
    config = ckpt["config"]
    total = ckpt.get("total", config.get("steps"))
    return RunInfo(folder, config, int(ckpt["step"]), None if total is None else int(total),
                   _last_json_line(folder / "metrics.jsonl"), _last_json_line(folder / "eval.jsonl"))


def _last_json_line(path: Path) -> dict | None:
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
    return None


class _GracefulStop:
    """The first Ctrl-C (SIGINT or SIGTERM) asks the loop to stop after the current step, so the checkpoint
    it writes is consistent; a second one interrupts at once. Processes agree on stopping via all_reduce."""

    def __init__(self):
        self.flag = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self, device) -> bool:
        if world()[1] > 1:
            t = torch.tensor([float(self.flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return self.flag

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _check_eval_data(cfg: TrainConfig, patch_size: int):
    from .evaluate import read_voc
    from .segment import check_k

    if cfg.eval_size % patch_size:
        raise LeopartError(f"eval_resolution {cfg.eval_size} is not a multiple of the patch size {patch_size}")
    n_images = len(read_voc(cfg.eval_data, "val").images)
    for k in cfg.eval_k:
        check_k(k, n_images, cfg.eval_size, patch_size, name="eval_k")


def _evaluate_during_training(model: LeopartViT, cfg: TrainConfig, step: int, out: Path, device):
    from .evaluate import evaluate

    was_training = model.training
    model.eval()
    try:
        # leopart eval's reference protocol with one seed, so the curve reads against leopart eval's scores (the
        # reference's training loop clustered bilinearly upsampled tokens instead: not reproduced).
        res = evaluate(cfg.eval_data, model, ks=cfg.eval_k, resolution=cfg.eval_size, protocol="reference",
                       seeds=1, device=device, progress=False)
    finally:
        model.train(was_training)
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "overclustering": res["overclustering"]}) + "\n")
