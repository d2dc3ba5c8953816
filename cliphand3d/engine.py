"""One training epoch and one pass of prediction: the loop bodies, nothing about building things.

`train_one_epoch` does AMP (CUDA only), clipping, EMA, the temperature clamp and the non-finite
guards; `predict` runs the inference path over a loader and returns numpy arrays for
`cliphand3d.metrics`, which train-time validation and eval.py share.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import dist
from .errors import ConfigError
from .geometry import root_and_bone_from_uvd, uvd_to_xyz
from .skeleton import SCALE_BONE


logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGradientError(NonFiniteLossError):
    """Gradients stayed non-finite for trainer.max_nonfinite_steps batches in a row. A subclass, so
    whatever stops a run on a non-finite loss stops it on this too."""


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


def _grad_norm(params: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Total 2-norm of the gradients (what clip_grad_norm_ computes; the clip reuses it)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=like.device)
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)


def _read_step(loss: torch.Tensor, grad_norm: torch.Tensor, terms: dict, with_values: bool):
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


def _loss_error(terms: dict, step: int) -> NonFiniteLossError:
    bad_terms = [k for k, v in terms.items() if not torch.isfinite(v).all()]
    return NonFiniteLossError(
        f"non-finite loss at step {step} (terms: {bad_terms or 'on another rank'}); the run stops here and "
        "the last good checkpoint is kept. Lower optim.lr, raise trainer.grad_clip, or check the data "
        "with scripts/check_data.py")


def _skip_or_stop(module: nn.Module, step: int, in_a_row: int, limit: int) -> None:
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
        logger.warning("%s: batch skipped, weights unchanged (%d of trainer.max_nonfinite_steps=%d in a row)",
                       where, in_a_row, limit)


def _log_step(log: Callable[[str, float, int], None], values: dict, optimizer, step: int,
              samples_per_s: float) -> None:
    log("train/loss", values["loss"], step)
    for k, v in values["terms"].items():
        log(f"train/{k}", v, step)
    log("train/lr", optimizer.param_groups[0]["lr"], step)
    log("train/grad_norm", values["grad_norm"], step)
    log("train/samples_per_s", samples_per_s, step)


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
    max_nonfinite_steps: int = 3,
) -> TrainState:
    """Train over `loader` (already positioned at `state.batch_in_epoch`), updating `state` in place.

    `on_step` runs after every optimiser step (periodic checkpoints); it sees a state that is safe to
    resume from. Stops early when `state.step` reaches `total_steps`. A non-finite loss stops the run
    (NonFiniteLossError). Non-finite gradients without a GradScaler skip the batch (no optimiser,
    schedule or EMA update, no step counted); `max_nonfinite_steps` such batches in a row stop the run
    (NonFiniteGradientError). The fp16 GradScaler handles them itself (skip, lower the scale). The
    host reads the device once per step; the loss for the bar and `log` only every `log_every` steps.
    """
    if int(max_nonfinite_steps) < 1:
        raise ConfigError(f"trainer.max_nonfinite_steps={max_nonfinite_steps} must be >= 1 (1 = stop at the "
                         "first batch with non-finite gradients)")
    module.train()
    inner = unwrap(module)
    criterion = inner.criterion
    clamps = [m.clamp_scales_ for m in inner.modules() if callable(getattr(m, "clamp_scales_", None))]
    params = [p for p in module.parameters() if p.requires_grad]
    cast, _ = autocast_for(device, amp)
    t0, seen, bad_in_a_row = time.perf_counter(), 0, 0
    for batch in loader:
        if state.step >= total_steps:
            break
        batch = to_device(batch, device)
        with cast:
            _, terms = module(batch)
            loss = criterion.total(terms)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = _grad_norm(params, loss)
        report = (log is not None or progress is not None) and (
            state.step == 0 or (state.step + 1) % log_every == 0)
        bad_loss, bad_grad, values = _read_step(loss, grad_norm, terms, with_values=report)
        if bad_loss:
            raise _loss_error(terms, state.step)
        state.batch_in_epoch += 1
        seen += batch["image"].shape[0]
        if bad_grad and scaler is None:
            bad_in_a_row += 1
            _skip_or_stop(module, state.step, bad_in_a_row, int(max_nonfinite_steps))
            continue
        bad_in_a_row = 0
        if grad_clip and not bad_grad:
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


PLACEMENTS = ("auto", "gt", "estimated")


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, *, text_branch=None,
            placement: str = "auto") -> dict:
    """Run the inference path over a loader. Returns numpy arrays (metres) in dataset order:
    pred/gt joints xyz, pred/gt verts xyz (when present), visibility, source indices, and the per-axis
    pose/text features when a text branch (callable prompts -> {axis: feats}) is given.

    placement: how uvd becomes metres. "gt": the true root depth and bone (the demo protocol);
    "estimated": both recovered from the predicted uvd, K and the metric scale (`item["scale"]`, or
    |xyz[9] - xyz[10]| of the labels), as a submission without labels must; "auto": "gt" when items
    carry labels."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement={placement!r} is not one of {PLACEMENTS} (eval.py placement=...)")
    model.eval()
    acc: dict[str, list] = {}

    def add(k, v):
        acc.setdefault(k, []).append(v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v)

    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch["image"], pose_features=text_branch is not None)
        S = batch["image"].shape[-1]
        K = batch["K"]
        root, bone, extra = _placement(out["joints"].float(), batch, S, placement,
                                       getattr(model, "uv_pixel_offset", 0.5))
        for k, v in extra.items():
            add(k, v)
        # the model owns its uvd -> xyz step (e.g. where J acts, model.joints_from)
        to_xyz = getattr(model, "outputs_to_xyz", None)
        xyz = to_xyz({k: out[k].float() if out.get(k) is not None else None for k in ("joints", "verts")},
                     K, root, bone, img_size=S) if to_xyz is not None else None
        add("pred_xyz", xyz["joints_xyz"] if xyz else uvd_to_xyz(out["joints"].float(), K, S, root, bone))
        if "joints_xyz" in batch:
            add("gt_xyz", batch["joints_xyz"])
        add("pred_uvd", out["joints"])
        add("K", K)
        add("root_depth", root)
        add("bone", bone)
        # vertices where they can be scored, and always without labels (the submission file wants them)
        if out.get("verts") is not None and ("verts_xyz" in batch or "joints_xyz" not in batch):
            add("pred_verts", xyz["verts_xyz"] if xyz else uvd_to_xyz(out["verts"].float(), K, S, root, bone))
            if "verts_xyz" in batch:
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


def _placement(uvd: torch.Tensor, batch: dict, img_size: int, placement: str, pixel_offset: float = 0.5):
    """(root_depth, bone, extra outputs) that turn this batch's uvd into metres (see `predict`)."""
    labelled = "root_depth" in batch
    if placement == "gt" or (placement == "auto" and labelled):
        if not labelled:
            raise ConfigError("placement='gt' needs the true root depth and bone, and these items carry no labels "
                             "(e.g. FreiHAND evaluation without evaluation_xyz.json); use placement=estimated")
        return batch["root_depth"], batch["bone"], {}
    if "scale" in batch:
        scale = batch["scale"]
    elif "joints_xyz" in batch:  # what FreiHAND's scale files hold, measured on the labels
        j = batch["joints_xyz"]
        scale = (j[..., SCALE_BONE[0], :] - j[..., SCALE_BONE[1], :]).norm(dim=-1)
    else:
        raise ConfigError("placement='estimated' needs each item's metric scale (item['scale'], FreiHAND's "
                         "*_scale.json) or its labels; this dataset provides neither")
    root, bone, exact = root_and_bone_from_uvd(uvd, batch["K"], img_size, scale, pixel_offset)
    return root, bone, {"scale": scale, "placement_exact": exact}


def exact_labels(dataset, preds: dict) -> dict:
    """gt_xyz / gt_verts in float64, as the reference scorers read the annotation files.

    Items carry labels as float32 tensors; that rounding can move a distance across an F-score or PCK
    threshold (seen: F@5 0.21391 vs the official scorer's 0.21388 on pred.json). The same labels come
    again, unrounded, from `label_targets` (the item's labels without decoding the image)."""
    if "gt_xyz" not in preds or not hasattr(dataset, "label_targets"):
        return {}
    targets = [dataset.label_targets(int(i)) for i in preds["index"]]
    out = {"gt_xyz": np.stack([np.asarray(t["joints_xyz"], dtype=np.float64) for t in targets])}
    if "gt_verts" in preds:
        out["gt_verts"] = np.stack([np.asarray(t["verts_xyz"], dtype=np.float64) for t in targets])
    for k, v in out.items():  # the same labels, or the items and label_targets have drifted apart
        if v.shape != preds[k].shape or not np.allclose(v, preds[k], rtol=0, atol=1e-5):
            raise RuntimeError(f"{k} from label_targets differs from the items' labels; report this as a bug")
    return out
