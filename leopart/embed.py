"""Images in, dense patch features out: ``leopart.embed``."""
from __future__ import annotations

import itertools
import numbers
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from . import data, serialization
from .device import autocast, check_host_memory, default_device, precision_key
from .errors import LeopartError, flag, positive_int
from .hub import from_pretrained
from .model import LeopartViT
from .progress import progress_bar

# A fixed input size: one side in pixels (a square) or (height, width).
Resolution = int | tuple[int, int]


@dataclass(frozen=True)
class ShorterSide:
    """Each image resized to ``pixels`` on its shorter side with its aspect ratio kept (keep_aspect=True)."""
    pixels: int


MAX_KEPT_ASPECT = 16  # a 16:1 panorama has 16x the patches of the square, its attention 256x the cost


def check_side(side: int, patch_size: int, shown: str = "") -> None:
    """Refuse an input side that is not a positive multiple of the patch size (``shown``: the whole resolution)."""
    if side < patch_size or side % patch_size:
        raise LeopartError(f"resolution{shown} {side} is not a positive multiple of the patch size {patch_size}")


def keep_aspect_size(height: int, width: int, short_side: int, patch_size: int) -> tuple[int, int]:
    """(height, width) of an image resized to ``short_side`` on its shorter side with its aspect ratio kept, each
    side rounded to a multiple of the patch size (``short_side`` must be one). The longer side is capped at
    MAX_KEPT_ASPECT times the shorter: a more elongated image is squeezed to 16:1."""
    check_side(short_side, patch_size)
    scale = short_side / min(height, width)
    long_side = MAX_KEPT_ASPECT * short_side
    return (min(long_side, max(1, round(height * scale / patch_size)) * patch_size),
            min(long_side, max(1, round(width * scale / patch_size)) * patch_size))


def sides(resolution: Resolution) -> tuple[int, int]:
    """(height, width) in pixels of a fixed resolution."""
    return resolution if isinstance(resolution, tuple) else (resolution, resolution)


def _preprocess(i: int, item: Any, resolution: Resolution | ShorterSide | None, patch_size: int,
                resample: str = "bicubic") -> tuple[str, torch.Tensor]:
    name = data.describe(item, i)
    img = data.load_image(item, name)
    if resolution is None:  # native size: at least one patch; a fixed resolution resizes any image
        data.check_size(img, patch_size, name)
        size = (img.height // patch_size * patch_size, img.width // patch_size * patch_size)
    elif isinstance(resolution, ShorterSide):
        size = keep_aspect_size(img.height, img.width, resolution.pixels, patch_size)
    else:
        size = sides(resolution)
    return name, data.to_tensor(img, size, resample)


def check_features_fit(n_images: int, model: LeopartViT, resolution: Resolution, bytes_per_value: int, what: str,
                       advice: str) -> None:
    """Fail before any work when ``what`` (patch tokens of ``n_images`` inputs) cannot fit in host memory."""
    height, width = sides(resolution)
    patches = (height // model.patch_size) * (width // model.patch_size)
    check_host_memory(n_images * patches * model.embed_dim * bytes_per_value, f"{what} of {n_images} images", advice)


def iter_preprocessed(images: Iterable, resolution: Resolution | ShorterSide | None, patch_size: int,
                      threads: int | None = None, resample: str = "bicubic") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, normalised tensor [3, H, W]) of single images (as ``data.listed`` gives them: expanding
    again would open a folder that a .txt list names) in input order, decoding lazily.

    Decoding and resizing run in a few threads (PIL releases the GIL), at most ``2 * threads`` images
    ahead of the consumer, so a GPU is not left waiting on one CPU core and memory stays bounded.
    """
    threads = threads if threads is not None else min(8, os.cpu_count() or 1)
    items = enumerate(images)
    yield from data.map_ahead(lambda item: _preprocess(*item, resolution, patch_size, resample), items, threads)


def _count(images: Any) -> int | None:
    if isinstance(images, (list, tuple)):
        return len(images)
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return images.shape[0]
    return None


@torch.no_grad()
def iter_batches(images: Any, model: LeopartViT, resolution: Resolution | ShorterSide | None, batch_size: int,
                 device: torch.device, attention: bool = False, progress: bool | None = None, desc: str = "embed",
                 resample: str = "bicubic", full_precision: bool = False):
    """Yield (names, patch tokens [b, h, w, D], attention [b, heads, h, w] or None) per batch, on ``device``.

    Ragged sizes (resolution None or ShorterSide) go one image at a time. On CUDA the model runs under bf16
    autocast unless ``full_precision`` (scoring: float32, as the reference code ran it).
    """
    ragged = resolution is None or isinstance(resolution, ShorterSide)
    if isinstance(resolution, ShorterSide):
        check_side(resolution.pixels, model.patch_size)
    elif resolution is not None:
        shown = f" {'x'.join(map(str, resolution))}:" if isinstance(resolution, tuple) else ""
        for side in sides(resolution):
            check_side(side, model.patch_size, shown)
    batch_size = positive_int(batch_size, "batch_size")
    # On a GPU, decode in threads so the model is not left waiting; on the CPU the model already uses every
    # core, and decoding threads would only compete with it.
    stream = iter_preprocessed(images, resolution, model.patch_size, threads=0 if device.type == "cpu" else None,
                               resample=resample)
    total = _count(images)
    per_call = 1 if ragged else batch_size
    with progress_bar(total=total, unit="img", desc=desc, progress=_progress(progress, total, batch_size)) as bar:
        while batch := list(itertools.islice(stream, per_call)):
            x = torch.stack([t for _, t in batch]).to(device)
            with autocast(device, full_precision):
                out = model(x, heads=False, attention=attention)
            attn = out.attention.float() if attention else None
            yield [name for name, _ in batch], out.patch_tokens.float(), attn
            bar.update(len(batch))


def embed(images: Any, model: str | LeopartViT = "vits16", resolution: Resolution | None = 224, batch_size: int = 32,
          device=None, progress: bool | None = None, cache_dir: str | os.PathLike | None = None,
          full_precision: bool = False, keep_aspect: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """Backbone patch tokens of ``images``.

    images: a path, a folder (recursive), a .txt file listing image paths (one per line, relative to its
        folder), a PIL image, an image file's bytes, an HxWx3 array or CxHxW tensor (uint8, or floats in
        [0, 1] or [0, 255]; not mean/std-normalised), a batch (BxHxWx3 array, BxCxHxW tensor), or a list /
        iterator of them. Decoded one batch at a time; the result is allocated once (an iterator's maps are
        collected first, since its length is unknown: twice the result's memory at the end).
    resolution: side of the square every image is resized to (bicubic), or (height, width); ``None`` (or
        "native") keeps each image's own size rounded down to the patch size and returns a list of [h_i, w_i, D]
        tensors.
    keep_aspect: resize each image to ``resolution`` pixels on its shorter side, its aspect ratio kept (each side
        rounded to the patch size; beyond 16:1 squeezed to 16:1), and return a list of [h_i, w_i, D] tensors.
    cache_dir: keep the features there in files of 256 images (image files only), named by the model's
        weights, the files and the resolution: an interrupted run resumes at the first missing file.
    progress: a bar in a terminal, lines on stderr in a log (see ``leopart.progress``); False: none.
    full_precision: on CUDA, run the model in float32 rather than under bf16 autocast (slower; the values of
        timm's float32 forward). The CPU always runs float32.
    Returns a float32 CPU tensor [B, h, w, D] with h = w = resolution // patch_size (h = height // patch_size,
    w = width // patch_size for (height, width)).
    """
    resolution = kept_aspect(as_resolution(resolution), keep_aspect)
    images = data.listed(images)  # counted first (unless an iterator), so the result is allocated once
    device = default_device(device)
    model = from_pretrained(model, device=device)
    ragged = resolution is None or isinstance(resolution, ShorterSide)  # a map per image, each of its own size
    if not ragged and isinstance(images, list):
        check_features_fit(len(images), model, resolution, 4, "the features",
                           "take them one at a time with leopart.iter_embeddings, or stream them to a file with "
                           "`leopart embed -o FILE`")
    maps = _embeddings(images, model, resolution, batch_size, device, progress, cache_dir, full_precision)
    if ragged:
        return list(maps)
    if isinstance(images, list):
        count = len(images)
    else:  # an iterator: its length is known only at its end
        maps = list(maps)
        count = len(maps)
    if count == 0:
        raise LeopartError("no images to embed")
    return serialization.concat_rows(({"features": fmap[None]} for fmap in maps), count)["features"]


def iter_embeddings(images: Any, model: str | LeopartViT = "vits16", resolution: Resolution | None = 224,
                    batch_size: int = 32, device=None, progress: bool | None = None,
                    cache_dir: str | os.PathLike | None = None, full_precision: bool = False,
                    keep_aspect: bool = False) -> Iterator[torch.Tensor]:
    """``embed`` one image at a time: float32 CPU tensors [h, w, D] in input order, with at most one batch
    (or one cache file) in memory, for datasets whose features do not fit in it (``leopart embed`` streams
    them to its output file). The model loads now, the images as the iterator is consumed."""
    return _embeddings(data.listed(images), model, kept_aspect(as_resolution(resolution), keep_aspect), batch_size,
                       device, progress, cache_dir, full_precision)


def kept_aspect(resolution: Resolution | None, keep_aspect: bool) -> Resolution | ShorterSide | None:
    """``resolution`` as ShorterSide where ``keep_aspect`` asks for it (which needs one side in pixels)."""
    if not flag(keep_aspect, "keep_aspect"):
        return resolution
    if not isinstance(resolution, int):
        raise LeopartError("keep_aspect takes the shorter side in pixels as resolution, not "
                           f"{'None (each image its own size)' if resolution is None else resolution}")
    return ShorterSide(resolution)


def as_resolution(resolution) -> Resolution | None:
    """``resolution`` as embed takes it: pixels (a square), (height, width), or None (also spelt "native", as on the
    command line). A square given as (side, side) is the side alone, so it names the same feature cache."""
    if resolution is None or resolution == "native":
        return None
    given = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    if len(given) != 2 or not all(isinstance(side, numbers.Real) and not isinstance(side, bool)
                                  and float(side).is_integer() for side in given):
        raise LeopartError(f"resolution must be a whole number of pixels, (height, width) or None (each image's own "
                           f"size), not {resolution!r}")
    height, width = (int(side) for side in given)
    return height if height == width else (height, width)


def _embeddings(images: list | Iterator, model, resolution, batch_size, device, progress, cache_dir,
                full_precision) -> Iterator[torch.Tensor]:
    """iter_embeddings of inputs already expanded by ``data.listed``."""
    device = default_device(device)
    model = from_pretrained(model, device=device)

    def stream(batch) -> Iterator[torch.Tensor]:
        return (t for _, tokens, _ in iter_batches(batch, model, resolution, batch_size, device, progress=progress,
                                                   full_precision=full_precision)
                for t in tokens.cpu().unbind(0))

    if cache_dir is None:
        return stream(images)

    def compute(batch) -> dict[str, torch.Tensor]:
        return {str(i): t for i, t in enumerate(stream(batch))}

    shards = serialization.cached_shards(cache_dir, list(images), compute, [model], "embed", model.backbone_id,
                                         resolution, *precision_key(device, full_precision))
    return (shard[str(i)] for shard in shards for i in range(len(shard)))


def _progress(progress: bool | None, total: int | None, batch_size: int) -> bool | None:
    if progress is None and total is not None and total <= batch_size:
        return False  # a single batch needs no bar
    return progress
