"""Training runs and inference models as the benchmark sections build them from configs/train.yaml:
the benchmark's overrides, a run's parts, a model, a first batch, a run stepped a few steps at a time
(StepRunner) and a bare optimiser step."""
from __future__ import annotations

import os
import signal
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import torch
from omegaconf import DictConfig

from ...build import build_datasets, build_model, build_prompts, build_template, build_training_module
from ...data.sampler import ResumableSampler
from ...data.transforms import batch_to_device
from ...models.training import TrainingModule
from ...runtime import make_loader, seed_everything
from ...train.loop import TrainState, train_one_epoch
from ...train.optim import optimizer_from_config


def train_overrides(cfg: DictConfig, *extra) -> list[str]:
    """Every composed train config gets the benchmark's `train_overrides`, then the section's."""
    items = [*cfg.train_overrides]
    for e in extra:
        items.extend(e or [])
    return ["logger.tensorboard=false", f"run_dir={Path(cfg.out_dir) / 'train'}", *items]


def build_run(cfg: DictConfig):
    """(train set, TrainingModule, optimiser) as the trainer builds them for one process."""
    seed_everything(int(cfg.seed))
    prompts = build_prompts(cfg)
    train_set = build_datasets(cfg, prompts, splits=("train",))["train"]
    template = build_template(cfg, train_set)
    module, _ = build_training_module(cfg, template)
    return train_set, module, optimizer_from_config(module, cfg.optim)


def eval_model(cfg: DictConfig, device: torch.device):
    """The inference network of a composed config (random weights), eval mode, on `device`."""
    seed_everything(int(cfg.seed))
    train_set = build_datasets(cfg, None, splits=("train",))["train"]
    return build_model(cfg, build_template(cfg, train_set)).to(device).eval()


def first_batch(dataset, batch_size: int, device: torch.device) -> dict:
    loader = make_loader(dataset, batch_size=batch_size, num_workers=0, device=device)
    return batch_to_device(next(iter(loader)), device)


# Job-control signals pause a run's loader workers between its turns (None where the platform has none).
STOP, CONTINUE = getattr(signal, "SIGSTOP", None), getattr(signal, "SIGCONT", None)


class StepRunner:
    """A training run as scripts/train.py builds it (its data loader and workers included), stepped a
    few steps at a time through train.loop.train_one_epoch, so runs can take turns."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.train_set, self.module, self.optimizer = build_run(cfg)
        self.module.to(device)
        t = cfg.trainer
        self.batch_size = int(t.batch_size)
        sampler = ResumableSampler(len(self.train_set), shuffle=True, seed=int(cfg.seed), rank=0, world_size=1,
                                   batch_size=self.batch_size, drop_last=True)
        sampler.set_epoch(0, 0)
        loader = make_loader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                             num_workers=int(t.num_workers), device=device, worker_nice=int(t.get("worker_nice", 0)))
        self.batches = iter(loader)
        self._signal_workers(STOP)  # until its first turn

    @property
    def encoder(self):
        return self.module.text_encoder

    def __call__(self, steps: int) -> list[float]:
        """Seconds of each of the next `steps` steps (data wait, forward, backward, optimiser, checks).
        The loader's workers run only inside this call: between turns they are stopped, so runs taking
        turns never render for one another's steps."""
        t = self.cfg.trainer
        self._signal_workers(CONTINUE)
        try:
            stamps = [time.perf_counter()]
            train_one_epoch(self.module, islice(self.batches, int(steps)), self.optimizer, None,
                                   TrainState(), device=self.device, total_steps=int(steps), amp=t.amp,
                                   grad_clip=t.grad_clip, on_step=lambda st: stamps.append(time.perf_counter()))
        finally:
            self._signal_workers(STOP)
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self.batches, "_workers", None) or [] if w.is_alive()]

    def _signal_workers(self, sig) -> None:
        if sig is None:  # no job-control signals on this platform: the workers run throughout
            return
        for pid in self.worker_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._signal_workers(CONTINUE)  # a stopped worker could not take the loader's shutdown message
        self.batches = None  # ends the loader's worker processes

    def __enter__(self) -> "StepRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an error or Ctrl-C: never leave stopped workers behind


def time_steps(cfg: DictConfig, steps: int, warmup: int, device: torch.device | None = None) -> list[float]:
    """Seconds of `steps` consecutive training steps after `warmup` (benchmarks/bench_train_step.py)."""
    with StepRunner(cfg, device or torch.device("cpu")) as runner:
        runner(warmup)
        return runner(steps)


def bare_step(module: TrainingModule, optimizer, batch: dict, cast=None) -> None:
    """One optimiser step on a batch already on the device: forward, loss, backward, update."""
    with cast or nullcontext():
        _, terms = module(batch)
        loss = module.criterion.total(terms)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
