"""Linear and FCN probes: the paper's supervised read-outs on frozen patch tokens (``leopart.probe``).

Protocol of the reference implementation (every default here), in float32 throughout (its Lightning Trainer ran
at precision 32): the backbone is frozen in eval mode; inputs
resized bilinearly to 448 x 448; patch tokens bilinearly upsampled to 100 x 100; a 1x1 conv (linear) or an FCN
head (two 3x3 conv + ReLU with 512 channels, the input concatenated back and fused by a third 3x3 conv + ReLU,
dropout 0.1, a 1x1 conv to the classes); cross-entropy ignoring 255 against masks resized (nearest) to the input
side, then to 100 x 100; SGD with momentum 0.9 and weight decay 1e-4, lr x 0.1 at epoch 20; 25 epochs (linear)
or 30 (FCN); the lr and global batch of the reference's PASCAL configs (``reference_recipe``): ViT-B/8 lr 0.1,
batch 12; other models (its ViT-S/16 configs) lr 0.01, batch 120 (linear) or 64 (FCN). Scoring as its
``eval_linear.py``: every image of the split, float32, tokens bilinearly upsampled to the input side (448) and
the head run there, against masks resized (nearest) to it; plain mIoU (no matching), label 255 ignored.
Training data: by default the resized images without augmentation, so the backbone's tokens are computed once and
cached (``cache_dir``) and every epoch after the first reads them instead of running the ViT; ``augment=True``
(``--probe-augment``) trains as the reference did, on a random crop of 0.8-1.0 of each image's area (aspect 3/4-4/3)
flipped half the time, drawn anew every epoch, so the ViT runs on every batch of every epoch.

Heads save and load like models (config.json + model.safetensors) and the released Lightning checkpoints
(leopart_vits16_pvoc_lin_head.ckpt, leopart_vits16_fcn_head.ckpt, leopart_vitb8_pvoc_fcn_head.ckpt) convert
by key name.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import data, serialization
from .augment import sample_box
from .device import autocast, default_device, rng_state, set_rng_state
from .embed import check_features_fit, iter_batches
from .errors import LeopartError, check_kinds, positive_int
from .evaluate import interpolate_mask, load_mask, load_target, read_voc
from .metrics import Confusion
from .model import LeopartViT
from .progress import progress_bar
from .segment import upsample_argmax

HEADS = ("linear", "fcn")
# A probe's output folder: CHECKPOINT_NAME (per epoch), cache/ (tokens) and, at the end, HEAD_FOLDER/.
CHECKPOINT_NAME, HEAD_FOLDER = "checkpoint.pt", "head"
DEFAULT_EPOCHS = {"linear": 25, "fcn": 30}
PROBE_RESAMPLE = "bilinear"  # the reference resized the probes' images bilinearly (torchvision's Resize default)
AUGMENT_SCALE = (0.8, 1.0)   # its training crops' share of the image area (RandomResizedCrop), flipped with p = 0.5


def reference_recipe(head: str, patch_size: int) -> tuple[float, int]:
    """(lr, global batch) of the reference's PASCAL probe configs: its ViT-B/8 ones trained with lr 0.1 and
    2 GPUs x 6 images; its ViT-S/16 ones with lr 0.01 and 2 x 60 (linear) or 2 x 32 (FCN)."""
    if patch_size == 8:
        return 0.1, 12
    return 0.01, 120 if head == "linear" else 64


# ---------------------------------------------------------------------- heads
def conv_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """Two 3x3 conv + ReLU, the input concatenated back and fused by a third, dropout, 1x1 classifier."""

    def __init__(self, in_dim: int, num_classes: int, channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(conv_relu(in_dim, channels), conv_relu(channels, channels))
        self.conv_cat = conv_relu(in_dim + channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_cat(torch.cat([x, self.convs(x)], dim=1))
        return self.conv_seg(self.dropout(out))


@dataclass
class ProbeConfig:
    head: str = "linear"
    in_dim: int = 384
    num_classes: int = 21
    channels: int = 512       # FCN width
    dropout: float = 0.1
    mask_size: int = 100      # tokens are upsampled to mask_size x mask_size before the head
    resolution: int = 448     # input size the head was trained at
    model: str | None = None  # the backbone it reads (name or absolute path), when known


class ProbeHead(nn.Module):
    """A trained read-out: patch tokens [B, h, w, D] -> class logits [B, C, mask_size, mask_size]."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        if config.head not in HEADS:
            raise LeopartError(f"head must be one of {', '.join(HEADS)}, not '{config.head}'")
        self.config = config
        if config.head == "linear":
            self.head = nn.Conv2d(config.in_dim, config.num_classes, 1)
        else:
            self.head = FCNHead(config.in_dim, config.num_classes, config.channels, config.dropout)

    def forward(self, tokens: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Logits [B, C, size, size] (default: the mask size it was trained at) of tokens upsampled to ``size``."""
        size = size or self.config.mask_size
        if self.config.head == "linear":
            # A 1x1 conv and bilinear upsampling commute (both linear; the weights of an upsampled pixel sum to
            # 1, so the bias passes through): classify the tokens, then upsample C channels instead of D. The
            # same logits up to float rounding, 6x faster for a batch of 12 at 384 -> 21 (CPU, with backward).
            return F.interpolate(self.native_logits(tokens), size=size, mode="bilinear", align_corners=False)
        x = F.interpolate(tokens.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)
        return self.head(x)

    def native_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, C, h, w] at the grid the head works on: the token grid for a linear head (any upsampling can
        follow), the trained mask size for an FCN (its 3x3 convolutions learnt that scale)."""
        if self.config.head == "linear":
            return self.head(tokens.permute(0, 3, 1, 2).float())
        return self(tokens)

    def save_pretrained(self, folder: str | Path) -> Path:
        config = {"leopart_kind": "probe_head", **asdict(self.config)}
        card = (f"# leopart {self.config.head} probe head\n\n{self.config.num_classes} classes on "
                f"{self.config.in_dim}-dim patch tokens at {self.config.resolution} px. Load with "
                f"`from leopart.probe import load_head; load_head(folder)`; use with `leopart segment --head folder`.\n")
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        return serialization.save_folder(folder, config, state, card)

    @classmethod
    def from_pretrained(cls, name: str | Path) -> "ProbeHead":
        return load_head(name)


def load_head(name: str | Path) -> ProbeHead:
    """A head from a folder written by save_pretrained, an org/repo on the Hub, or a released .ckpt."""
    name = serialization.check_name(name, "a probe head", "a folder, a Hub id or a released .ckpt file")
    path = Path(name).expanduser()
    if path.is_file():
        return convert_head_checkpoint(path)
    if path.is_dir():
        name = head_folder(path)
    config, state = serialization.fetch_folder(name, "probe_head", missing=f"no probe head folder or checkpoint {name}")
    names = set(ProbeConfig.__dataclass_fields__)
    head = ProbeHead(ProbeConfig(**{k: v for k, v in config.items() if k in names}))
    _load_state(head, state, str(name))
    return head


def head_folder(path: Path) -> Path:
    """A probe's output folder (`leopart eval --probe-dir DIR` writes DIR/linear, DIR/fcn) stands for the head
    saved in it at the end of training; any other path for itself."""
    if not (path / CHECKPOINT_NAME).is_file() or (path / serialization.CONFIG_NAME).is_file():
        return path
    if not (path / HEAD_FOLDER).is_dir():
        raise LeopartError(f"{path} is a probe's output folder whose training has not finished: its head is saved "
                           f"to {path / HEAD_FOLDER} at the end (run it again to resume)")
    return path / HEAD_FOLDER


def _load_state(head: ProbeHead, state: dict, source: str):
    problems, _ = serialization.state_dict_mismatches(head.state_dict(), state)
    if problems:
        raise LeopartError(f"{source} does not fit a {head.config.head} head: " + "; ".join(problems))
    head.load_state_dict(state)


# Reference (Lightning module attribute finetune_head, mmcv ConvModule without norm) -> ours.
_FCN_KEYS = {
    "convs.0.conv.": "head.convs.0.0.", "convs.1.conv.": "head.convs.1.0.",
    "conv_cat.conv.": "head.conv_cat.0.", "conv_seg.": "head.conv_seg.",
}


def convert_head_checkpoint(path: str | Path, trust_pickle: bool = False) -> ProbeHead:
    """A released probing checkpoint (Lightning, keys ``finetune_head.*``) -> ProbeHead, by key name."""
    from .hub import read_checkpoint

    raw = read_checkpoint(Path(path), trust_pickle=trust_pickle)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise LeopartError(f"{path} holds no state_dict")
    head_state = {k[len("finetune_head."):]: v for k, v in state.items() if k.startswith("finetune_head.")}
    if not head_state:
        raise LeopartError(f"{path} is not a leopart probing checkpoint: no 'finetune_head.*' keys "
                           f"(found e.g. {sorted(state)[:3]})")
    hparams = raw.get("hyper_parameters", {}) if isinstance(raw, dict) else {}
    if set(head_state) == {"weight", "bias"} and head_state["weight"].ndim == 4:
        w = head_state["weight"]
        config = ProbeConfig(head="linear", in_dim=w.shape[1], num_classes=w.shape[0])
        ours = {"head.weight": w, "head.bias": head_state["bias"]}
    else:
        ours = {}
        for k, v in head_state.items():
            prefix = next((p for p in _FCN_KEYS if k.startswith(p)), None)
            if prefix is None:
                raise LeopartError(f"{path}: unexpected key finetune_head.{k} for an FCN head")
            ours[_FCN_KEYS[prefix] + k[len(prefix):]] = v
        try:
            w0, ws = head_state["convs.0.conv.weight"], head_state["conv_seg.weight"]
        except KeyError as e:
            raise LeopartError(f"{path}: the FCN head lacks {e.args[0]}") from None
        config = ProbeConfig(head="fcn", in_dim=w0.shape[1], num_classes=ws.shape[0], channels=w0.shape[0])
    if "input_size" in hparams:
        config.resolution = int(hparams["input_size"])
    head = ProbeHead(config)
    _load_state(head, {k: v.float() for k, v in ours.items()}, str(path))
    return head


# ------------------------------------------------------------------- training
@dataclass
class ProbeTrainConfig:
    head: str = "linear"
    epochs: int | None = None   # default: 25 (linear) / 30 (FCN)
    lr: float | None = None     # default: reference_recipe's for the model (0.1 for ViT-B/8, else 0.01)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    drop_at: int = 20           # lr x 0.1 from this epoch on
    batch_size: int | None = None  # total over processes; default: reference_recipe's (12, or 120 / 64)
    resolution: int = 448
    mask_size: int = 100
    split: str = "train"        # ImageSets/Segmentation/<split>.txt, or a path to a list of names
    num_classes: int | None = None
    cache_dir: str | None = None  # where token caches live (default: <output>/cache, or none without output)
    output: str | None = None     # per-epoch checkpoints and the final head; resumes when it holds one
    seed: int = 0
    augment: bool = False       # the reference's random crops and flips (the ViT runs every epoch; no token cache)
    device: str | None = None
    progress: bool | None = None

    def check(self):
        check_kinds(self, prefix="probe ")
        if self.head not in HEADS:
            raise LeopartError(f"head must be one of {', '.join(HEADS)}, not '{self.head}'")
        for name in ("epochs", "batch_size", "resolution", "mask_size", "num_classes"):
            if getattr(self, name) is not None:  # stored as ints: the config is saved as JSON
                setattr(self, name, positive_int(getattr(self, name), f"probe {name}"))
        for name in ("lr", "momentum", "weight_decay", "drop_at"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise LeopartError(f"probe {name} must be >= 0, not {getattr(self, name)!r}")


class TokenCache:
    """Frozen-backbone tokens (fp16) and resized masks of a split, in safetensors shards written atomically.

    A shard that exists is complete, so an interrupted caching pass resumes where it stopped. Without a
    folder the shards are kept in memory instead."""

    SHARD = 256

    def __init__(self, folder: Path | None, model: LeopartViT, voc, resolution: int, mask_size: int, device,
                 progress):
        self.model, self.voc, self.resolution, self.mask_size = model, voc, resolution, mask_size
        self.device, self.progress = device, progress
        self.n = len(voc.images)
        self.folder = None if folder is None else Path(folder) / serialization.cache_key(
            [model.backbone], [*voc.images, *voc.masks], model.backbone_id, resolution, mask_size,
            PROBE_RESAMPLE, "masks through the input side")
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        if self.folder is None:
            check_features_fit(self.n, model, resolution, 2, "the fp16 tokens",
                               "keep them on disk instead with --probe-dir (probe(..., output=DIR))")

    def shard(self, s: int) -> dict[str, torch.Tensor]:
        if s in self.memory:
            return self.memory[s]
        path = None if self.folder is None else self.folder / f"shard_{s:05d}.safetensors"
        tensors = serialization.load_or_compute(path, lambda: self._compute(s))
        if self.folder is None:
            self.memory[s] = tensors
        return tensors

    def _compute(self, s: int) -> dict[str, torch.Tensor]:
        lo, hi = s * self.SHARD, min(self.n, (s + 1) * self.SHARD)
        tokens = [t.half().cpu() for _, t, _ in iter_batches(self.voc.images[lo:hi], self.model, self.resolution,
                                                              16, self.device, progress=self.progress,
                                                              desc=f"tokens {lo}-{hi}", resample=PROBE_RESAMPLE,
                                                              full_precision=True)]
        masks = [load_target(i, m, self.mask_size, self.resolution)
                 for i, m in zip(self.voc.images[lo:hi], self.voc.masks[lo:hi])]
        return {"tokens": torch.cat(tokens), "masks": torch.from_numpy(np.stack(masks)).to(torch.uint8)}

    def batches(self, batch_size: int, epoch_seed: int, rank: int = 0, world: int = 1):
        """(tokens [b, h, w, D], masks [b, S, S] int64) batches of an epoch, shuffled shard by shard."""
        generator = torch.Generator().manual_seed(epoch_seed)
        for s in torch.randperm(math.ceil(self.n / self.SHARD), generator=generator).tolist():
            t = self.shard(s)
            for chunk in rank_shares(torch.randperm(len(t["tokens"]), generator=generator), batch_size, rank, world):
                yield t["tokens"][chunk], t["masks"][chunk].long()


class AugmentedBatches:
    """The reference's probe training data: each image's random crop and flip of the epoch (``draw_augmentation``,
    seeded by the epoch and the image, so a resumed run sees the same ones) through the frozen backbone, in float32,
    batch by batch. Images decode in threads ahead of the model on a GPU."""

    def __init__(self, model: LeopartViT, voc, resolution: int, mask_size: int, device):
        self.model, self.voc, self.resolution, self.mask_size, self.device = model, voc, resolution, mask_size, device
        self.n = len(voc.images)

    def sample(self, epoch_seed: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = data.load_image(self.voc.images[i], str(self.voc.images[i]))
        mask = load_mask(self.voc.masks[i], img.size)
        box, flip = draw_augmentation(img.width, img.height,
                                      torch.Generator().manual_seed(epoch_seed * 1_000_003 + i))
        return augmented_pair(img, mask, box, flip, self.resolution, self.mask_size)

    def batches(self, batch_size: int, epoch_seed: int, rank: int = 0, world: int = 1):
        """(tokens [b, h, w, D] on the device, masks [b, S, S] int64) batches of an epoch, in a shuffled order."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed))
        mine = [chunk.tolist() for chunk in rank_shares(order, batch_size, rank, world)]
        threads = 0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)
        pairs = data.map_ahead(lambda i: self.sample(epoch_seed, i), (i for chunk in mine for i in chunk), threads,
                               ahead=2 * len(mine[0]) if mine else None)
        for chunk in mine:
            images, masks = zip(*(next(pairs) for _ in chunk))
            with torch.no_grad(), autocast(self.device, full_precision=True):
                tokens = self.model(torch.stack(images).to(self.device), heads=False).patch_tokens.float()
            yield tokens, torch.stack(masks)


def rank_shares(order: torch.Tensor, batch_size: int, rank: int, world: int):
    """This process's share of each batch of ``order`` (indices): consecutive batches of ``batch_size``, each split
    as evenly as it goes over the ``world`` processes, so that every process takes the same steps (DDP waits for
    all of them at each one); a last batch with fewer images than processes is left out."""
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk) >= world:
            yield chunk.tensor_split(world)[rank]


def draw_augmentation(width: int, height: int, g: torch.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """One training image's crop box (x0, y0, x1, y1) and flip, as the reference's probe transforms drew them:
    RandomResizedCrop(scale=(0.8, 1), ratio=(3/4, 4/3)) and a horizontal flip with probability 0.5."""
    box = sample_box(width, height, AUGMENT_SCALE, g)
    return box, bool(torch.rand((), generator=g) < 0.5)


def augmented_pair(image: Image.Image, mask: np.ndarray, box: tuple[int, int, int, int], flip: bool,
                   resolution: int, mask_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised image [3, R, R], mask [S, S] int64) of one crop, in the reference's order: the crop resized to the
    input side (image bilinear, mask nearest), then flipped, then the mask nearest to ``mask_size``."""
    x0, y0, x1, y1 = box
    x = data.to_tensor(image.crop(box), (resolution, resolution), PROBE_RESAMPLE)
    mask_crop = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8)).resize((resolution, resolution), Image.NEAREST)
    if flip:  # the normalised image flips as its pixels would; the mask at the input side, before the resize to S
        x, mask_crop = x.flip(-1), mask_crop.transpose(Image.FLIP_LEFT_RIGHT)
    return x, torch.from_numpy(interpolate_mask(np.asarray(mask_crop), mask_size))


def probe(model: LeopartViT | str, train_data: str | os.PathLike, head: str = "linear", **overrides) -> ProbeHead:
    """Train a linear or FCN head on frozen patch tokens of a VOC-layout folder's train split.

    Keyword overrides are ProbeTrainConfig fields. With ``output`` set, a checkpoint is written after every
    epoch and an interrupted run resumes from it; the final head is saved to ``<output>/head`` (``output`` itself
    names it too, wherever a head is loaded).
    """
    from .hub import from_pretrained

    unknown = set(overrides) - set(ProbeTrainConfig.__dataclass_fields__)
    if unknown:
        raise LeopartError(f"unknown probe option(s): {', '.join(sorted(unknown))}")
    cfg = ProbeTrainConfig(head=head, **overrides)
    cfg.check()
    epochs = cfg.epochs or DEFAULT_EPOCHS[cfg.head]
    device = default_device(cfg.device)
    model = from_pretrained(model, device=device).eval().requires_grad_(False)
    voc = read_voc(train_data, cfg.split)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

    output = Path(cfg.output) if cfg.output else None
    if cfg.augment:
        source = AugmentedBatches(model, voc, cfg.resolution, cfg.mask_size, device)
    else:
        cache_dir = cfg.cache_dir or (str(output / "cache") if output else None)
        source = TokenCache(Path(cache_dir) if cache_dir else None, model, voc, cfg.resolution, cfg.mask_size, device,
                            cfg.progress)
    num_classes = cfg.num_classes or _count_classes(voc)
    torch.manual_seed(cfg.seed)
    ckpt_path = output / CHECKPOINT_NAME if output else None
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True) \
        if ckpt_path is not None and ckpt_path.is_file() else None
    # Unset lr and batch: what a resumed run recorded (runs from before the per-model recipe recorded 0.1 and
    # 12), else the reference's recipe for this model.
    recorded = state["config"] if state else {}
    if state is not None and bool(recorded.get("augment", False)) != cfg.augment:
        was = "with" if recorded.get("augment") else "without"
        raise LeopartError(f"{output} holds a probe trained {was} random crops and flips: resume it {was} "
                           f"--probe-augment (augment={not cfg.augment}), or train this one in another folder")
    lr, batch = reference_recipe(cfg.head, model.patch_size)
    cfg = replace(cfg, lr=cfg.lr if cfg.lr is not None else recorded.get("lr", lr),
                  batch_size=cfg.batch_size or recorded.get("batch_size", batch))
    if cfg.batch_size < world:
        raise LeopartError(f"probe batch size {cfg.batch_size} is smaller than the {world} processes sharing it")
    probe_head = ProbeHead(ProbeConfig(head=cfg.head, in_dim=model.embed_dim, num_classes=num_classes,
                                       mask_size=cfg.mask_size, resolution=cfg.resolution, model=model.name_or_path))
    probe_head.to(device).train()
    trained = probe_head if world == 1 else nn.parallel.DistributedDataParallel(
        probe_head, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(probe_head.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    start_epoch = 0
    if state is not None:
        probe_head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        set_rng_state(state["rng"], device)  # dropout continues as if never stopped
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    n_batches = math.ceil(source.n / cfg.batch_size)
    for epoch in range(start_epoch, epochs):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (0.1 if epoch >= cfg.drop_at else 1.0)
        epoch_seed = cfg.seed * 1000 + epoch  # data order (and crops) per epoch
        bar = progress_bar(source.batches(cfg.batch_size, epoch_seed, rank, world), total=n_batches,
                           desc=f"{cfg.head} probe epoch {epoch + 1}/{epochs}", unit="batch",
                           progress=cfg.progress if rank == 0 else False)
        for tokens, masks in bar:
            # A given num_classes (not counted from the masks) may be too few; checked on the host: no GPU sync.
            if cfg.num_classes is not None:
                _check_classes(masks, num_classes, f"num_classes={num_classes}")
            tokens, masks = tokens.to(device), masks.to(device)
            logits = trained(tokens)  # float32 on a GPU too: the reference's Trainer ran at its default precision, 32
            loss = criterion(logits, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if ckpt_path is not None and rank == 0:
            with serialization.atomic_path(ckpt_path) as tmp:
                torch.save({"head": probe_head.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch + 1, "config": asdict(cfg), "rng": rng_state(device)}, tmp)
    probe_head.eval().cpu()
    if output is not None and rank == 0:
        probe_head.save_pretrained(output / HEAD_FOLDER)
    return probe_head


def _check_classes(masks: torch.Tensor, num_classes: int, what: str) -> None:
    top = int(masks.masked_fill(masks == 255, 0).max()) if masks.numel() else 0
    if top >= num_classes:
        raise LeopartError(f"the masks hold class id {top}, beyond {what} (ids 0..{num_classes - 1}; 255 is ignored)")


def _count_classes(voc) -> int:
    top = 0
    for m in voc.masks:
        mask = load_mask(m)
        valid = mask[mask != 255]
        if valid.size:
            top = max(top, int(valid.max()))
    return top + 1


@torch.no_grad()
def evaluate_probe(head: ProbeHead, model: LeopartViT, data_root: str | os.PathLike, split: str = "val",
                   device=None, batch_size: int = 16, progress: bool | None = None,
                   eval_size: int | None = None) -> tuple[float, np.ndarray]:
    """Plain mIoU (%) of the head's predictions on a VOC-layout split, and per-class IoU, scored as the reference's
    eval_linear.py scored its heads: every image, float32, tokens bilinearly upsampled to ``eval_size`` x
    ``eval_size`` (default: the input side the head was trained at, 448) and the head run there, against masks
    resized (nearest) to it, label 255 ignored."""
    device = default_device(device)
    eval_size = positive_int(eval_size or head.config.resolution, "eval_size")
    voc = read_voc(data_root, split)
    head = head.to(device).eval()
    n_classes = head.config.num_classes
    confusion = Confusion(n_classes, n_classes)  # rows: predicted class, columns: true class
    i = 0
    for _, tokens, _ in iter_batches(voc.images, model.to(device).eval(), head.config.resolution, batch_size, device,
                                     progress=progress, desc=f"{head.config.head} probe eval",
                                     resample=PROBE_RESAMPLE, full_precision=True):
        for t in tokens:  # one image at a time: an FCN at 448 x 448 holds about 1.5 GB of activations
            pred = head(t[None], size=eval_size).argmax(dim=1)[0].cpu().numpy()
            confusion.update(pred, load_target(voc.images[i], voc.masks[i], eval_size, head.config.resolution))
            i += 1
    if confusion.counts.shape[1] > n_classes:
        raise LeopartError(f"the masks hold class ids up to {confusion.counts.shape[1] - 1}, but the head has "
                           f"{n_classes} classes")
    miou, iou = confusion.miou(n_classes=n_classes, identity=True)
    return 100.0 * miou, iou


@torch.no_grad()
def segment_with_head(image, model: LeopartViT, head: ProbeHead, device=None) -> np.ndarray:
    """Class ids [H, W] of one image from a trained probe head, at the image's own size."""
    from . import data

    device = default_device(device)
    img = data.load_image(image, data.describe(image, 0))
    if head.config.in_dim != model.embed_dim:
        raise LeopartError(f"the head reads {head.config.in_dim}-dim tokens but the model gives {model.embed_dim}: "
                           "use the head's own backbone")
    (_, tokens, _), = iter_batches([img], model.to(device).eval(), head.config.resolution, 1, device, progress=False,
                                   resample=PROBE_RESAMPLE, full_precision=True)  # the tokens its head was trained on
    with autocast(device):
        logits = head.to(device).eval().native_logits(tokens)
    # Upsampled to the photo's size only for the argmax, channel-pruned: an FCN run at a 3 MP photo's own size
    # took 17 GB and 2 minutes (12 MP would not fit), and it saw its 3x3 convolutions at a scale it never learnt.
    return upsample_argmax(logits[0].float().permute(1, 2, 0), (img.height, img.width)).cpu().numpy()
