"""Shared bits of the benchmark scripts: timing, peak memory, device naming and result files."""
from __future__ import annotations

import datetime
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESULTS = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timeit(fn, device: str = "cpu", warmup: int = 1, repeat: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_jpegs(folder: Path, n: int, height: int, width: int) -> list[Path]:
    """``n`` noise JPEGs (seeded) in ``folder``: benchmark inputs that need no data; speed does not depend on
    what the pixels show."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = [folder / f"{i:04d}.jpg" for i in range(n)]
    for f in files:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(f)
    return files


def random_vits16(folder: Path):
    """A seeded random-weight Leopart ViT-S/16 (no network here), saved in ``folder``: (model, folder)."""
    import leopart

    torch.manual_seed(0)
    model = leopart.LeopartViT(leopart.LeopartConfig(arch="vit_small_patch16_224"))
    return model, model.save_pretrained(folder)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_results(name: str, device: str, rows: list[dict], columns: list[str], note: str = "",
                  echo: bool = True) -> Path:
    """Save rows as results/<name>.json and a Markdown table results/<name>.md; print the table if ``echo``."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"device": device_name(device), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "note": note}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# {name}", "", f"device: {meta['device']} · date: {meta['date']} · torch {meta['torch']}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    if echo:
        print(text)
    return RESULTS / f"{name}.md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
