"""The paper's unsupervised evaluation on a PASCAL-VOC-layout folder: ``leopart eval``.

Protocol (Ziegler & Asano, CVPR 2022, and its reference code): 448 x 448 inputs; k-means over the backbone patch
tokens of the whole split, run as the reference code runs it (``PROTOCOLS["reference"]``: tokens standardised and
reduced to 50 dimensions by PCA, Euclidean k-means fitted on 256 points per cluster, best of 5 runs from random
points, patch labels upsampled nearest; the mean over 5 seeds is reported) or as spherical k-means of the raw
tokens with part scores upsampled (``"cosine"``); predictions and masks compared at 100 x 100 (masks resized
nearest to the input side, then to 100, as the reference); label 255 ignored. Over-clustering (k > number of
classes) maps clusters to classes many-to-one, k = classes one-to-one (Hungarian, largest sum of IoUs; see
leopart.metrics); k < classes is matched many-to-one by the reference protocol (the reference code's rule:
Hungarian only at k = classes) and one-to-one by the cosine one. Fully unsupervised, reference protocol: the
reference code's pipeline on the train and scored splits together (leopart.fully_unsupervised: CBFE cut chosen on
the train masks, foreground parts, Infomap, mean of 10 runs). Cosine protocol: leopart.merge's pipeline on one
k-means of the scored split with K parts, the background share of CBFE swept over 0.55..0.75 and the best on the
scored split reported (``bg_shares``, ``--bg-share``, fixed to a share chosen on another split gives a score not
tuned on the scored images); objects are matched one-to-one to classes in both, objects left over merged into
background.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .cluster import KMeansResult, cluster
from .data import image_size, read_lines
from .device import default_device
from .errors import LeopartError, integer, plural, positive_int
from .fully_unsupervised import CBFE_K, CD_RUNS, check_infomap, reference_markov_time, reference_protocol
from .hub import from_pretrained
from .merge import check_weight_threshold, merge, reference_weight_threshold
from .metrics import hungarian_miou
from .model import LeopartViT
from .progress import progress_bar
from .segment import DEFAULT_RESOLUTION, check_k, dense_features, predict_objects, upsample_argmax

PUBLISHED = {  # PASCAL VOC 2012 val mIoU (%) from the paper
    "vits16": {"overclustering": {"500": 53.5}, "fully_unsupervised": 41.7, "linear": 69.3, "fcn": 71.4},
    "vitb8": {"overclustering": {"500": 59.7}, "fully_unsupervised": 47.2, "fcn": 76.3},
}
BG_SHARES = (0.55, 0.60, 0.65, 0.70, 0.75)


@dataclass(frozen=True)
class Protocol:
    """How the k-means of an evaluation is run and turned into 100 x 100 predictions."""

    pca_dim: int | None       # standardise the tokens and keep this many principal components (None: raw tokens)
    metric: str               # k-means metric
    iters: int                # Lloyd iterations at most
    n_init: int               # k-means runs per fit; the lowest-inertia one is kept
    init: str                 # initial centroids of each run: "random" points or "k-means++"
    seeds: int                # fits per k (different seeds); their mean mIoU is reported
    points_per_cluster: int | None  # fit on a random sample of this many points per cluster (None: all)
    upsample: str             # "labels": patch labels, nearest; "scores": part scores, bilinear, then argmax
    resample: str             # how images are resized to the input side: "bilinear" or "bicubic"
    one_to_one_below: bool    # k < classes: one-to-one matching (False: many-to-one, as for over-clustering)
    raw_means: bool           # metric "cosine": centroids average the raw tokens (faiss's spherical k-means)

    def many_to_one(self, k: int, num_classes: int) -> bool:
        """How a k-means fit's clusters are matched to classes: one-to-one (Hungarian) at k = classes."""
        return k > num_classes or (k < num_classes and not self.one_to_one_below)


PROTOCOLS = {
    # The reference code's (experiments/ of the Leopart repository): scikit-learn's StandardScaler, faiss's
    # PCA to 50 dimensions and faiss.Kmeans(niter=100, nredo=5), which trains on at most 256 points per
    # centroid and starts each run from random points, then labels every token; mean over 5 seeds. Images
    # resized by torchvision's Resize, bilinear. Hungarian matching only at k = classes, many-to-one at any other k.
    # Its spherical k-means (CBFE's) is faiss's: normalised means of the raw tokens.
    "reference": Protocol(pca_dim=50, metric="euclidean", iters=100, n_init=5, init="random", seeds=5,
                          points_per_cluster=256, upsample="labels", resample="bilinear", one_to_one_below=False,
                          raw_means=True),
    # Spherical k-means of all the raw tokens, one fit from k-means++; part scores upsampled before the argmax.
    # Hungarian matching at k <= classes.
    "cosine": Protocol(pca_dim=None, metric="cosine", iters=50, n_init=1, init="k-means++", seeds=1,
                       points_per_cluster=None, upsample="scores", resample="bicubic", one_to_one_below=True,
                       raw_means=False),
}


@dataclass
class VOCSplit:
    root: Path
    names: list[str]
    images: list[Path]
    masks: list[Path]


# The folders of a VOC-layout dataset, as VOCdevkit names them and, second, as the reference code's own
# "VOCSegmentation" folder does. Masks: the official ones first, then SBD's (the trainaug split's) for the rest.
IMAGE_DIRS = ("JPEGImages", "images")
SPLIT_DIRS = ("ImageSets/Segmentation", "sets")
MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")


def read_voc(root: str | Path, split: str = "val") -> VOCSplit:
    """Image and mask paths of a VOC-layout folder: JPEGImages/, SegmentationClass/ (and SegmentationClassAug/,
    where trainaug's SBD masks are) and ImageSets/Segmentation/<split>.txt, or the reference code's images/ and
    sets/; a folder with no split lists at all means every image that has a mask. ``split`` may also be the path
    of a file listing image names."""
    root = Path(root)
    img_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    mask_dirs = [root / d for d in MASK_DIRS if (root / d).is_dir()]
    if img_dir is None or not mask_dirs:
        # VOCdevkit/ for VOCdevkit/VOC2012/, or the folder the archive was unpacked into
        inner = sorted(p.parent for p in [*root.glob("*/JPEGImages"), *root.glob("*/*/JPEGImages")])
        hint = f" (did you mean {inner[0]}?)" if inner else ""
        missing = IMAGE_DIRS[0] if img_dir is None else MASK_DIRS[0]
        raise LeopartError(f"{root} is not a VOC-layout folder: {missing}/ is missing{hint}")
    lists = next((root / d for d in SPLIT_DIRS if (root / d).is_dir()), root / SPLIT_DIRS[0])
    split_file = Path(split) if Path(split).is_file() else lists / f"{split}.txt"
    if split_file.is_file():
        names = read_lines(split_file)
    elif known := sorted(p.stem for p in lists.glob("*.txt")):
        # Falling back to every mask here would mix the other splits in (a typo would score on training images).
        raise LeopartError(f"no split '{split}' in {lists} (it lists: {', '.join(known)}): name one of them, or a "
                           "file of image names")
    else:
        names = sorted({p.stem for d in mask_dirs for p in d.glob("*.png")})
    if not names:
        empty = f" ({split_file} is empty)" if split_file.is_file() else ""
        raise LeopartError(f"no images to evaluate in {root}{empty}")
    images, masks = [], []
    for name in names:
        image = next((img_dir / f"{name}{ext}" for ext in (".jpg", ".jpeg", ".png")
                      if (img_dir / f"{name}{ext}").is_file()), None)
        if image is None:
            raise LeopartError(f"no image {img_dir.name}/{name}.jpg for listed name '{name}'")
        mask = next((d / f"{name}.png" for d in mask_dirs if (d / f"{name}.png").is_file()), None)
        if mask is None:
            tried = " nor ".join(f"{d.name}/{name}.png" for d in mask_dirs)
            raise LeopartError(f"no mask {tried} for image {image.name}")
        images.append(image)
        masks.append(mask)
    return VOCSplit(root, names, images, masks)


def load_mask(path: Path, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Class-id mask [H, W] from a palette or grayscale PNG (values are class ids, 255 = ignore)."""
    try:
        with Image.open(path) as m:
            if m.mode not in ("P", "L", "I", "I;16"):
                raise LeopartError(f"mask {path} is a {m.mode} image: expected a palette or index PNG of class ids")
            if image_size is not None and m.size != image_size:
                raise LeopartError(f"mask {path} is {m.size[0]}x{m.size[1]} but its image is "
                                   f"{image_size[0]}x{image_size[1]}")
            return np.asarray(m).astype(np.int64)
    except (UnidentifiedImageError, OSError) as e:
        raise LeopartError(f"cannot read mask {path}: {e}") from None


def resize_mask(mask: np.ndarray, size: int, via: int | None = None) -> np.ndarray:
    """Nearest resize of a class-id mask to size x size. ``via``: first to via x via with PIL, then to size with
    F.interpolate, as the reference resized masks to the input side and then to 100 x 100."""
    resized = Image.fromarray(mask.astype(np.uint8)).resize((via or size,) * 2, Image.NEAREST)
    if via is None:
        return np.asarray(resized, dtype=np.int64)
    return interpolate_mask(np.asarray(resized), size)


def interpolate_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """F.interpolate's nearest resize of a class-id mask to size x size (int64): how the reference's training and
    monitoring steps took masks from the input side to 100 x 100."""
    at_input = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(at_input, size=(size, size), mode="nearest")[0, 0].long().numpy()


def load_target(image_path: Path, mask_path: Path, mask_size: int, resolution: int) -> np.ndarray:
    """One image's mask at ``mask_size``, resized through the input side ``resolution`` as the reference did (and
    checked to match the image's size)."""
    return resize_mask(load_mask(mask_path, image_size(image_path)), mask_size, via=resolution)


def load_targets(split: VOCSplit, mask_size: int, resolution: int) -> list[np.ndarray]:
    """A split's masks at the scoring size (``load_target`` of each)."""
    return [load_target(img_path, mask_path, mask_size, resolution)
            for img_path, mask_path in zip(split.images, split.masks)]


BG_SHARES_NEED_FU = ("background shares (--bg-share, bg_shares=) serve the fully unsupervised protocol only: add "
                     "--fully-unsupervised (fully_unsupervised=True) or leave them out")


def check_bg_shares(bg_shares) -> tuple[float, ...]:
    """The CBFE background shares to try, as a tuple of floats in [0, 1] (one number is taken as one share)."""
    shares = tuple(bg_shares) if isinstance(bg_shares, Iterable) and not isinstance(bg_shares, str) else (bg_shares,)
    if not shares:
        raise LeopartError("bg_shares is empty: give at least one CBFE background share")
    for share in shares:
        if isinstance(share, (bool, str)) or not isinstance(share, (int, float, np.number)) or not 0 <= share <= 1:
            raise LeopartError(f"a CBFE background share lies in [0, 1], not {share!r}")
    return tuple(float(share) for share in shares)


def standardise_and_project(features, dim: int, device=None, chunk: int = 65536):
    """[..., D] tokens -> [..., min(dim, D)]: each dimension standardised over all tokens (zero-variance ones
    only centred, as scikit-learn's StandardScaler does), then projected on the top principal components of
    the standardised tokens (as faiss's PCAMatrix without whitening). Two passes in chunks, fp64 sums.
    A list of tensors is standardised and projected as one set (a list comes back)."""
    parts = list(features) if isinstance(features, (list, tuple)) else [features]
    rows_of = [p.reshape(-1, p.shape[-1]) for p in parts]
    n, d = sum(x.shape[0] for x in rows_of), rows_of[0].shape[1]
    dim = min(dim, d)
    device = torch.device(device) if device is not None else rows_of[0].device
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for rows in (r for x in rows_of for r in x.split(chunk)):
        total += rows.to(device, torch.float64).sum(0)
    mean = total / n
    scatter = torch.zeros(d, d, dtype=torch.float64, device=device)
    for rows in (r for x in rows_of for r in x.split(chunk)):
        centred = rows.to(device, torch.float32) - mean.float()
        scatter += (centred.T @ centred).double()
    cov = scatter / n
    std = cov.diagonal().clamp_min(0).sqrt()
    scale = torch.where(std > 0, std, torch.ones_like(std))
    _, vectors = torch.linalg.eigh(cov / torch.outer(scale, scale))  # ascending eigenvalues
    # ((x - mean) / scale) @ top == (x - mean) @ (top / scale[:, None])
    basis = (vectors[:, -dim:].flip(-1) / scale[:, None]).float()
    projected = []
    for part, x in zip(parts, rows_of):
        out = torch.empty(x.shape[0], dim, dtype=torch.float32)
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk] = ((x[start:start + chunk].to(device, torch.float32) - mean.float()) @ basis).cpu()
        projected.append(out.view(*part.shape[:-1], dim))
    return projected if isinstance(features, (list, tuple)) else projected[0]


def fit_kmeans(features: torch.Tensor, k: int, protocol: Protocol, seed: int, device, progress,
               repeats: torch.Tensor | None = None) -> KMeansResult:
    """k-means as ``protocol`` runs it; the result's labels cover every token of ``features`` [..., D].
    ``repeats`` [N]: each token stands for that many points (the pixels it covers in an upsampled map), so
    the fit and its sample are over points, as clustering the upsampled map would be."""
    x = features.reshape(-1, features.shape[-1])
    rows = torch.arange(x.shape[0])
    points = rows if repeats is None else torch.repeat_interleave(rows, repeats.reshape(-1))  # row of each point
    cap = protocol.points_per_cluster and protocol.points_per_cluster * k
    if cap and len(points) > cap:
        points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))[:cap]]
    sample = x if points is rows else x[points]  # no copy when every token is one point
    km = cluster(sample, k, iters=protocol.iters, n_init=protocol.n_init, seed=seed, metric=protocol.metric,
                 init=protocol.init, device=device, progress=progress,
                 raw_means=protocol.raw_means and protocol.metric == "cosine")
    if sample is not x:
        km = KMeansResult(km.centroids, km.predict(x.to(km.centroids.device)).cpu(), km.inertia, km.n_iter, km.metric)
    return km


FG_MODEL_NEEDS_FU = ("a foreground model (--fg-model, fg_model=) serves the fully unsupervised protocol only: add "
                     "--fully-unsupervised (fully_unsupervised=True) or leave it out")
# Settings of one fully unsupervised pipeline that the other does not have: (name, the protocol they serve).
FU_SETTINGS = {"bg_shares": ("--bg-share (bg_shares=)", "cosine"),
               "cd_resolution": ("--cd-resolution (cd_resolution=)", "cosine"),
               "markov_time": ("--markov-time (markov_time=)", "reference"),
               "cbfe_k": ("--cbfe-k (cbfe_k=)", "reference"),
               "cd_runs": ("--cd-runs (cd_runs=)", "reference")}


def check_fu_settings(protocol: str, fully_unsupervised: bool, **given) -> None:
    """Refuse fully unsupervised settings without --fully-unsupervised, or meant for the other protocol's
    pipeline; the CLI calls this before it loads a model. ``given``: fg_model and the FU_SETTINGS names."""
    if given.get("fg_model") is not None and not fully_unsupervised:
        raise LeopartError(FG_MODEL_NEEDS_FU)
    if given.get("bg_shares") is not None and not fully_unsupervised:
        raise LeopartError(BG_SHARES_NEED_FU)
    for name, (flag, owner) in FU_SETTINGS.items():
        if given.get(name) is None:
            continue
        if not fully_unsupervised:
            raise LeopartError(f"{flag} serves the fully unsupervised protocol only: add --fully-unsupervised "
                               "(fully_unsupervised=True) or leave it out")
        if protocol != owner:
            raise LeopartError(f"{flag} serves the fully unsupervised pipeline of --protocol {owner}, not of "
                               f"--protocol {protocol}")
    if given.get("cbfe_k") is not None:
        positive_int(given["cbfe_k"], "cbfe_k")
    if given.get("cd_runs") is not None:
        positive_int(given["cd_runs"], "cd_runs")
    for name in ("markov_time", "cd_resolution"):
        value = given.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not value > 0):
            raise LeopartError(f"{name} must be a positive number, not {value!r}")


def read_fu_train_split(data_root, train_split: str, scored: VOCSplit) -> VOCSplit:
    """The train split the reference protocol clusters with the scored one (and picks its CBFE cut on); the
    last check before a model runs, with the one for the infomap package."""
    train = read_voc(data_root, train_split)
    shared = set(train.names) & set(scored.names)
    if shared:
        raise LeopartError(f"the fully unsupervised --train-split '{train_split}' shares {len(shared)} image(s) "
                           f"with the scored split ({min(shared)}, ...): the reference protocol clusters the two "
                           "together and picks its CBFE cut on the train masks")
    check_infomap()
    return train


def evaluate(data_root: str | Path, model: str | LeopartViT = "vits16", ks=(500, 21), fully_unsupervised: bool = False,
             num_classes: int | None = None, split: str = "val", resolution: int = DEFAULT_RESOLUTION,
             mask_size: int = 100, fg_model: str | LeopartViT | None = None, fu_k: int | None = None,
             weight_threshold: float | None = None, cd_resolution: float | None = None, bg_shares=None,
             protocol: str = "reference", iters: int | None = None, n_init: int | None = None,
             seeds: int | None = None, seed: int = 0, batch_size: int = 16, device=None,
             progress: bool | None = None, cache_dir: str | Path | None = None, train_split: str = "train",
             markov_time: float | None = None, cbfe_k: int | None = None, cd_runs: int | None = None) -> dict:
    """Score ``model`` on a VOC-layout folder with the paper's protocols (what ``leopart eval`` runs): k-means
    over-clustering for each k in ``ks`` and, with ``fully_unsupervised``, CBFE + CD. Returns
    {"overclustering": {k: miou}, "fully_unsupervised": miou, "n_images": n, ...} with mIoU in percent.

    ``protocol``: "reference" (the reference code's: standardised tokens, PCA to 50 dimensions, Euclidean
    k-means fitted on 256 points per cluster, best of 5 runs of 100 iterations, patch labels upsampled; mean
    over 5 seeds) or "cosine" (spherical k-means of all raw tokens, one run of 50 iterations, part scores
    upsampled). ``iters``, ``n_init`` (k-means runs per fit, the lowest inertia kept) and ``seeds`` (fits per k,
    mIoU averaged) override the protocol's. ``cache_dir``: see segment.dense_features.

    Fully unsupervised, "reference" protocol (leopart.fully_unsupervised): the train split ``train_split`` is
    clustered with the scored one; CBFE on ``cbfe_k`` clusters (200) with its cut chosen on the train masks,
    ``fu_k`` foreground parts, CD with Infomap (``markov_time``, ``weight_threshold``; default: the reference's
    for the patch size), mean of ``cd_runs`` runs (10). Needs the infomap package. "cosine" protocol: leopart's
    own CBFE + CD (leopart.merge) on one fit of the scored split with ``fu_k`` parts, networkx Louvain
    (``cd_resolution``, 1.0), CBFE background shares ``bg_shares`` tried (default BG_SHARES), the best reported."""
    device = default_device(device)  # the model's and k-means' (default: cuda when available)
    # Bad settings fail now, not after the features of the whole split are computed.
    if protocol not in PROTOCOLS:
        raise LeopartError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    base = PROTOCOLS[protocol]
    run = dataclasses.replace(base, iters=base.iters if iters is None else integer(iters, "iters", minimum=0),
                              n_init=positive_int(base.n_init if n_init is None else n_init, "n_init"),
                              seeds=positive_int(base.seeds if seeds is None else seeds, "seeds"))
    ks = tuple(positive_int(k, "k") for k in (ks if isinstance(ks, Iterable) and not isinstance(ks, str) else [ks]))
    if not ks and not fully_unsupervised:
        raise LeopartError("nothing to evaluate: give ks (k-means k values) or fully_unsupervised=True")
    fu_k = positive_int(fu_k, "fu_k") if fu_k is not None else None
    mask_size = positive_int(mask_size, "mask_size")
    resolution, batch_size = positive_int(resolution, "resolution"), positive_int(batch_size, "batch_size")
    seed = integer(seed, "seed")
    if weight_threshold is not None:
        check_weight_threshold(weight_threshold)
    check_fu_settings(protocol, fully_unsupervised, fg_model=fg_model, bg_shares=bg_shares,
                      cd_resolution=cd_resolution, markov_time=markov_time, cbfe_k=cbfe_k, cd_runs=cd_runs)
    bg_shares = check_bg_shares(BG_SHARES if bg_shares is None else bg_shares)
    reference_fu = fully_unsupervised and protocol == "reference"
    voc = read_voc(data_root, split)  # a wrong folder fails before a model loads (or downloads)
    train = read_fu_train_split(data_root, train_split, voc) if reference_fu else None
    model = from_pretrained(model, device=device)
    fg_model = from_pretrained(fg_model, device=device) if fg_model is not None else None
    targets = load_targets(voc, mask_size, resolution)
    n_found = max(int(t[t != 255].max(initial=-1)) for t in targets) + 1
    if num_classes is None:
        num_classes = n_found
    elif n_found > num_classes:
        raise LeopartError(f"masks hold class id {n_found - 1}, more than --num-classes {num_classes}")
    if num_classes < 1:
        raise LeopartError("the masks hold no class ids (every pixel is 255)")
    for k in ks:
        check_k(k, len(voc.images), resolution, model.patch_size)
    # Float32 on a GPU too: the reference scored float32 tokens, and one pass over a split is cheap.
    dense = dense_features(voc.images, model, resolution, batch_size, device, fg_model=fg_model, progress=progress,
                           cache_dir=cache_dir, resample=run.resample, full_precision=True)
    # The scored split's own projection serves the k-means scores and the cosine fully unsupervised pipeline; the
    # reference's fully unsupervised pipeline projects it with the train split instead.
    tokens = dense.features
    if run.pca_dim is not None and (ks or not reference_fu):
        tokens = standardise_and_project(dense.features, run.pca_dim, device)
    grid = dense.features.shape[:3]
    size = (mask_size, mask_size)
    results: dict = {"n_images": len(voc.names), "num_classes": num_classes, "resolution": resolution,
                     "mask_size": mask_size, "protocol": protocol, "image_resize": run.resample,
                     "kmeans": {"pca_dim": run.pca_dim, "metric": run.metric, "iters": run.iters, "n_init": run.n_init,
                                "init": run.init, "seeds": run.seeds, "points_per_cluster": run.points_per_cluster},
                     "overclustering": {}, "overclustering_matching": {}}

    def score(predict, n_images_desc: str, many_to_one: bool) -> float:
        preds = (predict(i) for i in progress_bar(range(len(targets)), desc=n_images_desc, unit="img", leave=False,
                                                  progress=progress))
        return 100.0 * hungarian_miou(preds, targets, n_classes=num_classes, many_to_one=many_to_one)[0]

    def upsample_labels(labels: torch.Tensor) -> np.ndarray:
        return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long().numpy()

    def part_predictor(km: KMeansResult):
        """image index -> its part ids at mask size, upsampled as the protocol does."""
        if run.upsample == "labels":
            labels = km.labels.cpu().view(grid)
            return lambda j: upsample_labels(labels[j])
        centroids = km.centroids.to(tokens.device)
        return lambda j: upsample_argmax(F.normalize(tokens[j], dim=-1) @ centroids.T, size).numpy()

    def object_predictor(seg, labels: torch.Tensor):
        """image index -> its object ids at mask size."""
        if run.upsample == "labels":
            return lambda j: upsample_labels(seg.objects(labels[j]))
        return lambda j: predict_objects(seg, tokens[j], size).numpy()

    for k in ks:
        runs = []
        many_to_one = run.many_to_one(k, num_classes)
        for i in range(run.seeds):  # each fit's n_init runs take seeds of their own
            km = fit_kmeans(tokens, k, run, seed + i * run.n_init, device, progress)
            runs.append(score(part_predictor(km), f"score k={k}", many_to_one=many_to_one))
        results["overclustering"][str(k)] = float(np.mean(runs))
        results["overclustering_matching"][str(k)] = "many-to-one" if many_to_one else "one-to-one"
        if run.seeds > 1:
            results.setdefault("overclustering_runs", {})[str(k)] = runs

    if fully_unsupervised:  # the reference's settings for the patch size, unless given
        fu_k = fu_k or (109 if model.patch_size == 8 else 149)
        if weight_threshold is None:
            weight_threshold = reference_weight_threshold(model.patch_size)
    if reference_fu:
        markov_time = markov_time or reference_markov_time(model.patch_size)
        cbfe_k, cd_runs = cbfe_k or CBFE_K, cd_runs or CD_RUNS
        train_dense = dense_features(train.images, model, resolution, batch_size, device, fg_model=fg_model,
                                     progress=progress, cache_dir=cache_dir, resample=run.resample,
                                     full_precision=True)
        train_targets = load_targets(train, mask_size, resolution)
        # One standardisation and PCA for both splits, as the reference fitted them on train + val.
        train_tokens, scored_tokens = standardise_and_project([train_dense.features, dense.features], run.pca_dim,
                                                              device)

        def fit(points, k, metric, fit_seed, repeats):
            return fit_kmeans(points, k, dataclasses.replace(run, metric=metric), fit_seed, device, progress, repeats)

        fu = reference_protocol(train_tokens, train_dense.foreground, train_targets, scored_tokens, dense.foreground,
                                targets, k=fu_k, num_classes=num_classes, fit=fit, cbfe_k=cbfe_k,
                                weight_threshold=weight_threshold, markov_time=markov_time, runs=cd_runs, seed=seed,
                                mask_size=mask_size)
        results["fully_unsupervised"] = fu.pop("miou")
        results["fully_unsupervised_runs"] = fu.pop("runs")
        results["fully_unsupervised_details"] = {
            "pipeline": "reference", "k": fu_k, "cbfe_k": cbfe_k,
            "cbfe_spherical_means": "raw" if run.raw_means else "unit", "weight_threshold": weight_threshold,
            "markov_time": markov_time, "cd_runs": cd_runs, "train_split": train_split,
            "n_train_images": len(train.names), **fu}
    elif fully_unsupervised:
        cd_resolution = cd_resolution or 1.0
        km = fit_kmeans(tokens, min(fu_k, grid.numel()), run, seed, device, progress)
        labels = km.labels.cpu().view(grid)
        best = None
        for share in bg_shares:
            seg = merge(km, labels, dense.foreground, bg_share=share, weight_threshold=weight_threshold,
                        resolution=cd_resolution, seed=seed)
            miou = score(object_predictor(seg, labels), f"score bg={share:.2f}", many_to_one=False)
            if best is None or miou > best[0]:
                best = (miou, share, seg.n_objects)
        results["fully_unsupervised"] = best[0]
        results["fully_unsupervised_details"] = {"pipeline": "leopart", "k": fu_k, "bg_share": best[1],
                                                 "n_objects": best[2],
                                                 "weight_threshold": weight_threshold, "cd_resolution": cd_resolution,
                                                 "bg_share_sweep": list(bg_shares)}
    return results


def format_table(results: dict, model_name: str) -> str:
    paper = PUBLISHED.get(model_name, {})
    rows = [("protocol", "mIoU (%)", "paper")]
    for k, miou in results.get("overclustering", {}).items():
        matching = "many-to-one" if results["overclustering_matching"][k] == "many-to-one" else "Hungarian, one-to-one"
        kind = f"over-clustering, {matching}" if int(k) > results["num_classes"] else matching
        runs = results.get("overclustering_runs", {}).get(k)
        spread = f" +- {np.std(runs):.1f}" if runs and len(runs) > 1 else ""  # over the seeds' fits
        rows.append((f"k-means k={k} ({kind})", f"{miou:.1f}{spread}", _fmt(paper.get("overclustering", {}).get(k))))
    if "fully_unsupervised" in results and results["fully_unsupervised_details"].get("pipeline") == "reference":
        d, runs = results["fully_unsupervised_details"], results["fully_unsupervised_runs"]
        spread = f" +- {np.std(runs):.1f}" if len(runs) > 1 else ""
        objects = (f"{min(d['n_objects'])}-{max(d['n_objects'])} objects" if len(set(d["n_objects"])) > 1
                   else plural(d["n_objects"][0], "object"))
        label = (f"fully unsupervised (k={d['k']}, CBFE k={d['cbfe_k']} cut on {d['train_split']} masks, "
                 f"Infomap markov time {d['markov_time']:g}, {objects})")
        rows.append((label, f"{results['fully_unsupervised']:.1f}{spread}", _fmt(paper.get("fully_unsupervised"))))
    elif "fully_unsupervised" in results:
        d = results["fully_unsupervised_details"]
        sweep = d.get("bg_share_sweep", [d["bg_share"]])
        bg = f"bg {d['bg_share']:.2f}" + (f", best of {len(sweep)} on this split" if len(sweep) > 1 else "")
        rows.append((f"fully unsupervised (k={d['k']}, CBFE+CD, {bg}, {plural(d['n_objects'], 'object')})",
                     f"{results['fully_unsupervised']:.1f}", _fmt(paper.get("fully_unsupervised"))))
    for key in ("linear", "fcn"):
        if key in results:
            rows.append((f"{key} probe", f"{results[key]:.1f}", _fmt(paper.get(key))))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    how = results.get("kmeans", {})
    protocol = f", {results['protocol']} protocol" if "protocol" in results else ""
    spreads = []
    if how.get("seeds", 1) > 1 and results.get("overclustering"):
        spreads.append(f"k-means scores: mean +- std of {how['seeds']} seeds")
    if len(results.get("fully_unsupervised_runs", ())) > 1:
        spreads.append(f"fully unsupervised: mean +- std of {len(results['fully_unsupervised_runs'])} Infomap runs")
    if spreads:
        protocol += f" ({'; '.join(spreads)})"
    return "\n".join(lines) + f"\n{plural(results['n_images'], 'image')}, {results['num_classes']} classes{protocol}"


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
