"""The optimiser and its learning-rate schedule (configs/optim/)."""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


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


def optimizer_from_config(module: torch.nn.Module, ocfg: DictConfig) -> torch.optim.AdamW:
    """build_optimizer with the `optim` group's settings."""
    return build_optimizer(module, lr=ocfg.lr, weight_decay=ocfg.weight_decay, betas=ocfg.betas,
                           backbone_lr_mult=ocfg.backbone_lr_mult, fused=ocfg.get("fused", False))


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / max(warmup_steps, 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_from_config(optimizer, ocfg: DictConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """warmup_cosine over `total_steps` optimiser steps; optim.warmup_steps below 1 is a fraction of them."""
    warmup = int(ocfg.warmup_steps if ocfg.warmup_steps >= 1 else ocfg.warmup_steps * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=warmup, total_steps=total_steps,
                                           min_lr_ratio=ocfg.min_lr_ratio))
