"""Wall time of one training step of a composed train config, as `scripts/train.py` runs it.

Builds the run's data, model, text branch and loss from `configs/train.yaml` plus overrides, then
times consecutive steps of `train.loop.train_one_epoch` (data loading, forward, backward, optimiser, EMA
and every per-step check included). Reports the median and quartiles of the step interval after
`--warmup` steps.

    python benchmarks/bench_train_step.py                          # the default run's step
    python benchmarks/bench_train_step.py --steps 40 trainer.batch_size=16 data.img_size=128
    python benchmarks/bench_train_step.py --config-dir /other/checkout/configs   # compare two checkouts

To compare two checkouts on the same CPU, run this file against each in turn, with the other
checkout first on PYTHONPATH and its `--config-dir`; interleave repeats (A B A B) so that drift in
the machine's state hits both alike (a checkout older than cliphand3d.apps.benchmark: run its own copy of
this file). Two configs of one checkout: `python scripts/benchmark.py sections=[train_step]` with both
as train_step.variants, which interleaves them for you.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cliphand3d.apps.benchmark.machine import cpu_name, vector_extensions
from cliphand3d.apps.benchmark.runs import time_steps

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--config-dir", default=str(REPO / "configs"))
    ap.add_argument("--label", default="", help="a name for this line of output")
    ap.add_argument("--json", default=None, help="append the result as one json line to this file")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/train.py")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(Path(args.config_dir).resolve()), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=/tmp/bench_train_step", "logger.tensorboard=false",
                                          *args.overrides])
    times = time_steps(cfg, args.steps, args.warmup)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    res = {"label": args.label, "median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2],
           "steps": len(times), "batch_size": int(cfg.trainer.batch_size), "img_size": int(cfg.data.img_size),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name(),
           "vector": vector_extensions(), "overrides": args.overrides}
    print(f"{args.label or 'step'}: median {res['median_s']:.3f} s/step (q1 {q[0]:.3f}, q3 {q[2]:.3f}) over "
          f"{len(times)} steps | batch {res['batch_size']} @ {res['img_size']} px | {res['threads']} threads | "
          f"torch {res['torch']} | {res['cpu']} ({res['vector']})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
