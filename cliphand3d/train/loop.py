"""One training epoch: the loop body, nothing about building things.

`train_one_epoch` does AMP (CUDA only), gradient accumulation, clipping, EMA, the temperature clamp and the
non-finite guards (train/guards.py). Prediction over a loader, which validation shares with eval.py, is
evaluation/predict.py.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.transforms import batch_to_device
from ..runtime import autocast_for, unwrap
from .guards import check_accumulate, check_nonfinite_limit, loss_error, read_step, skip_or_stop


@dataclass
class TrainState:
    """Counters that a checkpoint carries so a resumed run continues exactly."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # epoch in progress (or the next one, when batch_in_epoch == 0)
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_metric: float = math.inf
    best_step: int = -1
    history: list = field(default_factory=list)
    # What the position means: batch_in_epoch counts batches of `batch_size` per process on `world_size`
    # processes, so a resume must run with the same two (the trainer refuses otherwise).
    samples_seen: int = 0  # the position in samples: training samples consumed so far, all processes together
    world_size: int = 1
    batch_size: int = 0  # per process
    # batches in a row skipped for non-finite gradients, across epoch boundaries (a checkpoint at an epoch's end
    # may fall inside such a streak); absent from checkpoints written before it was kept: 0
    bad_in_a_row: int = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best_metric": self.best_metric, "best_step": self.best_step, "history": list(self.history),
                "samples_seen": self.samples_seen, "world_size": self.world_size, "batch_size": self.batch_size,
                "bad_in_a_row": self.bad_in_a_row}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**d)


def _grad_norm(params: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Total 2-norm of the gradients (what clip_grad_norm_ computes; the clip reuses it)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=like.device)
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)


def _forward_backward(module: nn.Module, batch: dict, scaler, cast, scale: float, sync: bool):
    """Forward, the weighted total (criterion.total) and its backward pass of the total x `scale`; (loss, named
    terms). sync=False: DDP keeps this backward's gradients local (no_sync), to be summed into the next one's."""
    local = module.no_sync() if not sync and isinstance(module, DistributedDataParallel) else nullcontext()
    with local:
        with cast:
            _, terms = module(batch)
            loss = unwrap(module).criterion.total(terms)
        part = loss if scale == 1 else loss * scale
        if scaler is not None:
            scaler.scale(part).backward()
        else:
            part.backward()
    return loss, terms


def _accumulate(module: nn.Module, group: list, optimizer, scaler, cast, device) -> tuple[torch.Tensor, dict, int]:
    """The gradients of one optimiser step over its micro-batches (`group`, N of them): each total x 1/N, so the
    gradients sum to those of the N micro-batches' mean, which for terms that are means over equal micro-batches is
    the whole batch's (BatchNorm and the contrastive negatives see a micro-batch). DDP synchronises the last
    backward pass only. (mean loss, mean terms, samples); gradients unscaled when there is a grad scaler."""
    optimizer.zero_grad(set_to_none=True)
    n, losses, terms, samples = len(group), [], [], 0
    for i, batch in enumerate(group):
        batch = batch_to_device(batch, device)  # the loader's bytes become the model's input there
        loss, named = _forward_backward(module, batch, scaler, cast, scale=1.0 / n, sync=i == n - 1)
        losses.append(loss.detach())
        terms.append({k: v.detach() for k, v in named.items()})
        samples += batch["image"].shape[0]
    if scaler is not None:
        scaler.unscale_(optimizer)
    if n == 1:
        return losses[0], terms[0], samples
    return torch.stack(losses).mean(), {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}, samples


def _steps(loader: Iterable, n: int):
    """The loader's micro-batches, n per optimiser step (an epoch holds whole steps: the sampler deals whole
    batches of batch_size, the loader n micro-batches of each)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def _update(inner: nn.Module, params: list, grad_norm: torch.Tensor, *, optimizer, scheduler, scaler, ema,
            clamps: list, grad_clip: float | None, clip: bool) -> None:
    """One optimiser step on finite gradients (clipped), then the logit-scale clamps, schedule and EMA."""
    if grad_clip and clip:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself when the gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    for clamp in clamps:  # also after a skipped scaler step: every rank clamps alike
        clamp()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update(inner.model)


def _log_step(log: Callable[[str, float, int], None], values: dict, optimizer, step: int,
              samples_per_s: float) -> None:
    log("train/loss", values["loss"], step)
    for k, v in values["terms"].items():
        log(f"train/{k}", v, step)
    log("train/lr", optimizer.param_groups[0]["lr"], step)
    log("train/grad_norm", values["grad_norm"], step)
    log("train/samples_per_s", samples_per_s, step)


def train_one_epoch(module: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    state: TrainState, *, device: torch.device, total_steps: int, amp: str | bool = "auto",
                    scaler=None, grad_clip: float | None = None, ema=None,
                    log: Callable[[str, float, int], None] | None = None, log_every: int = 20,
                    on_step: Callable[[TrainState], None] | None = None, progress=None,
                    max_nonfinite_steps: int = 3, accumulate: int = 1) -> TrainState:
    """Train over `loader` (already positioned at `state.batch_in_epoch`), updating `state` in place.

    Each optimiser step takes `accumulate` micro-batches of the loader (trainer.accumulate; 1: each batch is a
    step). `on_step` runs after every optimiser step (periodic checkpoints); it sees a state that is safe to
    resume from. Stops when `state.step` reaches `total_steps`. A non-finite loss stops the run
    (NonFiniteLossError). Non-finite gradients without a GradScaler skip the step's batch (no optimiser,
    schedule or EMA update, no step counted); `max_nonfinite_steps` such batches in a row, counted across
    epochs (`state.bad_in_a_row`), stop the run (NonFiniteGradientError). The fp16 GradScaler handles them
    itself (skip, lower the scale). The host reads the device once per step; the loss for the bar and `log`
    only every `log_every` steps.
    """
    limit = check_nonfinite_limit(max_nonfinite_steps)
    module.train()
    inner = unwrap(module)
    clamps = [m.clamp_scales_ for m in inner.modules() if callable(getattr(m, "clamp_scales_", None))]
    params = [p for p in module.parameters() if p.requires_grad]
    cast, _ = autocast_for(device, amp)
    t0, seen = time.perf_counter(), 0
    if state.step >= total_steps:
        return state
    for group in _steps(loader, check_accumulate(accumulate)):
        loss, terms, samples = _accumulate(module, group, optimizer, scaler, cast, device)
        grad_norm = _grad_norm(params, loss)
        report = (log is not None or progress is not None) and (
            state.step == 0 or (state.step + 1) % log_every == 0)
        bad_loss, bad_grad, values = read_step(loss, grad_norm, terms, with_values=report)
        if bad_loss:
            raise loss_error(terms, state.step)
        state.batch_in_epoch += 1
        seen += samples
        if bad_grad and scaler is None:
            state.bad_in_a_row += 1
            skip_or_stop(module, state.step, state.bad_in_a_row, limit)
            continue
        state.bad_in_a_row = 0
        _update(inner, params, grad_norm, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
                clamps=clamps, grad_clip=grad_clip, clip=not bad_grad)
        state.step += 1
        _report(progress, log, values, optimizer, state.step, seen / max(time.perf_counter() - t0, 1e-9))
        if on_step is not None:
            on_step(state)
        if state.step >= total_steps:  # before the loader reads the next batch, which nothing would train on
            break
    return state


def _report(progress, log, values: dict | None, optimizer, step: int, samples_per_s: float) -> None:
    if progress is not None:
        progress.update(1)
        if values is not None:
            progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    if log is not None and values is not None:
        _log_step(log, values, optimizer, step, samples_per_s)
