"""The demo's quality table as a benchmark row set: ``leopart demo`` in a temporary folder.

    python -m benchmarks.demo [--minutes 8] [--from-results leopart-demo/results.json]

Writes results/demo_<device>.md with the three methods' mIoU (%) from one run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write_results
from leopart.demo import METHODS, run_demo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--from-results", default=None, help="tabulate a finished demo's results.json instead of running")
    args = ap.parse_args()
    if args.from_results:
        res = json.loads(Path(args.from_results).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_demo(output=f"{tmp}/demo", minutes=args.minutes, progress=False)
    k_over, k_cls = str(res["k_over"]), str(res["num_classes"])
    rows = [{"method": m, f"k={k_over} many-to-one": r["overclustering"][k_over],
             f"k={k_cls} Hungarian": r["overclustering"][k_cls],
             "fully unsupervised": r["fully_unsupervised"] if r["fully_unsupervised"] is not None else "-"}
            for m, r in res["methods"].items() if m in METHODS]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_results(f"demo_{device}", device, rows,
                  ["method", f"k={k_over} many-to-one", f"k={k_cls} Hungarian", "fully unsupervised"],
                  note=f"leopart demo: {res['n_val']} synthetic val images, {res['num_classes']} classes incl. "
                       f"background; {res['train_steps']} training steps; whole run {res['seconds'] / 60:.1f} min.")


if __name__ == "__main__":
    main()
