"""Synthetic hand cost per sample on one core: sampling (kinematics, vertices, camera) and rendering.

Reports the median over repeats of the mean ms/sample over `--num` consecutive indices, and writes a
grid of 16 samples (optionally with the projected skeleton) to look at.

    python benchmarks/bench_render.py                       # 128 px (the default data.render_size), 500 x 5
    python benchmarks/bench_render.py --size 224            # FreiHAND-sized renders (the earlier default)
    python benchmarks/bench_render.py --num 100 --repeats 1 # quick check
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from cliphand3d.data.render import render
from cliphand3d.data.synthetic import sample_hand
from cliphand3d.geometry import project
from cliphand3d.skeleton import BONES


def per_sample_ms(fn, num: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(num):
            fn(i)
        runs.append((time.perf_counter() - t0) / num * 1e3)
    return statistics.median(runs)


def grid(seed: int, size: int, overlay: bool) -> np.ndarray:
    tiles = []
    for i in range(16):
        hand = sample_hand(seed, i, img_size=size)
        img, _ = render(hand)
        if overlay:
            uv = project(hand.xyz, hand.K)
            for p, c in BONES:
                a, b = (tuple(int(round(v)) for v in uv[j]) for j in (p, c))
                cv2.line(img, a, b, (255, 255, 255), 1, cv2.LINE_AA)
            cv2.circle(img, tuple(int(round(v)) for v in uv[0]), 3, (255, 0, 0), -1)
        tiles.append(img)
    rows = [np.concatenate(tiles[r * 4:(r + 1) * 4], 1) for r in range(4)]
    return np.concatenate(rows, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="image side in px (data.render_size)")
    ap.add_argument("--num", type=int, default=500, help="samples per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-verts", type=int, default=778)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="/tmp/synth_grid.png", help="where to write 16 samples ('' = skip)")
    ap.add_argument("--overlay", action="store_true", help="draw the projected skeleton on the grid")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core, as a DataLoader worker would use

    hands = [sample_hand(args.seed, i, num_verts=args.num_verts, img_size=args.size) for i in range(args.num)]
    sample_ms = per_sample_ms(lambda i: sample_hand(args.seed, i, num_verts=args.num_verts, img_size=args.size),
                              args.num, args.repeats)
    render_ms = per_sample_ms(lambda i: render(hands[i]), args.num, args.repeats)
    print(f"{args.size}x{args.size}, {args.num_verts} verts, 1 thread, median of {args.repeats} x {args.num}:")
    print(f"  sample_hand {sample_ms:.3f} ms   render {render_ms:.3f} ms   total {sample_ms + render_ms:.3f} ms/sample")
    if args.grid:
        cv2.imwrite(args.grid, cv2.cvtColor(grid(args.seed, args.size, args.overlay), cv2.COLOR_RGB2BGR))
        print(f"  grid of 16 samples: {args.grid}")


if __name__ == "__main__":
    main()
