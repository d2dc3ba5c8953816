"""What stops a run before it wastes time or writes something wrong: non-finite losses and gradients,
parameters no loss term reaches, too little disk for the checkpoints, DDP replicas that drifted apart."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .. import dist
from ..errors import ConfigError, NonFiniteGradientError, NonFiniteLossError
from ..preflight import check_free_space, state_bytes
from ..runtime import unwrap

log = logging.getLogger(__name__)


def check_nonfinite_limit(max_nonfinite_steps) -> int:
    if int(max_nonfinite_steps) < 1:
        raise ConfigError(f"trainer.max_nonfinite_steps={max_nonfinite_steps} must be >= 1 (1 = stop at the "
                          "first batch with non-finite gradients)")
    return int(max_nonfinite_steps)


def check_accumulate(accumulate) -> int:
    """trainer.accumulate as the loop takes it (preflight.check_config has checked it against batch_size)."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"trainer.accumulate={accumulate!r} must be a whole number >= 1 (micro-batches per "
                          "optimiser step; 1: each batch is one forward pass)")
    return accumulate


def read_step(loss: torch.Tensor, grad_norm: torch.Tensor, terms: dict, with_values: bool):
    """The step's one host read: (loss non-finite, gradients non-finite, values or None).

    The two flags are summed over ranks first, so every rank decides alike (step, skip or stop) and
    none is left waiting in a collective. `values` (this rank's loss, gradient norm and terms) ride
    along on logging steps only.
    """
    flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm)]).float()
    if dist.is_dist():
        torch.distributed.all_reduce(flags)
    parts = [flags]
    if with_values:
        parts.append(torch.stack([loss.detach().float(), grad_norm.float(),
                                  *(v.detach().float().reshape(()) for v in terms.values())]))
    host = torch.cat(parts).tolist()
    values = None
    if with_values:
        values = {"loss": host[2], "grad_norm": host[3], "terms": dict(zip(terms, host[4:]))}
    return host[0] > 0, host[1] > 0, values


def loss_error(terms: dict, step: int) -> NonFiniteLossError:
    bad_terms = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    return NonFiniteLossError(
        f"non-finite loss at step {step} (terms: {bad_terms or 'on another rank'}); the run stops here and "
        "the last good checkpoint is kept. Lower optim.lr, raise trainer.grad_clip, or check the data "
        "with scripts/check_data.py")


def skip_or_stop(module: nn.Module, step: int, in_a_row: int, limit: int) -> None:
    """A batch with non-finite gradients was skipped: warn, or stop after `limit` in a row."""
    names = [n for n, p in unwrap(module).named_parameters()
             if p.grad is not None and not torch.isfinite(p.grad).all()]
    shown = names[:8] + ([f"... and {len(names) - 8} more"] if len(names) > 8 else [])
    where = f"non-finite gradients at step {step} in {shown or 'parameters of another rank'}"
    if in_a_row >= limit:
        raise NonFiniteGradientError(
            f"{where}, {in_a_row} batch(es) in a row (trainer.max_nonfinite_steps={limit}); the run stops "
            "here and the last good checkpoint is kept. Lower optim.lr or trainer.grad_clip, or check the "
            "data with scripts/check_data.py")
    if dist.is_main_process():
        log.warning("%s: batch skipped, weights unchanged (%d of trainer.max_nonfinite_steps=%d in a row)",
                       where, in_a_row, limit)


def check_gradients(module: torch.nn.Module) -> bool:
    """After a backward pass: False if no parameter has a gradient yet (nothing to judge), True if every
    trainable one has; else stop naming those without one. DDP would fail at the next step with a
    hint to find_unused_parameters, which would hide the defect and cost every step."""
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    trainable = sum(p.requires_grad for p in module.parameters())
    if len(missing) == trainable:
        return False
    if missing:
        raise RuntimeError(f"trainable parameters got no gradient: {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                           "TrainingModule.parameter_terms / CLIPHand3D.parameter_terms must name the loss terms "
                           "that train them, so that they are frozen when those terms weigh 0")
    return True


def check_checkpoint_space(ckpt_dir: Path, module: torch.nn.Module, ema, save_init: bool = False) -> None:
    """A checkpoint holds the weights, AdamW's two moments per trainable weight and the EMA copy. A run keeps
    last.pt and best.pt (and init.pt with trainer.save_init) side by side, and an atomic save writes a temp
    file beside the one it replaces: at the peak, every file plus one temp copy. Files already there (a
    resumed run) are replaced in place and take no new space. Checked before the first step, not at the
    first save."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    size = state_bytes(module) + 2 * trainable + (state_bytes(ema.module) if ema is not None else 0)
    names = ["last.pt", "best.pt"] + (["init.pt"] if save_init else [])
    new = [n for n in names if not (Path(ckpt_dir) / n).is_file()]
    parts = ", ".join(new + ["the temp file of a save"])
    check_free_space(ckpt_dir, (len(new) + 1) * size, "run_dir",
                     f"the checkpoints at their peak ({parts}: {len(new) + 1} x {size / 2 ** 20:.1f} MB)")


def rank_weight_checksums(module: torch.nn.Module) -> list[float]:
    """One float64 checksum of the trainable weights per rank, gathered on every rank: DDP replicas
    must agree exactly, and a mismatch is logged (it means ranks trained different models)."""
    with torch.no_grad():
        total = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(
            q for q in module.parameters() if q.requires_grad))
        t = torch.as_tensor(total, dtype=torch.float64).reshape(1)
        if not dist.is_dist():
            return [float(t.item())]
        t = t.to(next(module.parameters()).device)
        parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        torch.distributed.all_gather(parts, t)
    sums = [float(p.item()) for p in parts]
    if len(set(sums)) > 1:
        log.error("DDP replicas disagree: weight checksums per rank %s", sums)
    return sums
