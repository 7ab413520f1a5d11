"""leopart embed vs timm's forward_features on the same 64 images at 224 px (ViT-S/16 architecture).

    python -m benchmarks.embed [--device cuda] [--images 64]

Weights are random (no network here); speed does not depend on them. Rows:
  timm forward_features: the backbone alone on the already-preprocessed batch (the floor);
  leopart.embed (API):   decode + resize + normalise + forward, from JPEG files;
  leopart embed (CLI):   the whole command, process start and model load included.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from PIL import Image

import leopart
from benchmarks.common import random_jpegs, random_vits16, timeit, write_results
from leopart.data import to_tensor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = random_jpegs(tmp, args.images, 375, 500)
        model, model_dir = random_vits16(tmp / "model")

        ref = timm.create_model("vit_small_patch16_224", num_classes=0).eval().to(args.device)
        ref.load_state_dict({k[9:]: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
        batch = torch.stack([to_tensor(Image.open(f).convert("RGB"), (224, 224)) for f in files]).to(args.device)

        @torch.no_grad()
        def run_timm():
            for chunk in batch.split(args.batch_size):
                ref.forward_features(chunk)

        model_dev = leopart.from_pretrained(model_dir, device=args.device)
        t_timm = timeit(run_timm, args.device)
        t_api = timeit(lambda: leopart.embed(files, model=model_dev, batch_size=args.batch_size,
                                             device=args.device, progress=False), args.device)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "leopart", "embed", str(tmp), "--model", str(model_dir),
                        "--device", args.device, "--batch-size", str(args.batch_size),
                        "--output", str(tmp / "f.safetensors")], check=True, capture_output=True)
        t_cli = time.perf_counter() - t0

    n = args.images
    rows = [
        {"what": "timm forward_features (baseline)", "seconds": t_timm, "images/s": n / t_timm, "ratio vs timm": 1.0},
        {"what": "leopart.embed from JPEG files", "seconds": t_api, "images/s": n / t_api, "ratio vs timm": t_api / t_timm},
        {"what": "`leopart embed` CLI, whole process", "seconds": t_cli, "images/s": n / t_cli, "ratio vs timm": t_cli / t_timm},
    ]
    write_results(f"embed_{args.device.split(':')[0]}", args.device, rows, ["what", "seconds", "images/s", "ratio vs timm"],
                  note=f"{n} images 375x500 JPEG -> 224x224, ViT-S/16, batch {args.batch_size}; median of 3 (CLI: 1 run)")


if __name__ == "__main__":
    main()
