"""A synthetic parts dataset: objects made of textured parts on textured backgrounds, with object masks.

Every scene has a background of smooth, muted colour noise with fine grain and two or three overlapping
objects. There are three object classes; each is a shape made of two parts, and the parts differ in
*texture* (stripes of one orientation, a checkerboard, dots), not only in colour: each part pairs a colour
from its own hue family with a grey of random shade (dark in the first part, light in the second). The six
part hues are spread evenly around the colour wheel, so hues next to each other often belong to different
classes, greys belong to every class and muted backgrounds come in every hue: a single pixel says little,
while a patch's texture, colour mix and its neighbours say a lot, the setting Leopart's part-aware
features are made for.

    write_voc_dataset(folder, n_train=400, n_val=60, size=96, seed=0)

writes a PASCAL-VOC-layout folder (JPEGImages/*.png, SegmentationClass/*.png palette masks with
0 = background and 1..3 = the classes, ImageSets/Segmentation/{train,val}.txt) that ``leopart train``,
``leopart eval`` and the demo read like any other dataset.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from .segment import mask_image

CLASSES = ("background", "wheel", "box", "kite")
# The hue family of each class's (first, second) part: red/yellow, green/cyan, blue/magenta.
PART_HUES = ((0.0, 1 / 6), (2 / 6, 3 / 6), (4 / 6, 5 / 6))


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def part_colour(cls: int, part: int, rng: np.random.Generator) -> np.ndarray:
    return hsv_to_rgb(PART_HUES[cls - 1][part] + rng.normal(0, 0.03), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))


def grey(lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    return np.full(3, 255 * rng.uniform(lo, hi), dtype=np.float32)


# ------------------------------------------------------------------ textures
def stripes(yy, xx, angle: float, period: float, c1, c2, rng) -> np.ndarray:
    t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
    on = (np.floor(t + rng.random()) % 2)[..., None]
    return c1 * on + c2 * (1 - on)


def checker(yy, xx, period: float, c1, c2) -> np.ndarray:
    on = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
    return c1 * on + c2 * (1 - on)


def dots(yy, xx, period: float, c1, c2) -> np.ndarray:
    fy, fx = (yy / period) % 1 - 0.5, (xx / period) % 1 - 0.5
    on = ((fy ** 2 + fx ** 2) < 0.09)[..., None]
    return c1 * on + c2 * (1 - on)


def smooth_noise(size: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """A background: three muted colours blended by smooth random fields, plus fine grain."""
    coarse = rng.random((3, cells + 1, cells + 1)).astype(np.float32)
    fields = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse])
    weights = np.exp(6 * fields)
    weights /= weights.sum(axis=0, keepdims=True)
    colours = np.stack([hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.9)) for _ in range(3)])
    img = np.einsum("chw,cd->hwd", weights, colours)
    return img + rng.normal(0, 8, img.shape)


# -------------------------------------------------------------------- shapes
def _part_masks(cls: int, yy, xx, cy: float, cx: float, r: float, angle: float):
    """(object mask, inner/first part mask) of class ``cls`` centred at (cy, cx) with radius r."""
    dy, dx = yy - cy, xx - cx
    # Rotate coordinates so that parts split along a random axis.
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    if cls == 1:  # wheel: checker hub inside a striped ring
        d = np.sqrt(dx ** 2 + dy ** 2)
        return d < r, d < 0.5 * r
    if cls == 2:  # box: a square split into a dotted half and a striped half
        obj = (np.abs(u) < 0.8 * r) & (np.abs(v) < 0.8 * r)
        return obj, obj & (u < 0)
    # kite: a diamond whose upper part is checkered and lower part striped
    obj = (np.abs(u) / (0.7 * r) + np.abs(v) / r) < 1
    return obj, obj & (v < -0.2 * r)


def _part_textures(cls: int, yy, xx, rng):
    """The two parts' textures: each part's colour against a dark grey (first part) or a light grey (second)."""
    period = rng.uniform(3.0, 5.0)
    first = part_colour(cls, 0, rng), grey(0.05, 0.35, rng)
    second = part_colour(cls, 1, rng), grey(0.65, 0.95, rng)
    if cls == 1:
        return checker(yy, xx, period, *first), stripes(yy, xx, rng.uniform(0, np.pi), period, *second, rng)
    if cls == 2:
        return dots(yy, xx, period + 1, *first), stripes(yy, xx, np.pi / 2 + rng.normal(0, 0.2), period, *second, rng)
    return checker(yy, xx, period - 1, *first), stripes(yy, xx, rng.normal(0, 0.2), period, *second, rng)


def make_scene(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 [size, size, 3], class-id mask uint8 [size, size])."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = smooth_noise(size, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(2, 4)):
        cls = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(0.22, 0.34) * size
        cy, cx = rng.uniform(r, size - r, size=2)
        obj, first = _part_masks(cls, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        tex_first, tex_second = _part_textures(cls, yy, xx, rng)
        img[first] = tex_first[first]
        rest = obj & ~first
        img[rest] = tex_second[rest]
        mask[obj] = cls
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img, mask


def write_voc_dataset(folder: str | Path, n_train: int = 400, n_val: int = 60, size: int = 96,
                      seed: int = 0) -> Path:
    """Generate the dataset in VOC layout under ``folder`` (PNG images, so no JPEG blur on the textures)."""
    root = Path(folder)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"train": [f"train_{i:05d}" for i in range(n_train)], "val": [f"val_{i:05d}" for i in range(n_val)]}
    for split, names in splits.items():
        for name in names:
            img, mask = make_scene(rng, size)
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.png")
            mask_image(mask).save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "train_images.txt").write_text("".join(f"JPEGImages/{n}.png\n" for n in splits["train"]))
    return root
