"""One training epoch: the loop body, nothing about building things.

`train_one_epoch` does AMP (CUDA only), clipping, EMA, the temperature clamp and the non-finite guards
(train/guards.py). Prediction over a loader, which validation shares with eval.py, is
evaluation/predict.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..data.transforms import batch_to_device
from ..runtime import autocast_for, unwrap
from .guards import check_nonfinite_limit, loss_error, read_step, skip_or_stop


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

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best_metric": self.best_metric, "best_step": self.best_step, "history": list(self.history),
                "samples_seen": self.samples_seen, "world_size": self.world_size, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**d)


def _grad_norm(params: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Total 2-norm of the gradients (what clip_grad_norm_ computes; the clip reuses it)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=like.device)
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)


def _backward(module: nn.Module, batch: dict, optimizer, scaler, cast) -> tuple[torch.Tensor, dict]:
    """Forward, the weighted total (criterion.total) and its backward pass: (loss, named terms)."""
    with cast:
        _, terms = module(batch)
        loss = unwrap(module).criterion.total(terms)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    return loss, terms


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
                    max_nonfinite_steps: int = 3) -> TrainState:
    """Train over `loader` (already positioned at `state.batch_in_epoch`), updating `state` in place.

    `on_step` runs after every optimiser step (periodic checkpoints); it sees a state that is safe to
    resume from. Stops early when `state.step` reaches `total_steps`. A non-finite loss stops the run
    (NonFiniteLossError). Non-finite gradients without a GradScaler skip the batch (no optimiser,
    schedule or EMA update, no step counted); `max_nonfinite_steps` such batches in a row stop the run
    (NonFiniteGradientError). The fp16 GradScaler handles them itself (skip, lower the scale). The
    host reads the device once per step; the loss for the bar and `log` only every `log_every` steps.
    """
    limit = check_nonfinite_limit(max_nonfinite_steps)
    module.train()
    inner = unwrap(module)
    clamps = [m.clamp_scales_ for m in inner.modules() if callable(getattr(m, "clamp_scales_", None))]
    params = [p for p in module.parameters() if p.requires_grad]
    cast, _ = autocast_for(device, amp)
    t0, seen, bad_in_a_row = time.perf_counter(), 0, 0
    for batch in loader:
        if state.step >= total_steps:
            break
        batch = batch_to_device(batch, device)  # the loader's bytes become the model's input there
        loss, terms = _backward(module, batch, optimizer, scaler, cast)
        grad_norm = _grad_norm(params, loss)
        report = (log is not None or progress is not None) and (
            state.step == 0 or (state.step + 1) % log_every == 0)
        bad_loss, bad_grad, values = read_step(loss, grad_norm, terms, with_values=report)
        if bad_loss:
            raise loss_error(terms, state.step)
        state.batch_in_epoch += 1
        seen += batch["image"].shape[0]
        if bad_grad and scaler is None:
            bad_in_a_row += 1
            skip_or_stop(module, state.step, bad_in_a_row, limit)
            continue
        bad_in_a_row = 0
        _update(inner, params, grad_norm, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
                clamps=clamps, grad_clip=grad_clip, clip=not bad_grad)
        state.step += 1
        if progress is not None:
            progress.update(1)
            if values is not None:
                progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if log is not None and values is not None:
            _log_step(log, values, optimizer, state.step, seen / max(time.perf_counter() - t0, 1e-9))
        if on_step is not None:
            on_step(state)
    return state
