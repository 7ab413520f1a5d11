"""The ``leopart`` command line: a thin layer over the Python API.

Every command turns a LeopartError (bad input, missing model, ...) into one line on stderr and exit
status 1, and writes its output files atomically, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import click

from .errors import LeopartError, plural


class _Group(click.Group):
    """Runs subcommands with one-line errors: no traceback unless LEOPART_DEBUG=1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except LeopartError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except BrokenPipeError:  # stdout went to `| head`, which has read enough: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so no flush at exit fails again
            sys.exit(1)
        except OSError as e:
            if os.environ.get("LEOPART_DEBUG") or not (e.filename and e.strerror):
                raise _unexpected(e) from None
            # A file-system error names its path: that and the reason are the whole story.
            raise click.ClickException(f"cannot use {e.filename}: {e.strerror}") from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            raise _unexpected(e) from None


def _unexpected(e: Exception) -> Exception:
    """The exception itself under LEOPART_DEBUG=1, else its first line as a one-line error."""
    if os.environ.get("LEOPART_DEBUG"):
        return e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return click.ClickException(f"{type(e).__name__}: {msg} (set LEOPART_DEBUG=1 for the traceback)")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leopart")
@click.pass_context
def main(ctx):
    """Dense, part-aware patch features with Leopart Vision Transformers.

    MODEL arguments take an alias (vits16, vitb8, dino-vits16, dino-vitb8), an org/repo[@revision] on
    the Hugging Face Hub (or its https://huggingface.co/org/repo address), a folder written by
    save_pretrained (or a finished `leopart train` run), or an original .ckpt/.pth file.
    """
    warnings.showwarning = _one_line_warning
    processes = int(os.environ.get("WORLD_SIZE") or 1)  # as device.launched_processes, which would import torch here
    if processes > 1 and ctx.invoked_subcommand != "train":
        # Each process would do the whole job on its own and write the same outputs.
        raise LeopartError(f"leopart {ctx.invoked_subcommand} runs in one process, not {processes} (WORLD_SIZE): of "
                           "the commands only `leopart train` shares its work under torchrun; run this one without it")


def _parse_resolution(value: str) -> int | tuple[int, int] | None:
    """`--resolution` of `leopart embed`: a square side, HEIGHTxWIDTH, or native; as embed takes it."""
    from .embed import as_resolution

    if value.lower() in {"native", "none", "0"}:
        return None
    try:
        sides = [int(side) for side in value.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise click.BadParameter(f"'{value}' is not a number of pixels, HEIGHTxWIDTH or 'native'")
    return as_resolution(sides[0] if len(sides) == 1 else sides)


@main.command()
@click.argument("model")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints that pickle Python objects besides tensors.")
def info(model, trust_pickle):
    """Describe MODEL: architecture, sizes and where it was loaded from; what a segmenter, part clusters or
    probe head folder holds and what it was fitted with; where a `leopart train` run stands; or what a
    `leopart embed` features file (.safetensors, .npy) holds."""
    from .hub import MODEL_NAMES
    from .probe import head_folder
    from .serialization import check_name, read_features_header
    from .train import is_run_folder

    model = str(check_name(model, "MODEL", MODEL_NAMES))  # a Hub repository's web address -> its id
    if Path(model).expanduser().is_dir():  # a probe's output folder: the head it saved
        model = str(head_folder(Path(model).expanduser()))
    features = read_features_header(model) if Path(model).expanduser().is_file() else None
    kind = _saved_kind(model)
    if features is not None:
        rows = _features_rows(model, features)
    elif kind in ("segmenter", "clusters", "probe_head"):
        rows = _fitted_rows(model, kind)
    elif kind is None and is_run_folder(Path(model).expanduser()):
        rows = _run_rows(Path(model).expanduser())
    else:
        rows = _model_rows(model, trust_pickle)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _saved_kind(name: str) -> str | None:
    """What a local folder or Hub repo saved by leopart holds (its config's leopart_kind), else None."""
    from . import serialization

    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / serialization.CONFIG_NAME
    elif not path.exists() and serialization.HUB_ID.match(name):
        config_file = serialization.download_from_hub(name, [serialization.CONFIG_NAME]) / serialization.CONFIG_NAME
    else:
        return None
    return serialization.read_config(config_file).get("leopart_kind") if config_file.is_file() else None


def _model_rows(model: str, trust_pickle: bool) -> list[tuple[str, object]]:
    from .hub import from_pretrained

    m = from_pretrained(model, trust_pickle=trust_pickle)
    c = m.config
    attention_problem = m.attention_problem()
    n_params = sum(p.numel() for p in m.parameters())
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    return [
        ("model", model),
        ("backbone", c.arch),
        ("patch size", m.patch_size),
        ("embed dim", m.embed_dim),
        ("depth / heads", f"{len(m.backbone.blocks)} / {m.num_heads or '-'}"),
        ("CLS attention", f"none: the backbone {attention_problem}" if attention_problem
         else "readable (the foreground cue)"),
        ("trained at", f"{c.img_size}x{c.img_size}"),
        ("input statistics", "ImageNet mean / std" if c.mean is None and c.std is None else
         f"mean {c.mean or 'ImageNet'}, std {c.std or 'ImageNet'} (converted from leopart's ImageNet-normalised input)"),
        ("projection head", f"{c.proj_layers} layers, {m.embed_dim} -> {c.proj_hidden_dim} -> {c.proj_dim}"),
        ("prototypes", c.num_prototypes),
        ("parameters", f"{n_params / 1e6:.2f}M ({n_backbone / 1e6:.2f}M backbone)"),
    ]


def _features_rows(path: str, features: dict) -> list[tuple[str, object]]:
    """What `leopart embed -o` wrote: how many maps of which shape, and (.safetensors) from what."""
    from .serialization import value_size

    shapes, meta = features["shapes"], features["metadata"]
    grids = [" x ".join(map(str, g)) for g in sorted({shape[:-1] for shape in shapes}, key=lambda g: (math.prod(g), g))]
    grid = grids[0] if len(grids) == 1 else f"{len(grids)} sizes, " + (
        ", ".join(grids) if len(grids) <= 3 else f"{grids[0]} (fewest) to {grids[-1]} (most)")
    names = json.loads(meta["names"]) if "names" in meta else []
    n_values = sum(math.prod(shape) for shape in shapes)
    rows = [("features", path), ("images", len(shapes)),
            ("patch grid", f"{grid} patches of {shapes[0][-1] if shapes else '?'} dimensions"),
            ("size", f"{_binary_size(n_values * value_size(features['dtype']))} of {features['dtype']}")]
    if meta:
        rows += [("model", meta.get("model", "-")), ("resolution", meta.get("resolution", "-"))]
        if "precision" in meta:  # files from before 2026-11-29 do not say
            rows.append(("computed in", meta["precision"]))
    if names:
        rows.append(("first image", names[0]))
    return rows


def _binary_size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def _run_rows(folder: Path) -> list[tuple[str, object]]:
    """Where a `leopart train` output folder stands: read off its checkpoint and logs, no weights loaded."""
    from .train import CHECKPOINT_NAME, read_run

    run = read_run(folder)
    cfg, logged = run.config, run.last_logged
    init = cfg.get("init")
    rows = [("training run", folder), ("data", cfg.get("data")),
            ("init", f"random {cfg.get('arch')}" if init == "random" else init),
            ("batch", f"{cfg.get('batch_size')} images: {cfg.get('n_global', 2)} x {cfg.get('global_size')} px + "
                      f"{cfg.get('n_local', 4)} x {cfg.get('local_size')} px crops"),
            ("step", f"{run.step} of {run.total if run.total is not None else '?'}"
                     + (" (finished)" if run.finished else "")),
            ("loss", f"{logged['loss']:.4f} at step {logged['step']}" if logged else "-")]
    if run.last_eval:
        scores = ", ".join(f"k={k}: {v:.1f}" for k, v in run.last_eval.get("overclustering", {}).items())
        rows.append(("k-means mIoU %", f"{scores} at step {run.last_eval.get('step')}"))
    rows += [("checkpoint", f"{folder / CHECKPOINT_NAME} (step {run.step})"),
             ("model", run.model_dir if run.finished else "written when the run finishes"),
             ("next", f"leopart cluster IMAGES --model {folder} --output PARTS" if run.finished
              else run.resume_command)]
    return rows


def _fitted_rows(folder: str, kind: str) -> list[tuple[str, object]]:
    """What `leopart cluster`, `leopart merge` and probe training wrote (a folder or Hub repo), and what they
    were fitted with."""
    from .serialization import fetch_folder

    config, tensors = fetch_folder(folder, kind, missing=f"no such folder: {folder}")
    if kind == "clusters":
        return [("part clusters", folder), ("parts", config.get("k")), ("images", len(config.get("names", []))),
                ("model", config.get("model")), ("foreground model", config.get("fg_model")),
                ("resolution", config.get("resolution")), ("metric", config.get("metric")),
                ("inertia", f"{config.get('inertia', float('nan')):.4g}"),
                ("next", f"leopart merge {folder} --output SEGMENTER")]
    if kind == "segmenter":
        params = config.get("params", {})
        return [("segmenter", folder), ("parts", config.get("k")),
                ("foreground parts", int(tensors["foreground"].sum())), ("objects", config.get("n_objects")),
                ("model", params.get("model", "not recorded (pass --model)")),
                ("resolution", params.get("image_resolution", "not recorded (pass --resolution)")),
                ("fitted on", plural(params["n_images"], "image") if "n_images" in params else "-"),
                ("background share", f"{params['bg_share_actual']:.2f}" if "bg_share_actual" in params else "-"),
                ("CD weight threshold", params.get("weight_threshold", "-")),
                ("Louvain resolution", params.get("resolution", "-"))]
    return [("probe head", folder), ("head", config.get("head")), ("classes", config.get("num_classes")),
            ("reads", f"{config.get('in_dim')}-dim tokens of {config.get('model') or 'a model it does not record'}"),
            ("resolution", config.get("resolution")), ("mask size", config.get("mask_size"))]


class _OutputPath(click.Path):
    """A click.Path the command will write to: it fails in one line while the options are read, not after the
    work, when it names a file where a folder belongs (or the reverse), or a folder above it is a file or
    cannot be written to."""

    def convert(self, value, param, ctx):
        path = Path(value)
        if path.is_dir() and not self.dir_okay:
            raise click.ClickException(f"cannot write {path}: it is a folder")
        if path.exists() and not path.is_dir() and not self.file_okay:
            raise click.ClickException(f"cannot write {path}: it is a file, and a folder belongs there")
        existing = next(p for p in path.absolute().parents if p.exists())  # the root always exists
        if not existing.is_dir():
            raise click.ClickException(f"cannot write {path}: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise click.ClickException(f"cannot write {path}: no permission to write in {existing}")
        return super().convert(value, param, ctx)


def _device_option(f):
    return click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")(f)


def _cache_option(f):
    """--cache DIR; a run interrupted without it says how to make the next one resume."""

    @functools.wraps(f)
    def run(*args, cache_dir=None, **kwargs):
        try:
            return f(*args, cache_dir=cache_dir, **kwargs)
        except KeyboardInterrupt:
            if cache_dir is None:
                click.echo("The features computed so far are lost: with --cache DIR a rerun resumes.", err=True)
            raise

    return click.option("--cache", "cache_dir", default=None, type=_OutputPath(file_okay=False, path_type=Path),
                        help="Keep the patch features here (files of 256 images): an interrupted run resumes, "
                             "a rerun reuses them.")(run)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", default="vits16", show_default=True, help="Alias, Hub id, folder or checkpoint.")
@click.option("--resolution", default="224", show_default=True,
              help="Square input side in pixels, HEIGHTxWIDTH (e.g. 448x672), or 'native' to keep each image's "
                   "size (rounded to the patch).")
@click.option("--keep-aspect", is_flag=True,
              help="Resize each image to --resolution on its shorter side, its aspect ratio kept (up to 16:1): one "
                   "map per image at its own grid, in a .safetensors file.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@_device_option
@click.option("--output", "-o", required=True, type=_OutputPath(dir_okay=False, path_type=Path),
              help="Where to write the features: FILE.safetensors or FILE.npy.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Value type in the file: float16 or bfloat16 halve it (bfloat16: .safetensors only).")
@click.option("--full-precision", is_flag=True,
              help="On a GPU, run the model in float32 instead of under bf16 autocast (slower; timm's float32 values).")
@_cache_option
def embed(inputs, model, resolution, keep_aspect, batch_size, device, output, dtype, full_precision, cache_dir):
    """Embed images (files, folders or .txt lists of paths) into patch features [B, h, w, D]."""
    from . import data
    from .device import default_device, uses_bf16
    from .embed import iter_embeddings
    from .hub import recorded_name
    from .serialization import write_features

    suffix = output.suffix.lower()
    if suffix not in {".safetensors", ".npy"}:
        raise LeopartError(f"--output must end in .safetensors or .npy, not '{output.name}'")
    res = _parse_resolution(resolution)
    if keep_aspect and not isinstance(res, int):
        raise LeopartError(f"--keep-aspect takes the shorter side in pixels as --resolution, not {resolution}")
    if (res is None or keep_aspect) and suffix == ".npy":
        raise LeopartError(f"{'--keep-aspect' if keep_aspect else '--resolution native'} gives one array per image "
                           "of its own size: write .safetensors instead of .npy")
    if dtype == "bfloat16" and suffix == ".npy":
        raise LeopartError("numpy has no bfloat16: write .safetensors, or --dtype float16 to .npy")
    paths = list(data.expand_inputs(list(inputs)))
    _check_images(paths)  # before the model loads (or downloads), and before hours of work on the good ones
    # One batch at a time from the model into the file: memory does not grow with the number of images.
    features = iter_embeddings(paths, model=model, resolution=res, batch_size=batch_size, device=device,
                               progress=True if len(paths) > batch_size else None, cache_dir=cache_dir,
                               full_precision=full_precision, keep_aspect=keep_aspect)
    # A local model is recorded by its absolute path (as segmenters and runs record theirs), so it resolves elsewhere.
    shown = "x".join(map(str, res)) if isinstance(res, tuple) else str(res or "native")
    shown += " on the shorter side" if keep_aspect else ""
    meta = {"model": recorded_name(model), "resolution": shown,
            "precision": "bf16 autocast" if uses_bf16(default_device(device), full_precision) else "float32",
            "names": json.dumps([str(p) for p in paths])}
    shape = write_features(output, features, len(paths), ragged=res is None or keep_aspect, metadata=meta, dtype=dtype)
    maps = f"of {' x '.join(map(str, shape[1:]))}" if shape else "each at its image's own size"
    click.echo(f"wrote {output} ({plural(len(paths), 'map')} {maps}, {dtype})")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out_dir", type=_OutputPath(file_okay=False, path_type=Path))
@click.option("--arch", default=None, help="timm model name, when it cannot be read off the weights.")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints that pickle Python objects besides tensors.")
def convert(checkpoint, out_dir, arch, trust_pickle):
    """Convert an original Leopart CHECKPOINT (.ckpt/.pth/.pt/.safetensors) into a model folder OUT_DIR.

    Also a timm state dict or another ViT family's release file (DINO, DINOv2, DINOv3, EVA-02; the heads start
    from a seeded init), and a `leopart train` run's checkpoint.pt (its student)."""
    from .hub import convert_checkpoint, save_converted
    from .serialization import CONFIG_NAME

    if not checkpoint.is_file():
        raise LeopartError(f"no such file: {checkpoint}")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
        raise LeopartError(f"{out_dir} exists and is not a leopart model folder: choose an empty or new folder")
    model = convert_checkpoint(checkpoint, arch=arch, trust_pickle=trust_pickle)
    save_converted(model, out_dir)
    click.echo(f"wrote {out_dir} ({model.config.arch}, {plural(model.config.num_prototypes, 'prototype')})")


def _fg_option(f):
    return click.option("--fg-model", default=None,
                        help="Model whose attention gives the foreground cue (default: MODEL itself, as the "
                             "reference code's evaluation did; or e.g. dino-vits16).")(f)


def _check_images(paths: list) -> None:
    """Fail before any work on inputs that are missing or not images (headers only)."""
    from .data import image_size

    for p in paths:
        if not Path(p).exists():
            raise LeopartError(f"no such file: {p}")
        image_size(p)  # "cannot read image ..." for a file that is not one


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", default="vits16", show_default=True, help="Alias, Hub id, folder or checkpoint.")
@click.option("--k", default=149, show_default=True, type=click.IntRange(min=1), help="Number of part clusters.")
@click.option("--output", "-o", required=True, type=_OutputPath(file_okay=False, path_type=Path),
              help="Folder for centroids, per-image labels and foreground masks.")
@click.option("--resolution", default=448, show_default=True, type=click.IntRange(min=1),
              help="Square input side in pixels, a multiple of the patch size (the paper: 448).")
@click.option("--iters", default=50, show_default=True, type=click.IntRange(min=0), help="Lloyd iterations at most.")
@click.option("--seed", default=0, show_default=True, help="Seed of the k-means++ seeding.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@_device_option
@_cache_option
@_fg_option
def cluster(inputs, model, k, output, resolution, iters, seed, batch_size, device, cache_dir, fg_model):
    """Cluster the patch tokens of INPUTS (files, folders or .txt lists of paths) into K parts."""
    import torch

    from . import data
    from .cluster import cluster as kmeans
    from .device import default_device
    from .hub import from_pretrained
    from .segment import check_k, dense_features
    from .serialization import save_folder

    paths = list(data.expand_inputs(list(inputs)))
    _check_images(paths)
    device = default_device(device)  # for the model and k-means alike
    m = from_pretrained(model, device=device)
    check_k(k, len(paths), resolution, m.patch_size)
    fg = from_pretrained(fg_model, device=device) if fg_model else None
    dense = dense_features(paths, m, resolution, batch_size, device, fg_model=fg, progress=True,
                           cache_dir=cache_dir)
    km = kmeans(dense.features, k, iters=iters, seed=seed, device=device, progress=True)
    config = {"leopart_kind": "clusters", "model": m.name_or_path, "fg_model": (fg or m).name_or_path, "k": k,
              "metric": km.metric, "resolution": resolution, "inertia": km.inertia, "seed": seed,
              "names": [str(p) for p in paths]}
    tensors = {"centroids": km.centroids, "labels": km.labels.view(dense.features.shape[:3]),
               "foreground": dense.foreground.to(torch.uint8)}
    images = plural(len(paths), "image")
    save_folder(output, config, tensors, f"# leopart clusters\n\nk={k} parts of {images}, model {model}.\n")
    click.echo(f"wrote {output} (k={k}, {images}, inertia {km.inertia:.4g})")


@main.command()
@click.argument("clusters_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=_OutputPath(file_okay=False, path_type=Path),
              help="Folder for the fitted segmenter.")
@click.option("--bg-share", default=None, type=click.FloatRange(0, 1),
              help="Share of patches to call background (default: the attention masks' own, within 0.55-0.75).")
@click.option("--weight-threshold", default=None, type=click.FloatRange(0, 1),
              help="Co-occurrence graph edges lighter than this are dropped before community detection "
                   "(default: the reference's, 0.09 for parts of a /16 model, 0.07 for /8).")
@click.option("--resolution", "cd_resolution", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Louvain resolution: higher gives more, smaller objects.")
@click.option("--seed", default=0, show_default=True, help="Seed of the Louvain community detection.")
def merge(clusters_dir, output, bg_share, weight_threshold, cd_resolution, seed):
    """Merge the part clusters in DIR (from `leopart cluster`) into objects: CBFE + community detection."""
    from .cluster import KMeansResult
    from .merge import merge as merge_parts
    from .merge import reference_weight_threshold
    from .serialization import load_folder

    config, t = load_folder(clusters_dir, "clusters")
    if weight_threshold is None:  # the patch size is the input side over the label grid's
        patch_size = (config.get("resolution") or 0) // t["labels"].shape[-1]
        weight_threshold = reference_weight_threshold(patch_size)
    km = KMeansResult(t["centroids"], t["labels"].flatten(), config.get("inertia", float("nan")), 0,
                      config.get("metric", "cosine"))
    seg = merge_parts(km, t["labels"], t["foreground"].bool(), bg_share=bg_share, weight_threshold=weight_threshold,
                      resolution=cd_resolution, seed=seed,
                      params={"model": config.get("model"), "image_resolution": config.get("resolution")})
    seg.save_pretrained(output)
    n_fg = int(seg.foreground.sum())
    click.echo(f"wrote {output} ({plural(seg.k, 'part')} -> {plural(seg.n_objects, 'object')}, "
               f"{plural(n_fg, 'foreground part')}, background share {seg.params['bg_share_actual']:.2f})")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", default=None,
              help="Alias, Hub id, folder or checkpoint (default: the segmenter's or head's own model, else vits16).")
@click.option("--segmenter", default=None, help="Folder or Hub id of a fitted segmenter (from `leopart merge`).")
@click.option("--k", default=None, type=click.IntRange(min=1),
              help="Parts per image when no segmenter is given (default 8).")
@click.option("--output", "-o", default=".", type=_OutputPath(file_okay=False, path_type=Path),
              help="Folder for <stem>_mask.png and <stem>_overlay.png (subfolders of a folder input kept).  "
                   "[default: current folder]")
@click.option("--resolution", default=None, type=click.IntRange(min=1),
              help="Input side in pixels, a multiple of the patch size: the shorter side, or the square's with "
                   "--square (default: the one the segmenter's parts were clustered at, else 448 as in the paper).")
@click.option("--keep-aspect/--square", default=None,
              help="Keep each image's aspect ratio, --resolution on its shorter side (up to 16:1), so wide photos "
                   "and video frames are not squeezed (the default); or resize it to a square, the paper's protocol "
                   "(as `leopart eval` and `leopart cluster` do).")
@_device_option
@click.option("--head", default=None,
              help="A trained probe head (folder, Hub id or released .ckpt): supervised class masks instead.")
@_fg_option
@click.option("--skip-existing", is_flag=True,
              help="Leave out inputs whose mask and overlay are already in the output folder (finishes an "
                   "interrupted run).")
@click.option("--overlay/--no-overlay", default=True, show_default=True,
              help="Also write <stem>_overlay.png, the image tinted by its mask (for a 12-megapixel photo, "
                   "writing it takes about as long as segmenting on a CPU).")
def segment(inputs, model, segmenter, k, output, resolution, keep_aspect, device, head, fg_model, skip_existing,
            overlay):
    """Segment images (files, folders or .txt lists of paths) into objects without labels (or into classes
    with --head); writes VOC-coloured masks and overlays."""
    import collections
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from . import data
    from .hub import from_pretrained
    from .merge import Segmenter
    from .progress import progress_bar
    from .segment import (MAX_MASK_ID, SEGMENTER_KNOWS_FOREGROUND, fitted_with, mask_image, recorded_model,
                          save_overlay, save_png, segment as segment_image)

    outputs = _segment_outputs(inputs, output)
    paths = list(outputs)
    # A rerun over a folder that also holds the outputs would segment them, or overwrite them while they are inputs.
    produced = {f.resolve() for pair in outputs.values() for f in pair}
    own = {p for p in paths if Path(p).resolve() in produced}
    if own:
        click.echo(f"leaving out {plural(len(own), 'input')} that this command writes (masks and "
                   f"overlays of the other inputs), e.g. {min(own)}")
        paths = [p for p in paths if p not in own]
    outputs = {p: outputs[p] if overlay else outputs[p][:1] for p in paths}
    _check_images(paths)
    if head and (segmenter or k or resolution or keep_aspect is not None or fg_model):
        raise LeopartError("--head gives supervised class masks at the head's own resolution: leave out "
                           "--segmenter, --k, --resolution, --keep-aspect / --square and --fg-model")
    if segmenter and fg_model:
        raise LeopartError(SEGMENTER_KNOWS_FOREGROUND)
    if skip_existing:
        todo = [p for p in paths if not all(f.is_file() for f in outputs[p])]
        if len(todo) < len(paths):
            click.echo(f"skipping {len(paths) - len(todo)} of {len(paths)} inputs: their outputs are in {output}")
        if not todo:
            return
        paths = todo
    seg = Segmenter.from_pretrained(segmenter) if segmenter else None
    if seg is not None and seg.n_objects > MAX_MASK_ID:  # before any model loads, not at the first image's PNG
        raise LeopartError(f"{segmenter} merges its parts into {seg.n_objects} objects, more than the {MAX_MASK_ID} a "
                           f"palette PNG mask can hold: use leopart.segment from Python, or fit one with fewer objects")
    probe_head = None
    if head:
        from .probe import load_head, segment_with_head

        probe_head = load_head(head)
    # Without --model: the one the segmenter's parts or the head were fitted on, when they record it.
    fitted_model = (probe_head.config.model if probe_head else None) or fitted_with(seg)[0]
    m = from_pretrained(model or recorded_model(fitted_model, head or segmenter or "the model"), device=device)
    fg = from_pretrained(fg_model, device=device) if fg_model else None

    def segment_one(image):
        if probe_head is not None:
            return segment_with_head(image, m, probe_head, device=device)
        return segment_image(image, model=m, segmenter=seg, k=k, resolution=resolution, fg_model=fg, device=device,
                             keep_aspect=keep_aspect is not False)

    def write(image, mask, files):
        save_png(mask_image(mask), files[0])
        if len(files) > 1:
            save_overlay(image, mask, files[1])

    # Each image is decoded once, for the model and the overlay, one image ahead; its files are written in
    # the background (at most 2 images' pending) while the next is segmented: PIL decodes and encodes with the
    # GIL released. 12-megapixel photos on 2 CPU cores: 1.1-1.2x end to end; on a GPU, where the model takes
    # a fraction of the PNG encoding's time, the overlap matters more (not measured).
    images = data.map_ahead(data.load_image, paths, threads=1, ahead=1)
    writing: collections.deque = collections.deque()
    done = 0
    with ThreadPoolExecutor(2) as writers, contextlib.closing(images):
        try:
            for image, path in zip(progress_bar(images, total=len(paths), desc="segment", unit="img",
                                                progress=len(paths) > 1), paths):
                writing.append(writers.submit(write, image, segment_one(image), outputs[path]))
                while len(writing) > 2 or (writing and writing[0].done()):
                    writing.popleft().result()
                    done += 1
            while writing:
                writing.popleft().result()
                done += 1
        except KeyboardInterrupt:
            for future in writing:
                future.cancel()  # not started; those under way finish (their files appear whole or not at all)
            writers.shutdown(wait=True)
            done += sum(f.done() and not f.cancelled() and f.exception() is None for f in writing)
            if done < len(paths):
                click.echo(f"Stopped after {done} of {plural(len(paths), 'image')}; rerun with --skip-existing to "
                           "finish.", err=True)
            raise
    click.echo(f"wrote {plural((1 + overlay) * len(paths), 'file')} to {output}")


def _segment_outputs(inputs: tuple[str, ...], output: Path) -> dict[Path, tuple[Path, Path]]:
    """Each input image's (mask, overlay) files: OUTPUT/<stem>_mask.png and _overlay.png, under the same
    subfolders as in a folder input, or as below a list file's folder (cameras restart their numbering, so
    a/IMG_0001.JPG and b/IMG_0001.JPG are common). Two inputs that would write the same file are an error."""
    from . import data

    outputs, writer = {}, {}
    for item in inputs:
        root = Path(item)
        root = root if root.is_dir() else root.parent if data.is_image_list(root) else None
        for path in data.expand_inputs(item):
            folder = output
            if root is not None:  # normpath first: a listed ../x/a.jpg must not write outside OUTPUT
                sub = os.path.relpath(os.path.normpath(path.parent), os.path.normpath(root))
                folder = output if sub.split(os.sep)[0] == os.pardir else output / sub
            mask = folder / f"{path.stem}_mask.png"
            if writer.setdefault(mask, path) != path:
                raise LeopartError(f"{writer[mask]} and {path} would both write {mask}: rename one or segment "
                                   "them into different --output folders")
            outputs[path] = (mask, folder / f"{path.stem}_overlay.png")
    return outputs


@main.command(name="eval")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--model", default="vits16", show_default=True, help="Alias, Hub id, folder or checkpoint.")
@click.option("--k", "ks", multiple=True, type=click.IntRange(min=1),
              help="k-means k to score (repeatable; default 500 and 21).")
@click.option("--fully-unsupervised", is_flag=True, help="Also run CBFE + CD fully unsupervised segmentation.")
@click.option("--fu-k", default=None, type=click.IntRange(min=1),
              help="Parts for --fully-unsupervised (default 149 for /16, 109 for /8).")
@click.option("--weight-threshold", default=None, type=click.FloatRange(0, 1),
              help="CD graph edges lighter than this are dropped (default 0.09 for /16, 0.07 for /8).")
@click.option("--markov-time", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Infomap markov time of CD, reference protocol (default 2 for /16, 0.4 for /8).")
@click.option("--cbfe-k", default=None, type=click.IntRange(min=2),
              help="Clusters of CBFE, reference protocol (default 200); its cut is chosen on --train-split's masks.")
@click.option("--cd-runs", default=None, type=click.IntRange(min=1),
              help="Infomap runs (seeds) averaged, reference protocol (default 10).")
@click.option("--cd-resolution", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Louvain resolution of CD, cosine protocol (default 1.0): higher gives more, smaller objects.")
@click.option("--bg-share", "bg_shares", multiple=True, type=click.FloatRange(0, 1),
              help="CBFE background share of patches, cosine protocol (repeatable: the best is reported; "
                   "default 0.55 to 0.75 by 0.05, best on the scored split). Give the one chosen on the train split "
                   "for a score not tuned on the scored images.")
@click.option("--num-classes", default=None, type=click.IntRange(min=1), help="Default: read from the masks.")
@click.option("--split", default="val", show_default=True,
              help="ImageSets/Segmentation/<split>.txt or a file listing image names (a folder without split "
                   "lists: every image with a mask).")
@click.option("--resolution", default=448, show_default=True, type=click.IntRange(min=1),
              help="Square input side in pixels, a multiple of the patch size (the paper: 448).")
@click.option("--json", "json_path", default=None, type=_OutputPath(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@click.option("--seed", default=0, show_default=True, help="Seed of k-means, community detection and the probes.")
@click.option("--protocol", default="reference", show_default=True, type=click.Choice(["reference", "cosine"]),
              help="As the reference code ran it (bilinear resize; standardised tokens, PCA to 50 dimensions, "
                   "Euclidean k-means, best of 5 runs from random points, mean of 5 seeds; fully unsupervised with "
                   "the train split and Infomap) or leopart's own (bicubic resize; spherical k-means of the raw "
                   "tokens, one run; fully unsupervised with CBFE shares and Louvain).")
@click.option("--n-init", default=None, type=click.IntRange(min=1),
              help="k-means runs per fit; the lowest-inertia one is scored (default: the protocol's, 5 or 1).")
@click.option("--seeds", default=None, type=click.IntRange(min=1),
              help="k-means fits per k, with different seeds; their mean mIoU is reported (default: the "
                   "protocol's, 5 or 1).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@_device_option
@click.option("--linear", is_flag=True, help="Train a linear probe on the train split and report its val mIoU.")
@click.option("--fcn", is_flag=True, help="Train an FCN probe on the train split and report its val mIoU.")
@click.option("--train-split", default="train", show_default=True,
              help="Probe training split, also clustered with --split by --fully-unsupervised under the reference "
                   "protocol: ImageSets/Segmentation/<name>.txt or a file listing image names.")
@click.option("--probe-epochs", default=None, type=click.IntRange(min=1), help="Default: 25 (linear), 30 (FCN).")
@click.option("--probe-lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Probe SGD learning rate (default: the reference's, 0.1 for ViT-B/8, else 0.01).")
@click.option("--probe-batch-size", default=None, type=click.IntRange(min=1),
              help="Probe batch (default: the reference's, 12 for ViT-B/8, else 120 linear / 64 FCN).")
@click.option("--probe-mask-size", default=100, show_default=True, type=click.IntRange(min=1),
              help="Tokens are upsampled to this size for the probe head, and masks resized to it.")
@click.option("--probe-augment", is_flag=True,
              help="Train the probes on the reference's random crops (0.8-1.0 of the area) and flips, drawn anew "
                   "every epoch: the backbone runs on every batch (default: the resized images, tokens computed "
                   "once and cached).")
@click.option("--probe-dir", default=None, type=_OutputPath(file_okay=False, path_type=Path),
              help="Token cache, per-epoch checkpoints (resumable) and trained heads: <dir>/<linear|fcn>/head.")
@_cache_option
@_fg_option
def evaluate(data_dir, model, ks, fully_unsupervised, fu_k, weight_threshold, markov_time, cbfe_k, cd_runs,
             cd_resolution, bg_shares, num_classes, split, resolution, json_path, seed, protocol, n_init, seeds,
             batch_size, device, linear, fcn, train_split, probe_epochs, probe_lr, probe_batch_size, probe_mask_size,
             probe_augment, probe_dir, cache_dir, fg_model):
    """Score MODEL on a PASCAL-VOC-layout folder DATA with the paper's protocols.

    k-means over-clustering (default k = 500 and 21) and, with --fully-unsupervised, CBFE + CD (reference
    protocol: clustered with --train-split, Infomap, needs `pip install infomap`); with --linear / --fcn,
    supervised probes trained on the train split (then k-means runs only if --k is given).
    """
    from .evaluate import check_fu_settings, evaluate as run_eval, format_table, read_fu_train_split, read_voc
    from .hub import from_pretrained
    from .serialization import write_json

    if json_path is not None and json_path.suffix.lower() != ".json":
        raise LeopartError(f"--json must name a .json file, not '{json_path.name}'")
    check_fu_settings(protocol, fully_unsupervised, fg_model=fg_model, bg_shares=bg_shares or None,
                      cd_resolution=cd_resolution, markov_time=markov_time, cbfe_k=cbfe_k, cd_runs=cd_runs)
    heads = [h for h, on in (("linear", linear), ("fcn", fcn)) if on]
    ctx = click.get_current_context()
    probe_options = [f"--{name.replace('_', '-')}" for name in ("probe_epochs", "probe_lr", "probe_batch_size",
                                                                 "probe_mask_size", "probe_augment", "probe_dir")
                     if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if probe_options and not heads:
        raise LeopartError(f"{', '.join(probe_options)} set the probes: add --linear and/or --fcn, or leave "
                           f"{'them' if len(probe_options) > 1 else 'it'} out")
    # A wrong folder or split fails before the model loads (or downloads).
    scored_split = read_voc(data_dir, split)
    scored = set(scored_split.names)
    if fully_unsupervised and protocol == "reference":
        read_fu_train_split(data_dir, train_split, scored_split)
    if heads:
        shared = scored & set(read_voc(data_dir, train_split).names)
        if shared:
            raise LeopartError(f"the probe's --train-split '{train_split}' and --split '{split}' share "
                               f"{plural(len(shared), 'image')} ({min(shared)}, ...): the probes would be scored on "
                               "images they were trained on")
    m = from_pretrained(model, device=device)
    fg = from_pretrained(fg_model, device=device) if fg_model else None
    ks = ks or (() if heads else (500, 21))
    if ks or fully_unsupervised:
        results = run_eval(data_dir, m, ks=ks, fully_unsupervised=fully_unsupervised,
                           num_classes=num_classes, split=split, resolution=resolution, fg_model=fg, fu_k=fu_k,
                           weight_threshold=weight_threshold, cd_resolution=cd_resolution,
                           bg_shares=bg_shares or None, protocol=protocol, n_init=n_init, seeds=seeds,
                           seed=seed, batch_size=batch_size, device=device, progress=True, cache_dir=cache_dir,
                           train_split=train_split, markov_time=markov_time, cbfe_k=cbfe_k, cd_runs=cd_runs)
    else:
        results = {"n_images": len(scored), "overclustering": {}}
    if heads:
        from .probe import evaluate_probe, probe

        for head in heads:
            out = probe_dir / head if probe_dir else None
            trained = probe(m, data_dir, head=head, split=train_split, epochs=probe_epochs, lr=probe_lr,
                            batch_size=probe_batch_size, num_classes=num_classes, resolution=resolution,
                            mask_size=probe_mask_size, augment=probe_augment, output=str(out) if out else None,
                            seed=seed, device=device, progress=True)
            results[head], _ = evaluate_probe(trained, m, data_dir, split=split, device=device,
                                              batch_size=batch_size, progress=True)
            results.setdefault("num_classes", trained.config.num_classes)
        results["probes"] = {"train_split": train_split, "augment": probe_augment, "mask_size": probe_mask_size,
                             "scored_at": resolution}
    results["model"] = model
    click.echo(format_table(results, model))
    if heads and probe_dir:
        shown = ", ".join(str(probe_dir / head) for head in heads)
        click.echo(f"trained heads in {shown}: `leopart segment IMAGE --model {model} --head {probe_dir / heads[-1]}`")
    if json_path is not None:
        write_json(json_path, results)
        click.echo(f"wrote {json_path}")


@main.command()
@click.argument("data_dir", metavar="DATA")
@click.option("--output", "-o", default="runs/leopart", show_default=True, type=_OutputPath(file_okay=False),
              help="Run folder: checkpoints, metrics, model.")
@click.option("--init", default="dino-vits16", show_default=True,
              help="Alias, org/repo, folder, checkpoint, or 'random'.")
@click.option("--arch", default=None,
              help="timm ViT name: of --init random (default vit_small_patch16_224), or of an --init weights file "
                   "whose weights do not tell (DINOv3, EVA release files).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Total steps of the run (default: --epochs).")
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(min=1),
              help="Passes over DATA (paper: 50 on COCO).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Global batch.")
@click.option("--global-size", default=224, show_default=True, type=click.IntRange(min=16),
              help="Side of the 2 global crops, pixels.")
@click.option("--local-size", default=96, show_default=True, type=click.IntRange(min=16),
              help="Side of the 4 local crops, pixels.")
@click.option("--num-prototypes", default=None, type=click.IntRange(min=1),
              help="Prototypes (Sinkhorn targets) K (default: the --init model's own; 300 for DINO and random init).")
@click.option("--lr-backbone", default=None, type=float,
              help="Backbone learning rate, cosine to 0 (default: the reference's, 1e-5, or 5e-6 for patch-8 "
                   "models such as ViT-B/8).")
@click.option("--lr-heads", default=None, type=float,
              help="Head and prototype learning rate, cosine to 0 (default: the reference's, 1e-4, or 5e-5 for "
                   "patch-8 models).")
@click.option("--queue-length", default=0, show_default=True, type=click.IntRange(min=0),
              help="Past teacher patch embeddings per global crop prepended before Sinkhorn (paper: 8192).")
@click.option("--loss-mask", default="fg", show_default=True, type=click.Choice(["all", "fg", "bg"]),
              help="Patches the loss counts, by the teacher's attention mask.")
@click.option("--grad-clip", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Clip the gradient norm to this (default: no clipping, as the reference).")
@click.option("--train-last-blocks", default=None, type=click.IntRange(min=0),
              help="Train only the backbone's last N blocks (and its final norm; 0: the heads alone).")
@click.option("--save-every", default=500, show_default=True, type=click.IntRange(min=1),
              help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its checkpoint.")
@_device_option
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0), help="Data-loading processes.")
@click.option("--seed", default=0, show_default=True, help="Seed of the heads, crops and data order.")
@click.option("--eval-data", default=None, help="VOC-layout folder for k-means mIoU during training.")
@click.option("--eval-every", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Steps between evaluations on --eval-data.")
@click.option("--eval-k", default=(500, 300, 21), show_default=True, multiple=True, type=click.IntRange(min=1),
              help="k-means k of those evaluations (repeatable; the reference's 500, 300 and 21).")
@click.option("--eval-resolution", default=448, show_default=True, type=click.IntRange(min=1),
              help="Input side of those evaluations, a multiple of the patch size (the reference's 448).")
@click.pass_context
def train(ctx, data_dir, output, resume, **options):
    """Fine-tune a ViT with the Leopart objective on DATA (an image folder or a text file of paths)."""
    from .train import MODEL_NAME, is_run_folder, train as run_training

    # Only what the user set explicitly overrides a resumed run's settings.
    explicit = {k: v for k, v in options.items()
                if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    if not resume:
        explicit = options
    try:
        run_training(data_dir, output, resume=resume, progress=True, **explicit)
    except KeyboardInterrupt:
        if is_run_folder(output) and os.environ.get("RANK", "0") == "0":
            click.echo("Continue it with the same command and --resume.", err=True)
        raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        click.echo(f"wrote {Path(output) / MODEL_NAME}")

@main.command()
@click.option("--output", "-o", default="leopart-demo", show_default=True, type=_OutputPath(file_okay=False),
              help="Folder for data, run, results.")
@click.option("--minutes", default=8.0, show_default=True, type=click.FloatRange(min=0.5),
              help="Time budget for the whole demo; training gets what the rest leaves, up to 800 steps.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Train this many steps instead.")
@click.option("--n-train", default=400, show_default=True, type=click.IntRange(min=16),
              help="Synthetic training scenes.")
@click.option("--n-val", default=60, show_default=True, type=click.IntRange(min=1), help="Synthetic validation scenes.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data, the model and k-means.")
def demo(output, minutes, steps, n_train, n_val, seed):
    """Train, cluster, merge and evaluate on a synthetic parts dataset, offline (about --minutes)."""
    from .demo import run_demo

    run_demo(output=output, minutes=minutes, steps=steps, n_train=n_train, n_val=n_val, seed=seed)


if __name__ == "__main__":
    main()
