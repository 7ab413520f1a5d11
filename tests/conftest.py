"""Test environment: no network, private caches, Triton's CPU interpreter.

The variables are set before anything imports huggingface_hub or triton, which read them at import.
"""
import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

# Processes the tests spawn (the DDP workers) import this module again: they share their parent's folder,
# which only the process that made it removes.
_OWNS_CACHE = "LEOPART_TEST_CACHE" not in os.environ
_CACHE = Path(tempfile.mkdtemp(prefix="leopart-test-cache-") if _OWNS_CACHE else os.environ["LEOPART_TEST_CACHE"])
os.environ["LEOPART_TEST_CACHE"] = str(_CACHE)
if _OWNS_CACHE:  # the private caches are per run: leave nothing in /tmp, however pytest exits (a usage error too)
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_CACHE / "hf")
os.environ["HF_HUB_CACHE"] = str(_CACHE / "hf" / "hub")
os.environ["LEOPART_CACHE"] = str(_CACHE / "leopart")
# A GPU session runs the real-compile tests with TRITON_INTERPRET=0 (see tests/test_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import leopart  # noqa: E402


def pytest_configure(config):
    """Fail at once, in one line, where Triton's interpreter cannot run the kernel tests at all."""
    try:
        import triton
    except ImportError:
        return
    triton_version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(v) for v in np.__version__.split(".")[:2])
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        # Older interpreters pass scalar kernel arguments as 1-element arrays, which numpy 2.4 no longer
        # turns into Python ints: every kernel test would fail with "only 0-dimensional arrays ...".
        raise pytest.UsageError(f"Triton {triton.__version__}'s interpreter does not run under numpy "
                                f"{np.__version__}: install numpy<2.4 or triton>=3.7 for the kernel tests")


TINY_ARCH = "test_vit"  # timm's 64-dim, 6-block test ViT: fast enough for CPU tests
# timm overrides that shrink a backbone of any ViT family (EVA-02, DINOv3, ...) to two 64-dim blocks.
SMALL_BACKBONE = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def meta_dinov2_layout(sd: dict) -> dict:
    """timm's DINOv2 weights as Meta's release files hold them: a mask token and, with registers, the class
    token's position folded out of the class token into a position row of its own (timm folds it in)."""
    sd = {**sd, "mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    if "reg_token" in sd:
        cls_position = torch.randn_like(sd["cls_token"])
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_position
        sd["pos_embed"] = torch.cat([cls_position, sd["pos_embed"]], dim=1)
    return sd


def meta_dinov3_layout(sd: dict) -> dict:
    """timm's DINOv3 weights as Meta's release files hold them: storage tokens, ls1/ls2 layer scales, one qkv
    bias (with the key part the model never uses; zeros where timm's model has none), a mask token and the
    rotary embedding's periods."""
    width = sd["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, width), "rope_embed.periods": torch.arange(8.0)}
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        if f"blocks.{i}.attn.q_bias" not in sd:  # the distilled models' biases, all zero, which timm leaves out
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * width)
    for key, value in sd.items():
        if key.endswith("attn.q_bias"):
            out[key.replace("q_bias", "qkv.bias")] = torch.cat(
                [value, torch.zeros_like(value), sd[key.replace("q_bias", "v_bias")]])
            out[key.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * value.numel())
        elif not key.endswith("attn.v_bias"):
            out[key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace(
                "reg_token", "storage_tokens")] = value
    return out


def hf_cache_dir() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def interrupt_at_call(monkeypatch, owner, name: str, n: int) -> list:
    """Replace ``owner.name`` with a wrapper that raises KeyboardInterrupt (a Ctrl-C) at its ``n``-th call and
    calls through otherwise; returns the list that grows by one per call."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def populate_hf_cache(repo_id: str, files: dict[str, bytes], revision: str = "main",
                      commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay files out as huggingface_hub's cache does after a download (snapshot + ref)."""
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    ref = repo / "refs" / revision  # a pull request's "refs/pr/1" is a nested file, as the Hub cache keeps it
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def tiny_model() -> leopart.LeopartViT:
    torch.manual_seed(0)
    return leopart.LeopartViT(leopart.LeopartConfig(arch=TINY_ARCH, img_size=64, num_prototypes=10,
                                                    proj_hidden_dim=32, proj_dim=16)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def random_image(h=40, w=56, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(random_image(seed=i)).save(folder / f"img{i}.png")
    Image.fromarray(random_image(seed=9)).save(folder / "sub" / "deep.jpg")
    return folder


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
