"""LeopartViT against timm, save/load/push, original-checkpoint conversion and Hub resolution (offline)."""
import dataclasses
import http.server
import io
import json
import re
import socket
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from click.testing import CliRunner
from conftest import (
    SMALL_BACKBONE,
    TINY_ARCH,
    meta_dinov2_layout,
    meta_dinov3_layout,
    populate_hf_cache,
    random_image,
)
from PIL import Image
from safetensors.torch import save as save_safetensors

import leopart
from leopart import hub, serialization
from leopart.cli import main
from leopart.errors import LeopartError
from leopart.model import LeopartConfig, LeopartViT


def timm_twin(model: LeopartViT, **kwargs) -> torch.nn.Module:
    """A plain timm model holding the same backbone weights."""
    ref = timm.create_model(model.config.arch, num_classes=0, img_size=model.config.img_size, **kwargs)
    ref.load_state_dict({k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    return ref.eval()


def test_patch_tokens_equal_timm(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = tiny_model.patch_tokens(x)
        ref = timm_twin(tiny_model).forward_features(x)[:, 1:].reshape(2, 4, 4, -1)
    assert ours.shape == (2, 4, 4, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_any_multiple_of_patch_size_matches_timm_dynamic(tiny_model):
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        out = tiny_model(x, attention=True)
        ref = timm_twin(tiny_model, dynamic_img_size=True).forward_features(x)[:, 1:].reshape(1, 3, 5, -1)
    torch.testing.assert_close(out.patch_tokens, ref, atol=1e-5, rtol=0)
    assert out.embeddings.shape == (1, 3, 5, 16) and out.scores.shape == (1, 3, 5, 10)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(1, 3, 5))
    assert out.scores.abs().max() <= 1 + 1e-5  # cosine similarities
    assert out.attention.shape == (1, tiny_model.num_heads, 3, 5)


def unfused_attention(attn: torch.nn.Module) -> dict:
    """Make a timm attention module compute its weights explicitly (its unfused path) and catch them (the input of
    its attention dropout) under "attn", as an independent reference for ours."""
    captured = {}
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("attn", i[0]))
    return captured


def test_attention_matches_explicit_softmax(tiny_model):
    """The CLS row of the last block's attention, recomputed independently with timm's unfused path."""
    x = torch.randn(1, 3, 64, 64)
    ref = timm_twin(tiny_model)
    captured = unfused_attention(ref.blocks[-1].attn)
    with torch.no_grad():
        ref.forward_features(x)
        ours = tiny_model.last_attention(x)
    expected = captured["attn"][:, :, 0, 1:].reshape(1, -1, 4, 4)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    # Bit for bit the formula of the code before 2026-11-29 (its own qkv layout), so plain ViTs score as they did.
    attn, seen = tiny_model.backbone.blocks[-1].attn, []
    hook = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        ours = tiny_model.last_attention(x)
    hook.remove()
    B, T, _ = seen[0].shape
    qkv = attn.qkv(seen[0]).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])
    before = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
    assert torch.equal(ours, before[:, :, 1:].reshape(1, -1, 4, 4))


# timm ViT families besides the plain ViT, shrunk: what each brings that the plain ViT has not.
FAMILIES = [
    ("eva02_tiny_patch14_224", SMALL_BACKBONE),           # EVA-02: rotary positions, q and v biases kept apart, SwiGLU
    ("eva02_enormous_patch14_clip_224", SMALL_BACKBONE),  # post-norm EVA blocks
    ("eva02_base_patch16_clip_224", SMALL_BACKBONE),      # separate q / k / v projections
    ("vit_small_patch16_dinov3", SMALL_BACKBONE),         # DINOv3: class + 4 register tokens, rotary positions
    ("vit_base_patch16_rope_mixed_224", SMALL_BACKBONE),  # RoPE ViT: a rotary embedding per block (AttentionRope)
    ("vit_pe_core_tiny_patch16_384", SMALL_BACKBONE),     # Perception Encoder
    ("vit_small_patch14_reg4_dinov2", SMALL_BACKBONE),    # DINOv2 with registers
    ("deit_tiny_distilled_patch16_224", SMALL_BACKBONE),  # class + distillation tokens
    ("vit_tiny_r_s16_p8_224", {"depth": 2}),     # hybrid: a CNN stem makes the tokens, 32 px each
]


@pytest.mark.parametrize(("arch", "overrides"), FAMILIES, ids=[a for a, _ in FAMILIES])
def test_timm_vit_families_match_timm(arch, overrides):
    """Patch tokens equal timm's forward_features at a non-square size, and the CLS attention equals the weights
    timm's own unfused attention computes, for every family (they failed with a TypeError before 2026-11-29)."""
    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    try:
        timm.create_model(arch, num_classes=0, dynamic_img_size=True, **overrides)
    except TypeError as e:  # timm 1.0.20: EvaBlockPostNorm refuses an argument its own factory passes
        pytest.skip(f"timm {timm.__version__} cannot build {arch} itself: {e}")
    torch.manual_seed(0)
    model = LeopartViT(LeopartConfig(arch=arch, num_prototypes=10, proj_hidden_dim=32, proj_dim=16,
                                     backbone_kwargs=overrides)).eval()
    ref = timm_twin(model, dynamic_img_size=True, **overrides)
    captured = unfused_attention(ref.blocks[-1].attn)
    p, n = model.patch_size, model.num_prefix_tokens
    x = torch.randn(2, 3, 3 * p, 5 * p)
    with torch.no_grad():
        out = model(x, attention=True)
        tokens = ref.forward_features(x)
    assert out.patch_tokens.shape[:3] == (2, 3, 5)
    torch.testing.assert_close(out.patch_tokens, tokens[:, n:].reshape(2, 3, 5, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.attention, captured["attn"][:, :, 0, n:].reshape(2, -1, 3, 5), atol=1e-6, rtol=1e-5)


# Attention modules with the options their forward handles: fused or separate projections, q/k norms, the two
# rotary layouts, fewer key heads than query heads.
ATTENTION_OPTIONS = [
    ("EvaAttention", {}), ("EvaAttention", {"qkv_fused": False}), ("EvaAttention", {"qkv_bias": False}),
    ("EvaAttention", {"qk_norm": True}), ("AttentionRope", {}), ("AttentionRope", {"qkv_fused": False}),
    ("AttentionRope", {"qk_norm": True}),
    ("AttentionRope", {"rotate_half": True}), ("AttentionRope", {"qkv_fused": False, "num_kv_heads": 2}),
]


@pytest.mark.parametrize(("kind", "options"), ATTENTION_OPTIONS, ids=[f"{k}-{o}" for k, o in ATTENTION_OPTIONS])
def test_cls_attention_follows_each_module_option(kind, options):
    from timm.models import eva

    from leopart.model import cls_attention

    try:
        from timm.layers.attention import AttentionRope
    except ImportError:  # timm < 1.0.16
        AttentionRope = None
    cls = {"EvaAttention": eva.EvaAttention, "AttentionRope": AttentionRope}[kind]
    if cls is None:
        pytest.skip(f"timm {timm.__version__} has no {kind}")
    try:
        module = cls(64, num_heads=4, num_prefix_tokens=2, norm_layer=torch.nn.LayerNorm, **options).eval()
    except (TypeError, AttributeError) as e:  # an option it lacks; or timm 1.0.16-1.0.20's EVA q/k norm bug
        pytest.skip(f"timm {timm.__version__}'s {kind} cannot take {options}: {e}")
    torch.manual_seed(0)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)
    captured = unfused_attention(module)
    x, rope = torch.randn(3, 2 + 12, 64), torch.randn(12, 2 * 16)  # rotary (sin, cos) for the 12 non-prefix tokens
    with torch.no_grad():
        module(x, rope=rope)
        ours = cls_attention(module, x, rope)
    torch.testing.assert_close(ours, captured["attn"][:, :, 0], atol=1e-6, rtol=1e-5)


def test_models_without_a_readable_cls_attention(image_dir, tmp_path, tiny_model_dir):
    """A model with no class token (or a last block leopart cannot read) embeds, but asking for its attention is one
    line that says where else to get the foreground cue; training with the foreground loss stops before any step."""
    gap = LeopartViT(LeopartConfig(arch="vit_medium_patch16_gap_256", num_prototypes=10, proj_hidden_dim=32,
                                   proj_dim=16, backbone_kwargs=SMALL_BACKBONE)).eval()
    x = torch.randn(1, 3, 32, 48)
    assert gap(x).patch_tokens.shape == (1, 2, 3, 64)
    with pytest.raises(LeopartError, match="has no class token.*--fg-model dino-vits16.*--loss-mask all"):
        gap(x, attention=True)
    parallel = LeopartViT(LeopartConfig(arch="vit_small_patch16_18x2_224", num_prototypes=10, proj_hidden_dim=32,
                                        proj_dim=16, backbone_kwargs=SMALL_BACKBONE)).eval()
    assert parallel(x).patch_tokens.shape == (1, 2, 3, 64) and parallel.num_heads is None
    with pytest.raises(LeopartError, match=r"attention leopart cannot read \(ParallelThingsBlock\)"):
        parallel(x, attention=True)
    # CLI: clustering with its own attention fails in one line; with another model's attention it works
    folder = gap.save_pretrained(tmp_path / "gap")
    runner = CliRunner()
    r = runner.invoke(main, ["cluster", str(image_dir), "--model", str(folder), "--k", "2", "--resolution", "32",
                             "-o", str(tmp_path / "parts")])
    assert r.exit_code != 0 and "has no class token" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "parts").exists()
    r = runner.invoke(main, ["cluster", str(image_dir), "--model", str(folder), "--k", "2", "--resolution", "32",
                             "--fg-model", str(tiny_model_dir), "-o", str(tmp_path / "parts")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["info", str(folder)])
    assert r.exit_code == 0 and re.search(r"depth / heads +2 / 2\n", r.output), r.output
    assert re.search(r"CLS attention +none: the backbone has no class token\n", r.output)
    with pytest.raises(LeopartError, match="has no class token"):
        leopart.train(str(image_dir), output=tmp_path / "run", init=str(folder), steps=1, batch_size=2,
                      global_size=32, local_size=16, workers=0)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_input_shapes(tiny_model):
    with pytest.raises(LeopartError, match="multiple of the patch size"):
        tiny_model(torch.randn(1, 3, 50, 64))
    with pytest.raises(LeopartError, match="expected images"):
        tiny_model(torch.randn(3, 64, 64))


def test_unknown_arch():
    with pytest.raises(LeopartError, match="unknown timm model 'vit_does_not_exist'"):
        LeopartViT(LeopartConfig(arch="vit_does_not_exist"))
    for arch in ("resnet18", "convnext_tiny"):
        with pytest.raises(LeopartError, match=f"'{arch}' is not a Vision Transformer"):
            LeopartViT(LeopartConfig(arch=arch))
    with pytest.raises(LeopartError, match="cannot build backbone .*divisible by num_heads"):
        LeopartViT(LeopartConfig(arch="vit_tiny_patch16_224", backbone_kwargs={"embed_dim": 100}))


def test_save_load_round_trip(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"] == TINY_ARCH and config["num_prototypes"] == 10
    assert "library_name: leopart" in (folder / "README.md").read_text()
    loaded = leopart.from_pretrained(folder)
    assert not loaded.training
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).scores, tiny_model(x).scores, atol=0, rtol=0)
    assert not list(folder.glob(".*.tmp")), "temporary files left behind"
    # A file where the folder belongs, or no path at all: one line (were FileExistsError and TypeError).
    (tmp_path / "taken.png").write_bytes(b"x")
    with pytest.raises(LeopartError, match="taken.png is a file, not a folder: saving writes config.json"):
        tiny_model.save_pretrained(tmp_path / "taken.png")
    with pytest.raises(LeopartError, match="^saving needs a folder, named by a path, not 3$"):
        tiny_model.save_pretrained(3)
    # The model takes normalised floats; pixels belong to leopart.embed (was a conv RuntimeError).
    with pytest.raises(LeopartError, match="^expected normalised float images, got torch.uint8: pass pixels to "
                                           "leopart.embed"):
        tiny_model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_push_to_hub_uploads_a_saved_folder(tiny_model, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    hub_answers(monkeypatch)
    url = tiny_model.push_to_hub("me/tiny", private=True, token="t")
    assert url == "https://hub/me/tiny/commit/1"
    assert calls["create"] == ("me/tiny", True, True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert calls["config"]["arch"] == TINY_ARCH
    # The card on the Hub page loads this repository, in the metadata the Hub lists models by.
    assert 'leopart.from_pretrained("me/tiny")' in calls["card"]
    assert "library_name: leopart" in calls["card"] and "pipeline_tag: image-feature-extraction" in calls["card"]
    # The repository's address as the browser shows it names the same repository.
    assert tiny_model.push_to_hub("https://huggingface.co/me/tiny") == "https://hub/me/tiny/commit/1"
    assert calls["create"][0] == "me/tiny" and 'leopart.from_pretrained("me/tiny")' in calls["card"]
    with pytest.raises(LeopartError, match=r"^push to a repository, org/repo, not to a revision \(me/tiny@v2\)$"):
        tiny_model.push_to_hub("https://huggingface.co/me/tiny/tree/v2")

    # A segmenter that names its model by a local path says others cannot load it; a Hub id is fine.
    seg = leopart.Segmenter(torch.randn(3, 8), torch.tensor([0, 1, 1]), torch.tensor([False, True, True]),
                            params={"model": "/home/me/runs/x/model"})
    with pytest.warns(UserWarning, match="local path .* push the model too"):
        seg.push_to_hub("me/seg")
    assert calls["create"][0] == "me/seg" and calls["config"]["params"]["model"] == "/home/me/runs/x/model"
    assert 'segmenter="me/seg"' in calls["card"] and "pipeline_tag: image-segmentation" in calls["card"]
    seg.params["model"] = "me/tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seg.push_to_hub("me/seg")


def hub_answers(monkeypatch):
    """As if the Hub answered (the tests run with HF_HUB_OFFLINE=1 and no network)."""
    monkeypatch.setattr(serialization, "hub_offline", lambda: False)
    monkeypatch.setattr(serialization, "unreachable", lambda url: None)


def test_push_to_hub_failures_are_one_line_errors(tiny_model, monkeypatch, online):
    """Offline, no network, no or a rejected token, no write access, a bad id: a LeopartError that says so."""
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError

    with monkeypatch.context() as offline:
        offline.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(LeopartError, match=r"^cannot push to the Hub repository 'me/tiny': HF_HUB_OFFLINE is set$"):
            tiny_model.push_to_hub("me/tiny")
    url = closed_port_url()
    online(url)
    with pytest.raises(LeopartError, match=rf"^cannot push to the Hub repository 'me/tiny': {url}: .*refused$"):
        tiny_model.push_to_hub("me/tiny")

    def http_error(status):
        error = HfHubHTTPError.__new__(HfHubHTTPError)  # its constructor's response type differs by version
        Exception.__init__(error, f"{status} Client Error for url: https://huggingface.co/api/repos/create")
        error.response = type("Response", (), {"status_code": status})()
        return error

    raised = []

    class RefusingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            raise raised[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", RefusingApi)
    hub_answers(monkeypatch)
    for error, match in ((http_error(401), r"did not accept the token \(or none is set\): log in with `.*login`"),
                         (http_error(403), "may not write there"),
                         (http_error(500), r"'me/tiny': 500 Client Error for url: \S+$"),
                         (ConnectionResetError(104, "Connection reset by peer"), r"'me/tiny': .*Connection reset")):
        raised.append(error)
        with pytest.raises(LeopartError, match=match):
            tiny_model.push_to_hub("me/tiny")
    monkeypatch.undo()  # the real HfApi checks the id before it sends anything
    hub_answers(monkeypatch)
    with pytest.raises(LeopartError, match="'not a/valid/id' is not a valid Hub repository id"):
        tiny_model.push_to_hub("not a/valid/id")


# ---------------------------------------------------------------- conversion
def original_state_dict(seed=0, arch="vit_tiny_patch16_224", prototypes=30):
    """What the original release looks like: a 'model.'-prefixed student, heads, and a teacher copy."""
    torch.manual_seed(seed)
    vit = timm.create_model(arch, num_classes=0)
    sd = {f"model.{k}": v.clone() for k, v in vit.state_dict().items()}
    dims = [(vit.embed_dim, 64), (64, 64), (64, 32)]
    for i, (a, b) in zip((0, 2, 4), dims):
        sd[f"model.projection_head.{i}.weight"] = torch.randn(b, a)
        sd[f"model.projection_head.{i}.bias"] = torch.randn(b)
    sd["model.prototypes.weight"] = F.normalize(torch.randn(prototypes, 32), dim=1)
    sd["teacher.blocks.0.attn.qkv.weight"] = torch.randn(3 * vit.embed_dim, vit.embed_dim)
    return sd, vit


def check_converted(model: LeopartViT, sd: dict, vit: torch.nn.Module):
    assert model.config.arch == "vit_tiny_patch16_224"
    assert (model.config.num_prototypes, model.config.proj_dim, model.config.proj_hidden_dim) == (30, 32, 64)
    assert torch.equal(model.prototypes.weight, sd["model.prototypes.weight"])
    assert torch.equal(model.projection_head[2].weight, sd["model.projection_head.2.weight"])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_tokens(x).reshape(1, 196, -1),
                                   vit.eval().forward_features(x)[:, 1:], atol=1e-5, rtol=0)


def test_convert_original_checkpoint(tmp_path):
    sd, vit = original_state_dict()
    path = tmp_path / "leopart_vitt16.ckpt"
    torch.save(sd, path)
    with pytest.warns(UserWarning, match="teacher.blocks.0.attn.qkv.weight"):
        model = leopart.from_pretrained(path)
    check_converted(model, sd, vit)


def test_convert_lightning_and_safetensors(tmp_path):
    sd, vit = original_state_dict(seed=1)
    lightning = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 1e-4}}, lightning)
    with pytest.warns(UserWarning):
        check_converted(hub.convert_checkpoint(lightning), sd, vit)
    st = tmp_path / "weights.safetensors"
    st.write_bytes(save_safetensors({k: v.contiguous() for k, v in sd.items()}))
    with pytest.warns(UserWarning):
        check_converted(leopart.from_pretrained(st), sd, vit)


def test_convert_cli_then_info(tmp_path):
    sd, vit = original_state_dict(seed=2)
    torch.save(sd, tmp_path / "orig.pth")
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(tmp_path / "orig.pth"), str(tmp_path / "conv")])
    assert r.exit_code == 0, r.output
    check_converted(leopart.from_pretrained(tmp_path / "conv"), sd, vit)
    r = runner.invoke(main, ["info", str(tmp_path / "conv")])
    assert r.exit_code == 0 and "vit_tiny_patch16_224" in r.output and "prototypes" in r.output


def test_wrong_architecture_names_the_keys(tmp_path):
    sd, _ = original_state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    with pytest.raises(LeopartError, match=r"shape mismatch: backbone\.cls_token"), pytest.warns(UserWarning):
        hub.convert_checkpoint(path, arch="vit_small_patch16_224")
    del sd["model.blocks.3.mlp.fc1.weight"]
    torch.save(sd, path)
    with pytest.raises(LeopartError, match=r"missing keys: backbone\.blocks\.3\.mlp\.fc1\.weight"), \
            pytest.warns(UserWarning):
        hub.convert_checkpoint(path)


# b"junk\n" made torch's weights-only unpickler raise a bare KeyError; "jpeg" is an image renamed .ckpt.
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"junk\n", "jpeg", "truncated"])
def test_corrupt_checkpoints(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        buf = io.BytesIO()
        torch.save(original_state_dict()[0], buf)
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    elif content == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(random_image()).save(buf, format="JPEG")
        content = buf.getvalue()
    path.write_bytes(content)
    with pytest.raises(LeopartError, match="corrupt or truncated"):
        leopart.from_pretrained(path)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(content or b"x")
    with pytest.raises(LeopartError, match="corrupt or truncated"):
        leopart.from_pretrained(bad_st)


def test_not_a_vit_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(LeopartError, match="no ViT weights"):
        leopart.from_pretrained(path)


def test_pickled_objects_need_trust(tmp_path):
    sd, vit = original_state_dict()
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": argparse_namespace()}, path)
    with pytest.raises(LeopartError, match="trust_pickle=True"):
        leopart.from_pretrained(path)
    with pytest.warns(UserWarning):
        check_converted(leopart.from_pretrained(path, trust_pickle=True), sd, vit)


def test_a_dino_training_checkpoint_gives_its_teacher(tmp_path):
    """DINO's own checkpoint.pth (student under DDP's 'module.', teacher, DINO heads, optimizer, epoch, args): the
    teacher's backbone loads, as DINO's evaluations and released weights take it; it was "not a state_dict of
    tensors". Its argparse args need trust_pickle, and the one-line refusal says how from the CLI."""
    torch.manual_seed(8)
    student, teacher = (timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True).eval()
                        for _ in range(2))
    head = {"head.mlp.0.weight": torch.randn(32, 192), "head.last_layer.weight_g": torch.ones(100, 1)}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in {**prefixed(student, "backbone."), **head}.items()},
                "teacher": {**prefixed(teacher, "backbone."), **head}, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 100, "args": argparse_namespace(), "dino_loss": {"center": torch.zeros(1, 100)}}, path)
    refusal = r"checkpoint.pth holds pickled Python objects besides tensors; .*\(CLI: `leopart convert .*OUT --trust"
    with pytest.raises(LeopartError, match=refusal + r"-pickle`, then use OUT\)$"):
        leopart.from_pretrained(path)
    with pytest.warns(UserWarning) as caught:
        model = leopart.from_pretrained(path, trust_pickle=True)
    assert re.match(r"ignored keys in .*: head.mlp.0.weight, head.last_layer.weight_g$", str(caught[0].message))
    assert "has no projection_head, prototypes weights" in str(caught[1].message)
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        expected = teacher.forward_features(x)[:, 1:].reshape(1, 3, 2, -1)
        torch.testing.assert_close(model.patch_tokens(x), expected, atol=1e-5, rtol=0)


def prefixed(module: torch.nn.Module, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)


# ----------------------------------------------------------------- resolution
def test_hub_repo_from_cache_offline(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
    populate_hf_cache("someone/tiny-leopart", files)
    populate_hf_cache("someone/tiny-leopart", files, revision="v1",
                      commit="fedcba9876543210fedcba9876543210fedcba98")
    for name in ("someone/tiny-leopart", "someone/tiny-leopart@v1"):
        loaded = leopart.from_pretrained(name)
        assert torch.equal(loaded.prototypes.weight, tiny_model.prototypes.weight)
        assert loaded.name_or_path == name


def test_hub_web_addresses_name_their_repository(tiny_model, tmp_path):
    """A repository's address copied from the browser loads as its id (and is recorded as the id); addresses
    of files, datasets and other sites are refused with what to pass instead."""
    folder = tiny_model.save_pretrained(tmp_path / "m")
    files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
    populate_hf_cache("someone/tiny-leopart", files)
    populate_hf_cache("someone/tiny-leopart", files, revision="refs/pr/1",
                      commit="0123456789abcdef0123456789abcdef01234567")
    for url, name in [("https://huggingface.co/someone/tiny-leopart", "someone/tiny-leopart"),
                      ("huggingface.co/someone/tiny-leopart/", "someone/tiny-leopart"),
                      ("https://hf.co/someone/tiny-leopart/tree/main", "someone/tiny-leopart"),
                      ("https://huggingface.co/someone/tiny-leopart/tree/refs%2Fpr%2F1", "someone/tiny-leopart@refs/pr/1"),
                      ("https://huggingface.co/someone/tiny-leopart?library=leopart", "someone/tiny-leopart")]:
        loaded = leopart.from_pretrained(url)
        assert torch.equal(loaded.prototypes.weight, tiny_model.prototypes.weight)
        assert loaded.name_or_path == name and hub.recorded_name(url) == name
    refusals = [
        ("https://huggingface.co/someone/tiny-leopart/blob/main/model.safetensors",
         "links a file or folder inside a Hub repository: name the repository itself, 'someone/tiny-leopart'$"),
        ("https://huggingface.co/someone/tiny-leopart/resolve/v2/config.json", "itself, 'someone/tiny-leopart@v2'$"),
        ("https://huggingface.co/datasets/someone/images", "is a Hub dataset, not a model repository$"),
        ("https://huggingface.co/spaces/someone/demo", "is a Hub space, not a model repository$"),
        ("https://huggingface.co/gpt2", r"is not a Hub repository's address \(https://huggingface.co/org/repo\)$"),
        ("https://example.com/leopart_vits16.ckpt",
         ("^a model is named by an alias, a Hub id, a folder or a checkpoint file, not a web address "
          r"\(https://example.com/leopart_vits16.ckpt\): download the file and pass its path$")),
    ]
    for url, match in refusals:
        with pytest.raises(LeopartError, match=match):
            leopart.from_pretrained(url)
    # Segmenters and probe heads take the same addresses; `leopart info` too.
    with pytest.raises(LeopartError, match="^'nobody/seg' is not in the Hugging Face cache"):
        leopart.Segmenter.from_pretrained("https://huggingface.co/nobody/seg")
    with pytest.raises(LeopartError, match="^'nobody/head@v1' is not in the Hugging Face cache.*--revision v1`$"):
        leopart.ProbeHead.from_pretrained("https://huggingface.co/nobody/head/tree/v1")
    r = CliRunner().invoke(main, ["info", "https://huggingface.co/someone/tiny-leopart"])
    assert r.exit_code == 0 and "someone/tiny-leopart" in r.output, r.output


def test_name_or_path_records_what_to_load_again(tiny_model, tmp_path, monkeypatch):
    """Outputs made with a model (segmenters, probe heads) record it: local paths absolute, aliases as aliases
    even beside a folder of the same name (the alias wins when loading too)."""
    tiny_model.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert leopart.from_pretrained("m").name_or_path == str(tmp_path / "m")
    assert tiny_model.name_or_path is None  # built in code
    assert leopart.from_pretrained(tiny_model) is tiny_model and tiny_model.name_or_path is None
    (tmp_path / "vits16").mkdir()
    assert hub.recorded_name("vits16") == "vits16" and hub.recorded_name("m") == str(tmp_path / "m")


def test_timm_repo_and_dino_alias(monkeypatch):
    """A timm-format Hub repo gives the backbone; heads start from a seeded init, identical each time."""
    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    config = json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 0}).encode()
    weights = save_safetensors({k: v.contiguous() for k, v in vit.state_dict().items()})
    populate_hf_cache("timm/vit_tiny_patch16_224.fake_dino", {"config.json": config, "model.safetensors": weights})
    monkeypatch.setitem(hub.DINO, "dino-vitt16", "timm/vit_tiny_patch16_224.fake_dino")
    a = leopart.from_pretrained("dino-vitt16")
    b = leopart.from_pretrained("timm/vit_tiny_patch16_224.fake_dino")
    assert torch.equal(a.backbone.pos_embed, vit.pos_embed)
    assert torch.equal(a.prototypes.weight, b.prototypes.weight)
    # A repo in neither format fails by its config.json alone (no weights are cached: none would download).
    populate_hf_cache("someone/not-a-vit", {"config.json": json.dumps({"model_type": "bert"}).encode()})
    with pytest.raises(LeopartError, match="^Hub repository 'someone/not-a-vit' holds neither a leopart model nor "
                                           "timm weights but a transformers 'bert' model$"):
        leopart.from_pretrained("someone/not-a-vit")
    # transformers' DINOv2 (the most downloaded copy): the refusal names timm's copies of the same weights
    dinov2 = {"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "patch_size": 14}
    populate_hf_cache("facebook/dinov2-small", {"config.json": json.dumps(dinov2).encode()})
    with pytest.raises(LeopartError, match=r"holds neither a leopart model nor timm weights but a transformers "
                                           r"'dinov2' model: timm's copies load, e.g. timm/vit_small_patch14_dinov2\."):
        leopart.from_pretrained("facebook/dinov2-small")


@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224", "vit_base_patch16_siglip_224"])
def test_timm_repo_with_model_args_and_input_statistics(arch, tmp_path):
    """A timm repo written by timm's own save_for_hf loads as that model: with the arguments beyond the name's
    defaults (its config.json's "model_args"; the backbone was built from the name alone before, and the weights
    did not fit), and fed as it was trained (pretrained_cfg's mean / std: ImageNet's for DINOv3, CLIP's for EVA-02,
    0.5 for SigLIP; leopart normalised every input with ImageNet's before). embed() of an image gives timm's tokens
    for that image normalised timm's way; the statistics survive save_pretrained."""
    from timm.models import _hub as timm_hub

    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    torch.manual_seed(4)
    vit = timm.create_model(arch, num_classes=0, dynamic_img_size=True, **SMALL_BACKBONE).eval()
    timm_hub.save_for_hf(vit, str(tmp_path / "timm"), model_args=SMALL_BACKBONE, safe_serialization=True)
    files = {name: (tmp_path / "timm" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    assert json.loads(files["config.json"])["model_args"]["embed_dim"] == 64
    populate_hf_cache(f"someone/{arch}-small", files)
    model = leopart.from_pretrained(f"someone/{arch}-small")
    mean, std = vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]
    imagenet = tuple(mean) == (0.485, 0.456, 0.406)
    assert (model.config.mean, model.config.std) == ((None, None) if imagenet else (tuple(mean), tuple(std)))
    side = (4 * model.patch_size, 2 * model.patch_size)
    image = Image.fromarray(random_image(*side, seed=5))
    raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        expected = vit.forward_features(TF.normalize(raw, mean, std))[:, model.num_prefix_tokens:].reshape(1, 4, 2, -1)
    for loaded in (model, leopart.from_pretrained(model.save_pretrained(tmp_path / "ours"))):
        torch.testing.assert_close(leopart.embed(image, model=loaded, resolution=None)[0][None], expected,
                                   atol=1e-4, rtol=0)
    if model.attention_problem() is None:  # SigLIP has no class token
        with torch.no_grad():
            assert model(TF.normalize(raw, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                         attention=True).attention.shape == (1, 2, 4, 2)


def test_timm_repo_holding_the_original_layout_loads_as_timm_loads_it():
    """timm runs its family converter on every download, so a timm repo may hold weights in the original release
    layout (here DINOv2 with registers, as Meta stores them): they load to timm's model (they failed on their keys)."""
    arch = "vit_small_patch14_reg4_dinov2"
    torch.manual_seed(9)
    vit = timm.create_model(arch, num_classes=0, dynamic_img_size=True, **SMALL_BACKBONE).eval()
    weights = {k: v.contiguous() for k, v in meta_dinov2_layout(vit.state_dict()).items()}
    config = {"architecture": arch, "num_classes": 0, "model_args": SMALL_BACKBONE}
    populate_hf_cache("someone/dinov2-original", {"config.json": json.dumps(config).encode(),
                                                  "model.safetensors": save_safetensors(weights)})
    model = leopart.from_pretrained("someone/dinov2-original")
    x = torch.randn(1, 3, 42, 28)
    with torch.no_grad():
        expected = vit.forward_features(x)[:, model.num_prefix_tokens:].reshape(1, 3, 2, -1)
        torch.testing.assert_close(model.patch_tokens(x), expected, atol=1e-5, rtol=1e-5)


# name, the timm model, what its original release file holds, whether the ViT can be read off the weights
RELEASE_FILES = [
    ("dinov2", "vit_small_patch14_dinov2", meta_dinov2_layout, True),
    ("dinov2-registers", "vit_small_patch14_reg4_dinov2", meta_dinov2_layout, True),
    ("dinov3-timm-layout", "vit_tiny_patch16_dinov3_qkvb", lambda sd: sd, False),  # no pos_embed: rotary positions
    ("dinov3", "vit_tiny_patch16_dinov3_qkvb", meta_dinov3_layout, False),
    ("dinov3-no-bias", "vit_small_patch16_dinov3", meta_dinov3_layout, False),
    ("eva02-separate-qkv", "eva02_base_patch14_224", lambda sd: sd, False),
]


@pytest.mark.parametrize(("name", "arch", "layout", "guessed"), RELEASE_FILES, ids=[r[0] for r in RELEASE_FILES])
def test_release_files_of_other_vits_load_as_timm_loads_them(name, arch, layout, guessed, tmp_path, capsys):
    """Meta's DINOv2 / DINOv3 release files, a timm state dict of a rotary-position ViT (DINOv3) and EVA-02's
    separate q/k/v projections, from a local file: tokens equal timm's model. They failed before 2026-11-29: DINOv2
    as "unknown timm model 'vit_small_patch14_224'" (a plain-ViT guess) and "unexpected keys: backbone.mask_token"
    with its arch, DINOv3 on its release keys, EVA-02 as "no ViT weights", the rotary timm state dict as "not a ViT
    checkpoint" whatever arch was given (before 2026-11-29 (third)). The weights pass through timm's own checkpoint
    converter for the family (its prints kept off stdout); DINOv2 is read off the weights (patch 14 with layer
    scale), the others ask for arch= in one line."""
    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    torch.manual_seed(7)
    vit = timm.create_model(arch, num_classes=0, dynamic_img_size=True).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(layout(vit.state_dict()), path)
    if not guessed:
        with pytest.raises(LeopartError, match=f"cannot tell the ViT of .*{name}.pth from its weights .*--arch"):
            leopart.from_pretrained(path)
    with pytest.warns(UserWarning, match="no projection_head, prototypes weights"):
        model = leopart.from_pretrained(path, arch=None if guessed else arch)
    assert model.config.arch == arch and capsys.readouterr().out == ""  # timm's converter prints what it skips
    p = model.patch_size
    x = torch.randn(1, 3, 4 * p, 3 * p)
    with torch.no_grad():
        expected = vit.forward_features(x)[:, model.num_prefix_tokens:].reshape(1, 4, 3, -1)
        torch.testing.assert_close(model.patch_tokens(x), expected, atol=1e-5, rtol=1e-5)


def test_another_patch_size_is_a_wrong_arch_not_a_resampling(tmp_path):
    """timm's converter resamples a patch embedding to another patch size when its users ask for one; a file loaded
    with the wrong arch must say so instead of loading as a different model."""
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp_path / "p16.pth")
    with pytest.raises(LeopartError, match=r"do not fit vit_small_patch8_224: shape mismatch: .*patch_embed\.proj"):
        leopart.from_pretrained(tmp_path / "p16.pth", arch="vit_small_patch8_224")


def test_a_guessed_vit_that_does_not_fit_asks_for_arch(tmp_path):
    """A ViT-S/16 with layer scale is not the plain ViT its shapes suggest: the error names the keys that do not
    fit (not the heads, which a backbone file never has) and says the arch was guessed."""
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, init_values=1e-5)
    torch.save(vit.state_dict(), tmp_path / "layer_scale.pth")
    with pytest.raises(LeopartError) as e:
        leopart.from_pretrained(tmp_path / "layer_scale.pth")
    message = str(e.value)
    assert "unexpected keys: backbone.blocks.0.ls1.gamma" in message and "projection_head" not in message
    assert "vit_small_patch16_224 was guessed from the weights' shapes: pass arch= with the timm model name (CLI: " \
           "--arch of `leopart convert` or `leopart train`)" in message
    assert "\n" not in message


def test_input_statistics_name_the_feature_cache(tiny_model, image_dir, tmp_path):
    """Same weights, other input statistics: other features, so another cache folder (the statistics are config,
    not weights, which the cache key samples); ImageNet's own statistics are spelled None; bad ones are refused."""
    other = LeopartViT(dataclasses.replace(tiny_model.config, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])).eval()
    other.load_state_dict(tiny_model.state_dict())
    assert other.backbone_id != tiny_model.backbone_id == tiny_model.config.arch
    cache = tmp_path / "cache"
    a = leopart.embed(image_dir, model=tiny_model, resolution=32, cache_dir=cache)
    b = leopart.embed(image_dir, model=other, resolution=32, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and not torch.allclose(a, b)
    assert LeopartConfig(mean=[0.485, 0.456, 0.406], std=(0.229, 0.224, 0.225)).mean is None
    with pytest.raises(LeopartError, match="mean must be three"):
        LeopartConfig(mean=(0.5, 0.5))
    with pytest.raises(LeopartError, match="std must be three"):
        LeopartConfig(std=(0.5, 0.0, 0.5))


def test_offline_not_cached_is_one_line():
    with pytest.raises(LeopartError, match="'nobody/nothing' is not in the Hugging Face cache") as e:
        leopart.from_pretrained("nobody/nothing")
    assert "\n" not in str(e.value)
    with pytest.raises(LeopartError, match="model 'vits16' is not cached") as e:
        leopart.from_pretrained("vits16")
    assert "leopart convert leopart_vits16.ckpt" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture()
def online(monkeypatch):
    """Downloads allowed (the tests run with HF_HUB_OFFLINE=1); returns a setter for the Hub endpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return lambda url: monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", url)


@pytest.fixture()
def hub_download_calls(monkeypatch):
    """Replaces hf_hub_download: records each call, then answers as huggingface_hub does without a network."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def fake(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise LocalEntryNotFoundError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    return calls


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed: connection refused


def test_unreachable_hub_fails_at_once(online, hub_download_calls):
    """No network and nothing cached: one line naming the cause, before huggingface_hub's retries (~30 s)."""
    url = closed_port_url()
    online(url)
    with pytest.raises(LeopartError, match=rf"cannot be reached \({re.escape(url)}: Connection refused\)") as e:
        leopart.from_pretrained("nobody/nothing")
    assert "\n" not in str(e.value)
    assert hub_download_calls == []


def test_reachable_hub_downloads(online, hub_download_calls):
    """Any HTTP answer (here 501 to a HEAD) means the Hub is there: the download goes ahead."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(LeopartError, match=r"cannot be reached \(offline\?\)"):
            leopart.from_pretrained("nobody/nothing")
    finally:
        server.shutdown()
        server.server_close()
    assert hub_download_calls == [("nobody/nothing", "config.json")]


def test_hub_refusals_are_one_line_errors(monkeypatch):
    """What the Hub answers for a gated, missing or private repo, a missing revision or file: one line each
    (huggingface_hub's own messages run over several lines and name its request ids)."""
    # Where leopart imports them from (0.23 on).
    from huggingface_hub import utils as hub_errors

    try:  # what recent huggingface_hub raises for a file the repo lacks (a kind of EntryNotFoundError)
        from huggingface_hub.errors import RemoteEntryNotFoundError as missing_file
    except ImportError:
        missing_file = hub_errors.EntryNotFoundError

    hub_answers(monkeypatch)
    refusals = [(hub_errors.GatedRepoError, "org/gated", (r"^'org/gated' is gated on the Hub: log in with `(hf auth|"
                                                          r"huggingface-cli) login`$")),
                (hub_errors.RepositoryNotFoundError, "org/none", (r"^no Hub repository 'org/none' \(or it is private: "
                                                                  r"log in first\)$")),
                (hub_errors.RevisionNotFoundError, "org/repo@v9", r"^Hub repository 'org/repo' has no revision 'v9'$"),
                (missing_file, "org/repo", r"^Hub repository 'org/repo' has no file config.json$")]
    for error_type, name, match in refusals:
        def refuse(repo_id, filename, error_type=error_type, **kwargs):
            error = error_type.__new__(error_type)  # their constructors' arguments differ by version
            Exception.__init__(error, f"{error_type.__name__}\nRequest ID: Root=1-abc\n\nmore lines")
            raise error

        monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
        with pytest.raises(LeopartError, match=match):
            leopart.from_pretrained(name)


def test_cached_hub_repo_loads_without_network(tiny_model, tmp_path, online):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    populate_hf_cache("someone/cached-leopart", {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")})
    online(closed_port_url())
    loaded = leopart.from_pretrained("someone/cached-leopart")
    assert torch.equal(loaded.prototypes.weight, tiny_model.prototypes.weight)


def test_error_messages_name_a_hub_command_that_exists(hub_download_calls):
    """huggingface_hub 1.0 removed `huggingface-cli`; the hint must name the installed command."""
    with pytest.raises(LeopartError, match="`(.+) download nobody/nothing`") as e:
        leopart.from_pretrained("nobody/nothing")
    command = re.search("`(.+) download", str(e.value)).group(1)
    assert (Path(sys.executable).parent / command).is_file()


def test_unknown_names():
    with pytest.raises(LeopartError, match="unknown model 'no-such-model'"):
        leopart.from_pretrained("no-such-model")
    with pytest.raises(LeopartError, match="unknown model 'missing.ckpt'"):
        leopart.from_pretrained("missing.ckpt")


def test_release_alias_downloads_converts_and_caches(tmp_path, monkeypatch):
    """The real download path, fed by a file:// URL: progress bar, conversion, cache, then no download."""
    sd, vit = original_state_dict(seed=4)
    src = tmp_path / "leopart_vitt16.ckpt"
    torch.save(sd, src)
    monkeypatch.setitem(hub.RELEASES, "vitt16", hub.Release(src.as_uri(), "leopart_vitt16.ckpt",
                                                           "vit_tiny_patch16_224"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.warns(UserWarning):
        check_converted(leopart.from_pretrained("vitt16"), sd, vit)
    cached = hub.cache_dir() / "vitt16"
    assert (cached / "config.json").is_file()
    assert not (hub.cache_dir() / "downloads" / "leopart_vitt16.ckpt").exists()
    src.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_converted(leopart.from_pretrained("vitt16"), sd, vit)


class RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves ``data`` and honours "Range: bytes=N-" with HTTP 206; ``cut_at`` drops the next body early."""
    data = bytes(range(256)) * 12_000  # ~3 MB: several of download()'s 1 MiB reads
    cut_at: int | None = None
    ranges: list = []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.removeprefix("bytes=").removesuffix("-")) if rng else 0
        if start >= len(self.data):
            self.send_error(416)  # Range Not Satisfiable
            return
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        self.end_headers()
        if self.cut_at is not None:
            body, type(self).cut_at = body[:self.cut_at], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_release_download_resumes_after_a_cut(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/leopart_vitt16.ckpt"
    dest = tmp_path / "downloads" / "leopart_vitt16.ckpt"
    RangeServer.cut_at, RangeServer.ranges = 1_500_000, []
    try:
        with pytest.raises(LeopartError, match="run again to resume"):
            hub.download(url, dest)
        assert not dest.exists()
        kept = (tmp_path / "downloads" / "leopart_vitt16.ckpt.part").stat().st_size
        assert 0 < kept <= 1_500_000
        assert hub.download(url, dest) == dest
        assert dest.read_bytes() == RangeServer.data
        assert RangeServer.ranges == [None, f"bytes={kept}-"]
        # A part file that is already whole (stopped before its rename): the server refuses the range, the
        # download starts over.
        dest.rename(dest.with_name(dest.name + ".part"))
        RangeServer.ranges = []
        assert hub.download(url, dest).read_bytes() == RangeServer.data
        assert RangeServer.ranges == [f"bytes={len(RangeServer.data)}-", None]
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "downloads" / "leopart_vitt16.ckpt.part").exists()


def test_release_alias_bad_download_leaves_cache_clean(tmp_path, monkeypatch):
    src = tmp_path / "broken.ckpt"
    src.write_bytes(b"\x00" * 1000)
    monkeypatch.setitem(hub.RELEASES, "broken", hub.Release(src.as_uri(), "broken.ckpt", "vit_tiny_patch16_224"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(LeopartError, match="corrupt or truncated"):
        leopart.from_pretrained("broken")
    assert not (hub.cache_dir() / "broken").exists()
    assert not list(hub.cache_dir().glob(".broken*"))
    monkeypatch.setitem(hub.RELEASES, "gone", hub.Release((tmp_path / "nope.ckpt").as_uri(), "gone.ckpt",
                                                         "vit_tiny_patch16_224"))
    with pytest.raises(LeopartError, match="cannot download") as e:
        leopart.from_pretrained("gone")
    assert f"run `leopart convert gone.ckpt {hub.cache_dir() / 'gone'}`" in str(e.value)
    assert not list((hub.cache_dir() / "downloads").iterdir())
