"""Fully unsupervised segmentation of images: ``leopart.segment`` and the pieces it shares with eval.

Pipeline: patch tokens (and the last layer's attention) -> part clusters -> CBFE + CD -> objects.
With a fitted ``Segmenter`` the part centroids and part -> object map are fixed, so object ids mean the
same thing in every image. Part scores, not ids, are upsampled (bilinear) to the input size before the
argmax, so boundaries fall between patches where the scores cross.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import data, serialization
from .cluster import KMeansResult, cluster
from .device import default_device, precision_key
from .embed import Resolution, check_features_fit, iter_batches, keep_aspect_size
from .errors import LeopartError, flag, positive_int
from .foreground import foreground_mask
from .hub import from_pretrained
from .merge import Segmenter, merge, reference_weight_threshold
from .model import LeopartViT
from .serialization import atomic_path

DEFAULT_RESOLUTION = 448  # the paper's evaluation input size
# CBFE's attention cue keeps 65% of the attention mass, as the reference's fully unsupervised code does (training's
# loss mask keeps 60%).
CBFE_ATTENTION_MASS = 0.65


@dataclass
class DenseFeatures:
    names: list[str]
    features: torch.Tensor    # [B, h, w, D] fp32, CPU
    foreground: torch.Tensor  # [B, h, w] bool, CPU
    patch_size: int | None = None  # the model's: it picks the reference's community-detection threshold


def dense_features(images: Any, model: LeopartViT, resolution: Resolution = DEFAULT_RESOLUTION, batch_size: int = 16,
                   device=None, fg_model: LeopartViT | None = None, progress: bool | None = None,
                   cache_dir: str | os.PathLike | None = None, resample: str = "bicubic",
                   full_precision: bool = False) -> DenseFeatures:
    """Patch tokens of every image plus a foreground mask on the same grid.

    The mask comes from ``fg_model``'s last-layer attention (Leopart used a DINO ViT-S/16), or from the
    model's own attention when ``fg_model`` is None: the patches that hold 65% of its (blurred) mass. With
    ``cache_dir`` (image files only), features are kept there in files of 256 images, named by the models'
    weights, the files and the resolution: an interrupted run resumes at the first missing file, and a rerun
    (say with another k) skips the models. On CUDA the models run under bf16 autocast unless ``full_precision``
    (what scoring asks for, as the reference code ran float32).
    """
    device = default_device(device)
    resolution = (tuple(positive_int(side, "resolution") for side in resolution) if isinstance(resolution, tuple)
                  else positive_int(resolution, "resolution"))
    images = list(data.expand_inputs(images)) if not isinstance(images, torch.Tensor) else images
    if len(images) == 0:
        raise LeopartError("no images given")
    check_features_fit(len(images), model, resolution, 4, "the patch features",
                       "use fewer images, a lower resolution or a machine with more memory")
    (fg_model or model).check_attention()  # before any image is read

    models = [model] if fg_model is None else [model, fg_model]
    shards = serialization.cached_shards(
        cache_dir, images,
        lambda batch: _dense_batch(batch, model, resolution, batch_size, device, fg_model, progress, resample,
                                   full_precision),
        models, "dense", [m.backbone_id for m in models], resolution, CBFE_ATTENTION_MASS,
        *(() if resample == "bicubic" else (resample,)),  # bicubic caches keep their earlier names
        *precision_key(device, full_precision))
    dense = serialization.concat_rows(shards, len(images))
    names = [data.describe(item, i) for i, item in enumerate(images)]
    return DenseFeatures(names, dense["features"], dense["foreground"].bool(), model.patch_size)


def _dense_batch(images: list, model: LeopartViT, resolution: Resolution, batch_size: int, device: torch.device,
                 fg_model: LeopartViT | None, progress: bool | None, resample: str,
                 full_precision: bool) -> dict[str, torch.Tensor]:
    masks = []

    def batches():
        for _, tokens, attn in iter_batches(images, model, resolution, batch_size, device,
                                            attention=fg_model is None, progress=progress, desc="features",
                                            resample=resample, full_precision=full_precision):
            if attn is not None:
                masks.append(foreground_mask(attn, keep=CBFE_ATTENTION_MASS).cpu())
            yield {"features": tokens}  # from the GPU straight into the result, with no staging copy

    features = serialization.concat_rows(batches(), len(images), device="cpu")["features"]
    if fg_model is not None:
        for _, _, attn in iter_batches(images, fg_model, resolution, batch_size, device, attention=True,
                                       progress=progress, desc="foreground", resample=resample,
                                       full_precision=full_precision):
            masks.append(foreground_mask(attn, keep=CBFE_ATTENTION_MASS).cpu())
    foreground = torch.cat(masks)
    if foreground.shape[1:] != features.shape[1:3]:  # fg model with another patch size: resample the mask
        foreground = F.interpolate(foreground[:, None].float(), size=features.shape[1:3], mode="bilinear",
                                   align_corners=False)[:, 0] > 0.5
    return {"features": features, "foreground": foreground.to(torch.uint8)}


def check_k(k: int, n_images: int, resolution: int, patch_size: int, name: str = "k") -> None:
    """Fail before any feature is computed when ``k`` exceeds the patches of ``n_images`` square inputs."""
    n_patches = n_images * (resolution // patch_size) ** 2
    if k > n_patches and resolution % patch_size == 0:  # else the feature extraction names the bad resolution
        raise LeopartError(f"{name}={k} is larger than the number of patches ({n_patches}): use a smaller k or "
                           "more images")


def fit_segmenter(dense: DenseFeatures, k: int, *, iters: int = 50, n_init: int = 1, seed: int = 0,
                  bg_share: float | None = None, weight_threshold: float | None = None, resolution: float = 1.0,
                  device=None, params: dict | None = None,
                  progress: bool | None = None) -> tuple[Segmenter, KMeansResult]:
    """Cluster the patch tokens into ``k`` parts (k-means on ``device``: default cuda when available) and
    merge them into objects. ``weight_threshold`` defaults to the reference's for the features' patch size
    (0.07 for /8, 0.09 otherwise; as `leopart merge`), or merge's 0.07 when the features do not say."""
    device = default_device(device)
    if weight_threshold is None:
        weight_threshold = reference_weight_threshold(dense.patch_size) if dense.patch_size else 0.07
    n_patches = dense.features.shape[0] * dense.features.shape[1] * dense.features.shape[2]
    if k > n_patches:
        raise LeopartError(f"k={k} is larger than the number of patches ({n_patches}): use a smaller k or more images")
    km = cluster(dense.features, k, iters=iters, n_init=n_init, seed=seed, device=device, progress=progress)
    labels = km.labels.view(dense.features.shape[:3])
    segmenter = merge(km, labels, dense.foreground, bg_share=bg_share, weight_threshold=weight_threshold,
                      resolution=resolution, seed=seed, params=params)
    return segmenter, km


def upsample_argmax(scores: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 24) -> torch.Tensor:
    """scores [h, w, C] -> argmax over C of the bilinearly upsampled scores (align_corners=False), [H, W] int64.

    Small outputs upsample every channel at once. Large ones (a 12-megapixel photo's 149 parts: 1.8 billion
    values) interpolate only the channels that can win: every output pixel mixes the 4 scores of its source
    cell's corners with non-negative weights summing to 1, so a channel whose best corner is below another
    channel's worst corner loses everywhere in that cell (about 10 of 149 parts remain per cell). Same maxima as
    interpolating all channels, up to float rounding (the index may differ where two channels tie); a 12 MP
    photo's 149 parts on 2 CPU cores: 13.1 s -> 0.215 s (`python -m benchmarks.segment`). Memory stays within
    about ``max_elements`` floats.
    """
    h, w, c = scores.shape
    H, W = size
    s = scores.float()
    if c * H * W <= max_elements:
        return F.interpolate(s.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    y0, ly = _source_cells(H, h, s.device)
    x0, lx = _source_cells(W, w, s.device)
    corners, best_corner, n_candidates = cell_candidates(s)
    out = torch.empty(H, W, dtype=torch.int64, device=s.device)
    row_starts = torch.searchsorted(y0, torch.arange(h + 1, device=s.device)).tolist()
    # Cells are grouped by their number of candidates rounded up to a power of two, so a few cells with many
    # candidates do not make the whole row of cells interpolate that many.
    group_of_column = (n_candidates.float().log2().ceil().long())[:, x0]  # [h, W]
    for i in range(h):  # the output rows whose source cell row is i
        r0, r1 = row_starts[i], row_starts[i + 1]
        if r0 == r1:
            continue
        for group in group_of_column[i].unique().tolist():
            columns = (group_of_column[i] == group).nonzero().squeeze(1)
            m = min(c, 1 << group)
            cells = x0[columns]
            channels = best_corner[i, cells].topk(m, dim=-1).indices  # [n, m]: each cell's candidates come first
            cell = corners[:, i, cells].gather(-1, channels.expand(4, -1, m))  # [4, n, m]
            weight = lx[columns, None]
            top = torch.lerp(cell[0], cell[1], weight)  # [n, m]: along the cell row's top edge
            bottom = torch.lerp(cell[2], cell[3], weight)
            n = len(columns)
            step = max(1, max_elements // (n * m))
            for a in range(r0, r1, step):
                b = min(r1, a + step)
                values = torch.lerp(top.expand(b - a, n, m), bottom.expand(b - a, n, m), ly[a:b, None, None])
                out[a:b, columns] = channels.expand(b - a, n, m).gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1)
    return out


def cell_candidates(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each source cell's 4 corner scores [4, h, w, C], every channel's best corner [h, w, C], and how many
    channels can win somewhere in the cell [h, w] (best corner at least the best worst corner; at least 1)."""
    h, w, _ = scores.shape
    down = torch.arange(1, h + 1, device=scores.device).clamp_max(h - 1)
    right = torch.arange(1, w + 1, device=scores.device).clamp_max(w - 1)
    corners = torch.stack([scores, scores[:, right], scores[down], scores[down][:, right]])
    best_corner = corners.amax(0)
    worst_corner_of_best = corners.amin(0).amax(-1, keepdim=True)
    slack = 1e-6 * (1 + worst_corner_of_best.abs())  # rounding of the interpolation: keep near-losers too
    return corners, best_corner, (best_corner >= worst_corner_of_best - slack).sum(-1)


def _source_cells(n_out: int, n_in: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each output index, its source cell (the lower of the two neighbours it mixes) and the weight of the
    upper one, as torch's bilinear resize with align_corners=False computes them (clamped at the edges)."""
    src = ((torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    cell = src.long().clamp_max(n_in - 1)
    return cell, src - cell


def predict_objects(segmenter: Segmenter, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch tokens [h, w, D] -> object ids [H, W] (0 = background) at ``size``."""
    parts = upsample_argmax(segmenter.part_scores(features), size)
    return segmenter.objects(parts)


SEGMENTER_KNOWS_FOREGROUND = ("a segmenter already knows which parts are foreground: leave out the foreground model "
                              "(--fg-model, fg_model=), which only serves parts fitted on the image itself")


def fitted_with(segmenter: Segmenter | None) -> tuple[str, int]:
    """The model and input resolution a segmenter's parts were clustered with (as ``leopart cluster`` and the
    demo record them), else the released ViT-S/16 at 448 px."""
    params = segmenter.params if segmenter is not None else {}
    return str(params.get("model") or "vits16"), int(params.get("image_resolution") or DEFAULT_RESOLUTION)


def recorded_model(name: str, source: str) -> str:
    """A model name that a segmenter or probe head recorded, checked to exist here when it is a local path
    (one fitted on another machine names a folder of that machine)."""
    if Path(name).is_absolute() and not Path(name).exists():
        raise LeopartError(f"{source} was fitted with the model {name}, which is not on this machine: pass that "
                           "model's folder or Hub id as --model (model=)")
    return name


def segment(image: Any, model: str | LeopartViT | None = None, segmenter: str | Path | Segmenter | None = None,
            k: int | None = None, resolution: int | None = None, fg_model: str | LeopartViT | None = None,
            device=None, seed: int = 0, keep_aspect: bool = True) -> np.ndarray:
    """Object ids (0 = background) of one image, [H, W] int64 at the image's own size.

    Without a segmenter the image's own patches are clustered into ``k`` parts (default 8) and merged by
    CBFE + CD on that image alone; with one (a Segmenter, or a folder / Hub id of a saved one) the parts and
    objects are the segmenter's, so ids are consistent across images. ``model`` and ``resolution`` default to
    those the segmenter's parts were clustered with (``leopart cluster --model / --resolution``), else vits16 and 448.
    The model sees the image with its aspect ratio kept, ``resolution`` on its shorter side (up to 16:1), so a
    wide photo or video frame is not squeezed; ``keep_aspect=False`` resizes it to resolution x resolution, the
    paper's protocol (``leopart eval``) and how ``leopart cluster`` fits a segmenter's parts. Square images give
    the same masks either way.
    """
    device = default_device(device)
    if segmenter is not None and fg_model is not None:
        raise LeopartError(SEGMENTER_KNOWS_FOREGROUND)
    flag(keep_aspect, "keep_aspect")
    k = positive_int(k, "k") if k is not None else None
    if segmenter is not None and not isinstance(segmenter, Segmenter):
        if not isinstance(segmenter, (str, os.PathLike)):
            raise LeopartError(f"segmenter must be a Segmenter, a folder or a Hub id, not a {type(segmenter).__name__}")
        segmenter = Segmenter.from_pretrained(segmenter)
    fitted_model, fitted_resolution = fitted_with(segmenter)  # parts are patch features of one model at one scale
    model = from_pretrained(model if model is not None else recorded_model(fitted_model, "the segmenter"),
                            device=device)
    resolution = positive_int(resolution, "resolution") if resolution is not None else fitted_resolution
    img = data.load_image(image, data.describe(image, 0))
    if keep_aspect:
        resolution = keep_aspect_size(img.height, img.width, resolution, model.patch_size)
    fg = from_pretrained(fg_model, device=device) if fg_model is not None else None
    dense = dense_features([img], model, resolution, device=device, fg_model=fg, progress=False)
    if segmenter is None:
        segmenter, _ = fit_segmenter(dense, k or 8, seed=seed, device=device, progress=False)
    elif k is not None and k != segmenter.k:
        raise LeopartError(f"k={k} disagrees with the segmenter's {segmenter.k} parts: leave k out")
    if segmenter.centroids.shape[1] != dense.features.shape[-1]:
        raise LeopartError(f"the segmenter was fitted on {segmenter.centroids.shape[1]}-dim features, but this "
                           f"model gives {dense.features.shape[-1]}-dim ones: use the segmenter's own model")
    return predict_objects(segmenter, dense.features[0], (img.height, img.width)).numpy()


# ------------------------------------------------------------------ outputs
def voc_palette() -> list[int]:
    """PASCAL VOC's colour map: the bits of the class id spread over the high bits of R, G, B."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


MAX_MASK_ID = 255  # a palette PNG holds ids 0..255


def mask_image(mask: np.ndarray) -> Image.Image:
    if mask.max(initial=0) > MAX_MASK_ID or mask.min(initial=0) < 0:
        raise LeopartError(f"mask ids must lie in 0..{MAX_MASK_ID} to be written as a palette PNG")
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    img = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
    img.putpalette(voc_palette())
    return img


def overlay_image(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with each object tinted in its mask colour (background untouched).

    PIL blends in C on uint8: a 12-megapixel photo takes 0.3 s (1.7 s and ~1 GB as float numpy arrays).
    """
    image = image.convert("RGB")
    tinted = Image.blend(image, mask_image(mask).convert("RGB"), alpha)
    return Image.composite(tinted, image, Image.fromarray(mask > 0))


def save_png(img: Image.Image, path: str | os.PathLike, compress_level: int = 6) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=compress_level)


def save_overlay(image: Image.Image, mask: np.ndarray, path: str | os.PathLike) -> None:
    # A preview: zlib level 1 writes a 12-megapixel photo in 1.2 s instead of 8 s, for a file ~15% larger.
    save_png(overlay_image(image, mask), path, compress_level=1)
