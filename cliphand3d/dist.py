"""Rank helpers and feature gathering for torch.distributed.

Every helper works unchanged in a single process (not initialised, or world size 1): ranks are 0,
the world is 1 and gathers return their input. DDP set-up lives here too.

Gradient convention of `all_gather_with_grad`: each rank computes the same loss on the gathered
(global) batch, and the backward pass sums, over ranks, the gradient reaching each rank's slice.
After DDP averages parameter gradients over ranks, they equal the gradients of a single process
that saw the concatenated batch, so a contrastive term keeps its weight relative to per-sample
terms (which DDP also averages) at any world size.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    # Local batches may differ (a last batch without drop_last); all_gather needs equal shapes,
    # so sizes go first and tensors are padded to the largest.
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    t = t.contiguous()
    longest = max(sizes)
    if t.shape[0] < longest:
        pad = t.new_zeros((longest - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(t.shape[0], t.device)
        rank = get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(t, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank used this rank's slice in its own copy of the loss: sum those gradients.
        # (all_reduce rather than reduce_scatter: gloo has no reduce_scatter.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.stop]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (N_r, ...) from all ranks along dim 0, in rank order; differentiable.

    Local sizes N_r may differ between ranks. Every rank must call it (a collective), and every
    rank must run backward through the result, since the backward pass is a collective too.
    """
    if get_world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (N_r, ...) from all ranks along dim 0, in rank order; no gradient.

    For labels and identities (e.g. int64 prompt hashes). Local sizes may differ between ranks.
    """
    if get_world_size() == 1:
        return t.detach()
    return _gather_padded(t, _gather_sizes(t.shape[0], t.device))


def all_reduce_sum(value: int, device: torch.device | str = "cpu") -> int:
    """The sum of an integer over all ranks (the value itself in a single process). A collective: every
    rank must call it at the same point. `device` must suit the backend (CUDA for NCCL)."""
    if get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def gather_to_main(obj) -> list | None:
    """Every rank's `obj` (any picklable value, e.g. a dict of numpy arrays), in rank order, on rank 0; None
    on the other ranks; [obj] in a single process. A collective: every rank must call it at the same point."""
    if get_world_size() == 1:
        return [obj]
    parts = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def broadcast_from_main(obj):
    """Rank 0's `obj` (picklable) on every rank (what the others pass is ignored); `obj` itself in a single
    process. A collective."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics and the like) copied into every rank's `module`, in place.

    DDP sends rank 0's buffers at the start of each forward, but each rank's training forward then updates
    its own running statistics: after a step they differ between ranks. Evaluation on several ranks must see
    one model. A collective; nothing in a single process."""
    if get_world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


# --------------------------------------------------------------------------- set-up
def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK set).

    Returns (rank, world_size, local_rank); a plain `python scripts/train.py` gets (0, 1, 0) and no
    process group. Backend: NCCL when CUDA is present, gloo otherwise, unless given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not is_dist():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    return rank, world, local_rank


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
