"""The ``leopart`` command line: a thin layer over the Python API.

Every command turns a LeopartError (bad input, missing model, ...) into one line on stderr and exit
status 1, and writes its output files atomically, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from .errors import LeopartError


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
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("LEOPART_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise click.ClickException(f"{type(e).__name__}: {msg} (set LEOPART_DEBUG=1 for the traceback)") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="leopart")
def main():
    """Dense, part-aware patch features with Leopart Vision Transformers.

    MODEL arguments take an alias (vits16, vitb8, dino-vits16, dino-vitb8), an org/repo[@revision] on
    the Hugging Face Hub, a folder written by save_pretrained, or an original .ckpt/.pth file.
    """
    warnings.showwarning = _one_line_warning


def _parse_resolution(value: str) -> int | None:
    if value.lower() in {"native", "none", "0"}:
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a number of pixels or 'native'") from None


@main.command()
@click.argument("model")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints that pickle Python objects besides tensors.")
def info(model, trust_pickle):
    """Describe MODEL: architecture, sizes and where it was loaded from."""
    from .hub import from_pretrained

    m = from_pretrained(model, trust_pickle=trust_pickle)
    c = m.config
    n_params = sum(p.numel() for p in m.parameters())
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    rows = [
        ("model", model),
        ("backbone", c.arch),
        ("patch size", m.patch_size),
        ("embed dim", m.embed_dim),
        ("depth / heads", f"{len(m.backbone.blocks)} / {m.num_heads}"),
        ("trained at", f"{c.img_size}x{c.img_size}"),
        ("projection head", f"{c.proj_layers} layers, {m.embed_dim} -> {c.proj_hidden_dim} -> {c.proj_dim}"),
        ("prototypes", c.num_prototypes),
        ("parameters", f"{n_params / 1e6:.2f}M ({n_backbone / 1e6:.2f}M backbone)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", default="vits16", show_default=True, help="Alias, Hub id, folder or checkpoint.")
@click.option("--resolution", default="224", show_default=True,
              help="Square input side in pixels, or 'native' to keep each image's size (rounded to the patch).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the features: FILE.safetensors or FILE.npy.")
def embed(inputs, model, resolution, batch_size, device, output):
    """Embed images (files or folders) into patch features [B, h, w, D]."""
    from . import data
    from .embed import embed as embed_images
    from .serialization import atomic_path, save_tensors

    suffix = output.suffix.lower()
    if suffix not in {".safetensors", ".npy"}:
        raise LeopartError(f"--output must end in .safetensors or .npy, not '{output.name}'")
    res = _parse_resolution(resolution)
    if res is None and suffix == ".npy":
        raise LeopartError("--resolution native gives one array per image: write .safetensors instead of .npy")
    paths = list(data.expand_inputs(list(inputs)))
    features = embed_images(paths, model=model, resolution=res, batch_size=batch_size, device=device,
                            progress=True if len(paths) > batch_size else None)
    meta = {"model": model, "resolution": str(res or "native"), "names": json.dumps([str(p) for p in paths])}
    if suffix == ".npy":
        import numpy as np

        with atomic_path(output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, features.numpy())
    elif res is None:
        save_tensors(output, {f"features.{i}": f for i, f in enumerate(features)}, metadata=meta)
    else:
        save_tensors(output, {"features": features}, metadata=meta)
    shape = tuple(features.shape) if res is not None else f"{len(features)} ragged maps"
    click.echo(f"wrote {output} ({shape})")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", default=None, help="timm model name, when it cannot be read off the weights.")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints that pickle Python objects besides tensors.")
def convert(checkpoint, out_dir, arch, trust_pickle):
    """Convert an original Leopart CHECKPOINT (.ckpt/.pth/.pt/.safetensors) into a model folder OUT_DIR."""
    from .hub import convert_checkpoint, save_converted
    from .serialization import CONFIG_NAME

    if not checkpoint.is_file():
        raise LeopartError(f"no such file: {checkpoint}")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file():
        raise LeopartError(f"{out_dir} exists and is not a leopart model folder: choose an empty or new folder")
    model = convert_checkpoint(checkpoint, arch=arch, trust_pickle=trust_pickle)
    save_converted(model, out_dir)
    click.echo(f"wrote {out_dir} ({model.config.arch}, {model.config.num_prototypes} prototypes)")


if __name__ == "__main__":
    main()
