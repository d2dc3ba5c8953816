"""Where the work runs: the device, seeding, data loaders, autocast, batches on the device, DDP unwrapping.

Shared by training, evaluation and the apps, so each decides these things the same way.
"""
from __future__ import annotations

import functools
import os
import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .errors import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when visible, else CPU), `cuda` (this process's GPU, `local_rank`) or any torch device name."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lower_worker_priority(nice: int, worker_id: int) -> None:
    os.nice(nice)


def make_loader(dataset, *, batch_size: int, num_workers: int, sampler=None, shuffle=False, drop_last=False,
                device: torch.device, worker_nice: int = 0) -> DataLoader:
    """worker_nice > 0 runs the workers at that lower priority: on a machine with as many training threads
    as cores they then fill the cores' idle moments instead of preempting a training thread, which stalls
    its partner at the next synchronisation (see trainer/cpu.yaml)."""
    if worker_nice < 0:
        raise ConfigError(f"trainer.worker_nice={worker_nice} must be >= 0 (0: the workers' priority is not changed)")
    init = functools.partial(lower_worker_priority, int(worker_nice)) if num_workers > 0 and worker_nice > 0 else None
    # Its own generator: creating a loader iterator would otherwise draw from the global torch RNG, and a
    # resumed run (which creates one mid-epoch) would drift from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                      num_workers=num_workers, drop_last=drop_last, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(0), worker_init_fn=init)


def to_device(batch, device: torch.device):
    """Tensors of a batch (nested dicts, lists and tuples of tensors) moved to `device`; the rest as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast_for(device: torch.device, amp: str | bool):
    """(autocast context, grad scaler or None). AMP only on CUDA: bf16 where supported, else fp16 with a
    grad scaler. CPU trains in fp32."""
    if device.type != "cuda" or amp in (False, "off", "none", None):
        return nullcontext(), None
    if amp in ("auto", True, "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper, else `module`."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return module.module if isinstance(module, wrappers) else module
