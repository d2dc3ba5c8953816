"""Time the frozen text tower per batch of prompts, with and without its exact savings.

Prompts come from cliphand3d.data.prompts (the training generator) on random joint positions; token
counts do not depend on the joint order, so random joints give realistic lengths. Batches are drawn
with replacement from a pool of `--pool` samples, as epochs revisit a finite dataset: a small pool
shows what the cache buys late in training, a pool much larger than the run shows a cold cache.

    python benchmarks/bench_text.py                      # ViT-B-32-shaped tower, random weights
    python benchmarks/bench_text.py --tiny --batches 5   # quick smoke run
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cliphand3d.data.prompts import PromptGenerator
from cliphand3d.models.text_encoder import TextEncoder

SETTINGS = {
    # name: (dedup, cache, truncate_to_eot)
    "none": (False, False, False),
    "eot": (False, False, True),
    "dedup": (True, False, False),
    "all": (True, True, True),
}


def make_pool(num_joints: int | None, template: str, size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    gen = PromptGenerator(template=template, num_joints=num_joints, axes=("x",), truncate=True)
    return [gen(rng.normal(size=(21, 3)), rng)["x"] for _ in range(size)]


def run(enc: TextEncoder, batches: list[list[str]], setting: str, cache_size: int) -> dict:
    dedup, cache, trunc = SETTINGS[setting]
    enc.dedup, enc.truncate_to_eot = dedup, trunc
    enc.cache_size = cache_size if cache else 0
    enc.clear_cache()
    enc.reset_stats()
    device = enc.tower.token_embedding.weight.device
    enc(batches[0])  # warm-up (allocator, kernels); not timed, but it does fill the cache
    times = []
    for batch in batches[1:]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        enc(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"ms": 1e3 * float(np.median(times)), "hit_rate": enc.hit_rate if cache else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="prompts per batch")
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting (+1 warm-up)")
    p.add_argument("--pool", type=int, default=512, help="distinct samples the batches are drawn from")
    p.add_argument("--num-joints", default="21,10,5", help="comma list; 21 = every joint (77 tokens)")
    p.add_argument("--template", default="order_are")
    p.add_argument("--cache-size", type=int, default=4096)
    p.add_argument("--tiny", action="store_true", help="2-layer width-64 tower instead of ViT-B-32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tower = dict(layers=2, width=64, heads=2, embed_dim=64) if args.tiny else None
    enc = TextEncoder(model_name="ViT-B-32", pretrained=None, tower=tower).to(args.device)
    precision = enc._autocast_dtype(torch.device(args.device)) or torch.float32
    print(f"# text tower: {'tiny' if args.tiny else 'ViT-B-32 (12x512)'}, device {args.device}, "
          f"compute {str(precision).replace('torch.', '')}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.batches} timed batches, pool {args.pool}")
    print(f"{'joints':>6} {'tokens':>6} {'distinct/batch':>14} " + " ".join(f"{s:>9}" for s in SETTINGS)
          + f" {'speed-up':>8} {'hit rate':>8}")
    rng = np.random.default_rng(args.seed)
    for k in (int(s) for s in args.num_joints.split(",")):
        pool = make_pool(None if k == 21 else k, args.template, args.pool, args.seed)
        batches = [[pool[i] for i in rng.integers(0, len(pool), args.batch)] for _ in range(args.batches + 1)]
        tokens = int(enc.eot_positions(enc.tokenizer(pool)).max()) + 1
        distinct = np.mean([len(set(b)) for b in batches])
        res = {s: run(enc, batches, s, args.cache_size) for s in SETTINGS}
        speedup = res["none"]["ms"] / res["all"]["ms"]
        print(f"{k:>6} {tokens:>6} {distinct:>14.1f} " + " ".join(f"{res[s]['ms']:>7.1f}ms" for s in SETTINGS)
              + f" {speedup:>7.1f}x {res['all']['hit_rate']:>8.2f}")
    print("# ms = median time per batch; none = full 77-token pass per prompt; eot = truncation only; "
          "dedup = dedup only; all = dedup + LRU cache + truncation")


if __name__ == "__main__":
    main()
