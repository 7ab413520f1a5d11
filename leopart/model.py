"""LeopartViT: a timm Vision Transformer + Leopart's projection head and prototypes.

The backbone is any timm ViT; its patch tokens go through a 3-layer MLP (Linear-GELU-Linear-GELU-Linear),
are L2-normalised, and are scored against L2-normalised prototypes (cosine similarities in [-1, 1]).
Module names follow the original release (``projection_head.0/2/4``, ``prototypes``) so converted
checkpoints load by key. Inputs of any size that is a multiple of the patch size work: timm interpolates
the position embeddings (``dynamic_img_size``).

The backbone runs through timm's own ``forward_features``, so every timm ViT family that can change its input
size works: ViT / DeiT / DINO(v2), EVA-02, DINOv3, RoPE ViTs and hybrids. The last layer's CLS attention (the
foreground cue) is recomputed from the last attention module's input for the kinds in ``READABLE_ATTENTION``.
Inputs arrive normalised with ImageNet's statistics (leopart's preprocessing, for every model); a backbone trained
with others (``config.mean`` / ``std``, from a timm repo's pretrained_cfg) converts them first.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from . import serialization
from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import LeopartError


def _readable_attention() -> tuple[type, ...]:
    """timm attention modules whose queries and keys cls_attention recomputes: the ViT's, EVA's (EVA-02, DINOv3)
    and the rotary one of timm's RoPE ViTs (timm >= 1.0.16; Perception Encoder). Others (parallel blocks,
    differential attention) run, but give no attention map."""
    from timm.models import eva, vision_transformer

    kinds = [vision_transformer.Attention, eva.EvaAttention]
    try:
        from timm.layers.attention import AttentionRope
        kinds.append(AttentionRope)
    except ImportError:
        pass
    return tuple(kinds)


READABLE_ATTENTION = _readable_attention()


@dataclass
class LeopartConfig:
    """What a LeopartViT is built from (its config.json): the timm ViT, the projection head and the prototypes."""

    arch: str = "vit_small_patch16_224"  # any timm ViT name
    img_size: int = 224                  # size the position embeddings were trained at
    num_prototypes: int = 300
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    proj_layers: int = 3
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)  # timm overrides, e.g. {"patch_size": 8}
    # Per-channel statistics the backbone's weights were trained with, where not ImageNet's (timm's pretrained_cfg
    # of CLIP, SigLIP, EVA-02, ...); None: ImageNet's. Inputs always arrive ImageNet-normalised: see LeopartViT.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        # One spelling: tuples (JSON gives lists), and None for ImageNet's own statistics.
        for name, imagenet in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                value = ()
            if len(value) != 3 or (name == "std" and min(value) <= 0):
                raise LeopartError(f"LeopartConfig {name} must be three (positive) numbers, one per RGB channel, "
                                   f"not {getattr(self, name)!r}")
            setattr(self, name, None if all(abs(a - b) < 1e-6 for a, b in zip(value, imagenet)) else value)

    @classmethod
    def from_dict(cls, d: dict) -> "LeopartConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def cls_attention(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """The class token's softmax attention weights [B, heads, T] in ``attn`` (a READABLE_ATTENTION module) on its
    input tokens ``x`` [B, T, D] (and the rotary embedding its block passed it, if any).

    timm's fused attention never materialises the weights, so recompute them from the module's own projections:
    the first query row and every key, as its forward computes them (biases, q/k norms, rotary positions on the
    non-prefix tokens, grouped key heads).
    """
    B, T, _ = x.shape
    heads = attn.num_heads
    if attn.qkv is not None:
        weight, bias = attn.qkv.weight, attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # EVA keeps its q and v biases apart (k's is zero)
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        # The whole projection, laid out as the module lays it out (so the same float rounding); then q's first row.
        qkv = F.linear(x, weight, bias).reshape(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0][:, :, :1], qkv[1]                                        # [B, heads, 1 | T, head_dim]
    else:
        q = attn.q_proj(x[:, :1]).reshape(B, 1, heads, -1).transpose(1, 2)     # [B, heads, 1, head_dim]
        k = attn.k_proj(x).reshape(B, T, -1, q.shape[-1]).transpose(1, 2)      # [B, key heads, T, head_dim]
    if hasattr(attn, "q_norm"):  # older timm's EVA attention (1.0.8) has no q/k norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:  # the class token is a prefix token: its query stays unrotated
        from timm.layers import apply_rot_embed_cat

        n = attn.num_prefix_tokens
        half = {"half": True} if getattr(attn, "rotate_half", False) else {}
        k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, **half)], dim=2).type_as(q)
    if k.shape[1] != heads:  # grouped-query attention: each key head serves several query heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]


class LeopartOutput(NamedTuple):
    patch_tokens: torch.Tensor        # [B, h, w, D] backbone output after the final norm
    embeddings: torch.Tensor | None   # [B, h, w, proj_dim], L2-normalised
    scores: torch.Tensor | None       # [B, h, w, K] cosine similarity to each prototype
    attention: torch.Tensor | None    # [B, heads, h, w] last layer's CLS-to-patch attention


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int) -> nn.Module:
    if n_layers == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(n_layers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


class LeopartViT(nn.Module):
    """A timm ViT backbone with Leopart's projection head and prototypes.

    ``model(x, attention=True)`` on normalised images [B, 3, H, W] (H, W multiples of the patch size) gives a
    LeopartOutput: patch tokens [B, h, w, D], embeddings, prototype scores and the last layer's CLS attention.
    Load one with ``leopart.from_pretrained``; ``save_pretrained`` / ``push_to_hub`` write config.json +
    model.safetensors.
    """

    # What from_pretrained loaded it from (alias, Hub id, or absolute local path), so outputs made with it
    # (segmenters, probe heads) can name it; None for a model built in code.
    name_or_path: str | None = None

    def __init__(self, config: LeopartConfig | None = None, **overrides):
        super().__init__()
        config = dataclasses.replace(config or LeopartConfig(), **overrides)
        self.config = config
        sizes = {name: getattr(config, name) for name in ("img_size", "num_prototypes", "proj_hidden_dim", "proj_dim",
                                                          "proj_layers")}
        bad = [f"{name}={value!r}" for name, value in sizes.items() if not isinstance(value, int) or value < 1]
        if bad:
            raise LeopartError(f"LeopartConfig needs positive integer sizes, not {', '.join(bad)}")
        if not timm.is_model(config.arch):
            raise LeopartError(f"unknown timm model '{config.arch}' (timm.list_models('vit_*') lists the ViTs)")
        not_a_vit = LeopartError(f"'{config.arch}' is not a Vision Transformer: leopart needs a timm ViT "
                                 "(vit_*, deit_*, eva02_*, ...)")
        try:
            self.backbone = timm.create_model(
                config.arch, pretrained=False, num_classes=0, img_size=config.img_size, dynamic_img_size=True,
                **config.backbone_kwargs,
            )
        except (TypeError, RuntimeError, ValueError, AssertionError) as e:  # e.g. a bad backbone_kwargs override
            if isinstance(e, TypeError) and "dynamic_img_size" in str(e):  # BEiT, SAM, relpos ViTs
                raise LeopartError(f"timm's '{config.arch}' cannot change its input size (no dynamic_img_size): "
                                   "leopart needs a timm ViT that can (vit_*, deit*, eva02_*, *_dinov3, ...)") from None
            if isinstance(e, TypeError) and "img_size" in str(e):  # a timm model without ViT arguments
                raise not_a_vit from None
            raise LeopartError(f"cannot build backbone '{config.arch}': {e}") from None
        if not hasattr(self.backbone, "blocks") or not hasattr(self.backbone, "patch_embed"):
            raise not_a_vit
        self.embed_dim = self.backbone.embed_dim
        # Pixels per token side: a hybrid's patch embedding (a CNN stem) reports patch size 1 and its stride apart.
        embed = self.backbone.patch_embed
        self.patch_size = embed.feat_ratio() if hasattr(embed, "feat_ratio") else embed.patch_size[0]
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
        # leopart's preprocessing normalises with ImageNet's statistics; a backbone trained with others gets its
        # inputs converted, x * scale + shift per channel (not saved: config.json holds the statistics).
        scale = shift = None
        if config.mean is not None or config.std is not None:
            mean = torch.tensor(config.mean or IMAGENET_MEAN)
            std = torch.tensor(config.std or IMAGENET_STD)
            scale = (torch.tensor(IMAGENET_STD) / std).view(1, 3, 1, 1)
            shift = ((torch.tensor(IMAGENET_MEAN) - mean) / std).view(1, 3, 1, 1)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.projection_head = projection_head(
            self.embed_dim, config.proj_hidden_dim, config.proj_dim, config.proj_layers
        )
        self.prototypes = nn.Linear(config.proj_dim, config.num_prototypes, bias=False)
        self._init_heads()

    def _init_heads(self):
        for m in [*self.projection_head.modules(), self.prototypes]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self):
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @property
    def backbone_id(self) -> str:
        """The backbone's timm name, and its input statistics where they are not ImageNet's: what feature caches are
        named by besides the weights (the statistics are not among them)."""
        c = self.config
        return c.arch if c.mean is None and c.std is None else f"{c.arch} mean={c.mean} std={c.std}"

    @property
    def num_heads(self) -> int | None:
        """Attention heads of the last block (None where its attention is not one module)."""
        last = self.backbone.blocks[-1]
        return getattr(getattr(last, "attn", last), "num_heads", None)

    def attention_problem(self) -> str | None:
        """Why the last layer's CLS attention (the foreground cue) cannot be read, or None when it can."""
        attn = getattr(self.backbone.blocks[-1], "attn", None)
        if getattr(self.backbone, "cls_token", None) is None:
            return "has no class token"
        if type(attn) not in READABLE_ATTENTION:
            return f"has a last-layer attention leopart cannot read ({type(attn or self.backbone.blocks[-1]).__name__})"
        return None

    def check_attention(self):
        """Raise a one-line LeopartError unless the last layer's CLS attention can be read."""
        problem = self.attention_problem()
        if problem:
            raise LeopartError(f"{self.config.arch} {problem}, so it gives no CLS attention for the foreground cue: "
                               f"take it from another model (--fg-model dino-vits16) or, in training, count every "
                               f"patch (--loss-mask all)")

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise LeopartError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():  # e.g. uint8 pixels: the model takes normalised floats, leopart.embed any image
            raise LeopartError(f"expected normalised float images, got {x.dtype}: pass pixels to leopart.embed, or "
                               "normalise them as it does (scale to [0, 1], then the model's mean and std)")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H < p or W < p:
            raise LeopartError(f"image size {H}x{W} is not a positive multiple of the patch size {p}")
        return H // p, W // p

    def _tokens(self, x: torch.Tensor, with_attention: bool):
        """Backbone tokens [B, T, D] after the final norm (timm's forward_features), and optionally the CLS row of
        the last block's attention, from that attention module's input, caught on the way."""
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        if not with_attention:
            return self.backbone.forward_features(x), None
        self.check_attention()
        attn = self.backbone.blocks[-1].attn
        seen = {}

        def keep_input(module, args, kwargs):
            # EVA-style blocks also pass the rotary position embedding their attention applies.
            seen["x"], seen["rope"] = args[0], kwargs.get("rope", args[1] if len(args) > 1 else None)

        hook = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
        try:
            t = self.backbone.forward_features(x)
        finally:
            hook.remove()
        return t, cls_attention(attn, seen["x"], seen["rope"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens [B, prefix + h*w, D], as timm's ``forward_features``."""
        self._check_input(x)
        return self._tokens(x, with_attention=False)[0]

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone patch tokens [B, h, w, D] (prefix tokens dropped)."""
        h, w = self._check_input(x)
        t = self._tokens(x, with_attention=False)[0]
        return t[:, self.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)

    def last_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Last layer's CLS-to-patch attention [B, heads, h, w]; average over dim 1 for the mean map."""
        return self(x, heads=False, attention=True).attention

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens [..., D] -> (L2-normalised embeddings [..., proj_dim], prototype scores [..., K])."""
        emb = F.normalize(self.projection_head(tokens), dim=-1)
        return emb, self.prototypes(emb)

    def forward(self, x: torch.Tensor, heads: bool = True, attention: bool = False) -> LeopartOutput:
        h, w = self._check_input(x)
        t, attn = self._tokens(x, with_attention=attention)
        patches = t[:, self.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)
        emb, scores = self.project(patches) if heads else (None, None)
        if attn is not None:
            # Keep the CLS token's weights on the patch tokens.
            attn = attn[:, :, self.num_prefix_tokens:].reshape(x.shape[0], -1, h, w)
        return LeopartOutput(patches, emb, scores, attn)

    # ------------------------------------------------------- save / load / push
    def save_pretrained(self, folder: str | Path, *, repo_id: str | None = None) -> Path:
        """Write config.json + model.safetensors + README.md model card into ``folder``; the card's example loads
        ``repo_id`` when given (push_to_hub passes it)."""
        config = {"leopart_kind": "model", **dataclasses.asdict(self.config)}
        return serialization.save_folder(folder, config, self.state_dict(), model_card(self, repo_id))

    @classmethod
    def from_pretrained(cls, name: str | Path, **kwargs) -> "LeopartViT":
        from .hub import from_pretrained

        return from_pretrained(name, **kwargs)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload Leopart ViT") -> str:
        return serialization.push_folder(self.save_pretrained, repo_id, private=private, token=token,
                                         commit_message=commit_message)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LeopartViT":
        config, state = serialization.load_folder(folder, "model")
        model = cls(LeopartConfig.from_dict(config))
        model.load_weights(state, source=str(folder), strict=True)
        return model

    def load_weights(self, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> list[str]:
        """Load a state dict in our key layout, reporting mismatches by name.

        Returns the names of missing head keys (allowed when ``strict`` is False, e.g. DINO weights).
        """
        problems, missing = serialization.state_dict_mismatches(
            self.state_dict(), state, tolerate_missing=lambda key: not strict and not key.startswith("backbone."))
        if problems:
            raise LeopartError(f"weights in {source} do not fit {self.config.arch}: " + "; ".join(problems))
        self.load_state_dict(state, strict=False)
        return missing


def model_card(model: LeopartViT, repo_id: str | None = None) -> str:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: leopart
pipeline_tag: image-feature-extraction
tags:
- leopart
- vision-transformer
- self-supervised
- semantic-segmentation
---
# Leopart ViT ({c.arch})

Dense, part-aware patch features from a Vision Transformer fine-tuned with Leopart
(Ziegler & Asano, "Self-Supervised Learning of Object Parts for Semantic Segmentation", CVPR 2022).

| backbone | patch size | embed dim | prototypes | parameters |
|---|---|---|---|---|
| `{c.arch}` | {model.patch_size} | {model.embed_dim} | {c.num_prototypes} | {n_params / 1e6:.1f}M |

```python
import leopart
model = leopart.from_pretrained("{repo_id or '<this repo or folder>'}")
features = leopart.embed("image.jpg", model=model)   # [1, h, w, {model.embed_dim}]
```
"""
