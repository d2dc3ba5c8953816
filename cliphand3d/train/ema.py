"""Exponential moving average of model weights, used for validation and the final checkpoint.

After update n (n = 1, 2, ...) every trainable floating-point parameter of the shadow copy is
    shadow <- d_n * shadow + (1 - d_n) * param,
with d_n = decay, or with warmup d_n = min(decay, n / (n + 9)) (0.1, 0.18, 0.25, ... -> decay),
so the average is not dominated by the random initial weights during the first steps.
Buffers (BatchNorm statistics, counters) and frozen parameters are copied, not averaged: buffers
are statistics of the current weights, and frozen parameters never change, so copying is exact
and avoids averaging a frozen CLIP tower every step.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoint.weights import check_state_dict_compat
from ..errors import ConfigError
from ..runtime import unwrap


class ModelEMA:
    """fp32 shadow copy of `model` (unwrapped from DDP), averaged by `update(model)`.

    `module` is the averaged network (eval mode, no gradients) for validation and saving.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"trainer.ema_decay={decay} must be in [0, 1) (or null for no EMA)")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(unwrap(model)).float().eval()
        self.module.requires_grad_(False)

    def current_decay(self, n: int | None = None) -> float:
        """d_n for update number n (default: the next update)."""
        n = self.updates + 1 if n is None else n
        return min(self.decay, n / (n + 9.0)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        d = self.current_decay()
        self.updates += 1
        shadow_params = dict(self.module.named_parameters())
        avg_dst, avg_src, copy_dst, copy_src = [], [], [], []
        for name, p in src.named_parameters():
            if name not in shadow_params:
                raise KeyError(f"EMA update: model parameter {name!r} is not in the EMA copy; "
                               "the EMA must be built from the same model it averages")
            s = shadow_params[name]
            if p.requires_grad and p.is_floating_point():
                avg_dst.append(s)
                avg_src.append(p.detach().to(device=s.device, dtype=s.dtype))
            else:
                copy_dst.append(s)
                copy_src.append(p.detach())
        if avg_dst:
            torch._foreach_mul_(avg_dst, d)
            torch._foreach_add_(avg_dst, avg_src, alpha=1.0 - d)
        shadow_bufs = dict(self.module.named_buffers())
        for name, b in src.named_buffers():
            if name in shadow_bufs:
                copy_dst.append(shadow_bufs[name])
                copy_src.append(b.detach())
        for dst, val in zip(copy_dst, copy_src):
            dst.copy_(val)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], where: str = "EMA state") -> None:
        for key in ("updates", "module"):
            if key not in state:
                raise KeyError(f"{where} has no {key!r}; expected the dict ModelEMA.state_dict() "
                               "returns")
        check_state_dict_compat(self.module, state["module"], where)
        self.module.load_state_dict(state["module"], strict=True)
        self.updates = int(state["updates"])
        # decay/warmup come from the current config, so a resumed run may change them on purpose.
