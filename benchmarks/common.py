"""Shared bits of the benchmark scripts: timing, peak memory, device naming and result files."""
from __future__ import annotations

import datetime
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

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


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_results(name: str, device: str, rows: list[dict], columns: list[str], note: str = "") -> Path:
    """Save rows as results/<name>.json and a Markdown table results/<name>.md; print the table."""
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
    print(text)
    return RESULTS / f"{name}.md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
