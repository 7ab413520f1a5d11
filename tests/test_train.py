"""Multi-crop overlap boxes, the Leopart loss, training runs, resume after SIGKILL, and DDP equivalence."""
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from conftest import SMALL_BACKBONE, free_port, interrupt_at_call, meta_dinov3_layout
from PIL import Image
from torchvision.ops import roi_align

import leopart
from leopart import progress as progress_module
from leopart.augment import CropConfig, intersection, make_views, to_crop_coords
from leopart.cli import main
from leopart.data import IMAGENET_MEAN, IMAGENET_STD
from leopart.errors import LeopartError
from leopart.synthetic import write_voc_dataset
from leopart.train import MultiCrop, TrainConfig, build_model, leopart_loss

TINY = dict(init="random", arch="test_vit", batch_size=4, global_size=64, local_size=32, num_prototypes=10,
            workers=0, progress=False, drop_path=0.0)


def textured_image(seed, h=80, w=100) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:] = rng.integers(0, 255, 3)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y:y + h // 2, x:x + w // 2] = rng.integers(0, 255, 3)
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_images")
    for i in range(8):
        textured_image(i).save(folder / f"{i}.jpg")
    return folder


# -------------------------------------------------------------------- views
def test_identical_crops_give_identity_boxes():
    cfg = CropConfig(global_size=64, local_size=32, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    views = make_views(textured_image(0, 64, 64), cfg, torch.Generator().manual_seed(0))
    for gi in range(cfg.n_global):
        for v in range(cfg.n_crops):
            size_g, size_v = cfg.size(gi), cfg.size(v)
            torch.testing.assert_close(views.boxes[gi, v, 0], torch.tensor([0.0, 0.0, size_g, size_g]))
            torch.testing.assert_close(views.boxes[gi, v, 1], torch.tensor([0.0, 0.0, size_v, size_v]))


def test_blur_off_keeps_fine_textures_and_hue_reaches_the_whole_wheel():
    # A 1-pixel checkerboard: any blur (sigma >= 0.1) flattens it, so its pixel-to-pixel contrast tells.
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([checker, 255 - checker, np.full_like(checker, 128)], axis=-1))
    same = dict(global_size=64, local_size=32, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))

    def contrast(cfg, seed):  # the first global crop, which DINO's recipe always blurs
        crop = make_views(img, cfg, torch.Generator().manual_seed(seed)).crops[0]
        return float((crop[:, :, 1:] - crop[:, :, :-1]).abs().mean())

    sharp = [contrast(CropConfig(**same, blur=False, photometric="dino"), s) for s in range(8)]
    blurred = [contrast(CropConfig(**same, photometric="dino"), s) for s in range(8)]
    # Same seed, same draws (the blur coin is still tossed): only the blur differs.
    assert all(s >= b - 1e-6 for s, b in zip(sharp, blurred)) and sum(sharp) > 3 * sum(blurred)

    red = Image.new("RGB", (64, 64), (220, 30, 30))
    def hues(hue):
        out = []
        for s in range(40):
            crop = make_views(red, CropConfig(**same, blur=False, hue=hue, photometric="dino"),
                              torch.Generator().manual_seed(s)).crops[0]
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            r, g, b = (crop.mean(dim=(1, 2)) * std + mean).tolist()
            out.append(max(g, b) > r + 0.1)  # turned green or blue (grey, from the grayscale step, does not count)
        return sum(out)
    assert hues(0.1) == 0 and hues(0.5) > 5


def test_reference_photometric_recipe():
    """The reference code's LeopartTransforms: ColorJitter(0.8, 0.8, 0.8, 0.2) with p = 0.8 and Gaussian blur with
    p = 0.5 on every crop (DINO's, the demo's: brightness within 1 +- 0.4, the first global crop always blurred)."""
    same = dict(global_size=32, local_size=16, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def crops(img, recipe, seeds=60, blur=True):
        cfg = CropConfig(**same, photometric=recipe, blur=blur)
        return [make_views(img, cfg, torch.Generator().manual_seed(s)).crops[0] * std + mean for s in range(seeds)]

    grey = Image.new("RGB", (32, 32), (128, 128, 128))  # brightness is all that moves a uniform grey
    levels = {r: [float(c.mean()) for c in crops(grey, r)] for r in ("reference", "dino")}
    assert min(levels["dino"]) > 0.29 and max(levels["dino"]) < 0.71
    assert min(levels["reference"]) < 0.25 and max(levels["reference"]) > 0.75
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    fine = Image.fromarray(np.stack([checker] * 3, axis=-1))
    # Same seeds with blur off: the same draws (the blur coin is tossed either way), so a crop that differs was
    # blurred (sigma below ~0.3 px leaves a checkerboard as it is: about a tenth of the blurred ones).
    blurred = {r: sum(not torch.allclose(a, b, atol=1e-4) for a, b in zip(crops(fine, r), crops(fine, r, blur=False)))
               for r in ("reference", "dino")}
    assert blurred["dino"] >= 48 and 15 <= blurred["reference"] <= 40, blurred
    with pytest.raises(LeopartError, match="photometric must be one of reference, dino, not 'simclr'"):
        TrainConfig(photometric="simclr").check()


def test_crop_boxes_are_drawn_as_torchvisions_random_resized_crop():
    """sample_box is RandomResizedCrop.get_params (which the reference's crops used) on a seeded generator: the same
    fallback when no draw fits, and the same distribution of boxes (VOC's 500 x 333 images at the probes' 0.8-1.0
    scale fall back two draws in three: a centred square there would shrink the mean crop from 0.89 of the area)."""
    from torchvision.transforms import RandomResizedCrop

    from leopart.augment import sample_box

    def theirs(width, height, scale):
        top, left, h, w = RandomResizedCrop.get_params(Image.new("L", (width, height)), list(scale), [3 / 4, 4 / 3])
        return left, top, left + w, top + h

    g = torch.Generator().manual_seed(0)
    for width, height, scale in ((1000, 10, (0.8, 1.0)), (10, 1000, (0.8, 1.0)), (100, 90, (1.5, 2.0))):
        assert sample_box(width, height, scale, g) == theirs(width, height, scale)  # every draw fails: fallback
    torch.manual_seed(0)
    for width, height, scale in ((500, 333, (0.8, 1.0)), (500, 375, (0.25, 1.0)), (90, 120, (0.05, 0.25))):
        ours = np.array([sample_box(width, height, scale, g) for _ in range(3000)], dtype=float)
        ref = np.array([theirs(width, height, scale) for _ in range(3000)], dtype=float)
        for boxes in (ours, ref):
            boxes[:, 2:] -= boxes[:, :2]  # x, y, w, h
        share = [b[:, 2] * b[:, 3] / (width * height) for b in (ours, ref)]
        assert abs(share[0].mean() - share[1].mean()) < 0.01, (width, height, scale)
        assert abs(np.mean(share[0] > 0.99) - np.mean(share[1] > 0.99)) < 0.03
        np.testing.assert_allclose(ours.mean(0), ref.mean(0), rtol=0.05, atol=1)


def test_crops_are_redrawn_one_at_a_time_as_the_reference_drew_them():
    """LeopartTransforms drew the first global crop freely and redrew each later crop alone until it overlapped the
    global crops before it (by more than 2% of the image for a global crop, 1% for a local one). Redrawing all six
    until every overlap holds (half the draws fail on a 500 x 333 image) would favour larger first crops."""
    from leopart.augment import sample_box, sample_crop_boxes

    cfg, width, height = CropConfig(), 500, 333

    def share(box):
        return (box[2] - box[0]) * (box[3] - box[1]) / (width * height)

    g = torch.Generator().manual_seed(0)
    views = [sample_crop_boxes(width, height, cfg, g) for _ in range(3000)]
    alone = [share(sample_box(width, height, cfg.global_scale, g)) for _ in range(3000)]
    assert abs(np.mean([share(b[0]) for b in views]) - np.mean(alone)) < 0.012  # the first crop: unconstrained
    for boxes in views:
        for i in range(1, cfg.n_crops):
            least = (cfg.min_overlap_global if i < cfg.n_global else cfg.min_overlap_local) * width * height
            for other in boxes[:min(i, cfg.n_global)]:
                inter = intersection(boxes[i], other)
                assert inter is not None and (inter[2] - inter[0]) * (inter[3] - inter[1]) > int(least)
    # each crop is redrawn alone: the first crop of a view is the generator's first draw
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sample_crop_boxes(width, height, cfg, g1)[0] == sample_box(width, height, cfg.global_scale, g2)
    # leopart's earlier way (runs from before it resume with it; the demo keeps it) redraws all six together
    together = [sample_crop_boxes(width, height, CropConfig(redraw="all"), g) for _ in range(3000)]
    assert np.mean([share(b[0]) for b in together]) - np.mean(alone) > 0.02
    assert TrainConfig(crop_redraw="all").crops().redraw == "all" and CropConfig().redraw == "each"
    with pytest.raises(LeopartError, match="crop_redraw must be one of each, all, not 'some'"):
        TrainConfig(crop_redraw="some").check()


@pytest.mark.parametrize("seed", range(5))
def test_overlap_boxes_map_back_to_the_same_image_region(seed):
    cfg = CropConfig(global_size=64, local_size=32)
    g = torch.Generator().manual_seed(seed)
    views = make_views(textured_image(seed, 120, 90), cfg, g)
    image_area = 120 * 90
    for gi in range(cfg.n_global):
        for v in range(cfg.n_crops):
            inter = intersection(views.image_boxes[gi], views.image_boxes[v])
            assert inter is not None
            min_share = cfg.min_overlap_global if v < cfg.n_global else cfg.min_overlap_local
            assert (inter[2] - inter[0]) * (inter[3] - inter[1]) >= min_share * image_area - 1e-6
            for side, crop in ((0, gi), (1, v)):
                box = views.boxes[gi, v, side]
                size = cfg.size(crop)
                assert 0 <= box[0] < box[2] <= size + 1e-4 and 0 <= box[1] < box[3] <= size + 1e-4
                w = box[2] - box[0]
                expected = to_crop_coords(inter, views.image_boxes[crop], size, flipped=False)
                assert w == pytest.approx(expected[2] - expected[0], rel=1e-5)


def test_roi_aligned_targets_of_a_crop_with_itself_are_its_assignments():
    q = torch.softmax(torch.randn(3, 10, 7, 7), dim=1)  # 112 px crop, patch 16: a 7x7 grid
    rois = torch.tensor([[i, 0.0, 0.0, 7.0, 7.0] for i in range(3)])
    torch.testing.assert_close(roi_align(q, rois, 7, aligned=True), q)


# --------------------------------------------------------------------- loss
def fixed_batch(n=4, cfg=None, seed=0):
    cfg = cfg or TrainConfig(**TINY)
    views = [make_views(textured_image(i + 10 * seed), cfg.crops(), torch.Generator().manual_seed(i)) for i in range(n)]
    crops = [torch.stack([v.crops[c] for v in views]) for c in range(cfg.crops().n_crops)]
    return crops, torch.stack([v.boxes for v in views])


def tiny_pair(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    teacher = build_model(cfg).eval().requires_grad_(False)
    teacher.load_state_dict(model.state_dict())
    return model, teacher


@pytest.mark.parametrize("mask", ["all", "fg", "bg"])
def test_loss_decreases_on_a_fixed_batch(mask):
    cfg = TrainConfig(**TINY, loss_mask=mask)
    model, teacher = tiny_pair(cfg)
    crops, boxes = fixed_batch(cfg=cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        model.normalize_prototypes()
        loss, value, _ = leopart_loss(MultiCrop(model), teacher, crops, boxes, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.load_state_dict(model.state_dict())
        losses.append(float(value))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses


def test_reference_recipe_blurs_with_pil_as_the_reference():
    """The reference's GaussianBlur augmentation: PIL's ImageFilter.GaussianBlur(radius=sigma), sigma in [0.1, 2]."""
    from PIL import ImageFilter

    from leopart.augment import PHOTOMETRIC, blur

    img = textured_image(2, 40, 52)
    for sigma in (0.1, 0.7, 2.0):
        want = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        assert np.array_equal(np.asarray(blur(img, sigma, PHOTOMETRIC["reference"])), np.asarray(want))
    # The DINO recipe (the demo's) keeps the Gaussian kernel it had: 2 ceil(3 sigma) + 1 taps.
    assert not np.array_equal(np.asarray(blur(img, 2.0, PHOTOMETRIC["dino"])),
                              np.asarray(img.filter(ImageFilter.GaussianBlur(radius=2.0))))


@pytest.mark.parametrize("recipe, resample", [("reference", Image.BILINEAR), ("dino", Image.BICUBIC)])
def test_crops_are_resampled_as_their_recipe(recipe, resample):
    """The reference's RandomResizedCrop resized bilinearly (torchvision's default); DINO's bicubically."""
    from leopart.data import to_tensor

    img = textured_image(1, 90, 70)
    views = make_views(img, CropConfig(global_size=48, local_size=24, jitter=False, photometric=recipe),
                       torch.Generator().manual_seed(0))
    for i, (crop, box) in enumerate(zip(views.crops, views.image_boxes)):
        size = 48 if i < 2 else 24
        want = img.resize((size, size), resample, box=box)
        options = [to_tensor(want, None), to_tensor(want.transpose(Image.FLIP_LEFT_RIGHT), None)]  # flipped or not
        assert any(torch.equal(crop, o) for o in options), i


@pytest.mark.parametrize("h, w", [(14, 14), (28, 28), (6, 9), (4, 4)])
def test_foreground_mask_is_the_references_attention_processing(h, w):
    """The reference (process_attentions): heads averaged, torchvision GaussianBlur(7, sigma 0.6) (reflect
    padding), the cells holding the top 60% of the mass, 8-connected components of <= 2 cells removed."""
    from scipy import ndimage
    from torchvision.transforms import GaussianBlur

    from leopart.foreground import foreground_mask

    torch.manual_seed(h * w)
    attention = torch.rand(6, 3, h, w) ** 4  # peaky, like CLS attention
    blurred = GaussianBlur(7, sigma=0.6)(attention.mean(1, keepdim=True)).flatten(1)
    values, order = blurred.sort(dim=1)
    kept = (values / values.sum(1, keepdim=True)).cumsum(1) > 1 - 0.6
    want = torch.zeros_like(kept).scatter_(1, order, kept).view(6, h, w).numpy()
    for m in want:
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        for c in range(1, n + 1):
            if (labels == c).sum() <= 2:
                m[labels == c] = False
    assert np.array_equal(foreground_mask(attention).numpy(), want)


@pytest.mark.parametrize("mask", ["fg", "all"])
def test_queue_takes_ten_random_counted_embeddings_per_image(mask):
    """As in the reference, a step adds 10 teacher embeddings per image and global crop to the queue, drawn at
    random among the positions the loss counts (all of them there if fewer); without a queue it draws nothing
    from the RNG, so runs without one are unchanged."""
    from leopart.foreground import foreground_mask

    cfg = TrainConfig(**{**TINY, "global_size": 96}, loss_mask=mask, queue_length=64)
    model, teacher = tiny_pair(cfg)
    crops, boxes = fixed_batch(cfg=cfg)
    b = crops[0].shape[0]
    _, _, added = leopart_loss(MultiCrop(model), teacher, crops, boxes, cfg)
    with torch.no_grad():
        out = teacher(torch.cat(crops[:cfg.n_global]), attention=True)
    counted = foreground_mask(out.attention) if mask == "fg" else torch.ones(out.embeddings.shape[:3], dtype=bool)
    assert len(added) == cfg.n_global
    for gi, emb in enumerate(added):
        pool = out.embeddings[gi * b:(gi + 1) * b].reshape(-1, emb.shape[1])
        inside = counted[gi * b:(gi + 1) * b].flatten()
        assert emb.shape == (10 * b, pool.shape[1]) and inside.sum() >= 10 * b  # 6 x 6 patches per image
        rows = [int(torch.cdist(e[None], pool).argmin()) for e in emb]
        assert len(set(rows)) == 10 * b and all(inside[r] for r in rows)
        torch.testing.assert_close(emb, pool[rows])
    state = torch.get_rng_state()
    _, _, added = leopart_loss(MultiCrop(model), teacher, crops, boxes, TrainConfig(**TINY, loss_mask=mask))
    assert added == [] and torch.equal(torch.get_rng_state(), state)


def test_queue_is_scored_with_the_student_prototypes(monkeypatch):
    """The reference prepends queue @ student prototypes to the teacher's scores of the batch before Sinkhorn
    (the batch itself is scored by the teacher's prototypes)."""
    cfg = TrainConfig(**TINY, queue_length=16)
    model, teacher = tiny_pair(cfg)
    with torch.no_grad():
        teacher.prototypes.weight.add_(0.5 * torch.randn_like(teacher.prototypes.weight))
    model.normalize_prototypes()
    teacher.normalize_prototypes()
    crops, boxes = fixed_batch(cfg=cfg)
    queue = torch.nn.functional.normalize(torch.randn(cfg.n_global, 16, model.config.proj_dim), dim=-1)
    seen = []
    train_module = sys.modules["leopart.train"]
    real = train_module.sinkhorn
    monkeypatch.setattr(train_module, "sinkhorn", lambda x, *a, **kw: seen.append(x) or real(x, *a, **kw))
    leopart_loss(MultiCrop(model), teacher, crops, boxes, cfg, queue)
    with torch.no_grad():
        batch_scores = teacher(torch.cat(crops[:cfg.n_global])).scores
    b, k = crops[0].shape[0], cfg.num_prototypes
    for gi, scores in enumerate(seen):
        torch.testing.assert_close(scores[:16], queue[gi] @ model.prototypes.weight.T)
        torch.testing.assert_close(scores[16:], batch_scores[gi * b:(gi + 1) * b].reshape(-1, k).float())


def _ddp_worker(rank, world, port, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(**TINY, loss_mask="fg")
        model, teacher = tiny_pair(cfg)
        crops, boxes = fixed_batch(cfg=cfg)
        half = slice(rank * 2, rank * 2 + 2)
        student = torch.nn.parallel.DistributedDataParallel(MultiCrop(model))
        loss, value, _ = leopart_loss(student, teacher, [c[half] for c in crops], boxes[half], cfg)
        loss.backward()
        results[rank] = (float(value), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_on_the_same_global_batch():
    cfg = TrainConfig(**TINY, loss_mask="fg")
    model, teacher = tiny_pair(cfg)
    crops, boxes = fixed_batch(cfg=cfg)
    loss, value, _ = leopart_loss(MultiCrop(model), teacher, crops, boxes, cfg)
    loss.backward()
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_ddp_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        ddp_value, grads = results[rank]
        assert ddp_value == pytest.approx(float(value), abs=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Under torchrun, --device cuda (or none) means each process's own GPU, not all of them on cuda:0."""
    from leopart.train import _process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for requested in (None, "cuda"):
        assert _process_device(requested, world_size=2, local_rank=1) == torch.device("cuda", 1)
        assert _process_device(requested, world_size=1, local_rank=0) == torch.device("cuda", 0)
    assert _process_device("cuda:1", world_size=1, local_rank=0) == torch.device("cuda", 1)  # one process: any GPU
    assert _process_device("cpu", world_size=2, local_rank=1) == torch.device("cpu")
    with pytest.raises(LeopartError, match="pass --device cuda"):
        _process_device("cuda:1", world_size=2, local_rank=0)
    with pytest.raises(LeopartError, match="LOCAL_RANK 3 .* 2 GPUs"):
        _process_device(None, world_size=4, local_rank=3)


def test_checkpoints_keep_the_random_state_of_this_processs_gpu(monkeypatch):
    """A checkpoint keeps the CPU generator and this process's GPU generator, which every process under torchrun
    resumes from (they draw the same numbers in the same order). It kept get_rng_state_all(), the first process's
    view of every GPU, so the others restarted theirs from the seed; such checkpoints still resume as before."""
    from leopart.device import rng_state, set_rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", int(state), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("set all", len(states))))
    gpu = torch.device("cuda", 1)
    state = rng_state(gpu)
    assert torch.equal(state["torch"], torch.get_rng_state()) and calls == [("get", gpu)]
    set_rng_state(state, torch.device("cuda", 0))  # another process: its own GPU takes the saved state
    set_rng_state({"torch": state["torch"], "cuda": [torch.tensor([1]), torch.tensor([2])]}, gpu)  # an old checkpoint
    assert calls[1:] == [("set", 7, torch.device("cuda", 0)), ("set all", 2)]
    assert rng_state(torch.device("cpu")).keys() == {"torch"} and len(calls) == 3


def test_only_train_runs_under_torchrun(tmp_path):
    """Under torchrun every other command would do its whole job once per process, writing the same outputs."""
    for args in (["eval", str(tmp_path)], ["embed", str(tmp_path), "-o", str(tmp_path / "f.npy")], ["info", "vits16"]):
        r = CliRunner().invoke(main, args, env={"WORLD_SIZE": "2"})
        assert r.exit_code == 1 and r.output == (f"Error: leopart {args[0]} runs in one process, not 2 (WORLD_SIZE): of "
                                                 "the commands only `leopart train` shares its work under torchrun; "
                                                 "run this one without it\n"), r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path / "nothing")], env={"WORLD_SIZE": "1"})
    assert "runs in one process" not in r.output


def test_processes_wait_for_an_evaluation_longer_than_nccls_default(monkeypatch):
    """With --eval-data the other processes wait in a collective while the first evaluates: the group train() starts
    allows 2 hours (NCCL's default, 10 minutes, ended runs whose evaluation took longer)."""
    from datetime import timedelta

    import torch.distributed as dist

    from leopart.train import _setup_distributed

    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: started.append((backend, kwargs)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _setup_distributed(TrainConfig(batch_size=4, device="cpu", eval_data="voc")) == (torch.device("cpu"), True)
    assert _setup_distributed(TrainConfig(batch_size=4, device="cpu")) == (torch.device("cpu"), True)
    assert started == [("gloo", {"timeout": timedelta(hours=2)}), ("gloo", {})]


def _train_worker(rank, world, ports, folder, out, results):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    leopart.train(folder, f"{out}/own", steps=1, device="cpu", **TINY)
    ended_own = not dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])  # a new group on the first one's port waits for its old store
    dist.init_process_group("gloo")
    leopart.train(folder, f"{out}/users", steps=1, device="cpu", **TINY)
    kept_users = dist.is_initialized()
    dist.destroy_process_group()
    results[rank] = (ended_own, kept_users)


def test_train_ends_the_process_group_it_started_only(train_dir, tmp_path):
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    first = free_port()
    ports = (first, next(port for port in iter(free_port, None) if port != first))
    mp.start_processes(_train_worker, args=(2, ports, str(train_dir), str(tmp_path), results), nprocs=2,
                       join=True, start_method="spawn")
    assert dict(results) == {0: (True, True), 1: (True, True)}


# ----------------------------------------------------------------- training
def test_train_api_run_and_outputs(train_dir, tmp_path):
    (train_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    try:
        model = leopart.train(train_dir, tmp_path / "run", steps=20, lr_backbone=1e-3, lr_heads=3e-3,
                              save_every=10, queue_length=256, **{k: v for k, v in TINY.items()})
    finally:
        (train_dir / "broken.jpg").unlink()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert set(lines[0]) == {"step", "loss", "lr", "wd", "images_per_s"}
    losses = [r["loss"] for r in lines]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert lines[0]["wd"] == pytest.approx(0.04) and lines[-1]["lr"] < lines[0]["lr"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and any(p.endswith("broken.jpg") for p in ckpt["skipped"])
    assert ckpt["queue_filled"] == 256
    loaded = leopart.from_pretrained(tmp_path / "run" / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # The checkpoint loads as a model too (its student, what run/model holds at the end), so a run can be
    # evaluated while it goes on; older checkpoints without the model's config read it off the weights.
    from_checkpoint = leopart.from_pretrained(tmp_path / "run" / "checkpoint.pt")
    assert from_checkpoint.config == loaded.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, from_checkpoint.state_dict()[k])
    del ckpt["model_config"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(LeopartError, match=r"cannot tell the ViT of .*old.pt from its weights \(width 64, depth 6"):
        leopart.from_pretrained(tmp_path / "old.pt")
    old = leopart.from_pretrained(tmp_path / "old.pt", arch=TINY["arch"])
    assert old.config.num_prototypes == 10
    torch.testing.assert_close(old.prototypes.weight, model.prototypes.weight, rtol=0, atol=0)


def test_without_a_terminal_training_logs_progress_lines(train_dir, tmp_path, monkeypatch, capsys):
    """A batch job has no progress bar (stderr is no terminal, as under pytest): a line every LOG_INTERVAL_S
    seconds, and one at the end when asked for (the CLI asks) or when it printed before, go to stderr
    instead; progress=False keeps it quiet."""
    settings = {**TINY, "progress": True, "steps": 3}
    leopart.train(train_dir, tmp_path / "asked", **settings)  # the first line waits a minute: only the last
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == ("train: 3 steps (8 images, 2 steps of 4 per epoch) on cpu, lr 1e-05 "
                                               "backbone / 0.0001 heads"), lines
    assert re.fullmatch(r"train 3/3 \(100\.0%\)  \d+(\.\d+)? step/s  0:00:\d\d elapsed  loss \d+\.\d{4}", lines[1])
    leopart.train(train_dir, tmp_path / "asked", resume=True, **{**settings, "steps": 4})
    assert capsys.readouterr().err.splitlines()[0] == \
        "train: resuming at step 3 of 4 (8 images, 2 steps of 4 per epoch) on cpu, lr 1e-05 backbone / 0.0001 heads"
    leopart.train(train_dir, tmp_path / "short", **{**settings, "progress": None})
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    leopart.train(train_dir, tmp_path / "every-step", **{**settings, "progress": None})
    assert [line.split()[1] for line in capsys.readouterr().err.splitlines()] == ["1/3", "2/3", "3/3"]
    leopart.train(train_dir, tmp_path / "silent", **{**settings, "progress": False})
    assert capsys.readouterr().err == ""


def test_evaluation_during_training(train_dir, tmp_path):
    """eval_data scores k-means mIoU every eval_every steps and at the end, into eval.jsonl; a bad folder or
    an eval_k above its patches fails before the first step."""
    assert TrainConfig().eval_k == (500, 300, 21) and TrainConfig().eval_resolution == 448  # the reference's
    voc = write_voc_dataset(tmp_path / "voc", n_train=0, n_val=3, size=64)
    leopart.train(train_dir, tmp_path / "run", steps=3, eval_data=str(voc), eval_every=2, eval_k=[4, 3],
                  eval_resolution=64, **TINY)
    lines = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3]
    assert all(0 < r["overclustering"][k] <= 100 for r in lines for k in ("4", "3")), lines
    info = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    last = lines[-1]["overclustering"]
    assert f"k-means mIoU %  k=4: {last['4']:.1f}, k=3: {last['3']:.1f} at step 3" in info.output, info.output
    for bad, match in ((dict(eval_data=str(tmp_path / "nowhere")), "not a VOC-layout folder"),
                       (dict(eval_data=str(voc), eval_k=49, eval_resolution=64),
                        r"eval_k=49 is larger than the number of patches \(48\)"),
                       (dict(eval_data=str(voc), eval_k=4, eval_resolution=72),
                        "eval_resolution 72 is not a multiple of the patch size 16"),
                       (dict(eval_data=str(voc), eval_k=(4, 0)), r"eval_k must be positive integers, not \(4, 0\)")):
        with pytest.raises(LeopartError, match=match):
            leopart.train(train_dir, tmp_path / "bad", steps=3, **{**TINY, **bad})
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()


RESUME_SCRIPT = """
import sys, leopart
leopart.train(sys.argv[1], sys.argv[2], resume=len(sys.argv) > 3, init="random", arch="test_vit", steps=8,
              batch_size=4, global_size=64, local_size=32, num_prototypes=10, workers=0, progress=False,
              save_every=2, lr_backbone=1e-3, lr_heads=3e-3, loss_mask="fg", queue_length=48)
"""


def test_sigkill_then_resume_matches_uninterrupted(train_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(script), str(train_dir), str(full)], check=True, env=env)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(script), str(train_dir), str(cut)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (cut / "checkpoint.pt").exists():
            try:
                if torch.load(cut / "checkpoint.pt", weights_only=True)["step"] >= 4:
                    break
            except Exception:  # noqa: BLE001 - being renamed into place right now
                pass
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(cut / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= killed_at < 8
    subprocess.run([sys.executable, str(script), str(train_dir), str(cut), "--resume"], check=True, env=env)

    a = leopart.from_pretrained(full / "model").state_dict()
    b = leopart.from_pretrained(cut / "model").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    full_lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    cut_lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut_lines] == list(range(1, 9))
    for x, y in zip(full_lines, cut_lines):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)


def test_a_checkpoint_with_the_queue_of_one_process_resumes(train_dir, tmp_path, monkeypatch):
    """Checkpoints before 2026-11-29 kept the queue as [n_global, length, dim], the first process's share:
    they resume as if written now ([processes, n_global, length, dim])."""
    settings = {**TINY, "steps": 3, "save_every": 1, "queue_length": 48, "lr_backbone": 1e-3, "lr_heads": 3e-3}
    full = leopart.train(train_dir, tmp_path / "full", **settings)
    undo = interrupt_at_call(monkeypatch, sys.modules["leopart.train"].Learner, "step", 3)
    with pytest.raises(KeyboardInterrupt):
        leopart.train(train_dir, tmp_path / "old", **settings)
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["queue"].shape[:2] == (1, 2) and len(undo) == 3
    torch.save({**ckpt, "queue": ckpt["queue"][0]}, tmp_path / "old" / "checkpoint.pt")
    resumed = leopart.train(train_dir, tmp_path / "old", resume=True, **settings)
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


def test_train_cli_guards(train_dir, tmp_path):
    runner = CliRunner()
    base = ["train", str(train_dir), "--output", str(tmp_path / "r"), "--init", "random", "--arch", "test_vit",
            "--batch-size", "4", "--global-size", "64", "--local-size", "32", "--num-prototypes", "10",
            "--workers", "0", "--save-every", "1"]
    r = runner.invoke(main, [*base, "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["grad_clip"] is None  # the reference: no clipping
    r = runner.invoke(main, [*base[:3], str(tmp_path / "clipped"), *base[4:], "--steps", "1", "--grad-clip", "2.5"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "clipped" / "config.json").read_text())["grad_clip"] == 2.5
    # A finished run folder stands for its model, and `leopart info` says where the run stands.
    loaded = leopart.from_pretrained(tmp_path / "r")
    assert loaded.name_or_path == str((tmp_path / "r" / "model").resolve())  # what outputs record
    assert torch.equal(loaded.prototypes.weight, leopart.from_pretrained(tmp_path / "r" / "model").prototypes.weight)
    r = runner.invoke(main, ["info", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "step          1 of 1 (finished)" in r.output and "init          random test_vit" in r.output
    assert f"next          leopart cluster IMAGES --model {tmp_path / 'r'}" in r.output
    r = runner.invoke(main, [*base, "--steps", "2"])
    assert r.exit_code == 1 and "pass --resume" in r.output
    r = runner.invoke(main, ["train", str(train_dir), "--output", str(tmp_path / "r"), "--resume", "--batch-size", "8",
                             "--steps", "2"])
    assert r.exit_code == 1 and "batch_size=8 (checkpoint: 4)" in r.output
    r = runner.invoke(main, ["train", str(train_dir), "--output", str(tmp_path / "r"), "--resume", "--steps", "2",
                             "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
    r = runner.invoke(main, ["train", str(tmp_path / "nothing"), "--output", str(tmp_path / "q")])
    assert r.exit_code == 1 and "no such folder" in r.output
    r = runner.invoke(main, [*base[:3], str(tmp_path / "big"), *base[4:], "--batch-size", "64", "--steps", "1"])
    assert r.exit_code == 1 and "need at least 64 images" in r.output


def test_training_images_from_a_folder_or_a_list_file_of_any_name(train_dir, tmp_path):
    from leopart.data import list_training_images

    files = list_training_images(train_dir)
    assert files and files == sorted(files) and len(files) == 8
    listing = train_dir / "train.lst"  # relative lines from the list's folder, absolute ones as they are
    listing.write_text(f"# two of them\n{files[0].relative_to(train_dir)}\n\n{files[1]}\n")
    try:
        assert list_training_images(listing) == files[:2]
        assert list_training_images(train_dir) == files  # the list itself is no image
    finally:
        listing.unlink()
    (tmp_path / "empty.txt").write_text("\n# none\n")
    with pytest.raises(LeopartError, match="empty.txt lists no images"):
        list_training_images(tmp_path / "empty.txt")
    # One image, or a binary file, where a folder or list belongs (was read as text: "File name too long")
    with pytest.raises(LeopartError, match="is one image: training takes a folder of images or a text file"):
        list_training_images(files[0])
    (tmp_path / "images.bin").write_bytes(files[0].read_bytes())
    with pytest.raises(LeopartError, match="images.bin is a binary file, not a text file listing one entry per line"):
        list_training_images(tmp_path / "images.bin")
    (tmp_path / "dino.pth").write_bytes(b"PK\x03\x04 a zipped torch.save")  # weights where DATA belongs
    with pytest.raises(LeopartError, match=r"dino.pth holds weights: .* \(weights to start from go to --init"):
        list_training_images(tmp_path / "dino.pth")


def test_train_on_a_python_list_of_paths(train_dir, tmp_path, monkeypatch):
    # A list of paths (here mixed: a folder, relative and absolute files) trains like the list file it
    # becomes in the run folder, which its config and resume command then name (was "no such folder or file
    # list: ['...', ...]").
    files = sorted(train_dir.glob("*.jpg"))
    monkeypatch.chdir(train_dir)
    images = [files[0].name, files[1], files[0].parent]
    leopart.train(images, tmp_path / "run", steps=1, **TINY)
    listing = tmp_path / "run" / "images.txt"
    assert listing.read_text().splitlines() == [str(files[0]), str(files[1]), *map(str, files)]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(listing)
    leopart.train(images, tmp_path / "run", resume=True, steps=2, **TINY)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    r = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert r.exit_code == 0 and "step          2 of 2 (finished)" in r.output, r.output
    for bad, message in [([Image.new("RGB", (64, 64))], "training reads images from files: give paths, not Image objects"),
                         ([], "the list of training images is empty"),
                         (5, "training data must be a folder, a text file listing images or a list of image paths")]:
        with pytest.raises(LeopartError, match=message):
            leopart.train(bad, tmp_path / "other", steps=1, **TINY)
    assert not (tmp_path / "other").exists()


def test_a_run_from_before_the_reference_augmentations_resumes_with_its_own(train_dir, tmp_path):
    leopart.train(train_dir, tmp_path / "old", steps=1, **TINY)
    ckpt_path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    for name in ("photometric", "hue", "eval_resolution", "crop_redraw"):  # what checkpoints from before these lack
        del ckpt["config"][name]
    ckpt["config"]["eval_k"] = 100  # then one k
    torch.save(ckpt, ckpt_path)
    leopart.train(train_dir, tmp_path / "old", resume=True, steps=2, **TINY)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config["photometric"] == "dino" and config["hue"] == 0.1 and config["crop_redraw"] == "all"
    assert config["eval_resolution"] is None and config["eval_k"] == [100]  # scored at the global crop size


def test_train_cli_from_a_leopart_model_records_its_architecture(train_dir, tiny_model_dir, tmp_path):
    base = ["train", str(train_dir), "--output", str(tmp_path / "r"), "--init", str(tiny_model_dir), "--batch-size",
            "4", "--global-size", "64", "--local-size", "32", "--workers", "0"]
    r = CliRunner().invoke(main, [*base, "--steps", "1"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())
    init_config = leopart.from_pretrained(tiny_model_dir).config
    assert recorded["num_prototypes"] == 10  # the init model's, as are its backbone and head
    assert (recorded["arch"], recorded["backbone_kwargs"]) == (init_config.arch, init_config.backbone_kwargs)
    assert (recorded["proj_hidden_dim"], recorded["proj_dim"]) == (init_config.proj_hidden_dim, init_config.proj_dim)
    r = CliRunner().invoke(main, [*base, "--steps", "2", "--resume", "--num-prototypes", "10"])  # the same count
    assert r.exit_code == 0, r.output
    assert leopart.from_pretrained(tmp_path / "r" / "model").config.num_prototypes == 10


def test_interrupted_train_cli_says_how_to_continue(train_dir, tmp_path, monkeypatch):
    interrupt_at_call(monkeypatch, sys.modules["leopart.train"].Learner, "step", 2)
    r = CliRunner().invoke(main, ["train", str(train_dir), "--output", str(tmp_path / "r"), "--init", "random",
                                  "--arch", "test_vit", "--batch-size", "4", "--global-size", "64", "--local-size",
                                  "32", "--num-prototypes", "10", "--workers", "0", "--save-every", "1",
                                  "--steps", "3"])
    assert r.exit_code == 130 and "Continue it with the same command and --resume." in r.output, r.output
    # Unfinished, the run folder is no model yet: the error and `leopart info` name the checkpoint and the
    # command that continues the run.
    resume = f"leopart train {train_dir} --output {tmp_path / 'r'} --resume"
    with pytest.raises(LeopartError, match="run at step 1 of 3, not finished: load .*checkpoint.pt") as e:
        leopart.from_pretrained(tmp_path / "r")
    assert resume in str(e.value)
    r = CliRunner().invoke(main, ["info", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "step          1 of 3\n" in r.output and f"next          {resume}" in r.output
    assert "loss          " in r.output and "model         written when the run finishes" in r.output
    # Checkpoints from before they recorded the run's total: the config's --steps stands in.
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    del ckpt["total"]
    torch.save(ckpt, tmp_path / "r" / "checkpoint.pt")
    assert "step          1 of 3\n" in CliRunner().invoke(main, ["info", str(tmp_path / "r")]).output


def test_init_from_a_leopart_model_keeps_its_prototypes_unless_another_count_is_asked(tiny_model_dir):
    trained = leopart.from_pretrained(tiny_model_dir)  # 10 prototypes
    kept = build_model(TrainConfig(init=str(tiny_model_dir)))
    assert kept.config.num_prototypes == 10
    torch.testing.assert_close(kept.prototypes.weight, trained.prototypes.weight)
    replaced = build_model(TrainConfig(init=str(tiny_model_dir), num_prototypes=20))
    assert replaced.config.num_prototypes == 20 and replaced.prototypes.weight.shape == (20, 16)
    torch.testing.assert_close(replaced.projection_head[0].weight, trained.projection_head[0].weight)
    assert build_model(TrainConfig(init="random", arch="test_vit")).config.num_prototypes == 300


def test_bad_training_options():
    with pytest.raises(LeopartError, match="unknown training option"):
        leopart.train("x", "y", learning_rate=1)
    with pytest.raises(LeopartError, match="loss_mask"):
        TrainConfig(loss_mask="middle").check()
    TrainConfig().check()  # the paper's recipe
    TrainConfig(n_global=1, grad_clip=None, momentum_teacher=0.9, hue=0.0).check()
    TrainConfig(hue=0, lr_heads=1, seed=np.int64(2), steps=None, eval_resolution=None, progress=True).check()
    # Out-of-range settings are named before any work, rather than failing in torch mid-run (drop_path 2:
    # "bernoulli_ expects p to be in [0, 1]"; a negative queue: "Dimension size must be non-negative").
    bad = [(dict(drop_path=2.0), r"drop_path must lie in \[0, 1\), not 2.0"),
           (dict(queue_length=-5), "queue_length must be >= 0, not -5"),
           (dict(lr_backbone=-1e-5), "lr_backbone must be >= 0"),
           (dict(temperature=0.0), "temperature must be positive, not 0.0"),
           (dict(grad_clip=0.0), "grad_clip must be positive"),
           (dict(momentum_teacher=1.5), r"momentum_teacher must lie in \[0, 1\], not 1.5"),
           (dict(hue=2), r"hue must lie in \[0, 0.5\]"),
           (dict(global_scale=(0.5, 0.2)), r"global_scale must be \(low, high\) with 0 < low <= high <= 1"),
           (dict(roi_size=0), "roi_size must be positive, not 0"),
           (dict(n_global=1, n_local=0), "at least two crops per image"),
           # Values of the wrong kind (a hand-edited config): named, not a TypeError from a comparison.
           (dict(epochs="50"), "^epochs must be an integer, not '50'$"),
           (dict(epochs=None), "^epochs must be an integer, not None$"),
           (dict(batch_size=32.0), "^batch_size must be an integer, not 32.0$"),
           (dict(lr_heads="1e-4"), "^lr_heads must be a number, not '1e-4'$"),
           (dict(jitter="no"), "^jitter must be True or False, not 'no'$"),
           (dict(local_scale=("0.05", 0.25)), r"^local_scale must be \(low, high\)")]
    for settings, match in bad:
        with pytest.raises(LeopartError, match=match):
            TrainConfig(**settings).check()


def test_trains_a_patch14_eva_backbone(train_dir, tmp_path):
    """EVA-02 (rotary positions, patch 14) trains with the foreground loss and resumes; the paper's 96 px local
    crops do not tile by 14 and are refused in one line before the output folder is made (it failed a step in)."""
    eva = {**TINY, "arch": "eva02_tiny_patch14_224", "global_size": 56, "backbone_kwargs": SMALL_BACKBONE}
    with pytest.raises(LeopartError, match=r"multiples of the model's patch size 14, not local_size 32: "
                                           r"e.g. --global-size 224 --local-size 98"):
        leopart.train(train_dir, tmp_path / "bad", steps=1, **eva)
    assert not (tmp_path / "bad").exists()
    eva["local_size"] = 28
    model = leopart.train(train_dir, tmp_path / "run", steps=2, **eva)
    assert model.patch_size == 14 and type(model.backbone).__name__ == "Eva"
    resumed = leopart.train(train_dir, tmp_path / "run", steps=3, resume=True, **eva)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["arch"] == "eva02_tiny_patch14_224"
    assert torch.isfinite(resumed(torch.randn(1, 3, 56, 56), attention=True).attention).all()


def test_train_cli_from_a_release_file_that_needs_its_arch(train_dir, tmp_path):
    """A DINOv3 release file tells no ViT by its weights: without --arch `leopart train` says so in one line before
    making the run folder; with it the run trains, records the arch, and resumes without it (--arch used to mean
    the --init random ViT only, and such files did not load at all)."""
    arch = "vit_tiny_patch16_dinov3_qkvb"
    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no {arch}")
    torch.manual_seed(0)
    torch.save(meta_dinov3_layout(timm.create_model(arch, num_classes=0).state_dict()), tmp_path / "dinov3.pth")
    run = tmp_path / "run"
    base = ["train", str(train_dir), "--output", str(run), "--init", str(tmp_path / "dinov3.pth"), "--batch-size",
            "4", "--global-size", "64", "--local-size", "32", "--num-prototypes", "10", "--workers", "0"]
    r = CliRunner().invoke(main, [*base, "--steps", "1"])
    assert r.exit_code == 1 and "(CLI: --arch of `leopart convert` or `leopart train`)" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not run.exists()
    r = CliRunner().invoke(main, [*base, "--steps", "1", "--arch", arch])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["arch"] == arch
    r = CliRunner().invoke(main, [*base, "--steps", "2", "--resume"])
    assert r.exit_code == 0, r.output
    assert leopart.from_pretrained(run).config.arch == arch


def test_learning_rates_default_to_the_references_for_the_patch_size(train_dir, tmp_path):
    """The reference's COCO configs: 1e-5 / 1e-4 (ViT-S/16, ViT-B/16), 5e-6 / 5e-5 for its ViT-B/8; what is
    asked for wins; config.json records what trained, and a resumed run keeps it."""
    patch8 = {**TINY, "backbone_kwargs": {"patch_size": 8}}
    for name, settings, expected in [("p16", TINY, (1e-5, 1e-4)), ("p8", patch8, (5e-6, 5e-5)),
                                     ("asked", {**patch8, "lr_heads": 3e-4}, (5e-6, 3e-4))]:
        model = leopart.train(train_dir, tmp_path / name, steps=1, **settings)
        assert model.patch_size == (8 if settings is not TINY else 16)
        recorded = json.loads((tmp_path / name / "config.json").read_text())
        assert (recorded["lr_backbone"], recorded["lr_heads"]) == expected
        ckpt = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert sorted({group["base_lr"] for group in ckpt["optimizer"]["param_groups"]}) == sorted(expected)
    leopart.train(train_dir, tmp_path / "p8", resume=True, steps=2, **patch8)
    recorded = json.loads((tmp_path / "p8" / "config.json").read_text())
    assert (recorded["lr_backbone"], recorded["lr_heads"]) == (5e-6, 5e-5)


@pytest.mark.parametrize("n", [0, 2])
def test_train_last_blocks_leaves_the_rest_of_the_backbone_as_it_was(train_dir, tmp_path, n):
    torch.manual_seed(0)
    before = build_model(TrainConfig(**TINY)).state_dict()  # what train() builds from the same seed
    after = leopart.train(train_dir, tmp_path / "run", steps=2, train_last_blocks=n, lr_backbone=1e-2,
                          **TINY).state_dict()
    depth = sum(name.startswith("backbone.blocks.") and name.endswith(".norm1.weight") for name in before)
    trained_blocks = {f"backbone.blocks.{i}." for i in range(depth - n, depth)}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    for name in before:
        in_backbone = name.startswith("backbone.")
        should_train = (not in_backbone or any(name.startswith(b) for b in trained_blocks)
                        or (n > 0 and name.startswith("backbone.norm.")))
        if not should_train:
            assert name not in changed, name
    assert any(name.startswith("projection_head.") for name in changed)
    assert n == 0 or {b for b in trained_blocks if any(name.startswith(b) for name in changed)} == trained_blocks
    with pytest.raises(LeopartError, match=f"train_last_blocks must lie in 0..{depth}"):
        leopart.train(train_dir, tmp_path / "bad", steps=1, train_last_blocks=depth + 1, **TINY)


def test_too_few_images_for_the_batch_says_what_to_change(image_dir, tmp_path, monkeypatch):
    """Fewer images than one global batch fails before the model is built (for DINO init: downloaded)."""
    train_module = importlib.import_module("leopart.train")  # the module (leopart.train is the function)
    monkeypatch.setattr(train_module, "build_model", lambda cfg: pytest.fail("model built before the check"))
    with pytest.raises(LeopartError, match=r"need at least 32 images for a global batch of 32, found \d+: use a "
                                           r"smaller batch size \(--batch-size\)"):
        leopart.train(image_dir, tmp_path / "run", init="dino-vits16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_gpu_bf16(train_dir, tmp_path):
    """A few real steps on CUDA: bf16 autocast, Triton Sinkhorn, pinned-memory loader, queue."""
    model = leopart.train(train_dir, tmp_path / "gpu", steps=4, save_every=2, queue_length=64,
                          **{**TINY, "device": "cuda"})
    lines = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(np.isfinite([r["loss"] for r in lines]))
    assert next(model.parameters()).device.type == "cpu"  # saved and returned on the CPU


@pytest.mark.parametrize("max_size", [1, 2, 3])
def test_small_component_removal_matches_scipy_labelling(max_size):
    """Sizes <= 2 use a labelling-free rule on the device; it must equal scipy's connected components."""
    from scipy import ndimage

    from leopart.foreground import remove_small_components

    g = torch.Generator().manual_seed(max_size)
    masks = torch.cat([torch.rand(100, 9, 11, generator=g) < p for p in (0.1, 0.25, 0.4, 0.6)])
    expected = masks.numpy().copy()
    for m in expected:
        labels, _ = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
        small = np.bincount(labels.ravel()) <= max_size
        small[0] = False
        m[small[labels]] = False
    assert np.array_equal(remove_small_components(masks, max_size).numpy(), expected)


def test_torchrun_two_cpu_processes(train_dir, tmp_path):
    """The documented multi-process entry point, with gloo on CPU: one metrics line per step, one model."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun leaves its rendezvous dir in TMPDIR
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "leopart",
               "train", str(train_dir), "--init", "random", "--arch", "test_vit", "--batch-size", "4",
               "--global-size", "64", "--local-size", "32", "--num-prototypes", "10", "--workers", "0",
               "--steps", "3", "--device", "cpu", "--output", str(out), "--queue-length", "128"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(np.isfinite([r["loss"] for r in lines]))
    assert proc.stdout.count("wrote") == 1
    leopart.from_pretrained(out / "model")
    # The queue's 128 embeddings are split over the processes (distributed Sinkhorn sees them all), as the
    # reference split it: 64 each, 20 added per step (10 per image, 2 images per process). The checkpoint
    # keeps every process's share [processes, global crops, 64, dim], and each resumes with its own.
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["queue"].shape[:3] == (2, 2, 64) and saved["queue_filled"] == 60
    assert not torch.equal(saved["queue"][0, :, :60], saved["queue"][1, :, :60])
    proc = subprocess.run([*command[:command.index("--steps") + 1], "4", *command[command.index("--steps") + 2:],
                           "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 4 and resumed["queue_filled"] == 64
    torch.testing.assert_close(resumed["queue"][:, :, 20:], saved["queue"][:, :, :44], rtol=0, atol=0)
    # Resuming with another number of processes says so.
    r = CliRunner().invoke(main, ["train", str(train_dir), "--output", str(out), "--resume", "--steps", "5",
                                  "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 1 and "resume with the number of processes it had" in r.output, r.output
