"""`resume=auto`: which checkpoint a run continues from, whether it can continue exactly, and putting its
state back.

A killed run continues where it stopped, to the same weights: the same data order, EMA, validation history
and best.pt. Anything that would change what the run computes is refused, each differing key listed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..checkpoint.state import (compare_configs, config_to_container, config_value, module_weights, restore_rng_state,
                                with_constructor_defaults)
from ..checkpoint.weights import load_model_weights
from ..errors import ConfigError
from ..losses import weight_for
from ..runtime import unwrap
from .loop import TrainState

log = logging.getLogger(__name__)


def find_resume_checkpoint(run_dir: str | os.PathLike, resume: Any) -> Path | None:
    """Which checkpoint to resume from, or None for a fresh start.

    resume: "auto" (or True) -> <run_dir>/checkpoints/last.pt if it exists, else None;
    "none" / "null" / "false" / "" / None / False -> None; anything else is a path to a .pt file
    or to a run folder (its checkpoints/last.pt).
    """
    run_dir = Path(run_dir)
    if resume is None or resume is False:
        return None
    if resume is True:
        resume = "auto"
    if not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume={resume!r}: expected 'auto', 'none' or a checkpoint path")
    text = os.fspath(resume)
    if text.strip().lower() in ("none", "null", "false", ""):
        log.info("resume=none: starting a fresh run in %s", run_dir)
        return None
    if text.strip().lower() == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            log.info("resume=auto: resuming from %s", last)
            return last
        log.info("resume=auto: no %s yet, starting a fresh run", last)
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"resume={text}: folder has no checkpoints/last.pt or last.pt; "
                                "pass a .pt file, or resume=auto / resume=none")
    if not path.is_file():
        raise FileNotFoundError(f"resume={text}: no such checkpoint file; pass an existing .pt "
                                "file, or resume=auto / resume=none")
    return path


# Config keys a resume may change: they decide where a run lives and how it is watched, validated and
# checkpointed, never the weights it computes (an item is a function of (seed, epoch, index) whichever
# worker loads it; validation and checkpoints draw from no training RNG). Everything else must match,
# keys added later included: optim.* (lr_scaling too), seed, and trainer.batch_size (the position counts
# batches), epochs / max_steps / schedule_batch (the warm-up + cosine schedule spans the total, counted in
# schedule batches, so a new total changes the learning rate from the resume on), amp, grad_clip, ema_decay,
# accumulate (BatchNorm statistics and the contrastive negatives are a micro-batch's), monitor (best_metric holds
# its values). val_batch_size may change: validation shares are whole val batches,
# and the metrics are those of one process whatever the batch (train/run.py, evaluation/sharding.py).
RESUME_MAY_CHANGE = (
    "name", "run_dir", "resume",                      # where the run lives, how it was started
    "logger",                                         # TensorBoard, log frequency
    "trainer.device", "trainer.dist_backend",         # another machine (float results may differ slightly)
    "trainer.cudnn_benchmark", "trainer.tf32",        # the GPU's kernels (float results may differ slightly)
    "trainer.num_workers", "trainer.worker_nice", "trainer.worker_cv2_threads", "trainer.sharing_strategy",
    "trainer.val_batch_size", "trainer.val_every_steps", "trainer.val_every_epochs",
    "trainer.ckpt_every_steps", "trainer.save_init", "trainer.record_samples",
    "trainer.max_nonfinite_steps",                    # only decides when a failing run stops
    "trainer.final_eval",                             # scores best.pt after training, trains nothing
    "data.skip_bad", "data.train.skip_bad",           # only decides whether an unreadable file stops the run
    "data.sets.*.skip_bad", "data.sets.*.train.skip_bad",  # the same, per set of a data=mix
)


# Keys that change what a run computes, added after checkpoints were written without them, and read by the run
# itself rather than passed to a constructor: absent from a saved config, each means the value that reproduces
# what that run computed. A constructor's keyword (a key under a `_target_`) needs no entry here: absent, it
# means the constructor's default (checkpoint.state.with_constructor_defaults).
RESUME_ABSENT_MEANS = {
    "trainer.schedule_batch": None,  # the schedule counted in batches of trainer.batch_size
    "optim.lr_scaling": "none",  # optim.lr as written
    "trainer.accumulate": 1,  # one forward pass per optimiser step
}


def _with_absent_defaults(cfg: dict) -> dict:
    """`cfg` (a plain nested dict) with RESUME_ABSENT_MEANS filled in where a group it has lacks the key."""
    out = dict(cfg)
    for key, value in RESUME_ABSENT_MEANS.items():
        group, name = key.split(".")
        if isinstance(out.get(group), dict) and name not in out[group]:
            out[group] = {**out[group], name: value}
    return out


def _with_absent_weights(saved: dict, cfg: dict) -> dict:
    """`saved` with every loss weight `cfg` names and `saved` lacks set to what the saved run weighed that term
    with (`losses.weight_for`: 0, or `clip` for a `clip_<axis>`), so a loss term added later never strands a run:
    resuming one whose new term weighs 0 is exact, and a nonzero weight is reported as a change from 0."""
    weights, now = (c.get("loss", {}).get("weights") if isinstance(c.get("loss"), dict) else None for c in (saved, cfg))
    if not isinstance(weights, dict) or not isinstance(now, dict):
        return saved
    filled = {**{k: weight_for(k, weights) for k in now if k not in weights}, **weights}
    return {**saved, "loss": {**saved["loss"], "weights": filled}}


def resume_mismatches(saved: dict, cfg: dict, *, world_size: int, batch_size: int) -> list[str]:
    """What keeps `saved` (a checkpoint) from continuing exactly as this run (config `cfg`, a plain
    dict), one 'key: saved X, now Y' line each; empty when it can."""
    saved_cfg = _with_absent_defaults(config_to_container(saved.get("config") or {}))
    saved_cfg = _with_absent_weights(with_constructor_defaults(saved_cfg, cfg), cfg)
    keys = compare_configs(saved_cfg, cfg, keys=None, ignore=RESUME_MAY_CHANGE)
    lines = [f"{k}: saved {config_value(saved_cfg, k)!r}, now {config_value(cfg, k)!r}" for k in keys]
    ts = saved.get("train_state") or {}
    missing = [k for k in ("world_size", "batch_size") if k not in ts]
    if missing:
        lines.append(f"train_state has no {' / '.join(missing)}: the checkpoint predates recording them, so its "
                     "data position (counted in batches) cannot be checked; finish that run with the cliphand3d "
                     "version that wrote it")
    else:
        if ts["world_size"] != world_size:
            lines.append(f"world size (processes): saved {ts['world_size']}, now {world_size}")
        if ts["batch_size"] != batch_size and "trainer.batch_size" not in keys:
            lines.append(f"batch size per process: saved {ts['batch_size']}, now {batch_size}")
    return lines


def check_resumable(saved: dict, cfg: DictConfig, path: Path, *, world_size: int, batch_size: int) -> None:
    lines = resume_mismatches(saved, config_to_container(cfg), world_size=world_size, batch_size=batch_size)
    if lines:
        raise ConfigError(
            f"cannot resume from {path} exactly; it differs from this run at:\n" + "".join(f"  {x}\n" for x in lines)
            + f"  fix: resume with the saved values (the run's config.yaml beside {path.parent.name}/ holds them) "
            "on the same number of processes, or start a new run with name=<new name>. May differ: "
            + ", ".join(RESUME_MAY_CHANGE))


def restore(saved: dict, where: Path, *, module, optimizer, scheduler, scaler, ema) -> TrainState:
    """Put a training checkpoint's state back into a freshly built run: weights (checked, then the training
    heads), optimiser, schedule, grad scaler, EMA and the RNG states; returns its TrainState."""
    inner = unwrap(module)
    load_model_weights(inner.model, saved["model"], str(where))
    inner.load_state_dict(module_weights(saved), strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    if ema is not None and saved.get("ema"):
        ema.load_state_dict(saved["ema"])
    state = TrainState.from_dict(saved["train_state"])
    restore_rng_state(saved["rng"])
    return state
