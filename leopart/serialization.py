"""Folder format shared by everything leopart saves (models, segmenters, probe heads).

A saved object is a folder with ``config.json`` + ``model.safetensors`` (+ a ``README.md`` card), the
layout of huggingface_hub's ``PyTorchModelHubMixin``, so any of them can live in a Hub repo. Files appear
atomically: they are written under a temporary name and renamed, so an interrupted save never leaves a
half-written file that a later load would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import LeopartError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# Weights files that from_pretrained and convert read (original checkpoints, state dicts, training runs).
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".safetensors")

# "org/repo" or "org/repo@revision" (Hub naming rules, loosely: the Hub itself validates the rest).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                # Mode 0o666 less the umask, as open() would give the file itself (mkstemp's 0o600 would
                # survive the rename and hide the output from the user's group).
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                continue
    except OSError as e:
        raise LeopartError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None or e.filename not in (None, str(tmp), tmp):  # not a failed write of this file
            raise
        # A full disk, or a folder where the file must go: name the file asked for, not the temporary one.
        raise LeopartError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# Feature file value types: name -> (torch dtype, safetensors dtype code, numpy descr; None: no numpy type).
FEATURE_DTYPES = {"float32": (torch.float32, "F32", "<f4"), "float16": (torch.float16, "F16", "<f2"),
                  "bfloat16": (torch.bfloat16, "BF16", None)}


def write_features(path: str | os.PathLike, maps: Iterable[torch.Tensor], count: int, ragged: bool = False,
                   metadata: dict[str, str] | None = None, dtype: str = "float32") -> tuple[int, ...] | None:
    """Write ``count`` feature maps to ``path`` (.npy or .safetensors) as ``maps`` yields them, holding one map
    in memory rather than the dataset; the file appears (atomically) once all of them are written.

    .npy: one array [count, *shape]; .safetensors: one tensor "features" [count, *shape] or, with ``ragged``
    (shapes may differ), one tensor "features.{i}" per map, plus ``metadata``. Values are stored as ``dtype``
    (FEATURE_DTYPES; half precision halves the file; numpy has no bfloat16). Returns the array's shape (None
    when ragged).
    """
    path = Path(path)
    npy = path.suffix.lower() == ".npy"
    if npy and ragged:
        raise LeopartError("maps of different shapes need .safetensors, not .npy")
    if dtype not in FEATURE_DTYPES:
        raise LeopartError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype!r}")
    torch_dtype, code, descr = FEATURE_DTYPES[dtype]
    if npy and descr is None:
        raise LeopartError(f"numpy has no {dtype}: write .safetensors, or float16 to .npy")
    if count < 1:
        raise LeopartError("no feature maps to write")
    metadata = metadata or {}
    # safetensors puts its JSON header (shapes, offsets) before the data: reserve room for it, write the data,
    # then fill the header in (the format allows trailing spaces in the header).
    n_entries = count if ragged else 1
    header_room = 0 if npy else _round_up(len(json.dumps(metadata)) + n_entries * (len(f"features.{count}") + 200), 8)
    shape, entries, offset, written = None, {}, 0, 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            f.seek(0 if npy else 8 + header_room)
            for t in maps:
                if written == count:
                    raise LeopartError(f"more than {count} feature maps for {path}")
                t = t.detach().to(torch_dtype).cpu().contiguous()
                if written == 0:
                    shape = tuple(t.shape)
                    if npy:
                        np.lib.format.write_array_header_1_0(
                            f, {"descr": descr, "fortran_order": False, "shape": (count, *shape)})
                elif not ragged and tuple(t.shape) != shape:
                    raise LeopartError(f"feature map {written} has shape {tuple(t.shape)}, the first had {shape}")
                data = t.view(-1).view(torch.uint8).numpy()  # the raw bytes (numpy has no bfloat16)
                f.write(data.data)
                if ragged:
                    entries[f"features.{written}"] = {"dtype": code, "shape": list(t.shape),
                                                      "data_offsets": [offset, offset + data.nbytes]}
                offset += data.nbytes
                written += 1
            if written != count:
                raise LeopartError(f"got {written} of {count} feature maps for {path}")
            if not npy:
                if not ragged:
                    entries = {"features": {"dtype": code, "shape": [count, *shape], "data_offsets": [0, offset]}}
                header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
                assert len(header) <= header_room, "header room underestimated"
                f.seek(0)
                f.write(struct.pack("<Q", header_room) + header.ljust(header_room, b" "))
        except OSError as e:
            raise LeopartError(f"cannot write {path}: {e.strerror or e}") from None
    return None if ragged else (count, *shape)


def read_features_header(path: str | os.PathLike) -> dict | None:
    """What a ``write_features`` file holds, from its header alone: {"shapes": [per-map shape, ...],
    "dtype": "float32" | "float16" | "bfloat16" | numpy's name, "metadata": {...}}, or None when ``path`` is no
    such file (a model's .safetensors, say)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.ndim < 3:  # features are [N, ..., D] maps; a vector or table is something else
                return None
            return {"shapes": [tuple(array.shape[1:])] * array.shape[0], "dtype": str(array.dtype), "metadata": {}}
        if path.suffix.lower() != ".safetensors":
            return None
        with safe_open(str(path), "pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            if keys == ["features"]:
                whole = f.get_slice("features")
                shape = tuple(whole.get_shape())
                return {"shapes": [shape[1:]] * shape[0], "dtype": _dtype_name(whole.get_dtype()), "metadata": metadata}
            if keys and all(re.fullmatch(r"features\.\d+", k) for k in keys):  # ragged: one tensor per map
                slices = [f.get_slice(k) for k in sorted(keys, key=lambda k: int(k.split(".")[1]))]
                return {"shapes": [tuple(s.get_shape()) for s in slices], "dtype": _dtype_name(slices[0].get_dtype()),
                        "metadata": metadata}
            return None
    except (SafetensorError, OSError, ValueError) as e:
        raise LeopartError(f"cannot read {path}: the file is corrupt or truncated ({e})") from None


def value_size(dtype: str) -> int:
    """Bytes per value of a feature file's dtype (a FEATURE_DTYPES name, or numpy's for other .npy files)."""
    return FEATURE_DTYPES[dtype][0].itemsize if dtype in FEATURE_DTYPES else np.dtype(dtype).itemsize


def _dtype_name(code: str) -> str:
    """numpy-style name of a safetensors dtype code: "F16" -> "float16", "BF16" -> "bfloat16", "I64" -> "int64"."""
    kinds = {"BF": "bfloat", "F": "float", "I": "int", "U": "uint"}
    match = re.fullmatch(r"(BF|F|I|U)(\d+)", code)
    return f"{kinds[match[1]]}{match[2]}" if match else code.lower()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LeopartError(f"cannot read weights from {path}: the file is corrupt or truncated ({e})") from None


def load_or_compute(path: str | os.PathLike | None,
                    compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors a previous run saved at ``path``, else ``compute()``, saved there. Files appear atomically,
    so one that exists is complete: a cache of many such files resumes at the first missing one."""
    if path is not None and Path(path).is_file():
        return load_tensors(path)
    tensors = compute()
    if path is not None:
        save_tensors(path, tensors)
    return tensors


CACHE_SHARD = 256  # images per cache file: an interrupted run loses at most this many images' work
# Changes when the same files would give other features: 2 = files read upright (EXIF orientation applied).
CACHE_VERSION = "2"


def cached_shards(cache_dir: str | os.PathLike | None, items, compute: Callable[[list], dict[str, torch.Tensor]],
                  modules: list[torch.nn.Module], *settings) -> Iterator[dict[str, torch.Tensor]]:
    """``compute`` over the image files ``items`` in slices of CACHE_SHARD, each kept by load_or_compute in
    a folder of ``cache_dir`` named by cache_key(modules, items, *settings), so an interrupted run resumes at
    the first missing slice; slices are computed or loaded as the caller iterates, one in memory at a time. With
    no cache_dir, one call over everything (``items`` may then be any iterable)."""
    if cache_dir is None:
        yield compute(items)
        return
    folder = Path(cache_dir) / cache_key(modules, items, *settings)
    for lo in range(0, len(items), CACHE_SHARD):
        yield load_or_compute(folder / f"shard_{lo // CACHE_SHARD:05d}.safetensors",
                              lambda: compute(items[lo:lo + CACHE_SHARD]))


def concat_rows(chunks: Iterable[dict[str, torch.Tensor]], total: int,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``torch.cat`` of each named tensor over ``chunks`` (``total`` rows in all) into tensors allocated once on
    ``device`` (default: the first chunk's), so memory peaks at the result plus one chunk rather than at every
    chunk plus the result (a ViT-B/8 evaluation at 448 px holds 14 GB of features), and GPU chunks are copied
    straight into host memory. A first chunk that already holds every row is returned (contiguous)."""
    out: dict[str, torch.Tensor] = {}
    row = 0
    for chunk in chunks:
        rows = len(next(iter(chunk.values())))
        if row + rows > total:
            raise LeopartError(f"got more than the {total} rows expected")
        if row == 0 and rows == total:
            out = {name: t.to(device or t.device).contiguous() for name, t in chunk.items()}
        else:
            if row == 0:
                out = {name: t.new_empty((total, *t.shape[1:]), device=device or t.device)
                       for name, t in chunk.items()}
            for name in chunk:
                out[name][row:row + rows] = chunk[name]
        row += rows
        del chunk  # else it would hold this chunk while the next one is made
    if row != total:
        raise LeopartError(f"got {row} rows, expected {total}")
    return out


def cache_key(modules: list[torch.nn.Module], files: list, *settings) -> str:
    """A short name for a cache folder that changes with the modules' weights (a cheap, weight-sensitive
    sample), with each input file's path, size and modification time, and with the settings."""
    if not all(isinstance(f, (str, os.PathLike)) for f in files):
        raise LeopartError("a feature cache needs image files, not images in memory")
    h = hashlib.sha256(CACHE_VERSION.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(json.dumps(settings, default=str).encode())
    for module in modules:
        for name, p in sorted(module.state_dict().items())[:8]:
            h.update(name.encode())
            h.update(p.float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_folder(folder: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], card: str) -> Path:
    if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():
        raise LeopartError(f"saving needs a folder, named by a path, not {folder!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LeopartError(f"{folder} is a file, not a folder: saving writes config.json, model.safetensors and "
                           "README.md into a folder")
    folder.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with a config.json is a complete one.
    save_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_text(folder / CARD_NAME, card)
    write_json(folder / CONFIG_NAME, config)
    return folder


def state_dict_mismatches(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                          tolerate_missing: Callable[[str], bool] = lambda key: False) -> tuple[list[str], list[str]]:
    """Whether ``state`` fits a module whose state dict is ``own``: (what does not fit, for an error message,
    empty when it fits; the keys of ``own`` that ``state`` lacks). Missing keys that ``tolerate_missing``
    accepts alone do not make it unfit."""
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if not (unexpected or wrong_shape or any(not tolerate_missing(k) for k in missing)):
        return [], missing
    problems, lacking = [], [k for k in missing if not tolerate_missing(k)]
    if wrong_shape:
        problems.append(f"shape mismatch: {', '.join(wrong_shape[:5])}")
    if lacking:
        problems.append(f"missing keys: {', '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    return problems, missing


def read_config(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LeopartError(f"cannot read {path}: {e}") from None


def load_folder(folder: str | os.PathLike, kind: str,
                source: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (config, tensors) from a folder written by save_folder, checking it holds a ``kind``. ``source``
    names the folder in errors (a Hub repo rather than its cache snapshot)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeopartError(f"{folder} is a file: expected the folder of {_kind_phrase(kind)}" if folder.exists()
                           else f"no such folder: {folder}")
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise LeopartError(f"{folder} is not a saved leopart {kind} folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = read_config(folder / CONFIG_NAME)
    check_kind(config, kind, source or str(folder))
    return config, load_tensors(folder / WEIGHTS_NAME)


def check_kind(config: dict, kind: str, source: str) -> None:
    """A saved config must hold a ``kind`` (configs from before leopart_kind was recorded pass)."""
    found = config.get("leopart_kind", kind)
    if found != kind:
        merge = (found, kind) == ("clusters", "segmenter")
        hint = f": fit one with `leopart merge {source} -o SEGMENTER`" if merge else ""
        raise LeopartError(f"{source} holds {_kind_phrase(found)}, not {_kind_phrase(kind)}{hint}")


def check_name(name, what: str, forms: str = "a folder or a Hub id") -> str | os.PathLike:
    """``name`` must be a path or Hub id, and not an empty one (Path("") would mean the current folder).
    Returns the name to load: a Hub repository's web address, as copied from the browser, becomes its id."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise LeopartError(f"{what} is named by {forms}, not {name!r}")
    return hub_id_of_url(name, what, forms)


# A Hub web address: https://huggingface.co/org/repo, .../tree/revision, hf.co for short; the scheme optional.
HUB_URL = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<path>[^?#]*)")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def hub_id_of_url(name: str | os.PathLike, what: str, forms: str) -> str | os.PathLike:
    """A Hub repository's web address -> its id "org/repo" ("org/repo@revision" for .../tree/revision); other
    names pass unchanged (an existing local path of the same spelling wins); other web addresses are refused."""
    from urllib.parse import unquote

    text = str(name).strip()
    match = HUB_URL.match(text)
    if Path(name).expanduser().exists() or not (match or URL.match(text)):
        return name
    if not match:
        raise LeopartError(f"{what} is named by {forms}, not a web address ({text}): download the file and "
                           "pass its path")
    parts = [unquote(part) for part in match["path"].strip("/").split("/") if part]
    if parts[:1] in (["datasets"], ["spaces"]):
        raise LeopartError(f"{text} is a Hub {parts[0][:-1]}, not a model repository")
    if len(parts) == 2 or (len(parts) == 4 and parts[2] == "tree"):
        repo_id = "/".join(parts[:2])
        return repo_id + (f"@{parts[3]}" if len(parts) == 4 and parts[3] != "main" else "")
    if len(parts) >= 4 and parts[2] in ("blob", "resolve", "tree"):
        revision = "" if parts[3] == "main" else f"@{parts[3]}"
        raise LeopartError(f"{text} links a file or folder inside a Hub repository: name the repository itself, "
                           f"'{parts[0]}/{parts[1]}{revision}'")
    raise LeopartError(f"{text} is not a Hub repository's address (https://huggingface.co/org/repo)")


def fetch_folder(name: str | os.PathLike, kind: str, missing: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved ``kind`` from a local folder or a Hub repo "org/repo[@revision]". From the
    Hub the config comes first, so a repo of another kind fails before its weights download. ``missing``: the
    error for a name that is neither."""
    name = check_name(name, _kind_phrase(kind))
    path = Path(name).expanduser()
    if path.exists():  # a folder, or a file given by mistake (load_folder says so)
        return load_folder(path, kind)
    if not HUB_ID.match(str(name)):
        raise LeopartError(missing)
    source = f"Hub repository '{name}'"
    check_kind(read_config(download_from_hub(str(name), [CONFIG_NAME]) / CONFIG_NAME), kind, source)
    return load_folder(download_from_hub(str(name), [WEIGHTS_NAME]), kind, source)  # the same snapshot folder


def _kind_phrase(kind: str) -> str:
    return "leopart part clusters" if kind == "clusters" else f"a leopart {kind.replace('_', ' ')}"


def download_from_hub(name: str, filenames: list[str]) -> Path:
    """Fetch ``filenames`` of Hub repo ``name`` ("org/repo[@revision]") into the HF cache; return the folder.

    Works offline (HF_HUB_OFFLINE=1 or no network) from the cache, and fails with one line otherwise.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    # huggingface_hub.utils has these from 0.23 on (huggingface_hub.errors only from 0.24).
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = name.partition("@")
    fetch = _hub_cli(f"hf download {repo_id}", f"huggingface-cli download {repo_id}") + (
        f" --revision {revision}" if revision else "")

    def not_cached(why: str) -> LeopartError:
        return LeopartError(f"'{name}' is not in the Hugging Face cache and the Hub cannot be reached ({why}): "
                            f"run once with network access, or `{fetch}`")

    folder, probed = None, False
    for filename in filenames:
        try:
            cached = isinstance(try_to_load_from_cache(repo_id, filename, revision=revision or None), str)
            if not cached and not probed and not hub_offline():
                # Without a network, recent huggingface_hub (2.4) retries five times (~30 s, a warning each)
                # before it gives up; one request tells that case apart at once.
                probed = True
                why = unreachable(constants.ENDPOINT)
                if why:
                    raise not_cached(f"{constants.ENDPOINT}: {why}")
            path = hf_hub_download(repo_id, filename, revision=revision or None)
        except LocalEntryNotFoundError:
            raise not_cached("HF_HUB_OFFLINE=1" if hub_offline() else "offline?") from None
        except GatedRepoError:
            raise LeopartError(f"'{repo_id}' is gated on the Hub: log in with `{_login_command()}`") from None
        except RepositoryNotFoundError:
            raise LeopartError(f"no Hub repository '{repo_id}' (or it is private: log in first)") from None
        except RevisionNotFoundError:
            raise LeopartError(f"Hub repository '{repo_id}' has no revision '{revision}'") from None
        except EntryNotFoundError:
            raise LeopartError(f"Hub repository '{name}' has no file {filename}") from None
        except HFValidationError as e:
            raise LeopartError(f"'{name}' is not a valid Hub repository id: {e}") from None
        folder = Path(path).parent
    return folder


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads the variable once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why ``url``'s server cannot be reached at all (no DNS, connection refused, no route), else None.

    An HTTP answer of any status means it is reachable; other failures (TLS, timeouts) are left to the
    caller's own client, which may know better (certificates, retries). Proxies from the environment apply.
    """
    import errno
    import socket
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except OSError as e:  # URLError included
        reason = getattr(e, "reason", e)
        no_route = getattr(reason, "errno", None) in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)
        if isinstance(reason, socket.gaierror) or no_route:
            return str(getattr(reason, "strerror", None) or reason)
    return None


def _hub_cli(new: str, old: str) -> str:
    """The Hub command line as the installed huggingface_hub spells it: ``hf ...`` from 0.34 on (2.4 has no
    ``huggingface-cli``), ``huggingface-cli ...`` before."""
    import huggingface_hub

    major, minor = (int(part) for part in huggingface_hub.__version__.split(".")[:2])
    return new if (major, minor) >= (0, 34) else old


def _login_command() -> str:
    return _hub_cli("hf auth login", "huggingface-cli login")


def push_folder(save: Callable[..., object], repo_id: str, *, private: bool | None = None,
                token: str | None = None, commit_message: str = "Upload with leopart") -> str:
    """Save into a temporary folder with ``save(folder, repo_id=repo_id)`` (its card then names the repository)
    and upload it as one commit; returns the commit URL.

    Fails with a one-line LeopartError when offline, not logged in, not allowed to write, or on a bad repo id.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError

    repo_id = str(hub_id_of_url(repo_id, "a repository to push to", "its id, org/repo"))  # a copied address
    if "@" in repo_id:
        raise LeopartError(f"push to a repository, org/repo, not to a revision ({repo_id})")

    def failed(why: str) -> LeopartError:
        return LeopartError(f"cannot push to the Hub repository '{repo_id}': {why}")

    if hub_offline():
        raise failed("HF_HUB_OFFLINE is set")
    why = unreachable(constants.ENDPOINT)  # else recent huggingface_hub retries for half a minute
    if why:
        raise failed(f"{constants.ENDPOINT}: {why}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp), repo_id=repo_id)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    except HFValidationError as e:
        raise LeopartError(f"'{repo_id}' is not a valid Hub repository id: {e}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise failed(f"the Hub did not accept the token (or none is set): log in with `{_login_command()}` "
                         "or pass token=") from None
        if status == 403:
            raise failed("this token may not write there (another user's or organisation's namespace, or a "
                         "read-only token)") from None
        raise failed(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except OSError as e:  # a connection dropped during the upload
        raise failed(str(e) or type(e).__name__) from None
    return getattr(info, "commit_url", str(info))
