"""The synthetic parts dataset and a short end-to-end ``leopart demo`` run."""
import json
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import interrupt_at_call
from PIL import Image

import leopart
from leopart.cli import main
from leopart.demo import METHODS, run_demo
from leopart.errors import LeopartError
from leopart.evaluate import load_mask, read_voc
from leopart.synthetic import CLASSES, make_scene, write_voc_dataset


def test_scenes_are_seeded_and_hold_textured_objects():
    a_img, a_mask = make_scene(np.random.default_rng(3), 96)
    b_img, b_mask = make_scene(np.random.default_rng(3), 96)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert a_img.shape == (96, 96, 3) and a_img.dtype == np.uint8 and a_mask.dtype == np.uint8
    masks = [make_scene(np.random.default_rng(s), 96)[1] for s in range(30)]
    assert set(np.unique(np.stack(masks))) == set(range(len(CLASSES)))
    # objects are textured: more local contrast inside objects than in the smooth (but grainy) backgrounds
    ratios = []
    for seed in range(6):
        img, mask = make_scene(np.random.default_rng(seed), 96)
        grad = np.abs(np.diff(img.astype(float), axis=1)).sum(axis=2)
        inside = mask[:, 1:] > 0
        ratios.append(grad[inside].mean() / grad[~inside].mean())
    assert np.mean(ratios) > 1.4, ratios


def test_voc_layout(tmp_path):
    root = write_voc_dataset(tmp_path / "syn", n_train=5, n_val=3, size=48, seed=1)
    voc = read_voc(root, "val")
    assert len(voc.names) == 3 and len(read_voc(root, "train").names) == 5
    with Image.open(voc.masks[0]) as m:
        assert m.mode == "P" and m.size == (48, 48)
    assert load_mask(voc.masks[0]).max() < len(CLASSES)
    assert len((root / "train_images.txt").read_text().split()) == 5


def test_short_demo_run_writes_everything(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(output=str(out), steps=4, n_train=32, n_val=4, image_size=48, k_over=8, fu_k=6, progress=False)
    for name in ("results.json", "loss_curve.png", "grid.png", "segmenter/config.json", "run/model/config.json",
                 "run/metrics.jsonl", "data/ImageSets/Segmentation/val.txt"):
        assert (out / name).is_file(), name
    assert len(list((out / "examples").glob("*_mask.png"))) == 4
    assert len(list((out / "examples").glob("*_overlay.png"))) == 4
    assert len(list((out / "features").glob("*/shard_*.safetensors"))) == 1  # eval's features, reused by step 4
    saved = json.loads((out / "results.json").read_text())
    assert saved["train_steps"] == 4 and set(saved["methods"]) == set(METHODS)
    for r in saved["methods"].values():
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in r["overclustering"].values())
    assert math.isfinite(saved["methods"][METHODS[2]]["fully_unsupervised"])
    assert isinstance(saved["trained_beats_baselines"], bool) and res["train_steps"] == 4
    # The saved segmenter reproduces the example masks through the public API, with the model and resolution
    # it records (the demo's ViT at 96 px).
    example = sorted((out / "examples").glob("*_mask.png"))[0]
    image = out / "data" / "JPEGImages" / example.name.replace("_mask.png", ".png")
    mask = leopart.segment(image, segmenter=str(out / "segmenter"))
    assert (mask == np.asarray(Image.open(example))).mean() > 0.99
    with pytest.raises(LeopartError, match="already holds a finished demo"):
        run_demo(output=str(out), steps=4, n_train=32, n_val=4, image_size=48)


def test_interrupted_demo_resumes_with_its_own_step_count(tmp_path, monkeypatch, capsys):
    """Rerunning an interrupted demo continues its training to the step count it had chosen (no new
    calibration), and ends as an uninterrupted run does; interrupted after training, it loads the model."""
    demo, learner = sys.modules["leopart.demo"], sys.modules["leopart.train"].Learner
    sizes = dict(n_train=32, n_val=4, image_size=48, k_over=8, fu_k=6, progress=False)
    monkeypatch.setattr(demo, "calibrate_steps", lambda *args: 8)
    real_step = learner.step
    interrupt_at_call(monkeypatch, learner, "step", 4)
    with pytest.raises(KeyboardInterrupt):
        run_demo(output=str(tmp_path / "cut"), **sizes)
    assert "Run the same `leopart demo` command again" in capsys.readouterr().out
    monkeypatch.setattr(learner, "step", real_step)

    def no_calibration(*args):
        raise AssertionError("a resumed demo must keep the interrupted run's step count")

    monkeypatch.setattr(demo, "calibrate_steps", no_calibration)
    res = run_demo(output=str(tmp_path / "cut"), **sizes)
    assert res["train_steps"] == 8
    monkeypatch.setattr(demo, "calibrate_steps", lambda *args: 8)
    full = run_demo(output=str(tmp_path / "full"), **sizes)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
              for d in ("cut", "full")]
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert res["methods"] == full["methods"]
    # Interrupted after training (no results.json yet): the trained model is loaded, not trained further.
    (tmp_path / "full" / "results.json").unlink()
    monkeypatch.setattr(learner, "step", lambda *args: pytest.fail("trained again"))
    assert run_demo(output=str(tmp_path / "full"), **sizes)["methods"] == full["methods"]


def test_demo_cli_rejects_bad_options(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "d"), "--n-train", "3"])
    assert r.exit_code == 2 and "n-train" in r.output


def test_demo_output_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("")
    r = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "taken")])  # said before any work
    assert r.exit_code == 1 and r.output.strip() == \
        f"Error: cannot write {tmp_path / 'taken'}: it is a file, and a folder belongs there", r.output
    # A file-system error met later is one line too, naming its path; the traceback is there for whoever asks.
    def taken(**_):
        raise FileExistsError(17, "File exists", str(tmp_path / "taken"))

    monkeypatch.setattr(sys.modules["leopart.demo"], "run_demo", taken)
    r = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "fresh")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: cannot use {tmp_path / 'taken'}: File exists", r.output
    monkeypatch.setenv("LEOPART_DEBUG", "1")
    r = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "fresh")])
    assert isinstance(r.exception, FileExistsError)
