"""Wide images segmented with their aspect ratio kept (the default) vs squeezed into a square (the paper's protocol).

    python -m benchmarks.aspect [leopart-demo]

Uses a finished demo's trained model and segmenter (``leopart demo`` first): its square val scenes are placed side
by side and cropped to a width, so each wide image has a ground truth, and ``leopart.segment`` masks them with
``keep_aspect`` off (`--square`) and on. Writes results/aspect_<device>.md: fully unsupervised mIoU (%) per aspect ratio,
Hungarian many-to-one over the segmenter's objects, as the demo scores its fully unsupervised column.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import leopart
from benchmarks.common import write_results
from leopart.merge import Segmenter
from leopart.metrics import hungarian_miou

# Aspect ratio -> (scenes side by side, width as a fraction of their total width).
RATIOS = {"1:1": (1, 1.0), "4:3": (2, 2 / 3), "16:9": (2, 8 / 9), "2:1": (2, 1.0), "3:1": (3, 1.0), "4:1": (4, 1.0)}


def wide_scenes(demo: Path, n_side: int, share: float):
    """(image, class mask) pairs: ``n_side`` consecutive val scenes side by side, the left ``share`` kept."""
    scenes = sorted((demo / "data" / "JPEGImages").glob("val_*.png"))
    for i in range(0, len(scenes) - n_side + 1, n_side):
        group = scenes[i:i + n_side]
        image = np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in group], axis=1)
        mask = np.concatenate([np.asarray(Image.open(demo / "data" / "SegmentationClass" / p.name)) for p in group],
                              axis=1)
        width = round(image.shape[1] * share)
        yield np.ascontiguousarray(image[:, :width]), np.ascontiguousarray(mask[:, :width])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("demo", nargs="?", default="leopart-demo", type=Path, help="a finished `leopart demo` folder")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not (args.demo / "results.json").is_file():
        raise SystemExit(f"{args.demo} holds no finished demo (no results.json): run `leopart demo` first")
    steps = json.loads((args.demo / "results.json").read_text())["train_steps"]
    model = leopart.from_pretrained(args.demo / "run" / "model", device=args.device)
    segmenter = Segmenter.from_pretrained(args.demo / "segmenter")
    rows = []
    for ratio, (n_side, share) in RATIOS.items():
        pairs = list(wide_scenes(args.demo, n_side, share))
        row = {"aspect": ratio, "size": "x".join(map(str, pairs[0][0].shape[1::-1])), "images": len(pairs)}
        for keep_aspect in (False, True):
            masks = [leopart.segment(image, model=model, segmenter=segmenter, keep_aspect=keep_aspect,
                                     device=args.device) for image, _ in pairs]
            row["keep_aspect" if keep_aspect else "squeezed"] = 100 * hungarian_miou(
                masks, [gt for _, gt in pairs], many_to_one=True)[0]
        row["gain"] = row["keep_aspect"] - row["squeezed"]
        rows.append(row)
    write_results(f"aspect_{args.device.split(':')[0]}", args.device, rows,
                  ["aspect", "size", "images", "squeezed", "keep_aspect", "gain"],
                  note=f"leopart.segment with the model and segmenter of a `leopart demo` run ({steps} training "
                       "steps), fully unsupervised mIoU "
                       "(%) of val scenes side by side, cropped to the width; 'squeezed': resized to the segmenter's "
                       "square resolution (keep_aspect=False, `--square`), 'keep_aspect': that resolution on the "
                       "shorter side (the default).")


if __name__ == "__main__":
    main()
