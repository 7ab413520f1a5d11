"""Linear and FCN probes: learning on separable data, the FCN layout, save/load, checkpoint conversion, CLI."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import free_port
from PIL import Image

import leopart
from leopart.cli import main
from leopart.data import IMAGENET_MEAN, IMAGENET_STD
from leopart.errors import LeopartError
from leopart.probe import (FCNHead, ProbeConfig, ProbeHead, convert_head_checkpoint, evaluate_probe, load_head,
                           segment_with_head)
from leopart.segment import mask_image

COLOURS = np.array([(20, 20, 20), (230, 40, 40), (40, 200, 60), (50, 80, 230)], dtype=np.uint8)


def write_block_voc(root, n_train=24, n_val=8, seed=0):
    """64x64 images made of 16x16 blocks (one token each for a /16 ViT), one flat colour per class."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        names = []
        for i in range(n):
            labels = rng.integers(0, len(COLOURS), size=(4, 4)).astype(np.uint8)
            mask = np.kron(labels, np.ones((16, 16), dtype=np.uint8))
            name = f"{split}{i:03d}"
            Image.fromarray(COLOURS[mask]).save(root / "JPEGImages" / f"{name}.png")
            mask_image(mask).save(root / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def reference_tokens(image: Image.Image, model, size: int) -> torch.Tensor:
    """Patch tokens [1, h, w, D] of an image the way the reference's probe transforms fed it: torchvision's Resize
    on a PIL image (bilinear), ToTensor, ImageNet Normalize."""
    x = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    x = (torch.from_numpy(x).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        return model(x[None]).patch_tokens


@pytest.fixture(scope="module")
def block_voc(tmp_path_factory):
    return write_block_voc(tmp_path_factory.mktemp("blocks"))


def test_linear_probe_learns_separable_classes(block_voc, tiny_model, tmp_path):
    head = leopart.probe(tiny_model, block_voc, head="linear", epochs=12, lr=0.5, drop_at=10, resolution=64,
                         mask_size=4, batch_size=6, output=str(tmp_path / "lin"), progress=False)
    assert isinstance(head, ProbeHead) and head.config.num_classes == 4
    miou, per_class = evaluate_probe(head, tiny_model, block_voc, "val", eval_size=4)  # one pixel per token
    assert miou >= 95.0, per_class
    # the token cache and the per-epoch checkpoint were written; the final head loads back
    assert list((tmp_path / "lin" / "cache").rglob("shard_*.safetensors"))
    assert torch.load(tmp_path / "lin" / "checkpoint.pt", weights_only=True)["epoch"] == 12
    again = load_head(tmp_path / "lin" / "head")
    x = torch.randn(2, 4, 4, tiny_model.embed_dim)
    torch.testing.assert_close(again(x), head(x))


def write_odd_voc(root, sizes=((70, 90), (50, 64), (96, 40), (64, 64), (81, 77)), seed=1):
    """Images of odd sizes (resizing to the input side matters) with 10-px class blocks and 255 borders."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = []
    for i, (h, w) in enumerate(sizes):
        labels = rng.integers(0, len(COLOURS), size=(h // 10 + 1, w // 10 + 1)).astype(np.uint8)
        mask = np.kron(labels, np.ones((10, 10), dtype=np.uint8))[:h, :w]
        pixels = COLOURS[mask].astype(np.int16) + rng.integers(-30, 30, size=(h, w, 3))
        mask[::10] = 255  # object boundaries, as VOC marks them
        for split in ("train", "val"):
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{split}{i}.png")
            mask_image(mask).save(root / "SegmentationClass" / f"{split}{i}.png")
        names.append(f"{{}}{i}")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(n.format(split) + "\n" for n in names))
    return root


@pytest.mark.parametrize("kind", ["linear", "fcn"])
def test_probe_scores_and_trains_as_the_reference_code(tmp_path, tiny_model, kind):
    """Scoring as eval_linear.py: every image, bilinear resize to the input side, tokens bilinearly upsampled to it
    and the head run there, argmax against masks resized nearest to it, 255 ignored, plain mIoU. Training masks
    as its transforms and training_step: nearest to the input side, then nearest to the mask size."""
    root = write_odd_voc(tmp_path / "voc")
    torch.manual_seed(0)
    head = ProbeHead(ProbeConfig(head=kind, in_dim=tiny_model.embed_dim, num_classes=4, channels=16, resolution=64,
                                 mask_size=8)).eval()
    tp, fp, fn = np.zeros(4), np.zeros(4), np.zeros(4)
    for name in (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        tokens = reference_tokens(Image.open(root / "JPEGImages" / f"{name}.png"), tiny_model, 64)
        with torch.no_grad():
            upsampled = F.interpolate(tokens.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear")
            pred = head.head(upsampled).argmax(1)[0].numpy()
        gt = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png").resize((64, 64), Image.NEAREST))
        valid = gt != 255
        for c in range(4):
            tp[c] += np.sum((pred == c) & (gt == c) & valid)
            fp[c] += np.sum((pred == c) & (gt != c) & valid)
            fn[c] += np.sum((pred != c) & (gt == c) & valid)
    expected = 100 * np.mean(tp / np.maximum(tp + fp + fn, 1e-8))
    miou, _ = evaluate_probe(head, tiny_model, root, "val")
    assert miou == pytest.approx(expected, abs=0.05)

    trained = leopart.probe(tiny_model, root, head=kind, epochs=1, resolution=64, mask_size=24, batch_size=5,
                            output=str(tmp_path / "run"), progress=False)
    assert trained.config.mask_size == 24
    (shard,) = (tmp_path / "run" / "cache").rglob("shard_*.safetensors")
    from safetensors.torch import load_file

    cached, direct_differs = load_file(shard)["masks"].numpy(), False
    for i, name in enumerate((root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()):
        at_input = Image.open(root / "SegmentationClass" / f"{name}.png").resize((64, 64), Image.NEAREST)
        two_stage = F.interpolate(torch.from_numpy(np.array(at_input)).float()[None, None], size=(24, 24),
                                  mode="nearest")[0, 0].numpy()
        np.testing.assert_array_equal(cached[i], two_stage)
        direct = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png").resize((24, 24), Image.NEAREST))
        direct_differs |= not np.array_equal(direct, two_stage)
    assert direct_differs  # the two resizings differ on these sizes: the check above tells them apart


def test_probe_settings_are_checked_in_one_line(block_voc, tiny_model):
    bad = [(dict(head="lin"), "head must be one of linear, fcn, not 'lin'"),
           (dict(epochs=0), "probe epochs must be a positive integer, not 0"),
           (dict(mask_size=0), "probe mask_size must be a positive integer, not 0"),
           (dict(batch_size=0), "probe batch_size must be a positive integer, not 0"),
           (dict(lr=-1.0), r"probe lr must be >= 0, not -1.0"),
           (dict(lr="0.1"), "^probe lr must be a number, not '0.1'$"),  # was a TypeError from the comparison
           (dict(augment="yes"), "^probe augment must be True or False, not 'yes'$"),
           # more classes in the masks than asked for: said by the first batch, not torch's "Target 3 is out of bounds"
           (dict(num_classes=3), r"the masks hold class id 3, beyond num_classes=3 \(ids 0..2; 255 is ignored\)")]
    for settings, match in bad:
        with pytest.raises(LeopartError, match=match):
            leopart.probe(tiny_model, block_voc, **{"head": "linear", "resolution": 64, "mask_size": 4,
                                                    "progress": False, **settings})


def test_tokens_that_cannot_fit_in_memory_fail_at_once_unless_kept_on_disk(block_voc, tiny_model, tmp_path,
                                                                            monkeypatch):
    from leopart import device

    # block_voc's 24 train images at 64 px: 24 x 4 x 4 tokens x 64 dims x 2 bytes = 49,152 bytes in memory
    monkeypatch.setattr(device, "host_memory_available", lambda: 49_151)
    args = dict(head="linear", epochs=1, resolution=64, mask_size=4, batch_size=6, progress=False)
    with pytest.raises(LeopartError, match=r"the fp16 tokens of 24 images take 0.0 GiB, more than the 0.0 GiB of "
                                           r"memory available here: keep them on disk instead with --probe-dir"):
        leopart.probe(tiny_model, block_voc, **args)
    leopart.probe(tiny_model, block_voc, output=str(tmp_path / "disk"), **args)  # on disk: no limit
    monkeypatch.setattr(device, "host_memory_available", lambda: 49_152)
    leopart.probe(tiny_model, block_voc, **args)


def test_probe_resumes_from_its_checkpoint(block_voc, tiny_model, tmp_path):
    args = dict(head="linear", lr=0.5, resolution=64, mask_size=4, batch_size=6, output=str(tmp_path / "r"),
                progress=False)
    full = leopart.probe(tiny_model, block_voc, epochs=4, **{**args, "output": str(tmp_path / "full")})
    leopart.probe(tiny_model, block_voc, epochs=2, **args)
    resumed = leopart.probe(tiny_model, block_voc, epochs=4, **args)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0)


def test_fcn_probe_resumes_with_its_dropout_where_it_stopped(block_voc, tiny_model, tmp_path):
    args = dict(head="fcn", lr=0.05, resolution=64, mask_size=4, batch_size=6, progress=False)
    full = leopart.probe(tiny_model, block_voc, epochs=3, output=str(tmp_path / "full"), **args)
    leopart.probe(tiny_model, block_voc, epochs=1, output=str(tmp_path / "r"), **args)
    resumed = leopart.probe(tiny_model, block_voc, epochs=3, output=str(tmp_path / "r"), **args)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0)
    # a checkpoint from before 2026-11-29 kept the CPU generator's state alone
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert set(ckpt["rng"]) == {"torch"}
    ckpt["rng"], ckpt["epoch"] = ckpt["rng"]["torch"], 2
    torch.save(ckpt, tmp_path / "r" / "checkpoint.pt")
    leopart.probe(tiny_model, block_voc, epochs=3, output=str(tmp_path / "r"), **args)


def test_probe_lr_and_batch_default_to_the_reference_recipe_for_the_model(block_voc, tiny_model, tmp_path):
    # The reference's PASCAL configs: ViT-S/16 probes lr 0.01 with 2 x 60 (linear) or 2 x 32 (FCN) images,
    # ViT-B/8 ones lr 0.1 with 2 x 6; a resumed run keeps what it recorded (0.1 and 12 before 2026-11-28).
    from leopart.probe import reference_recipe

    assert reference_recipe("linear", 16) == (0.01, 120) and reference_recipe("fcn", 16) == (0.01, 64)
    assert reference_recipe("linear", 8) == reference_recipe("fcn", 8) == (0.1, 12)
    args = dict(head="fcn", epochs=1, resolution=64, mask_size=4, progress=False)
    leopart.probe(tiny_model, block_voc, output=str(tmp_path / "p"), **args)
    config = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["config"]
    assert tiny_model.patch_size == 16 and (config["lr"], config["batch_size"]) == (0.01, 64)
    old = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)
    old["config"].update(lr=0.1, batch_size=12)
    torch.save(old, tmp_path / "p" / "checkpoint.pt")
    leopart.probe(tiny_model, block_voc, output=str(tmp_path / "p"), **{**args, "epochs": 2})
    config = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["config"]
    assert (config["lr"], config["batch_size"]) == (0.1, 12)


def test_fcn_head_layout_and_parameter_count():
    head = ProbeHead(ProbeConfig(head="fcn", in_dim=384, num_classes=21))
    assert isinstance(head.head, FCNHead)
    convs = [head.head.convs[0][0], head.head.convs[1][0], head.head.conv_cat[0]]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (384, 512, (3, 3)), (512, 512, (3, 3)), (384 + 512, 512, (3, 3))]
    assert head.head.conv_seg.kernel_size == (1, 1) and head.head.dropout.p == 0.1
    expected = (384 * 512 * 9 + 512) + (512 * 512 * 9 + 512) + ((384 + 512) * 512 * 9 + 512) + (512 * 21 + 21)
    assert sum(p.numel() for p in head.parameters()) == expected
    out = head.eval()(torch.randn(2, 28, 28, 384))
    assert out.shape == (2, 21, 100, 100)
    lin = ProbeHead(ProbeConfig(head="linear", in_dim=384, num_classes=21))
    assert sum(p.numel() for p in lin.parameters()) == 384 * 21 + 21
    # The protocol's linear head: tokens bilinearly upsampled to the mask size, then a 1x1 conv (leopart runs
    # the conv first; the logits and their gradients must be the same).
    torch.nn.init.normal_(lin.head.bias)
    tokens = torch.randn(2, 28, 28, 384, requires_grad=True)
    upsampled = F.interpolate(tokens.permute(0, 3, 1, 2), size=100, mode="bilinear", align_corners=False)
    expected = F.conv2d(upsampled, lin.head.weight, lin.head.bias)
    torch.testing.assert_close(lin(tokens), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(lin(tokens), [tokens, lin.head.weight], grad)
    want = torch.autograd.grad(expected, [tokens, lin.head.weight], grad)
    for a, b in zip(got, want):  # the weight's gradient sums 20,000 pixels: float rounding scales with it
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "fcn"])
def test_segment_with_head_upsamples_only_for_the_argmax(tiny_model, kind):
    """A photo's class mask: a linear head's logits at the token grid, an FCN's at its mask size (as trained),
    then upsampled to the photo for the argmax; the FCN never runs at the photo's size (3 MP took 17 GB)."""
    torch.manual_seed(0)
    head = ProbeHead(ProbeConfig(head=kind, in_dim=tiny_model.embed_dim, num_classes=5, channels=16, resolution=64,
                                 mask_size=8)).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    got = segment_with_head(image, tiny_model, head, device="cpu")
    tokens = reference_tokens(Image.fromarray(image), tiny_model, 64)  # the tokens its head was trained on
    with torch.no_grad():
        if kind == "linear":  # the protocol's order: tokens upsampled to the output, then the 1x1 conv
            expected = head(tokens, size=(70, 90)).argmax(1)[0]
        else:
            expected = F.interpolate(head(tokens), size=(70, 90), mode="bilinear", align_corners=False).argmax(1)[0]
    assert got.shape == (70, 90) and len(np.unique(got)) > 1
    assert (got == expected.numpy()).mean() > 0.999  # float rounding may flip a near-tie


def test_save_load_round_trip(tmp_path):
    head = ProbeHead(ProbeConfig(head="fcn", in_dim=32, num_classes=5, channels=16)).eval()
    folder = head.save_pretrained(tmp_path / "fcn")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    loaded = ProbeHead.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 3, 32)
    torch.testing.assert_close(loaded(x), head(x))
    (tmp_path / "model").mkdir()
    leopart.LeopartViT(leopart.LeopartConfig(arch="test_vit", img_size=64)).save_pretrained(tmp_path / "model")
    with pytest.raises(LeopartError, match="holds a leopart model, not a leopart probe head$"):
        load_head(tmp_path / "model")
    r = CliRunner().invoke(main, ["info", str(folder)])
    assert r.exit_code == 0 and r.output.splitlines()[1:4] == [
        "head        fcn", "classes     5", "reads       32-dim tokens of a model it does not record"], r.output


def _reference_fcn(state, x):
    """The reference head (mmcv ConvModule without norm: conv + bias, ReLU) written out functionally."""
    def conv_relu(t, prefix):
        return F.relu(F.conv2d(t, state[f"{prefix}.conv.weight"], state[f"{prefix}.conv.bias"], padding=1))

    out = conv_relu(conv_relu(x, "finetune_head.convs.0"), "finetune_head.convs.1")
    out = conv_relu(torch.cat([x, out], dim=1), "finetune_head.conv_cat")
    return F.conv2d(out, state["finetune_head.conv_seg.weight"], state["finetune_head.conv_seg.bias"])


def test_convert_released_checkpoint_layouts(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, c, ch = 24, 6, 16
    fcn_state = {
        "model.cls_token": torch.zeros(1, 1, d),  # the frozen backbone rides along in the released files
        "finetune_head.convs.0.conv.weight": torch.randn(ch, d, 3, 3, generator=g) * 0.1,
        "finetune_head.convs.0.conv.bias": torch.randn(ch, generator=g),
        "finetune_head.convs.1.conv.weight": torch.randn(ch, ch, 3, 3, generator=g) * 0.1,
        "finetune_head.convs.1.conv.bias": torch.randn(ch, generator=g),
        "finetune_head.conv_cat.conv.weight": torch.randn(ch, d + ch, 3, 3, generator=g) * 0.1,
        "finetune_head.conv_cat.conv.bias": torch.randn(ch, generator=g),
        "finetune_head.conv_seg.weight": torch.randn(c, ch, 1, 1, generator=g),
        "finetune_head.conv_seg.bias": torch.randn(c, generator=g),
    }
    torch.save({"state_dict": fcn_state, "hyper_parameters": {"input_size": 448}}, tmp_path / "fcn.ckpt")
    head = convert_head_checkpoint(tmp_path / "fcn.ckpt").eval()
    assert head.config.head == "fcn" and head.config.num_classes == c and head.config.channels == ch
    tokens = torch.randn(2, 7, 7, d, generator=g)
    x = F.interpolate(tokens.permute(0, 3, 1, 2), size=100, mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(tokens), _reference_fcn(fcn_state, x), atol=1e-4, rtol=1e-4)

    lin_state = {"finetune_head.weight": torch.randn(c, d, 1, 1, generator=g), "finetune_head.bias": torch.randn(c)}
    torch.save({"state_dict": lin_state}, tmp_path / "lin.ckpt")
    lin = load_head(tmp_path / "lin.ckpt")
    assert lin.config.head == "linear"
    ref = F.conv2d(x, lin_state["finetune_head.weight"], lin_state["finetune_head.bias"])
    torch.testing.assert_close(lin(tokens), ref, atol=1e-4, rtol=1e-4)

    torch.save({"state_dict": {"backbone.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(LeopartError, match="not a leopart probing checkpoint"):
        convert_head_checkpoint(tmp_path / "other.ckpt")
    broken = {k: v for k, v in fcn_state.items() if "conv_cat" not in k}
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(LeopartError, match="does not fit"):
        convert_head_checkpoint(tmp_path / "broken.ckpt")


def test_eval_cli_probes_json_and_segment_head(block_voc, tiny_model_dir, tmp_path):
    runner = CliRunner()
    # Probes trained on images of the scored split would be scored on their training data: refused at once.
    r = runner.invoke(main, ["eval", str(block_voc), "--model", str(tiny_model_dir), "--linear", "--split", "train"])
    assert r.exit_code == 1 and "--train-split 'train' and --split 'train' share " in r.output, r.output
    out = tmp_path / "r.json"
    r = runner.invoke(main, ["eval", str(block_voc), "--model", str(tiny_model_dir), "--linear", "--fcn",
                             "--probe-epochs", "2", "--resolution", "64", "--probe-mask-size", "8", "--probe-dir", str(tmp_path / "p"),
                             "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert set(res) >= {"linear", "fcn", "n_images"} and all(np.isfinite([res["linear"], res["fcn"]]))
    assert "linear probe" in r.output and "fcn probe" in r.output
    assert f"trained heads in {tmp_path / 'p' / 'linear'}, {tmp_path / 'p' / 'fcn'}: `leopart segment IMAGE " \
           f"--model {tiny_model_dir} --head {tmp_path / 'p' / 'fcn'}`" in r.output, r.output
    seg_out = tmp_path / "seg"
    r = runner.invoke(main, ["segment", str(block_voc / "JPEGImages" / "val000.png"), "--model",
                             str(tiny_model_dir), "--head", str(tmp_path / "p" / "linear" / "head"),
                             "--output", str(seg_out)])
    assert r.exit_code == 0, r.output
    with Image.open(seg_out / "val000_mask.png") as m:
        assert m.mode == "P" and m.size == (64, 64) and np.asarray(m).max() < 4
    # The head records its backbone, so --model can be left out (it defaulted to vits16 and failed offline).
    head_config = json.loads((tmp_path / "p" / "linear" / "head" / "config.json").read_text())
    assert head_config["model"] == str(tiny_model_dir.resolve())
    r = runner.invoke(main, ["segment", str(block_voc / "JPEGImages" / "val000.png"), "--head",
                             str(tmp_path / "p" / "linear" / "head"), "--output", str(tmp_path / "seg2")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "seg2" / "val000_mask.png").read_bytes() == (seg_out / "val000_mask.png").read_bytes()
    # A probe's output folder stands for the head saved in it (what the eval's last line suggests), in
    # `segment --head` and `info`; unfinished (no head yet), it says so.
    r = runner.invoke(main, ["segment", str(block_voc / "JPEGImages" / "val000.png"), "--head",
                             str(tmp_path / "p" / "linear"), "--output", str(tmp_path / "seg3")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "seg3" / "val000_mask.png").read_bytes() == (seg_out / "val000_mask.png").read_bytes()
    for extra in (["--k", "3"], ["--fg-model", str(tiny_model_dir)], ["--keep-aspect"], ["--square"]):
        r = runner.invoke(main, ["segment", str(block_voc / "JPEGImages" / "val000.png"), "--head",
                                 str(tmp_path / "p" / "linear"), "--output", str(tmp_path / "seg4"), *extra])
        assert r.exit_code == 1 and r.output.startswith("Error: --head gives supervised class masks"), r.output
    r = runner.invoke(main, ["info", str(tmp_path / "p" / "fcn")])
    assert r.exit_code == 0 and f"probe head  {tmp_path / 'p' / 'fcn' / 'head'}\nhead        fcn\n" in r.output, r.output
    shutil.rmtree(tmp_path / "p" / "fcn" / "head")
    for args in (["info", str(tmp_path / "p" / "fcn")],
                 ["segment", str(block_voc / "JPEGImages" / "val000.png"), "--head", str(tmp_path / "p" / "fcn")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 1 and "is a probe's output folder whose training has not finished" in r.output, r.output
    r = runner.invoke(main, ["segment", str(block_voc / "JPEGImages" / "val000.png"), "--model",
                             str(tiny_model_dir), "--head", str(tmp_path / "nothing"), "--output", str(seg_out)])
    assert r.exit_code == 1 and "no probe head" in r.output


def test_scoring_runs_the_backbone_in_float32_other_work_may_use_bf16(block_voc, tiny_model, tmp_path, monkeypatch):
    """On CUDA, embed / cluster / segment run the backbone under bf16 autocast for speed, while scoring (leopart
    eval, the probes, a probe head's masks) runs it in float32, as the reference code did; features computed
    under bf16 are cached under names of their own. (On the CPU both are float32: this checks what is asked.)"""
    import sys

    from leopart.segment import dense_features

    embed_module, asked = sys.modules["leopart.embed"], []
    real_autocast = embed_module.autocast

    def recording(device, full_precision=False):
        asked.append(full_precision)
        return real_autocast(device, full_precision)

    monkeypatch.setattr(embed_module, "autocast", recording)
    # The probe heads train in float32 too (the reference's Lightning Trainer ran at precision 32).
    probe_module, head_asked = sys.modules["leopart.probe"], []
    monkeypatch.setattr(probe_module, "autocast", lambda device, full_precision=False: (
        head_asked.append(full_precision), real_autocast(device, full_precision))[1])

    def precisions(run) -> set:
        asked.clear()
        run()
        assert asked  # the backbone ran
        return set(asked)

    images = sorted((block_voc / "JPEGImages").iterdir())[:4]
    scoring = {
        "evaluate": lambda: leopart.evaluate(block_voc, tiny_model, ks=(4,), resolution=64, mask_size=16, seeds=1,
                                             fully_unsupervised=True, protocol="cosine", fu_k=4, progress=False),
        "probe": lambda: leopart.probe(tiny_model, block_voc, head="fcn", epochs=1, resolution=64, mask_size=4,
                                       batch_size=6, output=str(tmp_path / "fcn"), progress=False),
        "augmented probe": lambda: leopart.probe(tiny_model, block_voc, head="linear", epochs=1, resolution=64,
                                                 mask_size=4, batch_size=6, augment=True, progress=False),
        "probe from its token cache": lambda: leopart.probe(tiny_model, block_voc, head="fcn", epochs=2, resolution=64,
                                                            mask_size=4, batch_size=6, output=str(tmp_path / "fcn"),
                                                            progress=False),
        "probe masks": lambda: segment_with_head(images[0], tiny_model, load_head(tmp_path / "fcn" / "head")),
    }
    for name, run in scoring.items():
        head_asked.clear()
        if name == "augmented probe":  # its backbone runs in leopart.probe, on the epoch's crops
            run()
            assert set(head_asked) == {True}, name
        elif name == "probe from its token cache":  # the backbone does not run, only the head
            run()
        else:
            assert precisions(run) == {True}, name
        if name not in ("augmented probe", "probe masks"):  # a head's masks (not a score) may come under bf16
            assert not head_asked, name  # the head trains without autocast
    fast = {"embed": lambda: leopart.embed(images, model=tiny_model, resolution=64),
            "dense features": lambda: dense_features(images, tiny_model, 64, progress=False),
            "segment": lambda: leopart.segment(images[0], model=tiny_model, resolution=64, k=3)}
    for name, run in fast.items():
        assert precisions(run) == {False}, name
    # ... unless asked: embed's full_precision, `leopart embed --full-precision`
    assert precisions(lambda: leopart.embed(images, model=tiny_model, resolution=64, full_precision=True)) == {True}
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    for flag, expected in (([], False), (["--full-precision"], True)):
        def cli(flag=flag):
            r = CliRunner().invoke(main, ["embed", *map(str, images), "--model", str(model_dir), "--resolution", "64",
                                          "-o", str(tmp_path / "f.npy"), *flag])
            assert r.exit_code == 0, r.output
        assert precisions(cli) == {expected}, flag
    # As on CUDA: bf16 features and float32 ones are cached apart (float32 caches keep their earlier names).
    from leopart.device import precision_key

    assert precision_key(torch.device("cuda")) == ("bf16",)
    assert precision_key(torch.device("cuda"), full_precision=True) == precision_key(torch.device("cpu")) == ()
    monkeypatch.setattr(sys.modules["leopart.segment"], "precision_key",
                        lambda device, full_precision=False: () if full_precision else ("bf16",))
    for full_precision in (True, False, True):
        dense_features(images, tiny_model, 64, progress=False, cache_dir=tmp_path / "cache", full_precision=full_precision)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_augmented_crops_are_the_reference_probe_transforms(tmp_path):
    """augment=True trains on linear_finetuning_transforms' pairs: RandomResizedCrop(448, scale=(0.8, 1)) of image
    (bilinear) and mask (nearest), a horizontal flip of both with p = 0.5, ToTensor + Normalize; training_step then
    takes the mask nearest to 100 x 100. Restated here with torchvision's functional transforms."""
    import torchvision.transforms.functional as TF

    from leopart.evaluate import load_mask
    from leopart.probe import AUGMENT_SCALE, augmented_pair, draw_augmentation

    root = write_odd_voc(tmp_path / "voc", sizes=((70, 90), (96, 40)))
    for name in ("train0", "train1"):
        image = Image.open(root / "JPEGImages" / f"{name}.png").convert("RGB")
        mask_png = Image.open(root / "SegmentationClass" / f"{name}.png")
        for box, flip in (((3, 5, 60, 52), False), ((0, 7, 40, 89), True), ((11, 0, 37, 69), True)):
            box = (min(box[0], image.width - 1), box[1], min(box[2], image.width), min(box[3], image.height))
            x, mask = augmented_pair(image, load_mask(root / "SegmentationClass" / f"{name}.png"), box, flip, 64, 24)
            left, top, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
            ref_img = TF.resized_crop(image, top, left, h, w, [64, 64], TF.InterpolationMode.BILINEAR)
            ref_mask = TF.resized_crop(mask_png, top, left, h, w, [64, 64], TF.InterpolationMode.NEAREST)
            if flip:
                ref_img, ref_mask = TF.hflip(ref_img), TF.hflip(ref_mask)
            ref_x = TF.normalize(TF.to_tensor(ref_img), IMAGENET_MEAN, IMAGENET_STD)
            ref_mask = F.interpolate(TF.to_tensor(ref_mask)[None] * 255, size=(24, 24), mode="nearest")[0, 0]
            torch.testing.assert_close(x, ref_x)
            assert mask.dtype == torch.int64 and torch.equal(mask, ref_mask.round().long()), (name, box, flip)
    # The draws: 0.8-1.0 of the area (rounding aside), aspect 3/4-4/3 or torchvision's fallback, flips half the time.
    g = torch.Generator().manual_seed(0)
    draws = [draw_augmentation(500, 333, g) for _ in range(2000)]
    shares = np.array([(b[2] - b[0]) * (b[3] - b[1]) / (500 * 333) for b, _ in draws])
    assert AUGMENT_SCALE == (0.8, 1.0) and shares.min() > 0.79 and shares.max() <= 1.0
    assert 0.45 < np.mean([flip for _, flip in draws]) < 0.55
    again = torch.Generator().manual_seed(0)
    assert [draw_augmentation(500, 333, again) for _ in range(5)] == draws[:5]


def test_augmented_probe_redraws_crops_each_epoch_and_resumes_exactly(block_voc, tiny_model, tmp_path):
    from leopart.evaluate import read_voc
    from leopart.probe import AugmentedBatches

    args = dict(head="linear", lr=0.5, resolution=64, mask_size=4, batch_size=6, progress=False)
    full = leopart.probe(tiny_model, block_voc, epochs=3, augment=True, output=str(tmp_path / "full"), **args)
    assert not (tmp_path / "full" / "cache").exists()  # no token cache: the backbone ran on every batch
    assert torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["config"]["augment"] is True
    leopart.probe(tiny_model, block_voc, epochs=1, augment=True, output=str(tmp_path / "r"), **args)
    resumed = leopart.probe(tiny_model, block_voc, epochs=3, augment=True, output=str(tmp_path / "r"), **args)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0)
    plain = leopart.probe(tiny_model, block_voc, epochs=3, **args)
    assert not torch.allclose(plain.head.weight, full.head.weight, atol=1e-4)
    # each epoch its own crop of an image; the same epoch the same crop
    source = AugmentedBatches(tiny_model, read_voc(block_voc, "train"), 64, 4, torch.device("cpu"))
    epoch0, epoch1 = source.sample(0, 3), source.sample(1, 3)
    assert torch.equal(epoch0[0], source.sample(0, 3)[0]) and not torch.equal(epoch0[0], epoch1[0])
    batches = list(source.batches(6, 0))
    assert [len(t) for t, _ in batches] == [6, 6, 6, 6] and batches[0][0].shape == (6, 4, 4, tiny_model.embed_dim)
    # a run trained one way does not resume the other way
    with pytest.raises(LeopartError, match=r"holds a probe trained with random crops and flips: resume it with "
                                           r"--probe-augment \(augment=True\), or train this one in another folder"):
        leopart.probe(tiny_model, block_voc, epochs=4, output=str(tmp_path / "r"), **args)


def test_eval_cli_probe_augment_and_probe_options_without_a_probe(block_voc, tiny_model_dir, tmp_path):
    runner = CliRunner()
    for extra in (["--probe-augment"], ["--probe-epochs", "2", "--probe-dir", str(tmp_path / "p")]):
        r = runner.invoke(main, ["eval", str(block_voc), "--model", str(tiny_model_dir), "--k", "4", *extra])
        assert r.exit_code == 1 and r.output.startswith(f"Error: {', '.join(e for e in extra if e.startswith('--'))} "
                                                        "set the probes: add --linear and/or --fcn"), r.output
    out = tmp_path / "r.json"
    r = runner.invoke(main, ["eval", str(block_voc), "--model", str(tiny_model_dir), "--linear", "--probe-augment",
                             "--probe-epochs", "1", "--resolution", "64", "--probe-mask-size", "8", "--probe-dir",
                             str(tmp_path / "p"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["probes"] == {"train_split": "train", "augment": True, "mask_size": 8, "scored_at": 64}
    assert np.isfinite(res["linear"]) and not (tmp_path / "p" / "linear" / "cache").exists()


def _probe_worker(rank, world, port, model_dir, voc, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for augment in (False, True):
        head = leopart.probe(model_dir, voc, head="linear", epochs=2, lr=0.5, resolution=64, mask_size=4,
                             batch_size=10, augment=augment, device="cpu", progress=False)
        results[(rank, augment)] = {k: v.clone() for k, v in head.state_dict().items()}
    dist.barrier()  # torch 2.4's gloo could deadlock destroying a group right after the last all-reduce (train.py)
    dist.destroy_process_group()


def test_two_processes_train_the_probe_one_process_trains(block_voc, tiny_model_dir, monkeypatch):
    """Under a process group each process takes an even share of every batch, so DDP's mean of their gradients is
    the batch's; block_voc's 24 images in batches of 10 end with a batch of 4, which gave one process 4 images and
    the other none: the first then waited in DDP's all-reduce for ever."""
    import time

    import torch.multiprocessing as mp

    from leopart.probe import rank_shares

    order = torch.arange(24)
    shares = [list(rank_shares(order, 10, rank, 2)) for rank in (0, 1)]
    assert [len(s) for s in shares] == [3, 3] and [len(c) for c in shares[1]] == [5, 5, 2]
    assert sorted(torch.cat([*shares[0], *shares[1]]).tolist()) == list(range(24))
    assert [len(c) for c in rank_shares(torch.arange(21), 10, 0, 2)] == [5, 5]  # a last batch of 1 for 2: left out
    with monkeypatch.context() as m:  # a batch smaller than the processes would leave some without any image
        import torch.distributed as dist

        m.setattr(dist, "is_initialized", lambda: True)
        m.setattr(dist, "get_rank", lambda: 0)
        m.setattr(dist, "get_world_size", lambda: 4)
        with pytest.raises(LeopartError, match="probe batch size 3 is smaller than the 4 processes sharing it"):
            leopart.probe(tiny_model_dir, block_voc, head="linear", epochs=1, resolution=64, mask_size=4,
                          batch_size=3, progress=False)

    port = free_port()
    results = mp.get_context("spawn").Manager().dict()
    context = mp.start_processes(_probe_worker, args=(2, port, str(tiny_model_dir), str(block_voc), results), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two probe processes did not finish within 4 minutes (a process waiting in DDP)")
    for augment in (False, True):
        alone = leopart.probe(tiny_model_dir, block_voc, head="linear", epochs=2, lr=0.5, resolution=64, mask_size=4,
                              batch_size=10, augment=augment, device="cpu", progress=False).state_dict()
        for k, v in alone.items():
            torch.testing.assert_close(results[(0, augment)][k], v, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(results[(1, augment)][k], v, atol=1e-5, rtol=1e-4)
