"""One training epoch and one pass of prediction: the loop bodies, nothing about building things.

`train_one_epoch` does AMP (CUDA only), clipping, EMA and the non-finite guard; `predict` runs the
inference path over a loader and returns numpy arrays for `cliphand3d.metrics`, which train-time
validation and eval.py share.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import dist
from .geometry import uvd_to_xyz


class NonFiniteLossError(RuntimeError):
    pass


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


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast_for(device: torch.device, amp: str | bool):
    """AMP only on CUDA: bf16 where supported, else fp16 (with a grad scaler). CPU trains in fp32."""
    if device.type != "cuda" or amp in (False, "off", "none", None):
        return nullcontext(), None
    if amp in ("auto", True, "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _check_finite(loss: torch.Tensor, terms: dict, step: int) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
    if dist.is_dist():
        # every rank must stop together, or the healthy ones hang in the next all-reduce
        torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        bad_terms = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (terms: {bad_terms or 'on another rank'}); the run stops here and "
            "the last good checkpoint is kept. Lower optim.lr, raise trainer.grad_clip, or check the data "
            "with scripts/check_data.py")


def train_one_epoch(
    module: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    *,
    device: torch.device,
    total_steps: int,
    amp: str | bool = "auto",
    scaler=None,
    grad_clip: float | None = None,
    ema=None,
    log: Callable[[str, float, int], None] | None = None,
    log_every: int = 20,
    on_step: Callable[[TrainState], None] | None = None,
    progress=None,
) -> TrainState:
    """Train over `loader` (already positioned at `state.batch_in_epoch`), updating `state` in place.

    `on_step` runs after every optimiser step (periodic checkpoints); it sees a state that is safe to
    resume from. Stops early when `state.step` reaches `total_steps`.
    """
    module.train()
    criterion = unwrap(module).criterion
    cast, _ = autocast_for(device, amp)
    t0, seen = time.perf_counter(), 0
    for batch in loader:
        if state.step >= total_steps:
            break
        batch = to_device(batch, device)
        with cast:
            _, terms = module(batch)
            loss = criterion.total(terms)
        _check_finite(loss, terms, state.step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = None
        if grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in module.parameters() if p.requires_grad], grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(unwrap(module).model)
        state.step += 1
        state.batch_in_epoch += 1
        seen += batch["image"].shape[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if log is not None and (state.step % log_every == 0 or state.step == 1):
            log("train/loss", loss.item(), state.step)
            for k, v in terms.items():
                log(f"train/{k}", float(v.detach()), state.step)
            log("train/lr", optimizer.param_groups[0]["lr"], state.step)
            if grad_norm is not None:
                log("train/grad_norm", float(grad_norm), state.step)
            log("train/samples_per_s", seen / max(time.perf_counter() - t0, 1e-9), state.step)
        if on_step is not None:
            on_step(state)
    return state


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, *, text_branch=None) -> dict:
    """Run the inference path over a loader. Returns numpy arrays (metres) in dataset order:
    pred/gt joints xyz, pred/gt verts xyz (when present), visibility, source indices, and the per-axis
    pose/text features when a text branch (callable prompts -> {axis: feats}) is given."""
    model.eval()
    acc: dict[str, list] = {}

    def add(k, v):
        acc.setdefault(k, []).append(v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v)

    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch["image"], pose_features=text_branch is not None)
        S = batch["image"].shape[-1]
        K, root, bone = batch["K"], batch["root_depth"], batch["bone"]
        add("pred_xyz", uvd_to_xyz(out["joints"].float(), K, S, root, bone))
        add("gt_xyz", batch["joints_xyz"])
        add("pred_uvd", out["joints"])
        add("K", K)
        add("root_depth", root)
        add("bone", bone)
        if out.get("verts") is not None and "verts_xyz" in batch:
            add("pred_verts", uvd_to_xyz(out["verts"].float(), K, S, root, bone))
            add("gt_verts", batch["verts_xyz"])
        if "visible" in batch:
            add("visible", batch["visible"])
        add("index", batch["meta"]["index"])
        if text_branch is not None:
            text = text_branch({a: list(batch["prompts"][a]) for a in out["pose_feats"]})
            for a, f in out["pose_feats"].items():
                add(f"pose_feat_{a}", f)
                add(f"text_feat_{a}", text[a])
                acc.setdefault(f"prompt_{a}", []).extend(batch["prompts"][a])
    result = {}
    for k, v in acc.items():
        result[k] = v if k.startswith("prompt_") else np.concatenate(v, 0)
    return result
