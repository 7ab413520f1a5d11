"""LeopartViT: a timm Vision Transformer + Leopart's projection head and prototypes.

The backbone is any timm ViT; its patch tokens go through a 3-layer MLP (Linear-GELU-Linear-GELU-Linear),
are L2-normalised, and are scored against L2-normalised prototypes (cosine similarities in [-1, 1]).
Module names follow the original release (``projection_head.0/2/4``, ``prototypes``) so converted
checkpoints load by key. Inputs of any size that is a multiple of the patch size work: timm interpolates
the position embeddings (``dynamic_img_size``).
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
from .errors import LeopartError


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

    @classmethod
    def from_dict(cls, d: dict) -> "LeopartConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
            if isinstance(e, TypeError) and "img_size" in str(e):  # a timm model without ViT arguments
                raise not_a_vit from None
            raise LeopartError(f"cannot build backbone '{config.arch}': {e}") from None
        if not hasattr(self.backbone, "blocks") or not hasattr(self.backbone, "patch_embed"):
            raise not_a_vit
        self.embed_dim = self.backbone.embed_dim
        self.patch_size = self.backbone.patch_embed.patch_size[0]
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
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
    def num_heads(self) -> int:
        return self.backbone.blocks[-1].attn.num_heads

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise LeopartError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H < p or W < p:
            raise LeopartError(f"image size {H}x{W} is not a positive multiple of the patch size {p}")
        return H // p, W // p

    def _tokens(self, x: torch.Tensor, with_attention: bool):
        """Backbone tokens [B, T, D] after the final norm, and optionally the last block's attention."""
        bb = self.backbone
        t = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        for blk in bb.blocks[:-1]:
            t = blk(t)
        attn = self._attention(bb.blocks[-1], t) if with_attention else None
        t = bb.blocks[-1](t)
        return bb.norm(t), attn

    @staticmethod
    def _attention(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The CLS token's softmax attention weights [B, heads, T] in ``block``, on input tokens ``t``.

        timm's fused attention never materialises the weights, so recompute them from the block's own qkv
        projection: one extra qkv matmul on the last layer, and only the CLS query row of q k^T.
        """
        attn = block.attn
        B, T, _ = t.shape
        qkv = attn.qkv(block.norm1(t)).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]

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
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors + README.md model card into ``folder``."""
        config = {"leopart_kind": "model", **dataclasses.asdict(self.config)}
        return serialization.save_folder(folder, config, self.state_dict(), model_card(self))

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


def model_card(model: LeopartViT) -> str:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: leopart
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
model = leopart.from_pretrained("<this repo or folder>")
features = leopart.embed("image.jpg", model=model)   # [1, h, w, {model.embed_dim}]
```
"""
