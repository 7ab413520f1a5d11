"""leopart.embed on every input type and every bad input, and the embed / info CLI."""
import re
import subprocess
import sys
import time

import click
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import TINY_ARCH, random_image
from PIL import Image
from safetensors import safe_open

import leopart
from leopart.cli import main
from leopart.data import IMAGENET_MEAN, IMAGENET_STD
from leopart.errors import LeopartError


def reference_tokens(model, pil: Image.Image, size: int) -> torch.Tensor:
    """timm's forward_features on an independently preprocessed image (PIL bicubic, ImageNet stats)."""
    x = np.asarray(pil.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    ref = timm.create_model(model.config.arch, num_classes=0, img_size=size)
    ref.load_state_dict({k[9:]: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    with torch.no_grad():
        t = ref.eval().forward_features(x)[0, 1:]
    return t.reshape(size // 16, size // 16, -1)


def test_embed_equals_timm(tiny_model):
    img = Image.fromarray(random_image(70, 90))
    feats = leopart.embed(img, model=tiny_model, resolution=64)
    assert feats.shape == (1, 4, 4, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[0], reference_tokens(tiny_model, img, 64), atol=1e-4, rtol=0)


def test_every_input_type_gives_the_same_features(tiny_model, tmp_path):
    arr = random_image(48, 64)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    inputs = {
        "path": path,
        "str": str(path),
        "pil": Image.fromarray(arr),
        "numpy": arr,
        "tensor_uint8": torch.from_numpy(arr).permute(2, 0, 1),
        "tensor_float": torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
        "numpy_uint16": arr.astype(np.uint16) * 257,
        "encoded bytes": path.read_bytes(),  # one image, not a sequence of numbers
        "encoded bytearray": bytearray(path.read_bytes()),
    }
    expected = leopart.embed(path, model=tiny_model, resolution=64)
    for name, item in inputs.items():
        torch.testing.assert_close(leopart.embed(item, model=tiny_model, resolution=64), expected,
                                   atol=1e-5, rtol=0, msg=name)
    batch = leopart.embed([path, arr, iter([Image.fromarray(arr)])], model=tiny_model, resolution=64, batch_size=2)
    assert batch.shape == (3, 4, 4, 64)
    torch.testing.assert_close(batch, expected.expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    gen = leopart.embed((a for a in [arr, arr]), model=tiny_model, resolution=64)
    assert gen.shape == (2, 4, 4, 64)
    stacked = {"numpy [B, H, W, 3]": np.stack([arr, arr]),
               "tensor [B, 3, H, W]": torch.from_numpy(np.stack([arr, arr])).permute(0, 3, 1, 2)}
    for name, item in stacked.items():
        torch.testing.assert_close(leopart.embed(item, model=tiny_model, resolution=64),
                                   expected.expand(2, -1, -1, -1), atol=1e-5, rtol=0, msg=name)


def test_float_images_in_either_range_and_normalised_ones_refused(tiny_model):
    arr = random_image(48, 64)
    expected = leopart.embed(arr, model=tiny_model, resolution=64)
    unit = torch.from_numpy(arr).permute(2, 0, 1).double() / 255
    overshoot = unit.clone()  # what a bicubic resize of a [0, 1] image gives at sharp edges
    overshoot[0, 0, 0], overshoot[1, 0, 1] = 1.06, -0.04
    clipped = arr.copy()
    clipped[0, 0, 0], clipped[0, 1, 1] = 255, 0
    torch.testing.assert_close(leopart.embed(overshoot, model=tiny_model, resolution=64),
                               leopart.embed(clipped, model=tiny_model, resolution=64), atol=1e-5, rtol=0)
    wide = unit * 255  # [0, 255] floats, with a resize's overshoot too
    wide[2, 5, 5] = -9.0
    torch.testing.assert_close(leopart.embed(wide, model=tiny_model, resolution=64),
                               leopart.embed(wide.clamp(0, 255).round().to(torch.uint8), model=tiny_model,
                                             resolution=64), atol=1e-5, rtol=0)
    assert not torch.equal(expected, leopart.embed(overshoot, model=tiny_model, resolution=64))  # the 2 pixels
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with pytest.raises(LeopartError, match=r"image #0: float values from -2\.\d\d to 2\.\d\d look mean/std-normalised"):
        leopart.embed((unit.float() - mean) / std, model=tiny_model, resolution=64)


def test_a_text_file_lists_images(tiny_model, tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    paths = [tmp_path / "data" / "sub" / "a.png", tmp_path / "b.png"]
    for i, path in enumerate(paths):
        Image.fromarray(random_image(40, 48, seed=i)).save(path)
    listing = tmp_path / "data" / "val.txt"  # relative lines from its own folder, not the working directory's
    listing.write_bytes(f"\ufeffsub/a.png\r\n# from elsewhere\r\n\r\n  {paths[1]}  \r\n".encode())  # as Notepad saves
    torch.testing.assert_close(leopart.embed(listing, model=tiny_model, resolution=32),
                               leopart.embed(paths, model=tiny_model, resolution=32), atol=0, rtol=0)
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(LeopartError, match="empty.txt lists no images"):
        leopart.embed(tmp_path / "empty.txt", model=tiny_model)
    (tmp_path / "gone.txt").write_text("nope.png\n")
    with pytest.raises(LeopartError, match=f"no such file: {tmp_path / 'nope.png'}"):
        leopart.embed(tmp_path / "gone.txt", model=tiny_model)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "1"])
def test_image_modes_become_rgb(tiny_model, tmp_path, mode):
    rgb = Image.fromarray(random_image(32, 32))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("img.tif" if mode in ("CMYK", "I") else "img.png")
    img.save(path)
    feats = leopart.embed(path, model=tiny_model, resolution=32)
    assert feats.shape == (1, 2, 2, 64) and torch.isfinite(feats).all()


def test_files_are_read_upright_with_their_exif_orientation(tiny_model, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise) is read
    as viewers show it; images passed in memory are taken as they are."""
    from leopart.data import image_size, load_image

    stored = Image.fromarray(random_image(48, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        shown = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    assert image_size(path) == (48, 80) and load_image(path).size == (48, 80)
    assert np.array_equal(np.asarray(load_image(path)), shown)
    maps = leopart.embed(path, model=tiny_model, resolution=None)
    assert maps[0].shape == (5, 3, 64)  # 80 x 48 upright, patch 16
    torch.testing.assert_close(maps[0], leopart.embed(shown, model=tiny_model, resolution=None)[0])
    stored.save(tmp_path / "plain.jpg", quality=95)
    assert image_size(tmp_path / "plain.jpg") == (80, 48)


def test_sixteen_bit_png_is_scaled_not_clipped(tiny_model, tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, size=(32, 32), dtype=np.uint8)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(gray).save(tmp_path / "g8.png")
    a = leopart.embed(tmp_path / "g16.png", model=tiny_model, resolution=32)
    b = leopart.embed(tmp_path / "g8.png", model=tiny_model, resolution=32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_folder_is_recursive_and_sorted(tiny_model, image_dir):
    feats = leopart.embed(image_dir, model=tiny_model, resolution=32)
    assert feats.shape == (4, 2, 2, 64)
    last = leopart.embed(image_dir / "sub" / "deep.jpg", model=tiny_model, resolution=32)
    torch.testing.assert_close(feats[3], last[0])


def test_folders_leave_out_photos_pillow_cannot_read_with_a_warning(tmp_path, monkeypatch):
    Image.fromarray(random_image(32, 32)).save(tmp_path / "b.jfif", format="JPEG")
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "raw/DSC_1.NEF", ".trash/IMG_3.HEIC", "notes.md", "clips/a.MP4",
                 "clips/b.mov", "clips/c.mov"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"\0" * 64)
    with pytest.warns(UserWarning) as record:
        assert leopart.data.list_images(tmp_path) == [tmp_path / "b.jfif"]
    photos = (f"{tmp_path}: leaving out 2 HEIC, 1 NEF files, which Pillow cannot read: convert them to JPEG or PNG "
              "to include them")
    videos = (f"{tmp_path}: leaving out 2 MOV, 1 MP4 files: leopart reads images, not videos; extract the frames "
              "first (ffmpeg -i VIDEO frames/%05d.png) and pass the folder")
    assert [str(w.message) for w in record] == [photos, videos]
    (tmp_path / "b.jfif").unlink()
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "-o", str(tmp_path / "f.npy")])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == f"Error: no images found in folder {tmp_path}", r.output
    assert "Warning: " in r.output and "2 HEIC" in r.output


def test_native_resolution_returns_a_list(tiny_model):
    imgs = [random_image(40, 70), random_image(33, 33)]
    feats = leopart.embed(imgs, model=tiny_model, resolution=None)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 64), (2, 2, 64)]


def test_images_smaller_than_a_patch_are_resized_to_a_fixed_resolution(tiny_model):
    small = random_image(10, 12)  # below one 16 px patch: only the native size has no patch to give
    upscaled = np.asarray(Image.fromarray(small).resize((64, 64), Image.BICUBIC))
    feats = leopart.embed([small, upscaled], model=tiny_model, resolution=64)
    assert feats.shape == (2, 4, 4, 64)
    torch.testing.assert_close(feats[0], feats[1])


def test_height_by_width_resolution(tiny_model, tiny_model_dir, tmp_path):
    """resolution=(height, width) resizes every image to that size: a batchable grid of another aspect than a
    square (e.g. video frames), the features of the image resized by PIL first and embedded at its own size."""
    img = random_image(60, 90)
    resized = np.asarray(Image.fromarray(img).resize((96, 64), Image.BICUBIC))
    feats = leopart.embed([img, img], model=tiny_model, resolution=(64, 96))
    assert feats.shape == (2, 4, 6, 64)
    torch.testing.assert_close(feats[0], leopart.embed(resized, model=tiny_model, resolution=None)[0])
    assert torch.equal(leopart.embed(img, model=tiny_model, resolution=[64, 64]),
                       leopart.embed(img, model=tiny_model, resolution=64))
    refusals = [((64, 90), r"^resolution 64x90: 90 is not a positive multiple of the patch size 16$"),
                ((64,), r"^resolution must be a whole number of pixels, \(height, width\) or None"),
                ("224", r"^resolution must be a whole number of pixels, .* not '224'$"),
                (True, r"not True$")]  # was a TypeError for tuples
    for resolution, match in refusals:
        with pytest.raises(LeopartError, match=match):
            leopart.embed(img, model=tiny_model, resolution=resolution)
    # The command line spells it HEIGHTxWIDTH, and the file records it so.
    Image.fromarray(img).save(tmp_path / "a.png")
    out = tmp_path / "f.safetensors"
    r = CliRunner().invoke(main, ["embed", str(tmp_path / "a.png"), "--model", str(tiny_model_dir), "--resolution",
                                  "64x96", "-o", str(out)])
    assert r.exit_code == 0 and "(1 map of 4 x 6 x 64, float32)" in r.output, r.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["resolution"] == "64x96"
        torch.testing.assert_close(f.get_tensor("features"), feats[:1])
    r = CliRunner().invoke(main, ["embed", str(tmp_path / "a.png"), "--model", str(tiny_model_dir), "--resolution",
                                  "64x", "-o", str(out)])
    assert r.exit_code == 2 and "'64x' is not a number of pixels, HEIGHTxWIDTH or 'native'" in r.output, r.output



def test_keep_aspect_embeds_each_image_at_its_shorter_side(tiny_model, tiny_model_dir, tmp_path):
    """keep_aspect: each image resized to the resolution on its shorter side, its aspect kept: one map per image,
    the features of the image resized by PIL first and embedded at its own size; the command line writes them to
    .safetensors (one tensor per image), the cache keeps them apart from the square's."""
    wide, tall = random_image(60, 90), random_image(100, 50)
    maps = leopart.embed([wide, tall], model=tiny_model, resolution=32, keep_aspect=True)
    assert [tuple(m.shape) for m in maps] == [(2, 3, 64), (4, 2, 64)]  # 32 x 48 and 64 x 32 pixels
    for img, fmap, size in ((wide, maps[0], (48, 32)), (tall, maps[1], (32, 64))):
        resized = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
        torch.testing.assert_close(fmap, leopart.embed(resized, model=tiny_model, resolution=None)[0])
    streamed = list(leopart.iter_embeddings([wide, tall], model=tiny_model, resolution=32, keep_aspect=True))
    assert all(torch.equal(a, b) for a, b in zip(streamed, maps, strict=True))
    no_side = r"^keep_aspect takes the shorter side in pixels as resolution, not None \(each image its own size\)$"
    for resolution, bad, match in ((None, True, no_side), ((32, 48), True, r"not \(32, 48\)$"),
                                   (40, True, "^resolution 40 is not a positive multiple of the patch size 16$"),
                                   (0, True, "^resolution 0 is not a positive multiple of the patch size 16$"),
                                   (32, "yes", r"^keep_aspect must be True or False, not 'yes'$")):
        with pytest.raises(LeopartError, match=match):
            leopart.embed(wide, model=tiny_model, resolution=resolution, keep_aspect=bad)

    for i, img in enumerate((wide, tall)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    files = [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    out = tmp_path / "f.safetensors"
    base = ["embed", *files, "--model", str(tiny_model_dir), "--resolution", "32", "--keep-aspect"]
    r = CliRunner().invoke(main, [*base, "-o", str(out), "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 0 and "(2 maps each at its image's own size, float32)" in r.output, r.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["resolution"] == "32 on the shorter side"
        stored = [f.get_tensor(name) for name in sorted(f.keys())]
    assert all(torch.equal(a, b) for a, b in zip(stored, maps, strict=True))
    square = leopart.embed(files, model=tiny_model, resolution=32, cache_dir=tmp_path / "cache")
    assert square.shape == (2, 2, 2, 64) and len(list((tmp_path / "cache").iterdir())) == 2
    npy = "--keep-aspect gives one array per image of its own size: write .safetensors instead of .npy"
    native = "--keep-aspect takes the shorter side in pixels as --resolution, not native"
    for extra, message in ((["-o", str(tmp_path / "f.npy")], npy),
                           (["--resolution", "native", "-o", str(out)], native)):
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 1 and r.output == f"Error: {message}\n", r.output

@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "text", "tiny", "empty_dir", "model",
                                  "resolution", "array_shape", "bomb", "bytes", "number",
                                  "listed_folder", "features_file", "checkpoint", "url", "listed_url", "video"])
def test_bad_inputs_raise_one_line(tiny_model, tmp_path, case, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(random_image(64, 64)).save(good)
    model, item, resolution = tiny_model, None, 64
    if case == "missing":
        item, match = tmp_path / "nope.jpg", "no such file"
    elif case == "corrupt":
        item = tmp_path / "corrupt.png"
        item.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
        match = "cannot read image"
    elif case == "truncated":
        item = tmp_path / "trunc.jpg"
        Image.fromarray(random_image(64, 64)).save(item)
        item.write_bytes(item.read_bytes()[:200])
        match = "cannot read image"
    elif case == "text":
        item = tmp_path / "notes.jpg"
        item.write_text("this is not an image")
        match = "cannot read image"
    elif case == "tiny":
        item = tmp_path / "one.png"
        Image.new("RGB", (1, 1)).save(item)
        resolution, match = None, "1x1 pixels: smaller than one 16x16 patch"  # native size; a fixed one resizes
    elif case == "empty_dir":
        item = tmp_path / "empty"
        item.mkdir()
        match = "no images found"
    elif case == "model":
        item, model, match = good, "no-such-model", "unknown model"
    elif case == "resolution":
        item, resolution, match = good, 50, "multiple of the patch size"
    elif case == "bomb":  # above twice Pillow's pixel limit it refuses to decode (a decompression-bomb guard)
        item = tmp_path / "big.png"
        Image.new("RGB", (100, 100)).save(item)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4096)  # good.png's 64x64 stays within it
        match = r"big.png: Image size \(10000 pixels\) exceeds limit of 8192 pixels \(Pillow's guard"
    elif case == "bytes":  # encoded bytes are named by their place, as arrays are
        item, match = b"GIF89a not quite", "cannot read image image #1: cannot identify image file"
    elif case == "number":
        item, match = 3, "cannot read an image from an int$"
    elif case == "listed_folder":  # a .txt list naming a folder (was "[Errno 21] Is a directory")
        (tmp_path / "sub").mkdir()
        item = tmp_path / "list.txt"
        item.write_text("good.png\nsub\n")
        match = "sub is a folder, not an image: a list names image files, one per line"
    elif case == "features_file":  # `leopart embed -o` output passed back as an image: where features go
        item = tmp_path / "feats.npy"
        np.save(item, np.zeros((2, 4, 4, 8), dtype=np.float32))
        match = re.escape(f"feats.npy: a features file (`leopart embed -o`), not an image: cluster features with "
                          f"leopart.cluster(numpy.load('{item}'))")
    elif case == "checkpoint":  # weights among the images (arguments swapped): where a model goes
        item = tmp_path / "leopart_vits16.ckpt"
        torch.save({"w": torch.zeros(2)}, item)
        match = "a checkpoint, not an image: weights are a model \\(--model, or model= in Python\\)"
    elif case == "video":  # read as "cannot identify image file"
        item = tmp_path / "clip.mp4"
        item.write_bytes(b"\0\0\0\x18ftypmp42" + b"\0" * 64)
        match = re.escape(f"clip.mp4: a video, not an image: extract the frames first (ffmpeg -i '{item}' "
                          "frames/%05d.png) and pass the folder")
    elif case == "url":  # read as a path it was "no such file: https:/example.com/cat.jpg" (one slash lost)
        item = "https://example.com/cat.jpg"
        match = ("^https://example.com/cat.jpg is a web address: leopart reads image files, so download it first "
                 r"\(curl -O URL\), or in Python pass its bytes: urllib.request.urlopen\(URL\).read\(\)$")
    elif case == "listed_url":  # URL lists (web-scale datasets ship them) are refused by the line, not joined to paths
        item = tmp_path / "urls.txt"
        item.write_text("good.png\nhttp://example.com/dog.png\n")
        match = f"^{re.escape(str(item))} lists http://example.com/dog.png, a web address: leopart reads image files"
    else:
        item, match = np.zeros((4, 4, 7), dtype=np.uint8), "expected an HxW"
    with pytest.raises(LeopartError, match=match) as e:
        leopart.embed([good, item], model=model, resolution=resolution)
    assert "\n" not in str(e.value)


def test_dataset_samples_are_named_as_such(tiny_model):
    """What datasets hand out (a torch Dataset, (image, label) pairs, Hugging Face rows) is not an image: the
    error says which of them it got and how to pass the images (a tuple of images is still a batch)."""
    img = Image.fromarray(random_image(64, 64))

    class Indexed(torch.utils.data.Dataset):  # map-style, like torchvision's: __getitem__ and __len__ only
        def __getitem__(self, i):
            if i >= len(self):
                raise IndexError(i)  # what ends iteration by index, as in torchvision's datasets
            return img, 0

        def __len__(self):
            return 2

    cannot = "^cannot read an image "
    cases = [(Indexed(), (cannot + r"from an Indexed, which is indexed but not iterable: pass its images, e.g. "
                          r"\(image for image, \*_ in dataset\)$")),
             ([(img, 3)], (cannot + r"from a tuple \(Image, int\), a dataset's \(image, label\) sample: pass the "
                           r"images alone")),
             ([(img, torch.tensor(3))], cannot + r"from a tuple \(Image, Tensor\), a dataset's"),
             ([{"image": img, "label": 3}], (cannot + r"from a dict \(keys image, label\): pass the images alone, "
                                             r"e.g. \[row\['image'\] for row in rows\]$")),
             ([None], cannot + "from a NoneType$"),
             # A DataLoader yields [images, labels] lists: the labels are named as such.
             (torch.utils.data.DataLoader([(torch.rand(3, 64, 64), 0)] * 4, batch_size=2),
              (r"^image #2 is a Tensor of shape \(2,\), not an image: labels\? pass the images alone, e.g. "
               r"\(images for images, \*_ in loader\)$"))]
    for inputs, match in cases:
        with pytest.raises(LeopartError, match=match):
            leopart.embed(inputs, model=tiny_model, resolution=64)
    assert leopart.embed((img, img), model=tiny_model, resolution=64).shape[0] == 2
    assert leopart.embed((image for image, _ in Indexed()), model=tiny_model, resolution=64).shape[0] == 2


def test_embed_cache_resumes_and_matches(tiny_model, image_dir, tmp_path, monkeypatch):
    """Interrupted after its first file of 2 images, a cached embed resumes there; fixed and native
    resolutions both come back as an uncached run's."""
    from leopart import serialization

    embed_module = sys.modules["leopart.embed"]  # leopart.embed itself is the function
    monkeypatch.setattr(serialization, "CACHE_SHARD", 2)  # 4 images -> 2 files
    cache = tmp_path / "cache"
    for resolution in (32, None):
        plain = leopart.embed(image_dir, model=tiny_model, resolution=resolution)
        calls, real = [], embed_module.iter_batches

        def interrupted_after_one(batch, *args, **kwargs):
            if calls:
                raise KeyboardInterrupt
            calls.append(len(batch))
            return real(batch, *args, **kwargs)

        monkeypatch.setattr(embed_module, "iter_batches", interrupted_after_one)
        with pytest.raises(KeyboardInterrupt):
            leopart.embed(image_dir, model=tiny_model, resolution=resolution, cache_dir=cache)
        monkeypatch.setattr(embed_module, "iter_batches", lambda batch, *a, **k: calls.append(len(batch)) or
                            real(batch, *a, **k))
        cached = leopart.embed(image_dir, model=tiny_model, resolution=resolution, cache_dir=cache)
        assert calls == [2, 2]  # the rerun computed only the second file
        # Equal up to rounding: batches of 2 instead of 4 change the matmul blocking.
        if resolution is None:
            assert len(cached) == 4
            for a, b in zip(cached, plain):
                torch.testing.assert_close(a, b)
        else:
            torch.testing.assert_close(cached, plain)
        monkeypatch.setattr(embed_module, "iter_batches", real)
    assert len(list(cache.iterdir())) == 2  # one folder per resolution
    with pytest.raises(LeopartError, match="needs image files"):
        leopart.embed([random_image()], model=tiny_model, resolution=32, cache_dir=cache)


def test_iter_embeddings_is_lazy_and_equals_embed(tiny_model):
    """Images are read only as maps are asked for: the first map comes out before a bad later input is read."""
    imgs = [random_image(seed=i) for i in range(3)]

    def source():
        yield from imgs[:2]
        raise AssertionError("read past what was asked for")

    stream = leopart.iter_embeddings(source(), model=tiny_model, resolution=32, batch_size=2)
    first = next(stream)
    torch.testing.assert_close(first, leopart.embed(imgs[0], model=tiny_model, resolution=32)[0])
    expected = leopart.embed(imgs, model=tiny_model, resolution=32, batch_size=2)
    torch.testing.assert_close(torch.stack(list(leopart.iter_embeddings(imgs, model=tiny_model, resolution=32,
                                                                        batch_size=2))), expected)


def test_embed_of_an_iterator_and_of_a_list_with_a_folder(tiny_model, image_dir):
    """Every input form gives the same stacked tensor (lists are counted up front, iterators collected)."""
    files = leopart.data.list_images(image_dir)
    expected = torch.stack([leopart.embed(f, model=tiny_model, resolution=32)[0] for f in files])
    torch.testing.assert_close(leopart.embed(image_dir, model=tiny_model, resolution=32, batch_size=2), expected)
    torch.testing.assert_close(leopart.embed(iter(files), model=tiny_model, resolution=32, batch_size=2), expected)
    torch.testing.assert_close(leopart.embed([files[0], image_dir], model=tiny_model, resolution=32, batch_size=2),
                               torch.cat([expected[:1], expected]))
    with pytest.raises(LeopartError, match="no images to embed"):
        leopart.embed(iter([]), model=tiny_model, resolution=32)


def test_concat_rows_fills_one_allocation_and_drops_each_chunk():
    import gc
    import weakref

    from leopart.serialization import concat_rows

    chunks = [{"a": torch.randn(n, 3, 2), "b": torch.arange(n)} for n in (4, 1, 3)]
    alive = []

    def fresh(chunk):
        copy = {k: v.clone() for k, v in chunk.items()}
        alive.append(weakref.ref(copy["a"]))
        return copy

    def stream():
        for i, c in enumerate(chunks):
            if i >= 1:
                gc.collect()
                assert alive[i - 1]() is None, "concat_rows kept a chunk it had already copied"
            yield fresh(c)

    out = concat_rows(stream(), 8)
    for k in ("a", "b"):
        assert torch.equal(out[k], torch.cat([c[k] for c in chunks]))
    whole = {"a": torch.randn(5, 2)}
    assert concat_rows(iter([whole]), 5)["a"].data_ptr() == whole["a"].data_ptr()  # one chunk: no copy
    transposed = torch.randn(2, 5).T
    assert concat_rows(iter([{"a": transposed}]), 5)["a"].is_contiguous()
    with pytest.raises(LeopartError, match="more than the 7 rows"):
        concat_rows(iter(chunks), 7)
    with pytest.raises(LeopartError, match="got 8 rows, expected 9"):
        concat_rows(iter(chunks), 9)


# ------------------------------------------------------------------------ feature files
@pytest.mark.parametrize("suffix, ragged", [(".npy", False), (".safetensors", False), (".safetensors", True)])
def test_write_features_streams_and_reads_back(tmp_path, suffix, ragged):
    """Maps are written as they come (none is held after its turn) and read back exactly by numpy / safetensors."""
    import gc
    import weakref

    from leopart.serialization import write_features

    shapes = [(2, 3, 5), (4, 1, 5), (3, 3, 5)] if ragged else [(2, 3, 5)] * 3
    maps = [torch.randn(s) for s in shapes]
    alive = []

    def stream():
        for i, m in enumerate(maps):
            if i >= 2:
                gc.collect()
                assert alive[i - 2]() is None, "write_features kept a map it had already written"
            t = m.clone()
            alive.append(weakref.ref(t))
            yield t

    out = tmp_path / f"f{suffix}"
    meta = {"names": '["caf\u00e9.jpg", "b.png"]'}
    shape = write_features(out, stream(), len(maps), ragged=ragged, metadata=meta)
    assert shape == (None if ragged else (3, 2, 3, 5))
    if suffix == ".npy":
        torch.testing.assert_close(torch.from_numpy(np.load(out)), torch.stack(maps), rtol=0, atol=0)
    else:
        with safe_open(str(out), "pt") as f:
            assert f.metadata() == meta
            got = [f.get_tensor(f"features.{i}") for i in range(3)] if ragged else list(f.get_tensor("features"))
        for g, m in zip(got, maps):
            torch.testing.assert_close(g, m, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("suffix, dtype", [(".npy", "float16"), (".safetensors", "float16"),
                                           (".safetensors", "bfloat16")])
def test_write_features_half_precision(tmp_path, suffix, dtype):
    """Half-precision files hold the maps rounded to that type (half the bytes), readable by numpy / safetensors,
    and their header names the type."""
    from leopart.serialization import read_features_header, write_features

    maps = [torch.randn(2, 3, 5) * 100 for _ in range(3)]
    out = tmp_path / f"f{suffix}"
    for ragged in (False, True) if suffix == ".safetensors" else (False,):
        write_features(out, iter(maps), 3, ragged=ragged, dtype=dtype)
        if suffix == ".npy":
            got = list(torch.from_numpy(np.load(out)))
        else:
            with safe_open(str(out), "pt") as f:
                got = [f.get_tensor(f"features.{i}") for i in range(3)] if ragged else list(f.get_tensor("features"))
        for g, m in zip(got, maps):
            assert g.dtype == getattr(torch, dtype)
            torch.testing.assert_close(g, m.to(getattr(torch, dtype)), rtol=0, atol=0)
        assert read_features_header(out)["dtype"] == dtype
        assert out.stat().st_size < 3 * 2 * 3 * 5 * 4 * 0.5 + 1024  # half of float32's bytes, plus the header


@pytest.mark.parametrize("case", ["fewer", "more", "shape", "fails", "npy_ragged"])
def test_write_features_bad_stream_leaves_no_file(tmp_path, case):
    from leopart.serialization import write_features

    maps = [torch.zeros(2, 2, 4)] * 3
    count, suffix = 3, ".safetensors"
    if case == "fewer":
        count = 4
    elif case == "more":
        count = 2
    elif case == "shape":
        maps[2] = torch.zeros(2, 3, 4)
    elif case == "npy_ragged":
        suffix = ".npy"

    def stream():
        yield from maps[:2]
        if case == "fails":
            raise LeopartError("cannot read image #2")
        yield from maps[2:]

    with pytest.raises(LeopartError):
        write_features(tmp_path / f"f{suffix}", stream(), count, ragged=case == "npy_ragged")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_umask_mode_not_private(tmp_path):
    """Outputs are created beside their final name and renamed; they must not keep a temp file's 0600 mode."""
    import os

    from leopart.serialization import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------ CLI
def test_cli_embed_records_the_model_by_its_absolute_path_and_the_precision(tiny_model_dir, image_dir, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "feats.safetensors"
    args = ["embed", str(image_dir), "--model", tiny_model_dir.name, "--resolution", "32", "--output", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model"] == str(tiny_model_dir.resolve())
        assert f.metadata()["precision"] == "float32"
    # As on a GPU, where bf16 autocast runs unless --full-precision: the file says which.
    import leopart.device

    monkeypatch.setattr(leopart.device, "uses_bf16", lambda device, full_precision=False: not full_precision)
    for flag, precision in (([], "bf16 autocast"), (["--full-precision"], "float32")):
        assert CliRunner().invoke(main, [*args, *flag]).exit_code == 0
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["precision"] == precision, flag
        info = CliRunner().invoke(main, ["info", str(out)]).output
        assert re.search(rf"^computed in +{precision}$", info, re.MULTILINE), info


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_cli_embed_writes_features(tiny_model, tiny_model_dir, image_dir, tmp_path, suffix):
    out = tmp_path / f"feats{suffix}"
    cache = ["--cache", str(tmp_path / "cache")] if suffix == ".npy" else []
    r = CliRunner().invoke(main, ["embed", str(image_dir), "--model", str(tiny_model_dir), "--resolution", "32",
                                  "--output", str(out), *cache])
    assert r.exit_code == 0, r.output
    expected = leopart.embed(image_dir, model=tiny_model, resolution=32)
    if suffix == ".npy":
        got = torch.from_numpy(np.load(out))
    else:
        with safe_open(str(out), "pt") as f:
            got = f.get_tensor("features")
            assert "deep.jpg" in f.metadata()["names"]
    torch.testing.assert_close(got, expected)
    assert len(list((tmp_path / "cache").glob("*/shard_00000.safetensors"))) == (1 if cache else 0)
    # `leopart info` describes the file from its header (it said "no ViT weights" / "not a checkpoint")
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0, r.output
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.output.splitlines())
    described = {"features": str(out), "images": "4", "patch grid": "2 x 2 patches of 64 dimensions",
                 "size": "4.0 KiB of float32"}
    if suffix == ".safetensors":  # and what its metadata records
        described.update({"model": str(tiny_model_dir), "resolution": "32", "computed in": "float32",
                          "first image": str(image_dir / "img0.png")})
    assert rows == described
    # Half precision: the same features rounded, half the size, and info says so.
    r = CliRunner().invoke(main, ["embed", str(image_dir), "--model", str(tiny_model_dir), "--resolution", "32",
                                  "--output", str(out), "--dtype", "float16"])
    assert r.exit_code == 0 and f"wrote {out} (4 maps of 2 x 2 x 64, float16)" in r.output, r.output
    got = torch.from_numpy(np.load(out)) if suffix == ".npy" else safe_open(str(out), "pt").get_tensor("features")
    torch.testing.assert_close(got, expected.half(), rtol=0, atol=0)
    r = CliRunner().invoke(main, ["info", str(out)])
    assert "\nsize" in r.output and r.output.split("\nsize", 1)[1].split("\n")[0].strip() == "2.0 KiB of float16"
    np.save(tmp_path / "vector.npy", np.zeros(3))  # another .npy is not taken for features
    r = CliRunner().invoke(main, ["info", str(tmp_path / "vector.npy")])
    assert r.exit_code == 1 and "vector.npy is not a checkpoint" in r.output, r.output
    if suffix == ".safetensors":  # taken for a model by mistake, it is named for what it is (was "no ViT weights")
        with pytest.raises(LeopartError, match=r"feats.safetensors holds patch features \(`leopart embed -o`\), not "
                                               "model weights"):
            leopart.from_pretrained(out)


def test_cli_embed_native_safetensors(tiny_model_dir, image_dir, tmp_path):
    out = tmp_path / "f.safetensors"
    r = CliRunner().invoke(main, ["embed", str(image_dir), "--model", str(tiny_model_dir),
                                  "--resolution", "native", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"wrote {out} (4 maps each at its image's own size, float32)" in r.output
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys()) == [f"features.{i}" for i in range(4)]
        assert f.get_tensor("features.0").shape == (2, 3, 64)  # 40x56 -> 32x48 pixels
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0, r.output
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.output.splitlines())
    assert (rows["images"], rows["resolution"], rows["patch grid"]) == ("4", "native", "2 x 3 patches of 64 dimensions")
    Image.fromarray(random_image(72, 40)).save(image_dir / "tall.png")  # 4 x 2 patches: same count, another shape
    Image.fromarray(random_image(16, 16)).save(image_dir / "small.png")
    r = CliRunner().invoke(main, ["embed", str(image_dir), "--model", str(tiny_model_dir), "--resolution", "native",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["info", str(out)])
    assert "patch grid   3 sizes, 1 x 1, 2 x 3, 4 x 2 patches of 64 dimensions\n" in r.output, r.output


@pytest.mark.parametrize("command", ["embed", "cluster", "segment", "eval"])
def test_cli_names_the_bad_input_before_loading_the_model(tmp_path, command):
    """A mistyped input fails as such, not as the (uncached, here undownloadable) default model's error."""
    args = {"embed": ["embed", str(tmp_path / "nope.jpg"), "-o", str(tmp_path / "f.npy")],
            "cluster": ["cluster", str(tmp_path / "nope.jpg"), "-o", str(tmp_path / "parts")],
            "segment": ["segment", str(tmp_path / "nope.jpg")],
            "eval": ["eval", str(tmp_path / "nope")]}[command]
    r = CliRunner().invoke(main, args)  # --model defaults to vits16, which is not cached
    assert r.exit_code == 1
    expected = f"{tmp_path / 'nope'} is not a VOC-layout folder" if command == "eval" else "no such file: "
    assert r.output.startswith(f"Error: {expected}"), r.output
    if command != "eval":  # a file that is not an image, last in a folder of good ones, fails first too
        folder = tmp_path / "photos"
        folder.mkdir()
        for i in range(3):
            Image.fromarray(random_image(32, 32, seed=i)).save(folder / f"{i}.png")
        (folder / "z_notes.jpg").write_text("not an image")
        args[1] = str(folder)
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and r.output.startswith(f"Error: cannot read image {folder / 'z_notes.jpg'}")


@pytest.mark.parametrize("case", ["missing", "text", "tiny", "empty", "model", "suffix", "npy_native", "npy_bfloat16",
                                  "unwritable", "device_unknown", "device_absent"])
def test_cli_bad_input_one_line_no_file(tiny_model_dir, tmp_path, case, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(random_image(64, 64)).save(good)
    out = tmp_path / "out.safetensors"
    args = ["embed", str(good), "--model", str(tiny_model_dir), "--resolution", "32", "--output", str(out)]
    if case == "missing":
        args[1] = str(tmp_path / "nope.jpg")
    elif case == "text":
        (tmp_path / "t.jpg").write_text("hello")
        args.insert(2, str(tmp_path / "t.jpg"))
    elif case == "tiny":
        Image.new("RGB", (1, 1)).save(tmp_path / "one.png")  # no patch at its native size
        args.insert(2, str(tmp_path / "one.png"))
        args[args.index("32")] = "native"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "model":
        args[3] = "no-such-model"
    elif case == "suffix":
        out = tmp_path / "out.txt"
        args[-1] = str(out)
    elif case == "unwritable":
        out = good / "out.npy"  # its folder is a file
        args[-1] = str(out)
    elif case == "device_unknown":
        args += ["--device", "gpu"]
    elif case == "device_absent":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args += ["--device", "cuda"]
    elif case == "npy_bfloat16":
        out = tmp_path / "out.npy"
        args[-1] = str(out)
        args += ["--dtype", "bfloat16"]
    else:
        out = tmp_path / "out.npy"
        args[-3:] = ["native", "--output", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    if case == "unwritable":
        assert lines[0].startswith(f"Error: cannot write {out}: "), r.output
    if case.startswith("device"):
        assert "device 'gpu'" in lines[0] or "device 'cuda'" in lines[0], r.output
    if case == "npy_bfloat16":
        assert lines[0] == "Error: numpy has no bfloat16: write .safetensors, or --dtype float16 to .npy", r.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


@pytest.mark.parametrize("args", [["eval", "VOC", "--json", "{blocked}/r.json"],
                                  ["embed", "a.png", "-o", "{blocked}/f.npy"],
                                  ["cluster", "a.png", "-o", "{blocked}/parts"],
                                  ["segment", "a.png", "-o", "{blocked}/s"],
                                  ["train", "imgs", "-o", "{blocked}/run"], ["convert", "x.ckpt", "{blocked}/m"],
                                  ["embed", "a.png", "-o", "f.npy", "--cache", "{blocked}/c"],
                                  ["eval", "VOC", "--linear", "--probe-dir", "{blocked}/p"]])
def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path, args):
    """An output below a file fails as the options are read (eval --json failed after the whole evaluation)."""
    blocked = tmp_path / "notes.txt"
    blocked.write_text("a file, not a folder")
    r = CliRunner().invoke(main, [a.format(blocked=blocked) for a in args])
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot write {blocked}/"), r.output
    assert r.output.endswith(f": {blocked} is a file\n") and r.output.count("\n") == 1, r.output


def test_named_devices_are_checked_before_any_work(monkeypatch):
    from leopart.device import default_device
    from leopart.errors import LeopartError

    assert default_device("cpu") == torch.device("cpu")
    with pytest.raises(LeopartError, match="unknown device 'gpu': use cpu, cuda or cuda:N"):
        default_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert default_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(LeopartError, match=r"no device 'cuda:2': torch sees 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        default_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LeopartError, match="torch sees no CUDA GPU here"):
        default_device("cuda")
    with pytest.raises(LeopartError, match="torch sees no CUDA GPU here"):  # the API checks as the CLI does
        leopart.cluster(torch.randn(20, 4), k=2, device="cuda")
    with pytest.raises(LeopartError, match="unknown device 'gpu'"):  # before the weights would download
        leopart.from_pretrained("vits16", device="gpu")


def test_api_arguments_of_the_wrong_kind_fail_in_one_line(tiny_model):
    image = random_image(32, 32)
    cases = [(lambda: leopart.from_pretrained(""), "a model is named by an alias, a Hub id, a folder or a "
                                                   "checkpoint file, not ''"),
             (lambda: leopart.from_pretrained(None), "not None"),
             (lambda: leopart.Segmenter.from_pretrained(None), "a leopart segmenter is named by a folder or a Hub id"),
             (lambda: leopart.ProbeHead.from_pretrained(""), "a probe head is named by a folder, a Hub id or a "
                                                            "released .ckpt file, not ''"),
             (lambda: leopart.embed(image, model=tiny_model, batch_size=0), "batch_size must be a positive integer"),
             (lambda: leopart.embed(image, model=tiny_model, resolution="64"),
              r"resolution must be a whole number of pixels, \(height, width\) or None"),
             (lambda: leopart.embed(image, model=tiny_model, resolution=64.5), "not 64.5"),
             (lambda: leopart.segment(image, model=tiny_model, k=0), "k must be a positive integer, not 0"),
             (lambda: leopart.segment(image, model=tiny_model, resolution="64"),  # was a TypeError
              "resolution must be a positive integer, not '64'"),
             (lambda: leopart.segment(image, model=tiny_model, segmenter=3),
              "segmenter must be a Segmenter, a folder or a Hub id, not a int"),
             (lambda: leopart.LeopartViT(leopart.LeopartConfig(arch=TINY_ARCH, num_prototypes=0, proj_dim=2.5)),
              r"needs positive integer sizes, not num_prototypes=0, proj_dim=2.5")]
    for call, match in cases:
        with pytest.raises(LeopartError, match=match):
            call()
    # the command line's spelling of native size works in the API too, as do whole floats and numpy integers
    native = leopart.embed(image, model=tiny_model, resolution=None)
    torch.testing.assert_close(leopart.embed(image, model=tiny_model, resolution="native"), native)
    assert leopart.embed(image, model=tiny_model, resolution=64.0, batch_size=np.int64(2)).shape == (1, 4, 4, 64)


def test_host_memory_is_read_from_meminfo(tmp_path):
    from leopart.device import host_memory_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\nSwapTotal: 0 kB\nSwapFree:  24 kB\n")
    assert host_memory_available(str(meminfo)) == 1024 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # kernels before 3.14 lack MemAvailable: no guess
    assert host_memory_available(str(meminfo)) is None
    assert host_memory_available(str(tmp_path / "none")) is None  # not Linux
    assert host_memory_available() is None or host_memory_available() > 0


def test_console_script_one_line_error_without_traceback(tmp_path):
    """The real entry point, as a user runs it: a text file named .jpg."""
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    r = subprocess.run([sys.executable, "-m", "leopart", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "leopart", "embed", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resolution" in r.stdout


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tiny_model_dir):
    """`leopart info MODEL | head -1`: the reader has gone before the output is written; no error message."""
    proc = subprocess.Popen([sys.executable, "-m", "leopart", "info", str(tiny_model_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the command, which first imports torch, prints
    stderr = proc.stderr.read()
    assert proc.wait() == 1 and stderr == "", stderr


def test_help_and_import_do_not_load_torch():
    """`leopart --help` answers at once: neither the package nor the CLI module imports torch until a command runs."""
    code = ("import sys, leopart; from leopart.cli import main; from click.testing import CliRunner; "
            "r = CliRunner().invoke(main, ['segment', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'timm', 'numpy', 'triton') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_interrupted_run_without_cache_says_how_to_resume(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["leopart.embed"], "iter_embeddings", interrupted)
    args = ["embed", str(image_dir), "--model", str(tiny_model_dir), "--resolution", "64", "-o", str(tmp_path / "f.npy")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 130 and "with --cache DIR a rerun resumes" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 130 and "--cache" not in r.output, r.output


def test_every_command_and_option_has_help():
    missing = [f"{name} {' '.join(param.opts)}" for name, command in main.commands.items()
               for param in command.params if isinstance(param, click.Option) and not param.help]
    missing += [name for name, command in main.commands.items() if not command.help]
    assert missing == []


def test_public_names_resolve_to_the_api_whichever_module_loads_first():
    """leopart.cluster (embed, merge, ...) is the function even when its module of the same name was loaded
    first by another import; every name in __all__ resolves; unknown names raise AttributeError."""
    fresh = """
import leopart
public = {name for name in dir(leopart) if not name.startswith("_")}
assert public == set(leopart.__all__), public ^ set(leopart.__all__)  # no helper imports in tab completion
"""
    r = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    code = """
import leopart.segment, leopart.evaluate, leopart.demo
import leopart
for name in ("cluster", "embed", "evaluate", "merge", "probe", "segment", "train"):
    f = getattr(leopart, name)
    assert callable(f) and not isinstance(f, type(leopart)) and f.__module__ == "leopart." + name, (name, f)
assert all(getattr(leopart, name) is not None for name in leopart.__all__)
assert set(leopart.__all__) <= set(dir(leopart))
assert leopart.data.list_images and leopart.kernels.sinkhorn
try:
    leopart.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_map_ahead_keeps_order_and_runs_a_bounded_way_ahead():
    import threading

    started, lock = [], threading.Lock()

    def slow_square(i):
        with lock:
            started.append(i)
        return i * i

    stream = leopart.data.map_ahead(slow_square, iter(range(100)), threads=2, ahead=3)
    assert next(stream) == 0
    time.sleep(0.2)  # the threads have done all they may
    assert sorted(started) == list(range(len(started))) and len(started) <= 1 + 3
    assert list(stream) == [i * i for i in range(1, 100)]
    assert list(leopart.data.map_ahead(slow_square, range(5), threads=0)) == [0, 1, 4, 9, 16]


def test_threaded_decoding_keeps_order_and_errors(image_dir, tmp_path):
    """The GPU path decodes in threads: same tensors in the same order, and a bad file still fails."""
    from leopart.embed import iter_preprocessed

    files = sorted(image_dir.rglob("*.*")) * 3
    serial = list(iter_preprocessed(files, 32, 16, threads=0))
    threaded = list(iter_preprocessed(files, 32, 16, threads=3))
    assert [n for n, _ in threaded] == [n for n, _ in serial]
    for (_, a), (_, b) in zip(serial, threaded):
        assert torch.equal(a, b)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(LeopartError, match="bad.jpg"):
        list(iter_preprocessed([*files, bad, *files], 32, 16, threads=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scoring_tokens_are_float32(tiny_model):
    """On CUDA, the backbone runs under bf16 autocast unless full precision is asked for (scoring): those tokens
    match the CPU's float32 ones (with TF32 off here, which cuDNN's patch-embedding convolution uses by default)."""
    from leopart.embed import iter_batches

    images = [random_image(64, 64, seed=s) for s in range(4)]

    def tokens(device, full_precision):
        model = tiny_model.to(device)
        (_, t, _), = iter_batches(images, model, 64, 4, torch.device(device), full_precision=full_precision)
        return t.cpu()

    reference = tokens("cpu", True)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32_error = (tokens("cuda", True) - reference).abs().max().item()
        bf16_error = (tokens("cuda", False) - reference).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        tiny_model.to("cpu")
    assert fp32_error < 1e-4 < bf16_error, (fp32_error, bf16_error)
