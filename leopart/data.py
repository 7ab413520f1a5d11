"""Reading images from whatever users have: paths, folders, PIL images, encoded bytes, numpy arrays, tensors.

Every input becomes an RGB PIL image: grayscale, RGBA, palette, CMYK and 16-bit files included.
Files are read upright, as image viewers show them: an EXIF orientation (phone photos) is applied;
images passed in memory are taken as they are.
Folders are walked recursively in sorted order. Nothing is decoded before it is needed, so a folder of
any size streams through in constant memory.
"""
from __future__ import annotations

import collections
import functools
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import LeopartError
from .serialization import CHECKPOINT_SUFFIXES, URL

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".tga"}
# Photos that Pillow cannot decode: a folder's are skipped with a warning rather than silently (HEIC is what
# iPhones save by default). AVIF joins IMAGE_EXTENSIONS where the installed Pillow reads it (11.2 and later).
UNREADABLE_PHOTO_EXTENSIONS = {".heic", ".heif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf",
                               ".rw2"}
# Videos are not read (that would need a video decoder): a folder's are left out with a warning, and one given
# directly is named as a video, each with the ffmpeg line that turns it into a folder of frames.
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}
EXTRACT_FRAMES = "extract the frames first (ffmpeg -i {video} frames/%05d.png) and pass the folder"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXIF_ORIENTATION = 0x0112  # 1 = upright; 2-8 = mirrored and/or rotated; 5-8 swap width and height


@functools.cache
def _image_extensions() -> tuple[frozenset[str], frozenset[str]]:
    """(extensions read, photo extensions Pillow cannot read), for the installed Pillow."""
    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    extra = UNREADABLE_PHOTO_EXTENSIONS & readable
    return frozenset(IMAGE_EXTENSIONS | extra), frozenset(UNREADABLE_PHOTO_EXTENSIONS - extra)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, in sorted order (hidden files skipped). Photos in formats
    Pillow cannot read (HEIC, camera raw) and videos are left out with a warning that counts them."""
    folder = Path(folder)
    readable, unreadable = _image_extensions()
    files, photos, videos = [], collections.Counter(), collections.Counter()
    for p in folder.rglob("*"):
        suffix = p.suffix.lower()
        if (suffix in readable or suffix in unreadable or suffix in VIDEO_EXTENSIONS) and p.is_file() \
                and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            if suffix in readable:
                files.append(p)
            else:
                (photos if suffix in unreadable else videos)[suffix] += 1
    if photos:
        warnings.warn(f"{folder}: leaving out {_count_files(photos)}, which Pillow cannot read: convert them to JPEG "
                      "or PNG to include them", stacklevel=2)
    if videos:
        warnings.warn(f"{folder}: leaving out {_count_files(videos)}: leopart reads images, not videos; "
                      + EXTRACT_FRAMES.format(video="VIDEO"), stacklevel=2)
    return sorted(files)


def _count_files(by_suffix: collections.Counter) -> str:
    counts = ", ".join(f"{n} {ext[1:].upper()}" for ext, n in sorted(by_suffix.items()))
    return f"{counts} file{'s' if sum(by_suffix.values()) > 1 else ''}"


# The bytes of an encoded image file (JPEG, PNG, ...): one image, not a sequence of numbers.
ENCODED = (bytes, bytearray, memoryview)


def expand_inputs(inputs: Any) -> Iterator[Any]:
    """Flatten a path / folder / image / list of them into single images (paths stay lazy)."""
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if isinstance(inputs, str) and URL.match(inputs.strip()) and not path.exists():
            raise web_address(inputs.strip())
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise LeopartError(f"no images found in folder {path}")
            yield from files
        elif is_image_list(path):
            yield from read_image_list(path)
        else:
            yield path
    elif isinstance(inputs, (Image.Image, np.ndarray, torch.Tensor, *ENCODED)):
        if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4:
            yield from inputs  # a batch: tensors [B, C, H, W], arrays [B, H, W, C] (stacked frames)
        else:
            yield inputs
    elif _is_collection(inputs):
        for item in inputs:
            yield from expand_inputs(item)
    else:
        raise not_an_image(inputs)


def _is_collection(inputs: Any) -> bool:
    """A list, generator, ... of inputs; not a dict or an (image, label) tuple, which datasets hand out."""
    if isinstance(inputs, tuple):
        return not any(_is_label(item) for item in inputs)
    return isinstance(inputs, Iterable) and not isinstance(inputs, dict)


def _is_label(item: Any) -> bool:
    """A class id, or a DataLoader batch's [B] labels: never an image."""
    return item is None or isinstance(item, (int, float)) or _is_label_array(item)


def _is_label_array(item: Any) -> bool:
    return isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim <= 1


def not_an_image(item: Any) -> LeopartError:
    """The error for an input that is no image, with a hint for the containers datasets hand out."""
    name = type(item).__name__
    what = f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    if isinstance(item, dict):  # a Hugging Face datasets row, or a sample dict
        keys = ", ".join(map(str, list(item)[:5]))
        return LeopartError(f"cannot read an image from a dict (keys {keys}): pass the images alone, e.g. "
                            f"[row['image'] for row in rows]")
    if isinstance(item, tuple):
        kinds = ", ".join(type(x).__name__ for x in item[:4])
        return LeopartError(f"cannot read an image from a tuple ({kinds}), a dataset's (image, label) sample: pass "
                            f"the images alone, e.g. (image for image, *_ in dataset)")
    if hasattr(item, "__getitem__") and hasattr(item, "__len__"):  # a map-style dataset (torch.utils.data.Dataset)
        return LeopartError(f"cannot read an image from {what}, which is indexed but not iterable: pass its "
                            f"images, e.g. (image for image, *_ in dataset)")
    return LeopartError(f"cannot read an image from {what}")


def web_address(url: str, listed_in: Path | None = None) -> LeopartError:
    """Images are read from files (or from memory): a URL is refused with what to do instead."""
    subject = f"{listed_in} lists {url}, a web address" if listed_in else f"{url} is a web address"
    return LeopartError(f"{subject}: leopart reads image files, so download it first (curl -O URL), or in Python "
                        "pass its bytes: urllib.request.urlopen(URL).read()")


def is_image_list(path: Path) -> bool:
    """A .txt file names images, one per line (``expand_inputs`` reads it); any other file is an image."""
    return path.suffix.lower() == ".txt" and path.is_file()


def read_lines(path: Path) -> list[str]:
    """The entries of a list file (image paths, split names): one per line, stripped, blank lines and
    # comments skipped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LeopartError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\0" in raw[:8192]:  # an image or other binary file given where a list belongs
        kind = "an image" if path.suffix.lower() in IMAGE_EXTENSIONS else "a binary file"
        raise LeopartError(f"{path} is {kind}, not a text file listing one entry per line")
    # utf-8-sig: a list saved by Windows Notepad starts with a byte-order mark, not part of its first entry
    lines = [line.strip() for line in raw.decode("utf-8-sig", errors="replace").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def read_image_list(path: Path) -> list[Path]:
    """The image paths a text file lists. Relative paths are taken from the file's folder, so a list travels
    with its dataset."""
    lines = read_lines(path)
    for line in lines:
        if URL.match(line):
            raise web_address(line, listed_in=path)
    files = [path.parent / line for line in lines]  # an absolute line stays as it is
    if not files:
        raise LeopartError(f"{path} lists no images")
    return files


def listed(inputs: Any) -> list | Iterator:
    """``expand_inputs`` as a list, so its length is known (paths stay paths: cheap), unless ``inputs`` is an
    iterator, which stays one: it may be endless or hold decoded images, and is read once, lazily."""
    return expand_inputs(inputs) if isinstance(inputs, Iterator) else list(expand_inputs(inputs))


def map_ahead(fn: Callable[[Any], Any], items: Iterable, threads: int, ahead: int | None = None) -> Iterator:
    """``map(fn, items)`` in input order, run by ``threads`` threads at most ``ahead`` (default ``2 * threads``)
    items ahead of the consumer, so that decoding (PIL releases the GIL) overlaps the model while memory stays
    bounded. An error is raised where its item comes. ``threads=0``: plain ``map``, no threads."""
    if threads < 1:
        yield from map(fn, items)
        return
    ahead = max(1, ahead or 2 * threads)
    with ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def describe(item: Any, index: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image #{index}"


def load_image(item: Any, name: str = "image") -> Image.Image:
    """Any supported input -> RGB PIL image, with a one-line error for anything unreadable."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            raise LeopartError(f"no such file: {path}")
        return _decode(path, str(path))
    if isinstance(item, ENCODED):  # an image file's contents, e.g. from a web response or a dataset shard
        return _decode(io.BytesIO(item), name)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if _is_label_array(item):  # e.g. the labels of a DataLoader's batch
        raise LeopartError(f"{name} is a {type(item).__name__} of shape {tuple(item.shape)}, not an image: labels? pass "
                           f"the images alone, e.g. (images for images, *_ in loader)")
    if isinstance(item, torch.Tensor):
        return _tensor_to_pil(item, name)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, name)
    raise not_an_image(item)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()
            return to_rgb(upright(img))
    except IsADirectoryError:  # named in a .txt list (folders given directly are expanded); no stat per image
        raise LeopartError(f"{name} is a folder, not an image: a list names image files, one per line") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise unreadable_image(name, e) from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make good pixels unreadable
        return 1


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (no copy when there is none)."""
    return ImageOps.exif_transpose(img) if _orientation(img) in range(2, 9) else img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as ``load_image`` returns it, from its header alone."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if _orientation(img) in range(5, 9) else (w, h)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise unreadable_image(str(path), e) from None


# Files that end up among image inputs by mistake: what they are instead, and where they go.
NOT_IMAGES = {
    **dict.fromkeys(CHECKPOINT_SUFFIXES,
                    "a checkpoint, not an image: weights are a model (--model, or model= in Python)"),
    ".safetensors": "weights or features, not an image: weights are a model (--model, or model= in Python), "
                    "features go to leopart.cluster",
    **dict.fromkeys(VIDEO_EXTENSIONS, "a video, not an image: " + EXTRACT_FRAMES.format(video="'{name}'")),
    ".npy": "a features file (`leopart embed -o`), not an image: cluster features with "
            "leopart.cluster(numpy.load('{name}'))",
}


def unreadable_image(name: str, e: Exception) -> LeopartError:
    hint = NOT_IMAGES.get(Path(name).suffix.lower()) if isinstance(e, UnidentifiedImageError) else None
    return LeopartError(f"cannot read image {name}: {hint.format(name=name) if hint else _reason(e)}")


def _reason(e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):  # Pillow's guard against tiny files that decode to huge images
        return (f"{e.args[0].split(',')[0]} (Pillow's guard against decompression bombs; for a file you trust, "
                "raise PIL.Image.MAX_IMAGE_PIXELS or downscale it first)")
    return str(e)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit and float images: scale the value range to 8 bits instead of clipping it.
        return _array_to_pil(np.asarray(img), "image")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_pil(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise LeopartError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise LeopartError(f"{name}: the array holds NaN or infinite values")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < -0.25 and hi < 10:  # ImageNet-normalised values span about -2.1 to 2.6: clipped, they'd be black
            raise LeopartError(f"{name}: float values from {lo:.2f} to {hi:.2f} look mean/std-normalised: pass "
                               "intensities in [0, 1] or [0, 255] (leopart normalises them itself)")
        # Floats in [0, 1] or in [0, 255]; a little past 1 or 0 is a bicubic resize's overshoot, not a dark image.
        scale = 255.0 if hi <= 1.5 else 1.0
        a = np.clip(a * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        hi = a.max(initial=0)
        a = (a.astype(np.float64) * (255.0 / 65535.0 if hi > 255 else 1.0)).clip(0, 255).astype(np.uint8)
    else:
        raise LeopartError(f"{name}: unsupported array dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 4:
        return to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGBA"))
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def _tensor_to_pil(t: torch.Tensor, name: str) -> Image.Image:
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise LeopartError(f"{name}: expected a CxHxW tensor with 1, 3 or 4 channels, got {tuple(t.shape)}")
    return _array_to_pil(t.detach().cpu().permute(1, 2, 0).numpy(), name)


def check_size(img: Image.Image, min_size: int, name: str) -> None:
    if img.width < min_size or img.height < min_size:
        raise LeopartError(f"{name} is {img.width}x{img.height} pixels: smaller than one {min_size}x{min_size} patch")


RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def to_tensor(img: Image.Image, size: tuple[int, int] | None, resample: str = "bicubic") -> torch.Tensor:
    """RGB PIL -> normalised float tensor [3, H, W]; ``size`` = (height, width) for a resize, bicubic (leopart's)
    or bilinear (torchvision's Resize default, which the reference's evaluation used)."""
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), RESAMPLING[resample])
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------ training
def list_training_images(source: str | os.PathLike) -> list[Path]:
    """Images for training: a folder (recursive) or a text file with one path per line, whatever its name
    (relative paths are taken from the file's folder)."""
    source = Path(source)
    if source.is_dir():
        return list(expand_inputs(source))
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        raise LeopartError(f"{source} is one image: training takes a folder of images or a text file listing them")
    if source.is_file() and source.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise LeopartError(f"{source} holds weights: training takes a folder of images or a text file listing them "
                           "(weights to start from go to --init, or init= in Python)")
    if source.is_file():
        return read_image_list(source)
    raise LeopartError(f"no such folder or file list: {source}")


class MultiCropDataset(torch.utils.data.Dataset):
    """Leopart views of training images, indexed by (epoch, index) so augmentations are reproducible.

    An unreadable file is skipped: the next image takes its place (deterministically) and the bad path is
    reported with the sample, so batches keep their size and a resumed run stays in step.
    """

    def __init__(self, files: list[Path], crop_config, seed: int = 0):
        self.files = files
        self.cfg = crop_config
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        from .augment import make_views

        epoch, index = key
        skipped = []
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            try:
                img = load_image(self.files[i])
            except LeopartError:
                skipped.append(str(self.files[i]))
                continue
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            views = make_views(img, self.cfg, g)
            return views.crops, views.boxes, skipped
        raise LeopartError("none of the training images can be read")


def collate_views(samples):
    crops = [torch.stack([s[0][v] for s in samples]) for v in range(len(samples[0][0]))]
    boxes = torch.stack([s[1] for s in samples])
    skipped = [p for s in samples for p in s[2]]
    return crops, boxes, skipped


class EpochSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) keys: a seeded permutation per epoch, whole global batches only, this rank's
    share of each, starting at global step ``start_step`` (for resuming mid-epoch)."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0, start_step: int = 0):
        if n < global_batch:
            raise LeopartError(f"need at least {global_batch} images for a global batch of {global_batch}, found {n}: "
                               f"use a smaller batch size (--batch-size)")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start_step = seed, start_step
        self.steps_per_epoch = n // global_batch

    def __iter__(self):
        per_rank = self.global_batch // self.world
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for step in range(offset, self.steps_per_epoch):
                batch = order[step * self.global_batch: (step + 1) * self.global_batch]
                for i in batch[self.rank * per_rank: (self.rank + 1) * per_rank].tolist():
                    yield epoch, i
            epoch, offset = epoch + 1, 0
