"""The per-pixel passes of one training crop beside the decode of its picture, on one core and a hot cache:
what bounds a loader worker's per-crop cost at a given crop size (docs/performance.md, "The loader: crop after
decode, labels written once").

    python benchmarks/bench_crop_passes.py                                   # FreiHAND's photos in ../shared, 256 px
    python benchmarks/bench_crop_passes.py --images DIR --size 64 --repeats 2000

Rows (median us over repeats): the decode (`read_image`), the warp (`geometry.warp_crop`, a 1.3x box with a
rotation), the colour pass (`transforms.jitter_color`, colour and channel gains on) and the CHW layout
(`transforms.image_tensor`) of one crop, each on the same decoded picture, and their sum over the decode.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from cliphand3d.apps.benchmark.machine import cpu_name
from cliphand3d.data.base import read_image
from cliphand3d.data.transforms import image_tensor, jitter_color
from cliphand3d.geometry import crop_affine, warp_crop


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="../shared/real_samples/freihand", help="a folder of .jpg pictures")
    ap.add_argument("--size", type=int, default=256, help="crop side in pixels")
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    files = sorted(Path(args.images).expanduser().glob("*.jpg"))
    if not files:
        raise SystemExit(f"no .jpg pictures in {args.images}: pass --images DIR (e.g. a FreiHAND training/rgb folder)")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = {"decode": [], "warp": [], "colour": [], "CHW layout": []}
    for f in files:
        image = read_image(f)
        h, w = image.shape[:2]
        A = crop_affine(((w - 1) / 2, (h - 1) / 2), 0.8 * max(h, w), args.size, 0.3)
        crop = warp_crop(image, A, args.size)
        rows["decode"].append(median_us(lambda: read_image(f), args.repeats))
        rows["warp"].append(median_us(lambda: warp_crop(image, A, args.size), args.repeats))
        rows["colour"].append(median_us(lambda: jitter_color(crop, (1.1, 0.9, 1.2), (1.2, 0.8, 1.1)), args.repeats))
        rows["CHW layout"].append(median_us(lambda: image_tensor(crop), args.repeats))
    us = {k: float(np.mean(v)) for k, v in rows.items()}
    passes = us["warp"] + us["colour"] + us["CHW layout"]
    print(f"CPU {cpu_name()}, torch {torch.__version__}, OpenCV {cv2.__version__}; {len(files)} pictures from "
          f"{args.images}, {args.size} px crops, median of {args.repeats} (mean over pictures)\n")
    print("| pass | us per crop |\n|---|---|")
    for k, v in us.items():
        print(f"| {k} | {v:.1f} |")
    print(f"| warp + colour + layout | {passes:.1f} ({passes / us['decode']:.2f}x the decode) |")


if __name__ == "__main__":
    main()
