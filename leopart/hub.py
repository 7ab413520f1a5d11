"""Resolving a model name to a LeopartViT: aliases, the HF Hub, local folders and original checkpoints.

``from_pretrained(name)`` tries, in order:

1. ``vits16`` / ``vitb8``: the original Leopart release files (downloaded once with a progress bar,
   converted to our format and cached under ``$LEOPART_CACHE``, default ``~/.cache/leopart``);
2. ``dino-vits16`` / ``dino-vitb8``: timm's DINO weights on the Hub (heads initialised with seed 0);
3. an existing local path: a folder from ``save_pretrained`` (or a finished ``leopart train`` run, which stands
   for its ``model/``) or an original-format file
   (.ckpt/.pth/.pt/.safetensors: a flat state_dict with one key prefix, or a Lightning checkpoint);
4. ``org/repo`` or ``org/repo@revision`` on the Hub, in our format or in timm's.

A local path wins over a Hub id of the same spelling, as in huggingface_hub. Offline
(``HF_HUB_OFFLINE=1`` or no network) everything loads from the caches or fails with one line.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from . import serialization
from .device import default_device
from .errors import LeopartError
from .model import LeopartConfig, LeopartViT
from .serialization import CHECKPOINT_SUFFIXES


@dataclass(frozen=True)
class Release:
    url: str
    filename: str
    arch: str


RELEASES = {
    "vits16": Release("https://www.dropbox.com/s/0kjy61jh4i3vbnh/leopart_vits16.ckpt?dl=1",
                      "leopart_vits16.ckpt", "vit_small_patch16_224"),
    "vitb8": Release("https://www.dropbox.com/s/ieyuqfv8get50cy/leopart_vitb8.ckpt?dl=1",
                     "leopart_vitb8.ckpt", "vit_base_patch8_224"),
}
DINO = {
    "dino-vits16": "timm/vit_small_patch16_224.dino",
    "dino-vitb8": "timm/vit_base_patch8_224.dino",
}
# timm.create_model arguments of a timm Hub repo's config.json ("model_args") that LeopartViT sets itself.
TIMM_ARGS_WE_SET = {"num_classes", "img_size", "dynamic_img_size", "pretrained"}
# (embed dim, depth) -> timm size name, to name the architecture of an original checkpoint.
VIT_SIZES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large", (1536, 40): "giant"}
MODEL_NAMES = "an alias, a Hub id, a folder or a checkpoint file"
ASK_FOR_ARCH = "pass arch= with the timm model name (CLI: --arch of `leopart convert` or `leopart train`)"


def cache_dir() -> Path:
    root = os.environ.get("LEOPART_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leopart"


def from_pretrained(name: str | os.PathLike | LeopartViT, *, arch: str | None = None, device=None,
                    trust_pickle: bool = False) -> LeopartViT:
    """Load a LeopartViT by alias, Hub id, folder or checkpoint file; returned in eval mode."""
    device = default_device(device) if device is not None else None  # a bad device fails before any download
    if isinstance(name, LeopartViT):
        model = name
    else:
        name = serialization.check_name(name, "a model", MODEL_NAMES)
        model = _resolve(str(name), arch=arch, trust_pickle=trust_pickle)
        model.name_or_path = recorded_name(name)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def recorded_name(name: str | os.PathLike) -> str:
    """A model name to record in an output: local paths made absolute, so it still resolves from elsewhere;
    aliases stay aliases (they win over a folder of the same name, as in _resolve)."""
    from .train import MODEL_NAME, is_run_folder  # lazily: train imports this module

    name = serialization.hub_id_of_url(name, "a model", MODEL_NAMES)
    path = Path(name).expanduser()
    if str(name) in RELEASES or str(name) in DINO or not path.exists():
        return str(name)
    if is_run_folder(path):  # the model itself: the run may go on later and replace it
        path = path / MODEL_NAME
    return str(path.resolve())


def _resolve(name: str, arch: str | None, trust_pickle: bool) -> LeopartViT:
    if name in RELEASES:
        return _load_release(name)
    if name in DINO:
        return _load_hub(DINO[name])
    path = Path(name).expanduser()
    if path.is_dir():
        from .train import is_run_folder  # lazily: train imports this module

        return _load_run(path) if is_run_folder(path) else LeopartViT.from_folder(path)
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise LeopartError(f"{path} is not a checkpoint (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")
        return convert_checkpoint(path, arch=arch, trust_pickle=trust_pickle)
    if serialization.HUB_ID.match(name) and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return _load_hub(name)
    known = ", ".join([*RELEASES, *DINO])
    raise LeopartError(f"unknown model '{name}': not an alias ({known}), an existing path, or an org/repo Hub id")


def _load_run(folder: Path) -> LeopartViT:
    """A `leopart train` output folder stands for its final model, once the run has written it."""
    from .train import CHECKPOINT_NAME, read_run

    run = read_run(folder)
    if run.finished:
        return LeopartViT.from_folder(run.model_dir)
    at = f"step {run.step} of {run.total}" if run.total is not None else f"step {run.step}"
    raise LeopartError(f"{folder} is a `leopart train` run at {at}, not finished: load {folder / CHECKPOINT_NAME} "
                       f"(its latest student) or finish it with `{run.resume_command}`")


# ------------------------------------------------------------------ releases
def _load_release(alias: str) -> LeopartViT:
    release = RELEASES[alias]
    folder = cache_dir() / alias
    if (folder / serialization.CONFIG_NAME).is_file():
        return LeopartViT.from_folder(folder)
    if serialization.hub_offline():
        raise LeopartError(
            f"model '{alias}' is not cached in {folder} and downloads are off (HF_HUB_OFFLINE=1): "
            f"fetch {release.url} elsewhere and run `leopart convert {release.filename} {folder}`"
        )
    try:
        ckpt = download(release.url, cache_dir() / "downloads" / release.filename)
    except LeopartError as e:
        raise LeopartError(f"{e} (no network? fetch it elsewhere and run `leopart convert {release.filename} "
                           f"{folder}`)") from None
    try:
        model = convert_checkpoint(ckpt, arch=release.arch)
        save_converted(model, folder)
    finally:
        ckpt.unlink(missing_ok=True)  # keep only the converted folder; a bad file is fetched afresh next time
    return model


def download(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; ``dest`` appears only when complete.

    Bytes go to ``<dest>.part`` as they arrive, so a download that is interrupted (Ctrl-C, a dropped
    connection) resumes from there next time when the server takes byte ranges (HTTP 206); else it restarts.
    """
    import http.client

    from .progress import progress_bar

    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if getattr(response, "status", None) != 206:  # the whole file, from the start
                have = 0
            length = int(response.headers.get("Content-Length") or 0)
            total = have + length if length else None
            with open(part, "ab" if have else "wb") as f, \
                    progress_bar(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                                 progress=None) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already whole (or stale): fetch afresh
            part.unlink()
            return download(url, dest, timeout)
        raise LeopartError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        kept = f"; {part.stat().st_size} bytes kept, run again to resume" if part.is_file() else ""
        raise LeopartError(f"cannot download {url}: {getattr(e, 'reason', None) or e!r}{kept}") from None
    if total is not None and part.stat().st_size != total:
        raise LeopartError(f"download of {url} was cut short ({part.stat().st_size} of {total} bytes): run again "
                           "to resume")
    os.replace(part, dest)
    return dest


def save_converted(model: LeopartViT, folder: Path) -> Path:
    """Save into a sibling temp folder, then rename: the cache never holds a half-written model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------- Hub
def _load_hub(name: str) -> LeopartViT:
    folder = serialization.download_from_hub(name, [serialization.CONFIG_NAME])
    config = serialization.read_config(folder / serialization.CONFIG_NAME)
    if "leopart_kind" in config:
        serialization.check_kind(config, "model", f"Hub repository '{name}'")  # before the weights download
        return LeopartViT.from_folder(serialization.download_from_hub(name, [serialization.WEIGHTS_NAME]))
    if "architecture" not in config:
        refusal = f"Hub repository '{name}' holds neither a leopart model nor timm weights"
        if "model_type" in config:  # a transformers repo (facebook/dinov2-small, ...): timm hosts the same weights
            copies = _timm_copies(config)
            refusal += f" but a transformers '{config['model_type']}' model" + (
                f": timm's copies load, e.g. {', '.join(copies)}" if copies else "")
        raise LeopartError(refusal)
    folder = serialization.download_from_hub(name, [serialization.WEIGHTS_NAME])  # a timm repo: backbone only
    state = serialization.load_tensors(folder / serialization.WEIGHTS_NAME)
    # timm records the arguments a model was built with beyond its name's defaults (timm.create_model's kwargs);
    # the input size is ours to set (from the position embeddings) and the classifier is dropped.
    model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k not in TIMM_ARGS_WE_SET}
    trained_with = config.get("pretrained_cfg") or {}  # its input statistics (CLIP's, SigLIP's, ...)
    return _from_backbone_state(state, arch=config["architecture"], source=name, backbone_kwargs=model_args,
                                mean=trained_with.get("mean"), std=trained_with.get("std"))


def _timm_copies(transformers_config: dict) -> list[str]:
    """Up to three timm Hub ids of ViTs of the family and size a transformers config describes."""
    family = str(transformers_config["model_type"]).split("_")[0]  # "dinov2", "dinov3_vit" -> "dinov3", "vit"
    size = VIT_SIZES.get((transformers_config.get("hidden_size"), transformers_config.get("num_hidden_layers")))
    pattern = f"vit_{size}_patch{transformers_config.get('patch_size')}_*" if size else "vit_*"
    names = [n for n in timm.list_pretrained(pattern) if family == "vit" or family in n]
    return [f"timm/{n}" for n in names[:3]]


def _from_backbone_state(state: dict[str, torch.Tensor], arch: str, source: str,
                         backbone_kwargs: dict | None = None, mean=None, std=None) -> LeopartViT:
    state = {f"backbone.{k}": v for k, v in state.items()}
    model = _with_seeded_heads(LeopartConfig(arch=arch, img_size=_pos_embed_size(state, arch),
                                             backbone_kwargs=backbone_kwargs or {}, mean=mean, std=std))
    state, ignored = _as_timm_loads(state, model)  # a repo may hold the original layout, as timm's loading allows
    if ignored:
        warnings.warn(f"ignoring classifier keys from {source}: {', '.join(ignored)}", stacklevel=3)
    model.load_weights(state, source=source, strict=False)
    return model


def _with_seeded_heads(config: LeopartConfig) -> LeopartViT:
    """A model whose heads (which backbone-only weights leave at their init) start the same for everyone who loads
    these weights, without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LeopartViT(config)


def _as_timm_loads(state: dict[str, torch.Tensor], model: LeopartViT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights in our key layout as timm would load them into ``model``'s backbone: through the converter timm runs
    on its downloads of the family, and without a classifier head or pooled-feature norm the model has no place
    for (the classifier always goes, num_classes=0; a norm the backbone keeps, EVA-02's fc_norm, stays).
    Returns (those weights, the dropped keys' backbone names)."""
    state = _in_timm_layout(state, model.backbone)
    ours = model.state_dict()
    dropped = sorted(k for k in state if k.startswith(("backbone.head.", "backbone.fc_norm.")) and k not in ours)
    return {k: v for k, v in state.items() if k not in dropped}, [k[len("backbone."):] for k in dropped]


def _pos_embed_size(state: dict[str, torch.Tensor], arch: str) -> int:
    """Image size the checkpoint's position embeddings were trained at (square grid, one CLS token)."""
    pos = state.get("backbone.pos_embed")
    patch = state.get("backbone.patch_embed.proj.weight")
    if pos is None or patch is None:
        return LeopartConfig().img_size
    grid = round((pos.shape[1] - 1) ** 0.5)
    return grid * patch.shape[-1]


# ---------------------------------------------------- original checkpoints
UNREADABLE = "the file is corrupt or truncated, or not a torch checkpoint"


def read_checkpoint(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors file, a torch state_dict or a Lightning checkpoint."""
    return _state_dict_of(_load_checkpoint_file(path, trust_pickle), path)


def _load_checkpoint_file(path: Path, trust_pickle: bool) -> Any:
    if path.suffix.lower() == ".safetensors":
        return serialization.load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if not trust_pickle and "Unsupported global" in str(e):
            raise LeopartError(
                f"{path} holds pickled Python objects besides tensors; if you trust the file, load it with "
                f"trust_pickle=True (CLI: `leopart convert {path} OUT --trust-pickle`, then use OUT)"
            ) from None
        raise LeopartError(f"cannot read checkpoint {path}: {UNREADABLE}") from None
    except Exception as e:  # noqa: BLE001 - unpickling arbitrary bytes fails in many ways (KeyError, EOFError, ...)
        raise LeopartError(f"cannot read checkpoint {path}: {UNREADABLE} ({type(e).__name__}: {e})") from None
    return obj


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning
    elif isinstance(obj, dict) and isinstance(obj.get("teacher"), dict) and isinstance(obj.get("student"), dict):
        obj = obj["teacher"]  # DINO's checkpoint.pth: its evaluations (and the released weights) are the teacher
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LeopartError(f"{path} is not a state_dict of tensors")
    return obj


def convert_state_dict(raw: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map original Leopart keys to ours; returns (state, ignored key names).

    The student backbone is found by its first attention's ``blocks.0.attn.qkv.weight`` key (or
    ``q_proj.weight``, EVA's separate projections); whatever precedes that is the prefix to strip
    (``model.`` in the release files). Teacher copies and other keys are ignored.
    """
    anchors = ("blocks.0.attn.qkv.weight", "blocks.0.attn.q_proj.weight")
    prefixes = sorted((k[: -len(anchor)] for k in raw for anchor in anchors if k.endswith(anchor)),
                      key=lambda p: ("teacher" in p or "momentum" in p, len(p)))
    if not prefixes:
        raise LeopartError(f"no ViT weights in {source}: expected keys like 'model.{anchors[0]}'")
    prefix = prefixes[0]
    state, ignored = {}, []
    for key, value in raw.items():
        rest = key[len(prefix):] if key.startswith(prefix) else key
        if rest.startswith(("projection_head.", "prototypes.")):
            state[rest] = value
        elif key.startswith(prefix):  # a classifier among them is dropped once the model is built
            state[f"backbone.{rest}"] = value
        else:
            ignored.append(key)
    return state, ignored


def _guess_arch(state: dict[str, torch.Tensor], source: str) -> str:
    """The timm name of a ViT read off the shapes of its weights: a plain ViT by width and depth, or DINOv2
    (patch 14 with layer scale; "_reg4" with register tokens). Other families need arch=."""
    def unknown(why: str) -> LeopartError:
        return LeopartError(f"cannot tell the ViT of {source} from its weights ({why}): {ASK_FOR_ARCH}")

    pos, patch = state.get("backbone.pos_embed"), state.get("backbone.patch_embed.proj.weight")
    if pos is None or patch is None:  # rotary-position ViTs (DINOv3, EVA) have no pos_embed
        raise unknown("no pos_embed / patch_embed")
    width, patch_size = pos.shape[-1], patch.shape[-1]
    depth = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    size = VIT_SIZES.get((width, depth))
    layer_scale = "backbone.blocks.0.ls1.gamma" in state
    if size is not None and layer_scale and patch_size == 14:
        registers = "backbone.register_tokens" in state or "backbone.reg_token" in state
        arch = f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2"
    elif size is not None:
        arch = f"vit_{size}_patch{patch_size}_224"
    if size is None or not timm.is_model(arch):
        raise unknown(f"width {width}, depth {depth}, patch {patch_size}")
    return arch


def _in_timm_layout(state: dict[str, torch.Tensor], backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights through the converter timm runs on this model family's own downloads, so that
    original release files load as they do in timm: DINOv2's (mask token, register tokens folded into
    timm's layout), DINOv3's (storage tokens, layer-scale names, rotary periods), EVA's."""
    convert = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    patches, ours = state.get("backbone.patch_embed.proj.weight"), backbone.state_dict().get("patch_embed.proj.weight")
    # timm resamples a patch embedding of another size to fit, on purpose; here that means a wrong arch: the
    # unconverted weights then fail to load, naming the mismatch
    if convert is None or (patches is not None and ours is not None and patches.shape != ours.shape):
        return state
    try:
        # timm prints (not logs) what it skips, e.g. the zero qkv biases of DINOv3 files for a bias-free model
        with contextlib.redirect_stdout(io.StringIO()):
            converted = convert({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                                backbone)
    except Exception:  # noqa: BLE001 - a layout timm does not know: load_weights names the keys that do not fit
        return state
    heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    return {**heads, **{f"backbone.{k}": v for k, v in converted.items()}}


def infer_config(state: dict[str, torch.Tensor], arch: str | None, source: str) -> LeopartConfig:
    """Architecture and head sizes from the shapes of converted weights."""
    if arch is None:
        arch = _guess_arch(state, source)
    config = LeopartConfig(arch=arch, img_size=_pos_embed_size(state, arch))
    linears = sorted((k for k in state if k.startswith("projection_head.") and k.endswith(".weight")),
                     key=lambda k: int(k.split(".")[1]))
    if linears:
        config.proj_layers = len(linears)
        config.proj_dim = state[linears[-1]].shape[0]
        config.proj_hidden_dim = state[linears[0]].shape[0] if len(linears) > 1 else config.proj_hidden_dim
    if "prototypes.weight" in state:
        config.num_prototypes = state["prototypes.weight"].shape[0]
    return config


def convert_checkpoint(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False) -> LeopartViT:
    """Build a LeopartViT from an original-format checkpoint file, or from a `leopart train` checkpoint.pt."""
    path = Path(path)
    if serialization.read_features_header(path) is not None:
        raise LeopartError(f"{path} holds patch features (`leopart embed -o`), not model weights: "
                           f"`leopart info {path}` describes them")
    obj = _load_checkpoint_file(path, trust_pickle)
    if _is_training_checkpoint(obj):
        return _from_training_checkpoint(obj, arch, path)
    state, ignored = convert_state_dict(_state_dict_of(obj, path), str(path))
    config = infer_config(state, arch, str(path))
    model = _with_seeded_heads(config)
    state, dropped = _as_timm_loads(state, model)
    ignored += dropped
    if ignored:
        shown = ", ".join(ignored[:6]) + (f" and {len(ignored) - 6} more" if len(ignored) > 6 else "")
        warnings.warn(f"ignored keys in {path}: {shown}", stacklevel=2)
    try:
        missing = model.load_weights(state, source=str(path), strict=False)
    except LeopartError as e:
        if arch is not None:
            raise
        guessed = f"the ViT {config.arch} was guessed from the weights' shapes"
        raise LeopartError(f"{e} ({guessed}: {ASK_FOR_ARCH})") from None
    if missing:
        warnings.warn(f"{path} has no {', '.join(sorted({k.split('.')[0] for k in missing}))} weights: "
                      f"those start from a seeded random init", stacklevel=2)
    return model


# ------------------------------------------------- `leopart train` checkpoints
def _is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("student"), dict) and "step" in obj


def _from_training_checkpoint(ckpt: dict, arch: str | None, path: Path) -> LeopartViT:
    """The student of a run's checkpoint.pt: what ``<run>/model`` will hold, readable while the run goes on."""
    state = ckpt["student"]
    if isinstance(ckpt.get("model_config"), dict):
        config = LeopartConfig.from_dict(ckpt["model_config"])
    else:  # written before checkpoints recorded the model's config: read the sizes off the weights
        config = infer_config(state, arch, str(path))
    model = LeopartViT(config)
    model.load_weights(state, source=str(path))
    return model
