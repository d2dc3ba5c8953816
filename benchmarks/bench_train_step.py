"""Wall time of one training step of a composed train config, as `scripts/train.py` runs it.

Builds the run's data, model, text branch and loss from `configs/train.yaml` plus overrides, then
times consecutive steps of `engine.train_one_epoch` (data loading, forward, backward, optimiser, EMA
and every per-step check included). Reports the median and quartiles of the step interval after
`--warmup` steps.

    python benchmarks/bench_train_step.py                          # the default run's step
    python benchmarks/bench_train_step.py --steps 40 trainer.batch_size=16 data.img_size=128
    python benchmarks/bench_train_step.py --config-dir /other/checkout/configs   # compare two checkouts

To compare two checkouts on the same CPU, run this file against each in turn, with the other
checkout first on PYTHONPATH and its `--config-dir`; interleave repeats (A B A B) so that drift in
the machine's state hits both alike.
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cliphand3d import engine
from cliphand3d.build import build_criterion, build_datasets, build_model, build_prompts, build_template, build_text
from cliphand3d.data.sampler import ResumableSampler
from cliphand3d.models.training import TrainingModule
from cliphand3d.trainer import build_optimizer, make_loader, seed_everything

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_extensions() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def build_run(cfg):
    """The pieces the trainer builds for a single-process run (train split only)."""
    seed_everything(int(cfg.seed))
    prompts = build_prompts(cfg)
    train_set = build_datasets(cfg, prompts, splits=("train",))["train"]
    template = build_template(cfg, train_set)
    model = build_model(cfg, template)
    encoder, adapters = build_text(cfg)
    criterion = build_criterion(cfg)
    if not criterion.uses_text:
        for p in model.pose_heads.parameters():
            p.requires_grad_(False)
    module = TrainingModule(model, criterion, encoder, adapters)
    o = cfg.optim
    optimizer = build_optimizer(module, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                backbone_lr_mult=o.backbone_lr_mult, fused=o.get("fused", False))
    return train_set, module, optimizer


def time_steps(cfg, steps: int, warmup: int) -> list[float]:
    train_set, module, optimizer = build_run(cfg)
    t = cfg.trainer
    bs = int(t.batch_size)
    sampler = ResumableSampler(len(train_set), shuffle=True, seed=int(cfg.seed), rank=0, world_size=1,
                               batch_size=bs, drop_last=True)
    sampler.set_epoch(0, 0)
    loader = make_loader(train_set, batch_size=bs, sampler=sampler, drop_last=True,
                         num_workers=int(t.num_workers), device=torch.device("cpu"),
                         worker_nice=int(t.get("worker_nice", 0)))
    stamps: list[float] = []
    state = engine.TrainState()
    kwargs = dict(device=torch.device("cpu"), total_steps=warmup + steps, amp=t.amp, scaler=None,
                  grad_clip=t.grad_clip, ema=None, log=None, log_every=int(cfg.logger.log_every),
                  on_step=lambda st: stamps.append(time.perf_counter()), progress=None)
    accepted = inspect.signature(engine.train_one_epoch).parameters
    t0 = time.perf_counter()
    engine.train_one_epoch(module, loader, optimizer, None, state,
                           **{k: v for k, v in kwargs.items() if k in accepted})
    stamps.insert(0, t0)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return intervals[warmup:]


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
