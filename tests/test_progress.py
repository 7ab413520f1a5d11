"""Progress reporting: bars where someone watches, plain lines in logs (pytest's captured stderr is no terminal,
like a batch job's log)."""
import re

import numpy as np
import pytest
from tqdm.auto import tqdm

import leopart
from leopart import progress as progress_module
from leopart.progress import ProgressLines, progress_bar

SPEED = r"\d+(\.\d+)? \w+/s"
LINE = re.compile(rf"work (\d+)/5 \((\d+\.\d)%\)  {SPEED}  0:00:\d\d elapsed(  0:00:\d\d left)?(  loss \d\.\d\d)?")


def run(progress, n=5, **kwargs):
    with progress_bar(total=n, desc="work", progress=progress, **kwargs) as bar:
        for i in range(n):
            bar.set_postfix(loss=f"{1 / (i + 1):.2f}", refresh=False)
            bar.update(1)


def test_without_a_terminal_lines_replace_the_bar(capsys, monkeypatch):
    run(None)  # short work, no terminal: quiet
    run(False)
    assert capsys.readouterr().err == ""
    run(True)  # asked for: one closing line, no carriage returns
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 1 and LINE.fullmatch(err.strip()), err
    assert err.startswith("work 5/5 (100.0%)") and err.strip().endswith("loss 0.20")
    run(True, leave=False)  # an inner loop leaves no closing line
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # every update is an interval: no repeated last line
    run(None)
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.fullmatch(line).group(1) for line in lines] == ["1", "2", "3", "4", "5"], lines
    run(False)
    assert capsys.readouterr().err == ""


def test_lines_for_iterables_bytes_and_unknown_totals(capsys, monkeypatch):
    assert list(progress_bar(iter("abc"), desc="letters", progress=True)) == ["a", "b", "c"]
    assert re.fullmatch(rf"letters 3  {SPEED}  0:00:\d\d elapsed\n", capsys.readouterr().err)
    assert list(progress_bar(range(4), desc="numbers", unit="img", progress=True)) == [0, 1, 2, 3]
    assert capsys.readouterr().err.startswith("numbers 4/4 (100.0%)  ")
    with progress_bar(total=3 << 20, initial=1 << 20, unit="B", unit_scale=True, desc="x.ckpt", progress=True) as bar:
        bar.update(2 << 20)
    assert re.match(r"x\.ckpt 3\.15MB/3\.15MB \(100\.0%\)  [\d.]+[kMGTPE]?B/s  ", capsys.readouterr().err)


def test_a_terminal_or_a_notebook_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(progress_module, "_watched", lambda: True)
    bar = progress_bar(total=3, desc="work", progress=None)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert progress_bar(total=3, progress=False).disable
    monkeypatch.setattr(progress_module, "_watched", lambda: False)
    assert isinstance(progress_bar(total=3, progress=None), ProgressLines)


def test_api_calls_report_in_lines(capsys, tmp_path):
    """embed with progress=True (what the CLI passes) logs one closing line instead of tqdm's bar updates."""
    model = leopart.LeopartViT(leopart.LeopartConfig(arch="test_vit", img_size=32))
    images = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    leopart.embed(images, model=model, resolution=32, batch_size=1, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("embed 3/3 (100.0%)  ") and len(err.splitlines()) == 1, err
    leopart.embed(images, model=model, resolution=32, batch_size=1)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError):
        progress_bar(total=1)  # every caller states the user's setting


def test_failed_work_ends_without_a_closing_line(capsys):
    """The one-line error stays the last line of a failed command's output."""
    with pytest.raises(ValueError):
        with progress_bar(total=5, desc="work", progress=True) as bar:
            bar.update(2)
            raise ValueError
    for _ in zip(progress_bar(range(5), desc="work", progress=True), range(2)):
        pass  # abandoned after 2 items, as a loop that breaks on an error
    assert capsys.readouterr().err == ""
