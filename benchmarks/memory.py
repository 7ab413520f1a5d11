"""Peak memory of collecting patch features in memory, against the features' own size (the floor).

    python -m benchmarks.memory [--images 160] [--resolution 448] [--batch-size 2]

Random-weight ViT-S/16 (no network here), generated JPEGs, CPU. Each row runs in a fresh process and
reports how far its peak RSS rose above its resident memory once the model is loaded; a small batch keeps
the model's activations small next to the features. Linux only (resets and reads the peak in /proc). Rows:
  list then stack:          torch.stack(list(leopart.iter_embeddings(...))), the obvious way (the baseline);
  leopart.embed:            the API, which fills one tensor allocated up front;
  dense_features:           what `leopart eval` and `leopart cluster` hold (features + foreground masks);
  `leopart embed` to .npy:  streamed to the file, so it holds about one batch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import random_jpegs, random_vits16, write_results

CASES = {
    "list then stack (baseline)": "torch.stack(list(leopart.iter_embeddings(folder, **embed_args)))",
    "leopart.embed": "leopart.embed(folder, **embed_args)",
    "dense_features (eval / cluster)": "dense_features(folder, model, resolution, batch_size, 'cpu', progress=False)"
                                       ".features",
    "`leopart embed` to .npy (streamed)": None,
}

CHILD = """
import json, sys
import torch
import leopart
from leopart.segment import dense_features
from leopart.serialization import write_features
folder, model_dir, resolution, batch_size, expr = sys.argv[1:6]
resolution, batch_size = int(resolution), int(batch_size)
model = leopart.from_pretrained(model_dir, device="cpu")
embed_args = dict(model=model, resolution=resolution, batch_size=batch_size, device="cpu", progress=False)
def status_kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
# Reset the peak (Linux): loading the model peaks higher than where it settles.
open("/proc/self/clear_refs", "w").write("5")
before = status_kib("VmRSS:")
if expr == "stream":
    files = leopart.data.listed(folder)
    write_features(folder + "/features.npy", leopart.iter_embeddings(files, **embed_args), len(files))
    features_bytes = None
else:
    features = eval(expr)
    features_bytes = features.numel() * features.element_size()
print(json.dumps({"growth_kib": status_kib("VmHWM:") - before, "features_bytes": features_bytes}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        random_jpegs(folder, args.images, 300, 400)
        _, model_dir = random_vits16(tmp / "m")
        rows, features_mib = [], None
        for what, expr in CASES.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(model_dir), str(args.resolution),
                                  str(args.batch_size), expr or "stream"], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{what} failed:\n{out.stderr[-2000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result["features_bytes"]:
                features_mib = result["features_bytes"] / 2**20
            growth = result["growth_kib"] / 1024
            rows.append({"what": what, "features MiB": features_mib, "peak RSS growth MiB": growth,
                         "growth / features": growth / features_mib})
            print(rows[-1], flush=True)
    write_results("memory_cpu", "cpu", rows, ["what", "features MiB", "peak RSS growth MiB", "growth / features"],
                  note=f"{args.images} JPEGs 400x300 -> {args.resolution} px, random-weight ViT-S/16, batch "
                       f"{args.batch_size}; peak RSS minus the resident memory once the model is loaded; one "
                       f"process per row")


if __name__ == "__main__":
    main()
