"""The optimiser and its learning-rate schedule (configs/optim/; the length: trainer.epochs / max_steps).

The schedule is defined in training samples, not optimiser steps, so it is one curve on any number of
processes. Its unit is the schedule batch, trainer.schedule_batch (null: trainer.batch_size, what one process
steps with): trainer.max_steps and optim.warmup_steps count batches of it, and trainer.epochs spans
epochs x (training samples // schedule batch) of them. A run whose global batch G (processes x
trainer.batch_size) differs takes ceil(total samples / G) optimiser steps, each at the curve's value at the
samples seen before it, with optim.lr scaled by optim.lr_scaling. One process at the schedule batch computes
what a step-defined schedule computes, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..errors import ConfigError

LR_SCALINGS = ("none", "linear", "sqrt")


def build_optimizer(module: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    backbone_lr_mult: float = 1.0, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; no decay on norms, biases and logit scales (decaying them only fights the model).

    fused: one kernel per parameter instead of ~10 (the same update to float rounding); on CPU the
    default per-tensor loop costs ~3x as much (benchmarks: scripts/benchmark.py).
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "logit_scale" in name
        is_backbone = ".backbone." in f".{name}"
        groups.setdefault((no_decay, is_backbone), []).append(p)
    param_groups = [{"params": ps, "weight_decay": 0.0 if nd else weight_decay,
                     "lr": lr * (backbone_lr_mult if bb else 1.0)} for (nd, bb), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=bool(fused) or None)


def optimizer_from_config(module: torch.nn.Module, ocfg: DictConfig, lr_scale: float = 1.0) -> torch.optim.AdamW:
    """build_optimizer with the `optim` group's settings; optim.lr times `lr_scale` (Schedule.lr_scale)."""
    lr = ocfg.lr if lr_scale == 1.0 else ocfg.lr * lr_scale
    return build_optimizer(module, lr=lr, weight_decay=ocfg.weight_decay, betas=ocfg.betas,
                           backbone_lr_mult=ocfg.backbone_lr_mult, fused=ocfg.get("fused", False))


def lr_curve(seen: int, *, warmup: int, total: int, unit: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier of an optimiser step that starts after `seen` training samples, all counts
    in samples: linear warm-up over the first `warmup`, from unit / warmup (one schedule batch's share) to 1,
    then cosine decay to `min_lr_ratio` at `total`, flat after. Integer arithmetic up to the one division, so
    the same position gives the same float whatever the batch that reached it."""
    if seen < warmup:
        return min((seen + unit) / warmup, 1.0)
    progress = min((seen - warmup) / max(total - warmup, unit), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """lr_curve counted in steps of the schedule batch: linear warm-up from ~0, then cosine decay to
    `min_lr_ratio`."""
    return lr_curve(step, warmup=warmup_steps, total=total_steps, unit=1, min_lr_ratio=min_lr_ratio)


def lr_scale(rule: str, global_batch: int, schedule_batch: int) -> float:
    """optim.lr_scaling: the factor on optim.lr for a global batch other than the schedule batch. none: 1;
    linear: global / schedule (Goyal et al. 2017, for SGD); sqrt: its square root (the usual rule for Adam-type
    optimisers). Exactly 1.0 when the two batches are equal, whatever the rule."""
    if rule not in LR_SCALINGS:
        raise ConfigError(f"optim.lr_scaling={rule!r} is not one of {list(LR_SCALINGS)} (how optim.lr follows a "
                          "global batch other than trainer.schedule_batch)")
    if rule == "none" or global_batch == schedule_batch:
        return 1.0
    ratio = global_batch / schedule_batch
    return ratio if rule == "linear" else math.sqrt(ratio)


@dataclass(frozen=True)
class Schedule:
    """A run's schedule in samples (see the module's docstring) and the optimiser steps it takes."""

    unit: int  # the schedule batch: samples per step of trainer.max_steps and optim.warmup_steps
    total: int  # training samples the schedule spans
    warmup: int  # samples of linear warm-up
    global_batch: int  # samples per optimiser step of this run: processes x trainer.batch_size
    min_lr_ratio: float
    lr_scale: float  # on optim.lr (optim.lr_scaling)

    @property
    def steps(self) -> int:
        """Optimiser steps of this run: ceil(total / global batch)."""
        return -(-self.total // self.global_batch)

    def multiplier(self, step: int) -> float:
        """The multiplier on the (scaled) lr of optimiser step `step` (0-based): the curve at step x G samples."""
        return lr_curve(step * self.global_batch, warmup=self.warmup, total=self.total, unit=self.unit,
                        min_lr_ratio=self.min_lr_ratio)

    def scheduler(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # a plain lambda: LambdaLR's state_dict then stores no function state (what checkpoints always held)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.multiplier(s))


def schedule_batch(tcfg: DictConfig, batch_size: int) -> int:
    """trainer.schedule_batch, the global batch the schedule is counted in (null: `batch_size`)."""
    unit = tcfg.get("schedule_batch")
    if unit is None:
        return int(batch_size)
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
        raise ConfigError(f"trainer.schedule_batch={unit!r} must be a whole number of samples >= 1, or null "
                          "(trainer.batch_size: what trainer.max_steps and optim.warmup_steps count)")
    return unit


def schedule_from_config(tcfg: DictConfig, ocfg: DictConfig, *, train_size: int, batch_size: int,
                         world_size: int) -> Schedule:
    """The schedule of trainer.epochs (over `train_size` samples) or trainer.max_steps, counted in the schedule
    batch, for `world_size` processes of `batch_size`; optim.warmup_steps below 1 is a fraction of it."""
    unit = schedule_batch(tcfg, batch_size)
    if tcfg.get("max_steps"):
        total = int(tcfg.max_steps)
    else:
        total = int(tcfg.epochs) * (int(train_size) // unit)
        if int(tcfg.epochs) > 0 and total == 0:
            raise ConfigError(f"trainer.schedule_batch={unit} is larger than the training set ({train_size} "
                              "samples): trainer.epochs counts passes in batches of it; lower it, or set "
                              "trainer.max_steps")
    warmup = int(ocfg.warmup_steps if ocfg.warmup_steps >= 1 else ocfg.warmup_steps * total)
    global_batch = int(batch_size) * int(world_size)
    return Schedule(unit=unit, total=total * unit, warmup=warmup * unit, global_batch=global_batch,
                    min_lr_ratio=ocfg.min_lr_ratio,
                    lr_scale=lr_scale(str(ocfg.get("lr_scaling", "none")), global_batch, unit))
