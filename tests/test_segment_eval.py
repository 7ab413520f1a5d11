"""segment / cluster / merge / eval, through the API and the CLI, on generated images and masks."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import interrupt_at_call, random_image
from PIL import Image

import leopart
from leopart.cli import main
from leopart.embed import keep_aspect_size
from leopart.errors import LeopartError
from leopart.evaluate import read_voc
from leopart.segment import overlay_image, upsample_argmax, voc_palette


def scene(h, w, seed):
    """An image with a few flat-coloured rectangles, and its class mask (255 on a 1-pixel border)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    for cls in (1, 2):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + h // 3, x:x + w // 3] = (200, 60, 60) if cls == 1 else (60, 200, 60)
        mask[y:y + h // 3, x:x + w // 3] = cls
    mask[0, :] = 255
    return img, mask


@pytest.fixture()
def voc_dir(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = []
    for i, (h, w) in enumerate([(48, 64), (64, 64), (80, 60), (50, 70), (64, 48), (40, 40)]):
        img, mask = scene(h, w, i)
        name = f"2007_{i:06d}"
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg")
        m = Image.fromarray(mask)
        if i % 2:
            m = m.convert("P")
            m.putpalette(voc_palette())
        m.save(root / "SegmentationClass" / f"{name}.png")
        names.append(name)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[:5]) + "\n")
    return root


@pytest.mark.parametrize("h, w, c, size", [(4, 5, 37, (30, 41)), (14, 14, 149, (333, 250)), (3, 2, 1, (7, 9)),
                                            (28, 28, 21, (20, 17)), (1, 1, 5, (4, 4)), (2, 9, 300, (64, 1))])
def test_upsample_argmax_interpolates_only_the_channels_that_can_win(h, w, c, size):
    """Pruned to each source cell's candidate channels (max_elements small forces it), the argmax picks the same
    maximum of the bilinearly upsampled scores as interpolating every channel; the index differs only where
    two channels tie (a channel twice here); max_elements bounds the rows done at once."""
    import torch

    g = torch.Generator().manual_seed(h * 100 + c)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 8, 2, 2, generator=g), size=(h, w), mode="bilinear")
    noise = 0.3 * torch.randn(h, w, 8, generator=g)
    features = torch.nn.functional.normalize(smooth[0].permute(1, 2, 0) + noise, dim=-1)
    scores = features @ torch.nn.functional.normalize(torch.randn(c, 8, generator=g), dim=-1).T
    if c > 1:
        scores[..., -1] = scores[..., 0]  # an exact tie everywhere
    full = torch.nn.functional.interpolate(scores.permute(2, 0, 1)[None], size=size, mode="bilinear",
                                           align_corners=False)[0]
    for max_elements in (1, 1 << 24):
        picked = upsample_argmax(scores, size, max_elements=max_elements)
        assert picked.shape == size and picked.dtype == torch.int64
        torch.testing.assert_close(full.gather(0, picked[None])[0], full.amax(0), rtol=0, atol=1e-6)
        assert ((picked == full.argmax(0)) | (picked == c - 1) | (picked == 0)).all()


def test_segment_api_without_and_with_segmenter(tiny_model):
    img = scene(70, 90, 0)[0]
    mask = leopart.segment(img, model=tiny_model, k=4, resolution=64)
    assert mask.shape == (70, 90) and mask.dtype == np.int64 and mask.min() >= 0
    with pytest.raises(LeopartError, match=r"larger than the number of patches \(20\)"):  # 64 x 80: 4 x 5 patches
        leopart.segment(img, model=tiny_model, k=21, resolution=64)
    with pytest.raises(LeopartError, match=r"larger than the number of patches \(16\)"):
        leopart.segment(img, model=tiny_model, k=17, resolution=64, keep_aspect=False)



def test_keep_aspect_sizes_keep_the_shorter_side_and_round_to_patches():
    assert keep_aspect_size(70, 90, 64, 16) == (64, 80)  # 64 x 82.3 -> 64 x 80
    assert keep_aspect_size(3000, 4000, 448, 16) == (448, 592)  # 448 x 597.3
    assert keep_aspect_size(4000, 3000, 448, 14) == (602, 448)  # 597.3 -> 43 patches of 14
    assert keep_aspect_size(1000, 1000, 448, 16) == (448, 448)
    assert keep_aspect_size(10, 150, 32, 16) == (32, 480)  # 15:1
    assert keep_aspect_size(10, 1000, 32, 16) == (32, 512)  # 100:1 is squeezed to 16:1
    with pytest.raises(LeopartError, match="resolution 40 is not a positive multiple of the patch size 16"):
        keep_aspect_size(70, 90, 40, 16)


def test_segment_keeps_the_aspect_ratio_unless_asked_for_the_square(tiny_model, tiny_model_dir, tmp_path):
    """The model sees a 48 x 144 image at 32 x 96 (with keep_aspect=False, the paper's square: 32 x 32), a 100:1
    strip squeezed to 16:1; masks are at the image's own size. `leopart segment` does the same, --square the
    square."""
    img = scene(48, 144, 5)[0]
    strip = np.zeros((340, 20, 3), np.uint8)
    seen = []
    hook = tiny_model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        kept = leopart.segment(img, model=tiny_model, k=3, resolution=32)
        square = leopart.segment(img, model=tiny_model, k=3, resolution=32, keep_aspect=False)
        assert leopart.segment(strip, model=tiny_model, k=3, resolution=32).shape == (340, 20)
    finally:
        hook.remove()
    assert seen == [(1, 3, 32, 96), (1, 3, 32, 32), (1, 3, 512, 32)]
    assert square.shape == kept.shape == (48, 144) and not np.array_equal(square, kept)
    for bad in ("yes", 1):
        with pytest.raises(LeopartError, match="keep_aspect must be True or False"):
            leopart.segment(img, model=tiny_model, k=3, resolution=32, keep_aspect=bad)
    with pytest.raises(LeopartError, match="resolution 40 is not a positive multiple of the patch size 16"):
        leopart.segment(img, model=tiny_model, k=3, resolution=40)

    Image.fromarray(img).save(tmp_path / "wide.png")
    base = ["segment", str(tmp_path / "wide.png"), "--model", str(tiny_model_dir), "--k", "3", "--resolution", "32"]
    for flag, expected in (([], kept), (["--keep-aspect"], kept), (["--square"], square)):
        r = CliRunner().invoke(main, [*base, *flag, "-o", str(tmp_path / "out")])
        assert r.exit_code == 0, r.output
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "wide_mask.png")), expected), flag


def test_features_that_cannot_fit_in_memory_fail_before_any_is_computed(tiny_model, monkeypatch):
    from leopart import device

    segment = sys.modules["leopart.segment"]
    monkeypatch.setattr(device, "host_memory_available", lambda: 2 * 16 * 64 * 4 - 1)  # 2 images, 4x4 patches
    monkeypatch.setattr(segment, "iter_batches", lambda *a, **k: pytest.fail("features computed before the check"))
    with pytest.raises(LeopartError, match="the patch features of 2 images take .* GiB of memory available here"):
        segment.dense_features([random_image(64, 64)] * 2, tiny_model, 64)
    embed = sys.modules["leopart.embed"]
    monkeypatch.setattr(embed, "iter_batches", lambda *a, **k: pytest.fail("features computed before the check"))
    with pytest.raises(LeopartError, match="the features of 2 images take .* leopart.iter_embeddings"):
        leopart.embed([random_image(64, 64)] * 2, model=tiny_model, resolution=64)
    monkeypatch.undo()
    monkeypatch.setattr(device, "host_memory_available", lambda: 2 * 16 * 64 * 4)  # exactly fits
    assert leopart.embed([random_image(64, 64)] * 2, model=tiny_model, resolution=64).shape == (2, 4, 4, 64)


def test_a_segmenter_fitted_elsewhere_says_to_pass_its_model(tiny_model, tiny_model_dir, tmp_path):
    dense = sys.modules["leopart.segment"].dense_features([scene(64, 64, 0)[0]], tiny_model, 64)
    seg, _ = sys.modules["leopart.segment"].fit_segmenter(dense, 3, params={"model": "/elsewhere/run/model",
                                                                             "image_resolution": 64})
    seg.save_pretrained(tmp_path / "seg")
    Image.fromarray(scene(64, 64, 1)[0]).save(tmp_path / "a.png")
    args = ["segment", str(tmp_path / "a.png"), "--segmenter", str(tmp_path / "seg"), "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {tmp_path / 'seg'} was fitted with the model /elsewhere/run/model, which is not on this machine: "
        "pass that model's folder or Hub id as --model (model=)"), r.output
    with pytest.raises(LeopartError, match="the segmenter was fitted with the model /elsewhere/run/model"):
        leopart.segment(tmp_path / "a.png", segmenter=tmp_path / "seg")
    r = CliRunner().invoke(main, [*args, "--model", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    # A foreground model only serves parts fitted on the image itself: with a segmenter it would be ignored.
    r = CliRunner().invoke(main, [*args, "--model", str(tiny_model_dir), "--fg-model", str(tiny_model_dir)])
    assert r.exit_code == 1 and r.output.startswith("Error: a segmenter already knows which parts are foreground")
    with pytest.raises(LeopartError, match="a segmenter already knows which parts are foreground"):
        leopart.segment(tmp_path / "a.png", model=tiny_model, segmenter=tmp_path / "seg", fg_model=tiny_model)


def test_fit_segmenter_takes_the_references_threshold_for_the_patch_size(tiny_model):
    """fit_segmenter (and leopart.segment without a segmenter) cut the CD graph at the reference's threshold for the
    features' patch size, as `leopart merge` and `leopart eval` do: 0.09 for /16, 0.07 for /8; it was 0.07 for every
    model. Features that do not say their patch size keep merge's 0.07; an explicit threshold wins."""
    segment = sys.modules["leopart.segment"]
    torch.manual_seed(0)
    patch8 = leopart.LeopartViT(leopart.LeopartConfig(arch="test_vit", img_size=64, num_prototypes=10,
                                                      proj_hidden_dim=32, proj_dim=16,
                                                      backbone_kwargs={"patch_size": 8})).eval()
    images = [scene(64, 64, seed)[0] for seed in range(2)]
    for model, expected in [(tiny_model, 0.09), (patch8, 0.07)]:
        dense = segment.dense_features(images, model, 64)
        assert dense.patch_size == model.patch_size
        assert segment.fit_segmenter(dense, 3)[0].params["weight_threshold"] == expected
    unsized = segment.DenseFeatures(dense.names, dense.features, dense.foreground)
    assert segment.fit_segmenter(unsized, 3)[0].params["weight_threshold"] == 0.07
    assert segment.fit_segmenter(dense, 3, weight_threshold=0.2)[0].params["weight_threshold"] == 0.2


def test_segment_cli_refuses_more_objects_than_a_png_holds(tmp_path):
    """A palette PNG holds ids 0..255: a segmenter with more objects is refused before any model loads."""
    from leopart.merge import Segmenter

    k = 300
    Segmenter(torch.randn(k, 64), torch.arange(k), torch.ones(k, dtype=torch.bool),
              params={"model": "no-such-model", "image_resolution": 64}).save_pretrained(tmp_path / "seg")
    Image.fromarray(random_image(64, 64)).save(tmp_path / "a.png")
    r = CliRunner().invoke(main, ["segment", str(tmp_path / "a.png"), "--segmenter", str(tmp_path / "seg"),
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {tmp_path / 'seg'} merges its parts into 299 objects, "
                                                    "more than the 255 a palette PNG mask can hold"), r.output
    assert not (tmp_path / "out").exists()


def test_segment_cli_writes_mask_and_overlay(tiny_model_dir, tmp_path):
    Image.fromarray(scene(70, 90, 1)[0]).save(tmp_path / "a.jpg")
    Image.fromarray(random_image(50, 40)).convert("L").save(tmp_path / "b.png")
    Image.fromarray(random_image(10, 12)).save(tmp_path / "icon.png")  # smaller than a patch: resized like any
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["segment", str(tmp_path / "a.jpg"), str(tmp_path / "b.png"),
                                  str(tmp_path / "icon.png"), "--model", str(tiny_model_dir), "--k", "3",
                                  "--resolution", "64", "--output", str(out)])
    assert r.exit_code == 0, r.output
    for stem, size in (("a", (90, 70)), ("b", (40, 50)), ("icon", (12, 10))):
        m = Image.open(out / f"{stem}_mask.png")
        assert m.mode == "P" and m.size == size
        assert m.getpalette()[3:6] == [128, 0, 0]  # VOC colour of id 1
        o = Image.open(out / f"{stem}_overlay.png")
        assert o.mode == "RGB" and o.size == size


def test_segment_cli_writes_in_the_background_what_the_api_gives(tiny_model, tiny_model_dir, tmp_path):
    """Decoding ahead and writing behind change nothing in the files; --no-overlay writes the masks alone, and
    a file that cannot be written stops the run with one line naming it."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(scene(48 + 8 * i, 64, i)[0]).save(images / f"{i}.png")
    base = ["segment", str(images), "--model", str(tiny_model_dir), "--k", "3", "--resolution", "64"]
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and "wrote 12 files" in r.output, r.output
    for i in range(6):
        expected = leopart.segment(images / f"{i}.png", model=tiny_model, k=3, resolution=64)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i}_mask.png")), expected)
        overlay = overlay_image(Image.open(images / f"{i}.png"), expected)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i}_overlay.png")), np.asarray(overlay))

    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "masks"), "--no-overlay"])
    assert r.exit_code == 0 and "wrote 6 files" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [f"{i}_mask.png" for i in range(6)]
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "masks"), "--no-overlay", "--skip-existing"])
    assert r.exit_code == 0 and "skipping 6 of 6 inputs" in r.output, r.output

    (tmp_path / "bad" / "3_mask.png").mkdir(parents=True)  # a folder where a mask must go
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "bad")])
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip() and "segment:" not in line]
    assert lines == [f"Error: cannot write {tmp_path / 'bad' / '3_mask.png'}: Is a directory"], r.output
    assert not [p for p in (tmp_path / "bad").iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_segment_cli_masks_a_sideways_phone_photo_as_it_is_shown(tiny_model_dir, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # shown rotated 90 degrees counter-clockwise
    Image.fromarray(scene(64, 96, 3)[0]).save(tmp_path / "phone.jpg", exif=exif)
    r = CliRunner().invoke(main, ["segment", str(tmp_path / "phone.jpg"), "--model", str(tiny_model_dir), "--k", "3",
                                  "--resolution", "64", "--output", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for name in ("phone_mask.png", "phone_overlay.png"):
        assert Image.open(tmp_path / name).size == (64, 96)  # upright: 64 wide, 96 high


def test_overlay_tints_objects_and_leaves_background():
    from leopart.segment import overlay_image

    image = random_image(30, 40, seed=3)
    mask = np.zeros((30, 40), dtype=np.int64)
    mask[5:20, 10:30], mask[22:, :8] = 1, 7
    got = np.asarray(overlay_image(Image.fromarray(image).convert("L"), mask, alpha=0.3)).astype(float)
    base = np.asarray(Image.fromarray(image).convert("L").convert("RGB")).astype(float)
    colours = np.array(voc_palette(), dtype=float).reshape(256, 3)[mask]
    want = np.where(mask[..., None] > 0, 0.7 * base + 0.3 * colours, base)
    assert np.abs(got - want).max() <= 1.0  # uint8 rounding
    assert np.array_equal(got[mask == 0], base[mask == 0])


def test_segment_cli_one_liner_writes_to_current_folder(tiny_model_dir, tmp_path, monkeypatch):
    """`leopart segment img.jpg`, the documented one-liner, needs no --output."""
    Image.fromarray(scene(64, 64, 2)[0]).save(tmp_path / "img.jpg")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["segment", "img.jpg", "--model", str(tiny_model_dir), "--resolution", "64"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.glob("img_*.png")) == ["img_mask.png", "img_overlay.png"]
    assert "wrote 2 files to ." in r.output


def test_segment_cli_rerun_in_its_own_output_folder_leaves_its_outputs_out(tiny_model_dir, tmp_path):
    """`leopart segment photos/ -o photos/` twice: the second run must not segment (or overwrite as inputs)
    the masks and overlays of the first."""
    for i in range(2):
        Image.fromarray(scene(64, 64, i)[0]).save(tmp_path / f"{i}.jpg")
    args = ["segment", str(tmp_path), "--model", str(tiny_model_dir), "--resolution", "64", "--output", str(tmp_path)]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = sorted(p.name for p in tmp_path.iterdir())
    assert first == ["0.jpg", "0_mask.png", "0_overlay.png", "1.jpg", "1_mask.png", "1_overlay.png"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "leaving out 4 inputs that this command writes" in r.output and "wrote 4 files" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == first


def test_segment_cli_skip_existing_finishes_an_interrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(scene(64, 64, i)[0]).save(images / f"{i}.png")
    out = tmp_path / "out"
    args = ["segment", str(images), "--model", str(tiny_model_dir), "--resolution", "64", "--output", str(out)]
    calls = interrupt_at_call(monkeypatch, sys.modules["leopart.segment"], "segment", 2)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 130 and "Stopped after 1 of 3 images; rerun with --skip-existing" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["0_mask.png", "0_overlay.png"]
    first = (out / "0_mask.png").stat().st_mtime_ns

    r = CliRunner().invoke(main, [*args, "--skip-existing"])
    assert r.exit_code == 0, r.output
    assert "skipping 1 of 3 inputs" in r.output and "wrote 4 files" in r.output and len(calls) == 4
    assert len(list(out.iterdir())) == 6 and (out / "0_mask.png").stat().st_mtime_ns == first

    # Nothing left to do: the model is not even loaded (this one does not exist).
    r = CliRunner().invoke(main, [*args[:2], "--model", str(tmp_path / "no-model"), "--output", str(out),
                                  "--skip-existing"])
    assert r.exit_code == 0 and "skipping 3 of 3 inputs" in r.output, r.output


def test_cluster_merge_segment_chain(tiny_model_dir, voc_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    images = voc_dir / "JPEGImages"
    r = runner.invoke(main, ["cluster", str(images), "--model", str(tiny_model_dir), "--k", "6",
                             "--resolution", "64", "--output", str(tmp_path / "clusters")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "clusters" / "config.json").read_text())
    assert config["k"] == 6 and len(config["names"]) == 6
    r = runner.invoke(main, ["merge", str(tmp_path / "clusters"), "--output", str(tmp_path / "seg"),
                             "--weight-threshold", "0.01"])
    assert r.exit_code == 0, r.output
    seg = leopart.Segmenter.from_pretrained(tmp_path / "seg")
    assert seg.k == 6 and seg.part_to_object.shape == (6,) and seg.params["weight_threshold"] == 0.01
    r = runner.invoke(main, ["merge", str(tmp_path / "clusters"), "--output", str(tmp_path / "seg_default")])
    assert r.exit_code == 0, r.output  # the reference's threshold for parts of a /16 model, as leopart eval uses
    assert leopart.Segmenter.from_pretrained(tmp_path / "seg_default").params["weight_threshold"] == 0.09
    # `leopart info` describes what cluster and merge wrote, and what they were fitted with.
    info = {name: dict(re.split(r"\s{2,}", line, maxsplit=1)  # "key   value" rows
                       for line in runner.invoke(main, ["info", str(tmp_path / name)]).output.splitlines())
            for name in ("clusters", "seg")}
    assert info["clusters"]["parts"] == "6" and info["clusters"]["images"] == "6", info
    assert info["clusters"]["model"] == str(tiny_model_dir.resolve()) and info["clusters"]["resolution"] == "64"
    assert info["seg"]["segmenter"] == str(tmp_path / "seg") and info["seg"]["parts"] == "6", info
    assert info["seg"]["objects"] == str(seg.n_objects) and info["seg"]["CD weight threshold"] == "0.01", info
    assert info["seg"]["foreground parts"] == str(int(seg.foreground.sum())) and info["seg"]["fitted on"] == "6 images"
    r = runner.invoke(main, ["segment", str(images / "2007_000002.jpg"), "--segmenter", str(tmp_path / "clusters")])
    assert r.exit_code == 1 and r.output.strip() == (f"Error: {tmp_path / 'clusters'} holds leopart part clusters, "
                                                     f"not a leopart segmenter: fit one with `leopart merge "
                                                     f"{tmp_path / 'clusters'} -o SEGMENTER`"), r.output
    r = runner.invoke(main, ["segment", str(images / "2007_000002.jpg"), "--model", str(tiny_model_dir),
                             "--segmenter", str(tmp_path / "seg"), "--resolution", "64", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    mask = np.asarray(Image.open(tmp_path / "m" / "2007_000002_mask.png"))
    assert mask.shape == (80, 60) and mask.max() <= seg.n_objects
    # Without --model and --resolution the segmenter's own are used (the tiny model at 64 px), not vits16 at 448.
    assert config["model"] == str(tiny_model_dir.resolve())  # absolute: it resolves from any folder
    r = runner.invoke(main, ["segment", str(images / "2007_000002.jpg"), "--segmenter", str(tmp_path / "seg"),
                             "-o", str(tmp_path / "m2")])
    assert r.exit_code == 0, r.output
    for name in ("2007_000002_mask.png", "2007_000002_overlay.png"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "m2" / name).read_bytes()
    r = runner.invoke(main, ["segment", str(images / "2007_000002.jpg"), "--model", str(tiny_model_dir),
                             "--head", str(tmp_path / "seg"), "--resolution", "64"])
    assert r.exit_code == 1 and "--head" in r.output and "--resolution" in r.output, r.output

    def no_features(*args, **kwargs):
        raise AssertionError("k was checked only after computing the features")

    monkeypatch.setattr(sys.modules["leopart.segment"], "dense_features", no_features)
    r = runner.invoke(main, ["cluster", str(images), "--model", str(tiny_model_dir), "--k", "500",
                             "--resolution", "64", "--output", str(tmp_path / "too_many")])
    assert r.exit_code == 1 and "larger than the number of patches (96)" in r.output, r.output
    assert not (tmp_path / "too_many").exists()
    r = runner.invoke(main, ["merge", str(tmp_path / "clusters_typo"), "--output", str(tmp_path / "seg2")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: no such folder: {tmp_path / 'clusters_typo'}", r.output
    a_file = sorted(images.iterdir())[0]  # a file where a folder belongs is named as such (was "no such folder")
    r = runner.invoke(main, ["merge", str(a_file), "--output", str(tmp_path / "seg2")])
    assert r.output.strip() == f"Error: {a_file} is a file: expected the folder of leopart part clusters", r.output
    r = runner.invoke(main, ["segment", str(a_file), "--segmenter", str(a_file), "--output", str(tmp_path / "o")])
    assert r.output.strip() == f"Error: {a_file} is a file: expected the folder of a leopart segmenter", r.output


def test_eval_cli_json(tiny_model_dir, voc_dir, tmp_path):
    out = tmp_path / "res.json"
    r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "8", "--k", "3",
                                  "--fully-unsupervised", "--protocol", "cosine", "--fu-k", "6", "--resolution", "64",
                                  "--json",
                                  str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["n_images"] == 5 and res["num_classes"] == 3
    assert set(res["overclustering"]) == {"8", "3"}
    for v in [*res["overclustering"].values(), res["fully_unsupervised"]]:
        assert 0.0 <= v <= 100.0
    assert res["fully_unsupervised_details"]["bg_share"] in res["fully_unsupervised_details"]["bg_share_sweep"]
    assert "k-means k=8 (over-clustering, many-to-one)" in r.output
    assert "k-means k=3 (Hungarian, one-to-one)" in r.output
    details = res["fully_unsupervised_details"]
    assert details["weight_threshold"] == 0.09 and details["cd_resolution"] == 1.0  # the paper's, for a /16 model
    r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "3",
                                  "--fully-unsupervised", "--protocol", "cosine", "--fu-k", "6", "--resolution", "64",
                                  "--json",
                                  str(out),
                                  "--weight-threshold", "0.2", "--cd-resolution", "2"])
    assert r.exit_code == 0, r.output
    details = json.loads(out.read_text())["fully_unsupervised_details"]
    assert details["weight_threshold"] == 0.2 and details["cd_resolution"] == 2.0
    assert "best of 5 on this split" in r.output  # the default sweep picks on the scored images, and says so
    # A fixed background share (say, the one chosen on the train split): no sweep over the scored images.
    r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "3",
                                  "--fully-unsupervised", "--protocol", "cosine", "--fu-k", "6", "--resolution", "64",
                                  "--json",
                                  str(out),
                                  "--bg-share", "0.6"])
    assert r.exit_code == 0, r.output
    details = json.loads(out.read_text())["fully_unsupervised_details"]
    assert details["bg_share"] == 0.6 and details["bg_share_sweep"] == [0.6]
    assert "CBFE+CD, bg 0.60, " in r.output and "best of" not in r.output
    for bad, message in [(["--bg-share", "1.2"], "1.2 is not in the range 0<=x<=1"),
                         (["--k", "3", "--bg-share", "0.6"], "serve the fully unsupervised protocol only")]:
        r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), *bad])
        assert r.exit_code != 0 and message in r.output, r.output


def test_eval_n_init_scores_the_lowest_inertia_run(tiny_model_dir, voc_dir):
    from leopart.cluster import cluster
    from leopart.evaluate import evaluate, read_voc
    from leopart.segment import dense_features

    model = leopart.from_pretrained(str(tiny_model_dir))
    dense = dense_features(read_voc(voc_dir, "val").images, model, 64, progress=False)
    # cluster(n_init=3, seed=0) runs seeds 0, 1, 2 and keeps the lowest inertia.
    inertia = [cluster(dense.features, 3, iters=10, seed=s, progress=False).inertia for s in range(3)]
    best_seed = int(np.argmin(inertia))
    args = dict(ks=(3,), resolution=64, mask_size=32, iters=10, protocol="cosine", progress=False)
    restarts = evaluate(voc_dir, model, n_init=3, seed=0, **args)["overclustering"]["3"]
    assert restarts == evaluate(voc_dir, model, seed=best_seed, **args)["overclustering"]["3"]
    r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "3",
                                  "--resolution", "64", "--n-init", "3", "--protocol", "cosine"])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["eval", str(voc_dir), "--n-init", "0"]).exit_code == 2


def test_eval_and_cluster_cli_run_kmeans_where_the_model_runs(tiny_model_dir, voc_dir, tmp_path, monkeypatch):
    """k-means gets the resolved device (cuda when available) like the model, not None, which would keep it on
    the CPU where the features are collected."""
    import sys

    from leopart.device import default_device
    from leopart.evaluate import evaluate

    kmeans_module = sys.modules["leopart.cluster"]  # the package's `cluster` (and `evaluate`) is the function
    seen, real = [], kmeans_module.cluster

    def spy(*args, device=None, **kwargs):
        seen.append(device)
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(sys.modules["leopart.evaluate"], "cluster", spy)
    monkeypatch.setattr(kmeans_module, "cluster", spy)  # where the CLI imports it from
    model = leopart.from_pretrained(str(tiny_model_dir))
    evaluate(voc_dir, model, ks=(3,), resolution=64, mask_size=32, iters=2, seeds=1, progress=False)
    r = CliRunner().invoke(main, ["cluster", str(voc_dir / "JPEGImages"), "--model", str(tiny_model_dir), "--k", "3",
                                  "--resolution", "64", "--iters", "2", "-o", str(tmp_path / "parts")])
    assert r.exit_code == 0, r.output
    assert seen == [default_device(None)] * 2


def test_eval_num_classes_and_bad_layouts(tiny_model_dir, voc_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    base = ["--model", str(tiny_model_dir), "--k", "4", "--resolution", "64"]
    r = runner.invoke(main, ["eval", str(voc_dir), *base, "--num-classes", "21", "--json", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a.json").read_text())["num_classes"] == 21
    # k above the number of patches (5 val images x 4 x 4): said before any feature is computed
    monkeypatch.setattr(sys.modules["leopart.evaluate"], "dense_features", None)
    r = runner.invoke(main, ["eval", str(voc_dir), *base, "--k", "81"])
    assert r.exit_code == 1 and "k=81 is larger than the number of patches (80)" in r.output, r.output
    monkeypatch.undo()
    # a mask whose size does not match its image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(voc_dir / "SegmentationClass" / "2007_000001.png")
    r = runner.invoke(main, ["eval", str(voc_dir), *base, "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 1 and "is 10x10 but its image is 64x64" in r.output
    assert not (tmp_path / "b.json").exists()
    r = runner.invoke(main, ["eval", str(tmp_path), *base])  # the folder above VOC2012/, as VOCdevkit/ is
    assert r.exit_code == 1 and f"(did you mean {voc_dir}?)" in r.output, r.output
    empty = tmp_path / "empty"
    (empty / "JPEGImages").mkdir(parents=True)
    (empty / "SegmentationClass").mkdir()
    r = runner.invoke(main, ["eval", str(empty), *base])
    assert r.exit_code == 1 and "no images to evaluate" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "nowhere"), *base])
    assert r.exit_code == 1 and "not a VOC-layout folder" in r.output
    r = runner.invoke(main, ["eval", str(voc_dir), *base, "--json", str(tmp_path / "x.txt")])
    assert r.exit_code == 1 and "--json must name a .json file" in r.output
    r = runner.invoke(main, ["eval", str(voc_dir), *base, "--fg-model", str(tiny_model_dir)])
    assert r.exit_code == 1 and "serves the fully unsupervised protocol only: add --fully-unsupervised" in r.output
    # a split file saved by Windows Notepad (byte-order mark, CRLF) lists the same names
    val = (voc_dir / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (tmp_path / "notepad.txt").write_bytes(("\ufeff" + "\r\n".join(val) + "\r\n").encode())
    assert read_voc(voc_dir, str(tmp_path / "notepad.txt")).names == val
    # A split that is not listed fails, naming the lists (falling back to every mask would mix the splits in);
    # only a folder without any lists is scored whole.
    r = runner.invoke(main, ["eval", str(voc_dir), *base, "--split", "vall"])
    assert r.exit_code == 1 and f"no split 'vall' in {voc_dir / 'ImageSets' / 'Segmentation'} (it lists: val)" \
        in r.output, r.output
    (voc_dir / "ImageSets" / "Segmentation" / "val.txt").unlink()
    masked = sorted(p.stem for p in (voc_dir / "SegmentationClass").glob("*.png"))
    assert read_voc(voc_dir, "val").names == masked and len(masked) > len(val)


def test_voc_trainaug_masks_and_the_reference_codes_layout(tmp_path):
    """SBD's trainaug masks live in SegmentationClassAug/ (official masks first), and the reference code's own
    folder (images/, sets/, SegmentationClass/, SegmentationClassAug/) reads as VOCdevkit's does."""
    def layout(root, image_dir, list_dir):
        for folder in (image_dir, "SegmentationClass", "SegmentationClassAug", list_dir):
            (root / folder).mkdir(parents=True)
        for i in range(4):
            img, mask = scene(32, 32, i)
            Image.fromarray(img).save(root / image_dir / f"2008_{i:06d}.jpg")
            Image.fromarray(mask).save(root / "SegmentationClassAug" / f"2008_{i:06d}.png")
        Image.fromarray(scene(32, 32, 0)[1]).save(root / "SegmentationClass" / "2008_000000.png")
        (root / list_dir / "trainaug.txt").write_text("".join(f"2008_{i:06d}\n" for i in range(4)))
        (root / list_dir / "val.txt").write_text("2008_000000\n")
        return root

    for image_dir, list_dir in (("JPEGImages", "ImageSets/Segmentation"), ("images", "sets")):
        root = layout(tmp_path / image_dir, image_dir, list_dir)
        aug = read_voc(root, "trainaug")
        assert aug.images == [root / image_dir / f"2008_{i:06d}.jpg" for i in range(4)]
        assert aug.masks == [root / "SegmentationClass" / "2008_000000.png",
                             *(root / "SegmentationClassAug" / f"2008_{i:06d}.png" for i in range(1, 4))]
        assert read_voc(root, "val").masks == [root / "SegmentationClass" / "2008_000000.png"]
        with pytest.raises(LeopartError, match=f"no split 'train' in {root / list_dir}"):
            read_voc(root, "train")
        (root / "SegmentationClassAug" / "2008_000003.png").unlink()
        with pytest.raises(LeopartError, match="no mask SegmentationClass/2008_000003.png nor "
                                               "SegmentationClassAug/2008_000003.png for image 2008_000003.jpg"):
            read_voc(root, "trainaug")


def test_evaluate_api_checks_its_settings_before_any_feature(tiny_model, voc_dir, monkeypatch):
    from leopart.evaluate import evaluate

    monkeypatch.setattr(sys.modules["leopart.evaluate"], "dense_features", None)  # called: a TypeError
    bad = [(dict(ks=()), "nothing to evaluate"), (dict(ks=(4, 0)), "k must be a positive integer, not 0"),
           (dict(ks=4.5), "k must be a positive integer, not 4.5"),
           (dict(fully_unsupervised=True, fu_k=0), "fu_k must be a positive integer, not 0"),
           (dict(mask_size=0), "mask_size must be a positive integer, not 0"),
           (dict(n_init=0), "n_init must be a positive integer"), (dict(iters=-1), "iters must be >= 0, not -1"),
           (dict(fg_model=tiny_model), "serves the fully unsupervised protocol only"),  # ran a second model for nothing
           (dict(bg_shares=(0.6,)), "serve the fully unsupervised protocol only"),
           (dict(fully_unsupervised=True, protocol="cosine", bg_shares=()), "bg_shares is empty"),
           (dict(fully_unsupervised=True, protocol="cosine", bg_shares=(0.6, 1.5)),
            r"a CBFE background share lies in \[0, 1\], not 1.5"),
           (dict(fully_unsupervised=True, protocol="cosine", bg_shares="0.6"), "a CBFE background share lies in"),
           # Each fully unsupervised pipeline's own settings are refused by the other.
           (dict(fully_unsupervised=True, bg_shares=(0.6,)), "--bg-share .* serves the fully unsupervised pipeline "
                                                             "of --protocol cosine, not of --protocol reference"),
           (dict(fully_unsupervised=True, cd_resolution=2.0), "--cd-resolution .* of --protocol cosine"),
           (dict(fully_unsupervised=True, protocol="cosine", markov_time=0.4), "--markov-time .* of --protocol ref"),
           (dict(fully_unsupervised=True, protocol="cosine", cbfe_k=50), "--cbfe-k .* of --protocol reference"),
           (dict(cd_runs=3), "--cd-runs .* serves the fully unsupervised protocol only"),
           (dict(fully_unsupervised=True, markov_time=-1.0), "markov_time must be a positive number, not -1.0"),
           (dict(fully_unsupervised=True, cd_runs=0), "cd_runs must be a positive integer, not 0"),
           # Settings of the wrong kind, before any feature (some failed only after the features, as TypeErrors).
           (dict(iters="3"), "^iters must be an integer, not '3'$"), (dict(seed="0"), "^seed must be an integer"),
           (dict(batch_size=0), "^batch_size must be a positive integer, not 0$"),
           (dict(fully_unsupervised=True, weight_threshold="0.1"), "^weight_threshold must be a number, not '0.1'$"),
           (dict(fully_unsupervised=True, weight_threshold=2), r"^weight_threshold must lie in \[0, 1\], not 2$"),
           # The reference protocol clusters a train split with the scored one: this folder lists none.
           (dict(fully_unsupervised=True), "no split 'train'")]
    for settings, match in bad:
        with pytest.raises(LeopartError, match=match):
            evaluate(voc_dir, tiny_model, resolution=64, **settings)
    monkeypatch.undo()
    one_k = evaluate(voc_dir, tiny_model, ks=4, resolution=64, progress=False)  # a single k needs no tuple
    assert list(one_k["overclustering"]) == ["4"]
    numpy_ks = evaluate(voc_dir, tiny_model, ks=np.array([4, 5]), resolution=64, progress=False)
    assert list(numpy_ks["overclustering"]) == ["4", "5"]


@pytest.mark.parametrize("given", ["folder", "list"])
def test_segment_cli_keeps_the_subfolders_of_a_folder_input(tiny_model_dir, tmp_path, given):
    """Cameras restart their numbering: photos/a/IMG_0001.JPG and photos/b/IMG_0001.JPG get masks in
    out/a/ and out/b/ rather than one file written twice (or an error). A list file's entries keep their
    folders below the list's own; one outside it (../loose.png) is written to OUTPUT itself, never above it."""
    for d in ("a", "b/deeper"):
        (tmp_path / "photos" / d).mkdir(parents=True)
        Image.fromarray(random_image(48, 40)).save(tmp_path / "photos" / d / "IMG_0001.jpg")
    Image.fromarray(random_image(40, 48)).save(tmp_path / "loose.png")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "photos"), str(tmp_path / "loose.png")]
    if given == "list":
        (tmp_path / "photos" / "todo.txt").write_text("a/IMG_0001.jpg\nb/deeper/IMG_0001.jpg\n../loose.png\n")
        inputs = [str(tmp_path / "photos" / "todo.txt")]
    args = ["segment", *inputs, "--model", str(tiny_model_dir), "--k", "2", "--resolution", "64", "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["a/IMG_0001_mask.png", "a/IMG_0001_overlay.png", "b/deeper/IMG_0001_mask.png",
                       "b/deeper/IMG_0001_overlay.png", "loose_mask.png", "loose_overlay.png"]
    r = CliRunner().invoke(main, [*args, "--skip-existing"])
    assert r.exit_code == 0 and "skipping 3 of 3 inputs" in r.output, r.output


def test_segment_cli_bad_inputs(tiny_model_dir, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        Image.fromarray(random_image(64, 64)).save(tmp_path / d / "same.png")
    (tmp_path / "text.jpg").write_text("no image")
    runner = CliRunner()
    base = ["--model", str(tiny_model_dir), "--resolution", "64", "--output", str(tmp_path / "out")]
    r = runner.invoke(main, ["segment", str(tmp_path / "x"), str(tmp_path / "y"), *base])
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {tmp_path / 'x' / 'same.png'} and {tmp_path / 'y' / 'same.png'} would both write "
        f"{tmp_path / 'out' / 'same_mask.png'}: rename one or segment them into different --output folders"), r.output
    r = runner.invoke(main, ["segment", str(tmp_path / "text.jpg"), *base])
    assert r.exit_code == 1 and "cannot read image" in r.output
    r = runner.invoke(main, ["segment", str(tmp_path / "x"), *base, "--segmenter", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no segmenter folder" in r.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_feature_cache_resumes_and_matches(tiny_model, voc_dir, tmp_path, monkeypatch):
    """An interrupted cached run keeps its finished files; the rerun computes only the rest, and the
    features match an uncached run's."""
    import sys

    import torch

    from leopart import serialization

    segment = sys.modules["leopart.segment"]  # the module: leopart.segment itself is the function
    monkeypatch.setattr(serialization, "CACHE_SHARD", 2)  # 6 images -> 3 files
    images = sorted((voc_dir / "JPEGImages").glob("*.jpg"))
    plain = segment.dense_features(images, tiny_model, 64, batch_size=4)
    computed, real = [], segment._dense_batch

    def interrupted_after_one(batch, *args):
        if computed:
            raise KeyboardInterrupt
        computed.append(len(batch))
        return real(batch, *args)

    cache = tmp_path / "cache"
    monkeypatch.setattr(segment, "_dense_batch", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        segment.dense_features(images, tiny_model, 64, batch_size=4, cache_dir=cache)
    files = sorted(cache.glob("*/*"))
    assert [p.name for p in files] == ["shard_00000.safetensors"]  # no half-written second file

    def counted(batch, *args):
        computed.append(len(batch))
        return real(batch, *args)

    monkeypatch.setattr(segment, "_dense_batch", counted)
    resumed = segment.dense_features(images, tiny_model, 64, batch_size=4, cache_dir=cache)
    assert computed == [2, 2, 2]  # first run: file 0; rerun: files 1 and 2
    # Equal up to rounding (the uncached run used batches of 4, the cached one files of 2).
    torch.testing.assert_close(resumed.features, plain.features)
    assert torch.equal(resumed.foreground, plain.foreground)
    again = segment.dense_features(images, tiny_model, 64, batch_size=4, cache_dir=cache)
    assert computed == [2, 2, 2] and torch.equal(again.features, resumed.features)  # all from the cache

    # Another resolution or a changed image file gets a new cache folder, never stale features.
    segment.dense_features(images, tiny_model, 32, batch_size=4, cache_dir=cache)
    Image.fromarray(random_image(48, 64)).save(images[0])
    changed = segment.dense_features(images, tiny_model, 64, batch_size=4, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3 and not torch.equal(changed.features[0], plain.features[0])
    with pytest.raises(LeopartError, match="needs image files"):
        segment.dense_features([random_image()], tiny_model, 64, cache_dir=cache)


def test_cluster_and_eval_cli_share_the_cache_flag(tiny_model_dir, voc_dir, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    outputs = []
    for run in range(2):
        r = runner.invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "4", "--resolution", "64",
                                 "--cache", str(cache), "--json", str(tmp_path / f"e{run}.json")])
        assert r.exit_code == 0, r.output
        outputs.append(json.loads((tmp_path / f"e{run}.json").read_text())["overclustering"])
    assert outputs[0] == outputs[1] and len(list(cache.glob("*/shard_*.safetensors"))) == 1
    r = runner.invoke(main, ["cluster", str(voc_dir / "JPEGImages"), "--model", str(tiny_model_dir), "--k", "4",
                             "--resolution", "64", "--cache", str(cache), "--output", str(tmp_path / "clusters")])
    assert r.exit_code == 0, r.output
    assert len(list(cache.glob("*/shard_*.safetensors"))) == 2  # 6 images, not eval's 5: a folder of its own


def test_cbfe_cue_keeps_65_percent_of_the_attention_mass(tiny_model, voc_dir):
    # The reference's fully unsupervised code thresholds the attention at 65% of its mass for CBFE (training's
    # loss mask keeps 60%); a cue from a second model gets the same.
    from leopart.embed import iter_batches
    from leopart.foreground import foreground_mask
    from leopart.segment import dense_features

    images = sorted((voc_dir / "JPEGImages").iterdir())
    attn = torch.cat([a for _, _, a in iter_batches(images, tiny_model, 64, 4, torch.device("cpu"), attention=True)])
    expected = foreground_mask(attn, keep=0.65)
    assert not torch.equal(expected, foreground_mask(attn, keep=0.6))  # the test can tell the two apart
    assert torch.equal(dense_features(images, tiny_model, 64, progress=False).foreground, expected)
    assert torch.equal(dense_features(images, tiny_model, 64, fg_model=tiny_model, progress=False).foreground, expected)


def test_foreground_of_a_model_with_another_patch_size_lands_on_the_feature_grid(tiny_model, voc_dir):
    # The paper's ViT-B/8 parts took their foreground cue from a DINO ViT-S/16: a 2x coarser attention grid,
    # resampled to the features' (at 2x, bilinear > 0.5 keeps each patch's nearest coarse cell).
    from leopart.segment import dense_features

    torch.manual_seed(1)
    patch8 = leopart.LeopartViT(leopart.LeopartConfig(arch="test_vit", img_size=64, num_prototypes=10,
                                                      proj_hidden_dim=32, proj_dim=16,
                                                      backbone_kwargs={"patch_size": 8})).eval()
    images = sorted((voc_dir / "JPEGImages").iterdir())
    coarse = dense_features(images, tiny_model, 64, progress=False).foreground  # [B, 4, 4]: its own cue
    dense = dense_features(images, patch8, 64, fg_model=tiny_model, progress=False)
    assert dense.features.shape[1:3] == (8, 8) and coarse.shape[1:] == (4, 4)
    assert 0 < coarse.float().mean() < 1
    assert torch.equal(dense.foreground, coarse.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_standardise_and_project_matches_scikit_learn():
    # The reference protocol's k-means input: StandardScaler, then PCA (faiss's PCAMatrix, no whitening). Each
    # component may come out with either sign, which k-means does not see.
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from leopart.evaluate import standardise_and_project

    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=gen) * torch.linspace(0.1, 3, 12)
    tokens = (torch.randn(3, 20, 30, 12, generator=gen) @ mixing + 5).float()
    tokens[..., 4] = 2.0  # a constant dimension: StandardScaler leaves it at scale 1 (zero after centring)
    ours = standardise_and_project(tokens, 5, chunk=256)
    assert ours.shape == (3, 20, 30, 5)
    flat = tokens.reshape(-1, 12).double().numpy()
    theirs = PCA(5, svd_solver="full").fit_transform(StandardScaler().fit_transform(flat))
    ours = ours.reshape(-1, 5).double().numpy()
    signs = np.sign((ours * theirs).sum(0))
    np.testing.assert_allclose(ours * signs, theirs, atol=2e-4, rtol=1e-4)
    assert standardise_and_project(tokens[..., :3], 50).shape == (3, 20, 30, 3)  # never more than D components


def test_reference_protocol_fits_on_256_points_per_cluster_and_averages_seeds(tiny_model_dir, voc_dir, monkeypatch,
                                                                              tmp_path):
    ev = sys.modules["leopart.evaluate"]  # the package's `evaluate` is the function
    fitted = []
    real_cluster = ev.cluster

    def recording_cluster(x, k, **kwargs):
        fitted.append((x.shape, k, kwargs["metric"], kwargs["n_init"], kwargs["iters"], kwargs["seed"], kwargs["init"]))
        return real_cluster(x, k, **kwargs)

    monkeypatch.setattr(ev, "cluster", recording_cluster)
    model = leopart.from_pretrained(str(tiny_model_dir))
    res = ev.evaluate(voc_dir, model, ks=(3,), resolution=64, seeds=2, progress=False)  # 5 images x 16 patches
    # PCA to 50 dimensions; 3 x 256 = 768 > 80 points: all are fitted, from random points (faiss's start);
    # seeds 0 and 0 + n_init.
    assert model.embed_dim > 50
    assert fitted == [((80, 50), 3, "euclidean", 5, 100, seed, "random") for seed in (0, 5)]
    assert res["protocol"] == "reference" and len(res["overclustering_runs"]["3"]) == 2
    assert res["overclustering"]["3"] == pytest.approx(np.mean(res["overclustering_runs"]["3"]))
    # Above 256 points per cluster, a seeded sample is fitted and every token labelled.
    fitted.clear()
    tokens = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    km = ev.fit_kmeans(tokens, 2, ev.PROTOCOLS["reference"], seed=3, device="cpu", progress=False)
    assert fitted[0][0] == (512, 8) and km.labels.shape == (2000,)
    torch.testing.assert_close(km.labels, km.predict(tokens), rtol=0, atol=0)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "3", "--seeds", "2",
                                  "--resolution", "64", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "reference protocol (k-means scores: mean +- std of 2 seeds)" in r.output
    runs = json.loads(out.read_text())["overclustering_runs"]["3"]
    assert f"{np.mean(runs):.1f} +- {np.std(runs):.1f}" in r.output  # the spread over the seeds
    assert json.loads(out.read_text())["kmeans"]["seeds"] == 2
    with pytest.raises(LeopartError, match="protocol must be one of reference, cosine, not 'faiss'"):
        ev.evaluate(voc_dir, model, ks=(3,), resolution=64, protocol="faiss")
    with pytest.raises(LeopartError, match="seeds must be a positive integer"):
        ev.evaluate(voc_dir, model, ks=(3,), resolution=64, seeds=0)


@pytest.mark.parametrize("h, w, via", [(500, 375, 448), (333, 500, 448), (281, 500, 224), (64, 48, 64)])
def test_eval_masks_are_resized_as_the_reference_resized_them(h, w, via):
    """The reference resized masks to the input side (torchvision Resize, nearest) and then to 100 x 100
    (F.interpolate, nearest): the two roundings pick other source pixels than one direct resize."""
    import torch.nn.functional as F
    import torchvision.transforms as T

    from leopart.evaluate import resize_mask

    rng = np.random.default_rng(h)
    mask = rng.integers(0, 21, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.1] = 255
    at_input = T.Resize((via, via), interpolation=T.InterpolationMode.NEAREST)(Image.fromarray(mask))
    want = F.interpolate(torch.from_numpy(np.array(at_input))[None, None].float(), size=(100, 100))[0, 0]
    assert np.array_equal(resize_mask(mask, 100, via=via), want.long().numpy())


def test_eval_resizes_masks_through_the_input_side(tiny_model, voc_dir, monkeypatch):
    ev = sys.modules["leopart.evaluate"]
    seen = []
    real = ev.resize_mask
    monkeypatch.setattr(ev, "resize_mask", lambda m, size, via=None: seen.append((size, via)) or real(m, size, via))
    ev.evaluate(voc_dir, tiny_model, ks=(3,), resolution=64, seeds=1, progress=False)
    assert seen == [(100, 64)] * 5


def test_reference_protocol_resizes_images_bilinearly_as_the_reference(tiny_model, voc_dir, tmp_path, monkeypatch):
    """The reference's eval input: torchvision Resize((448, 448)) (bilinear on PIL), ToTensor, Normalize; leopart's
    own default (embed, the cosine protocol) stays bicubic. The feature cache tells the two apart."""
    import torchvision.transforms as T

    from leopart.data import IMAGENET_MEAN, IMAGENET_STD, to_tensor

    img = Image.fromarray(random_image(75, 61, seed=3))
    want = T.Compose([T.Resize((32, 48)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    torch.testing.assert_close(to_tensor(img, (32, 48), resample="bilinear"), want, rtol=0, atol=1e-6)
    assert not torch.allclose(to_tensor(img, (32, 48)), want, atol=1e-3)  # bicubic, the default
    ev = sys.modules["leopart.evaluate"]
    seen = []
    real = ev.dense_features
    monkeypatch.setattr(ev, "dense_features", lambda *a, **kw: seen.append(kw.get("resample")) or real(*a, **kw))
    for protocol in ("reference", "cosine"):
        ev.evaluate(voc_dir, tiny_model, ks=(3,), resolution=64, seeds=1, protocol=protocol, progress=False,
                    cache_dir=tmp_path / "cache")
    assert seen == ["bilinear", "bicubic"] and len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("protocol, below", [("reference", "many-to-one"), ("cosine", "one-to-one")])
def test_eval_matching_below_the_number_of_classes_follows_the_protocol(tiny_model_dir, voc_dir, monkeypatch, tmp_path,
                                                                       protocol, below):
    """The reference code matched one-to-one only at k = classes (sup_overcluster.py: many-to-one at any other k);
    leopart's cosine protocol matches one-to-one at every k <= classes. Both: many-to-one above."""
    ev = sys.modules["leopart.evaluate"]
    matched = []
    real = ev.hungarian_miou

    def recording(preds, targets, **kwargs):
        matched.append(kwargs["many_to_one"])
        return real(preds, targets, **kwargs)

    monkeypatch.setattr(ev, "hungarian_miou", recording)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(voc_dir), "--model", str(tiny_model_dir), "--k", "2", "--k", "3",
                                  "--k", "5", "--seeds", "1", "--protocol", protocol, "--resolution", "64",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["num_classes"] == 3
    assert matched == [below == "many-to-one", False, True]
    assert json.loads(out.read_text())["overclustering_matching"] == {"2": below, "3": "one-to-one",
                                                                      "5": "many-to-one"}
    kind = "many-to-one" if below == "many-to-one" else "Hungarian, one-to-one"
    assert f"k-means k=2 ({kind})" in r.output
    assert "k-means k=3 (Hungarian, one-to-one)" in r.output
    assert "k-means k=5 (over-clustering, many-to-one)" in r.output


def test_eval_table_counts_read_as_english():
    """The table's counts: 1 object and 1 image read singular, and a range of object counts over Infomap runs."""
    from leopart.evaluate import format_table

    cosine = {"n_images": 1, "num_classes": 3, "fully_unsupervised": 50.0,
              "fully_unsupervised_details": {"k": 4, "bg_share": 0.6, "n_objects": 1}}
    table = format_table(cosine, "mine")
    assert "(k=4, CBFE+CD, bg 0.60, 1 object)" in table and table.endswith("\n1 image, 3 classes")
    reference = {"n_images": 2, "num_classes": 3, "fully_unsupervised": 50.0, "fully_unsupervised_runs": [50.0],
                 "fully_unsupervised_details": {"pipeline": "reference", "k": 4, "cbfe_k": 10, "train_split": "train",
                                                "markov_time": 2.0, "n_objects": [1]}}
    assert "markov time 2, 1 object)" in format_table(reference, "mine")
    reference["fully_unsupervised_details"]["n_objects"], reference["fully_unsupervised_runs"] = [1, 3], [40.0, 60.0]
    table = format_table(reference, "mine")
    assert "markov time 2, 1-3 objects)" in table and table.endswith("2 images, 3 classes (fully unsupervised: "
                                                                     "mean +- std of 2 Infomap runs)")
