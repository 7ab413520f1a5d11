"""Leopart's multi-crop views and the overlap boxes that tie them together.

Per image: ``n_global`` crops (scale 0.25-1 of the image area, resized to ``global_size``) and ``n_local``
crops (scale 0.05-0.25, resized to ``local_size``), each with colour jitter, grayscale, blur (``PHOTOMETRIC``:
the reference code's recipe, or DINO's) and a flip.
Crops are drawn one after another, each redrawn until it overlaps the global crops before it by more than 2% of
the image area (global crops) or 1% (local crops), as the reference code drew them. For each (global crop g,
crop v) pair we return the overlap rectangle in g's own pixel coordinates and in v's (flips included), which is
where the loss RoI-aligns g's targets and v's predictions.

All randomness comes from an explicit ``torch.Generator``, seeded per (seed, epoch, image index) by the
dataset, so a resumed run sees exactly the views an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from .data import RESAMPLING, to_tensor

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


@dataclass
class CropConfig:
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    min_overlap_global: float = 0.02  # of the image area, between the global crops
    min_overlap_local: float = 0.01   # of the image area, between each local crop and each global crop
    max_tries: int = 50
    jitter: bool = True               # colour jitter, grayscale and blur (flips always)
    hue: float = 0.2                  # largest hue shift of the colour jitter (0.5 = anywhere on the wheel)
    blur: bool = True                 # Gaussian blur (sigma 0.1-2 px: it erases textures finer than ~4 px)
    photometric: str = "reference"    # jitter strengths, blur probabilities, resampling: a key of PHOTOMETRIC
    redraw: str = "each"              # a key of CROP_REDRAW: how crops are redrawn until they overlap

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def size(self, i: int) -> int:
        return self.global_size if i < self.n_global else self.local_size


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_box(width: int, height: int, scale: tuple[float, float], g: torch.Generator,
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's integer box (x0, y0, x1, y1) inside a width x height image: up to 10 draws of an area share
    in ``scale`` and a log-uniform aspect ratio in ``ratio``, placed uniformly; when none fits, torchvision's
    fallback: the largest centred box of the image whose aspect ratio is within ``ratio``."""
    area = width * height
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(torch.randint(0, width - w + 1, (), generator=g))
            y0 = int(torch.randint(0, height - h + 1, (), generator=g))
            return x0, y0, x0 + w, y0 + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def intersection(a: Box, b: Box) -> Box | None:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def area(box: Box | None) -> float:
    return 0.0 if box is None else (box[2] - box[0]) * (box[3] - box[1])


def to_crop_coords(box: Box, crop: Box, size: int, flipped: bool) -> Box:
    """An image-space box in the pixel coordinates of ``crop`` resized to size x size (and maybe flipped)."""
    sx, sy = size / (crop[2] - crop[0]), size / (crop[3] - crop[1])
    x0, x1 = (box[0] - crop[0]) * sx, (box[2] - crop[0]) * sx
    y0, y1 = (box[1] - crop[1]) * sy, (box[3] - crop[1]) * sy
    if flipped:
        x0, x1 = size - x1, size - x0
    return x0, y0, x1, y1


def sample_crop_boxes(width: int, height: int, cfg: CropConfig, g: torch.Generator) -> list[tuple[int, int, int, int]]:
    """Crop boxes whose overlaps satisfy cfg's shares (``cfg.redraw``: the reference's way or leopart's earlier one)."""
    return CROP_REDRAW[cfg.redraw](width, height, cfg, g)


def redraw_each(width: int, height: int, cfg: CropConfig, g: torch.Generator) -> list[tuple[int, int, int, int]]:
    """The reference's LeopartTransforms: crops drawn one after another, the first freely, each later one redrawn
    alone until it overlaps every global crop before it by more than its share of the image area (2% between global
    crops, 1% for the others). A crop that finds no such place in ``max_tries`` draws (tiny or extreme-aspect
    images; the reference would loop forever) becomes the whole image, which overlaps every crop."""
    image_area = width * height
    boxes: list[tuple[int, int, int, int]] = []
    for i in range(cfg.n_crops):
        is_global = i < cfg.n_global
        scale = cfg.global_scale if is_global else cfg.local_scale
        least = int(image_area * (cfg.min_overlap_global if is_global else cfg.min_overlap_local))
        earlier_globals = boxes[:cfg.n_global]
        for _ in range(cfg.max_tries):
            box = sample_box(width, height, scale, g)
            if all(area(intersection(box, other)) > least for other in earlier_globals):
                break
        else:
            box = (0, 0, width, height)
        boxes.append(box)
    return boxes


def redraw_all(width: int, height: int, cfg: CropConfig, g: torch.Generator) -> list[tuple[int, int, int, int]]:
    """leopart's way before 2026-11-29 (the demo keeps it): every crop redrawn together until all overlaps hold.
    Half the draws fail on a 500 x 333 image, so it favours larger, more overlapping global crops. If none holds
    within ``max_tries``, every crop becomes the whole image."""
    image_area = width * height
    for _ in range(cfg.max_tries):
        boxes = [sample_box(width, height, cfg.global_scale, g) for _ in range(cfg.n_global)]
        boxes += [sample_box(width, height, cfg.local_scale, g) for _ in range(cfg.n_local)]
        globals_ok = all(area(intersection(boxes[i], boxes[j])) >= cfg.min_overlap_global * image_area
                         for i in range(cfg.n_global) for j in range(i + 1, cfg.n_global))
        locals_ok = all(area(intersection(boxes[gi], boxes[v])) >= cfg.min_overlap_local * image_area
                        for gi in range(cfg.n_global) for v in range(cfg.n_global, cfg.n_crops))
        if globals_ok and locals_ok:
            return boxes
    return [(0, 0, width, height)] * cfg.n_crops


CROP_REDRAW = {"each": redraw_each, "all": redraw_all}


@dataclass(frozen=True)
class Photometric:
    """A crop recipe: colour jitter (applied with p = 0.8; each factor uniform in 1 +- its strength), Gaussian
    blur, and how the crop is resampled to its size."""

    brightness: float
    contrast: float
    saturation: float
    random_order: bool                # the four adjustments in a random order, as torchvision's ColorJitter
    blur_p: tuple[float, float, float]  # blur probability: first global crop, second global crop, other crops
    resample: str                     # the crop's resize: a key of data.RESAMPLING
    pil_blur: bool                    # PIL's GaussianBlur (box passes), else a sampled Gaussian kernel

    def blur_probability(self, i: int, n_global: int) -> float:
        return self.blur_p[i] if i < min(n_global, 2) else self.blur_p[2]


PHOTOMETRIC = {
    # The reference code's LeopartTransforms (jitter_strength 1, blur_strength 1): ColorJitter(0.8, 0.8, 0.8, 0.2)
    # with p = 0.8, grayscale with p = 0.2, blur with p = 0.5 on every crop; RandomResizedCrop's bilinear resize.
    # Blur with PIL's ImageFilter.GaussianBlur, as its GaussianBlur class did.
    "reference": Photometric(0.8, 0.8, 0.8, random_order=True, blur_p=(0.5, 0.5, 0.5), resample="bilinear",
                             pil_blur=True),
    # DINO's: ColorJitter(0.4, 0.4, 0.2, 0.1), blur always on the first global crop, 10% on the second, 50% on
    # the local ones, bicubic crops (leopart's recipe before 2026-11-28; the demo keeps it).
    "dino": Photometric(0.4, 0.4, 0.2, random_order=False, blur_p=(1.0, 0.1, 0.5), resample="bicubic",
                        pil_blur=False),
}


def photometric(img: Image.Image, g: torch.Generator, blur_p: float, hue: float = 0.2,
                recipe: Photometric = PHOTOMETRIC["reference"]) -> Image.Image:
    """Colour jitter, grayscale and blur with parameters drawn from ``g``."""
    if float(torch.rand((), generator=g)) < 0.8:
        adjustments = [
            lambda x: TF.adjust_brightness(x, _uniform(g, 1 - recipe.brightness, 1 + recipe.brightness)),
            lambda x: TF.adjust_contrast(x, _uniform(g, 1 - recipe.contrast, 1 + recipe.contrast)),
            lambda x: TF.adjust_saturation(x, _uniform(g, 1 - recipe.saturation, 1 + recipe.saturation)),
            lambda x: TF.adjust_hue(x, _uniform(g, -hue, hue)),
        ]
        order = torch.randperm(4, generator=g).tolist() if recipe.random_order else range(4)
        for i in order:
            img = adjustments[i](img)
    if float(torch.rand((), generator=g)) < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if float(torch.rand((), generator=g)) < blur_p:
        img = blur(img, _uniform(g, 0.1, 2.0), recipe)
    return img


def blur(img: Image.Image, sigma: float, recipe: Photometric) -> Image.Image:
    if recipe.pil_blur:
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))
    return TF.gaussian_blur(img, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)


@dataclass
class Views:
    crops: list[torch.Tensor]  # n_crops normalised tensors [3, size_i, size_i]
    boxes: torch.Tensor        # [n_global, n_crops, 2, 4]: overlap of (g, v) in g's and in v's pixels
    image_boxes: list[Box]     # the crops in image coordinates (for inspection and tests)


def make_views(img: Image.Image, cfg: CropConfig, g: torch.Generator) -> Views:
    width, height = img.size
    boxes = sample_crop_boxes(width, height, cfg, g)
    flips = [bool(torch.rand((), generator=g) < 0.5) for _ in boxes]
    crops = []
    recipe = PHOTOMETRIC[cfg.photometric]
    for i, (box, flip) in enumerate(zip(boxes, flips)):
        size = cfg.size(i)
        crop = img.resize((size, size), RESAMPLING[recipe.resample], box=box)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if cfg.jitter:
            blur_p = recipe.blur_probability(i, cfg.n_global) if cfg.blur else 0.0
            crop = photometric(crop, g, blur_p, cfg.hue, recipe)
        crops.append(to_tensor(crop, None))
    overlap = torch.zeros(cfg.n_global, cfg.n_crops, 2, 4)
    for gi in range(cfg.n_global):
        for v in range(cfg.n_crops):
            inter = intersection(boxes[gi], boxes[v])
            if inter is None:
                continue  # zero box: the loss skips pairs without overlap
            overlap[gi, v, 0] = torch.tensor(to_crop_coords(inter, boxes[gi], cfg.size(gi), flips[gi]))
            overlap[gi, v, 1] = torch.tensor(to_crop_coords(inter, boxes[v], cfg.size(v), flips[v]))
    return Views(crops, overlap, [tuple(map(float, b)) for b in boxes])
