"""Config checks that run before any training time is spent (no data read, no model built).

Each would otherwise surface late: a `trainer.monitor` the protocol does not report fails at the first
validation, minutes in; an image size the backbone cannot tile, or prompts longer than the text tower
reads, train without an error at all. `check_config` names the key, the bad value and the fix.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from . import metrics
from .build import DATA_SPLITS, data_sets, monitor_data, text_branch_on
from .errors import ConfigError
from .models.text_encoder import tower_context_length as open_clip_context_length
from .skeleton import NUM_JOINTS

BACKBONE_STRIDE = 32  # ResNet F4 (cliphand3d.models.backbone.STRIDES[-1])


def metric_names(protocol: str, has_verts: bool) -> list[str]:
    """The keys `metrics.evaluate` reports for `protocol`, read off one evaluation of a dummy input
    (so they follow metrics.py rather than a copy of its key list)."""
    rng = np.random.default_rng(0)
    gt = rng.normal(scale=0.05, size=(2, NUM_JOINTS, 3)) + np.array([0.0, 0.0, 0.5])
    pred = gt + rng.normal(scale=0.005, size=gt.shape)
    verts = None
    if has_verts and protocol != "rhd":
        verts = rng.normal(scale=0.05, size=(2, 16, 3)) + np.array([0.0, 0.0, 0.5])
    return sorted(metrics.evaluate(protocol, pred, gt, verts, None if verts is None else verts + 0.001))


def monitor_choices(cfg: DictConfig) -> list[str]:
    """Every validation metric a run with `cfg` reports: the protocol of the validation set's class (data=mix:
    the monitor set's), plus retrieval per axis when the text branch is on (evaluation.scoring.validate)."""
    val_class = get_class(monitor_data(cfg).val._target_)
    names = metric_names(getattr(val_class, "protocol", "freihand"), bool(getattr(val_class, "has_verts", False)))
    if text_branch_on(cfg):
        names += [f"retrieval_{a}" for a in cfg.prompt.axes if a in ("x", "y", "z")]
    return names


def tower_context_length(cfg: DictConfig) -> int:
    """Token context of the text tower `text.encoder` builds, from its open_clip config and overrides."""
    enc = cfg.text.encoder
    tower = OmegaConf.to_container(enc.tower, resolve=True) if enc.get("tower") is not None else None
    return open_clip_context_length(str(enc.model_name), tower)


def _monitor_problem(cfg: DictConfig) -> str | None:
    monitor = cfg.trainer.monitor
    choices = monitor_choices(cfg)
    if monitor in choices:
        return None
    return (f"trainer.monitor={monitor!r} is not a metric validation reports for data={cfg.data.get('name')} "
            f"(class {monitor_data(cfg).val._target_}); choose from {choices}")


def _img_size_problem(cfg: DictConfig) -> str | None:
    size = cfg.data.get("img_size")
    if isinstance(size, int) and size > 0 and size % BACKBONE_STRIDE == 0:
        return None
    lower = max(BACKBONE_STRIDE, (int(size) // BACKBONE_STRIDE) * BACKBONE_STRIDE) if isinstance(size, int) else 256
    return (f"data.img_size={size!r} is not a positive multiple of {BACKBONE_STRIDE}: the backbone downsamples "
            f"the crop by {BACKBONE_STRIDE}, so its feature maps would not tile the crop; use e.g. "
            f"data.img_size={lower} or {lower + BACKBONE_STRIDE}")


def _context_problem(cfg: DictConfig) -> str | None:
    if not text_branch_on(cfg) or cfg.get("prompt") is None:
        return None  # no text tower is built
    wanted, tower = int(cfg.prompt.context_length), tower_context_length(cfg)
    if wanted <= tower:
        return None
    return (f"prompt.context_length={wanted} does not fit the text tower, which reads {tower} tokens "
            f"(text.encoder.model_name={cfg.text.encoder.model_name}, text.encoder.tower): prompts up to "
            f"{wanted} tokens would be cut without notice; set prompt.context_length={tower}")


def _nonfinite_problem(cfg: DictConfig) -> str | None:
    limit = cfg.trainer.get("max_nonfinite_steps", 1)
    if isinstance(limit, int) and limit >= 1:
        return None
    return (f"trainer.max_nonfinite_steps={limit!r} must be an integer >= 1 (batches with non-finite gradients "
            "in a row before the run stops; 1 = stop at the first)")


def _accumulate_problem(cfg: DictConfig) -> str | None:
    n, batch = cfg.trainer.get("accumulate", 1), int(cfg.trainer.batch_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return (f"trainer.accumulate={n!r} must be a whole number >= 1 (micro-batches per optimiser step; 1: each "
                "batch is one forward pass)")
    if batch % n == 0:
        return None
    near = sorted(sorted((d for d in range(1, batch + 1) if batch % d == 0), key=lambda d: (abs(d - n), d))[:2])
    sizes = [b for b in ((batch // n) * n, (batch // n + 1) * n) if b > 0]
    return (f"trainer.accumulate={n} must be a whole number >= 1 that divides trainer.batch_size={batch} (the batch "
            "of one optimiser step per process; each forward pass takes batch_size / accumulate samples): use "
            f"trainer.accumulate={' or '.join(map(str, near))}, or trainer.batch_size={' or '.join(map(str, sizes))}")


def _final_eval_problem(cfg: DictConfig) -> str | None:
    split = cfg.trainer.get("final_eval")
    if data_sets(cfg) is not None and split:
        return (f"trainer.final_eval={split!r}: data=mix is scored one dataset at a time, each with its own protocol; "
                "set trainer.final_eval=null and run eval.py ckpt=<run>/checkpoints/best.pt data=<set> root=<its "
                "folder> per set")
    if split is None or split is False or split in DATA_SPLITS:
        return None
    return (f"trainer.final_eval={split!r} is not a data split; use trainer.final_eval=test (score best.pt on the "
            "test split after training, as eval.py does) or null (no evaluation)")


def check_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem found, each naming its key, value and fix."""
    checks = (_monitor_problem, _img_size_problem, _context_problem, _nonfinite_problem, _accumulate_problem,
              _final_eval_problem)
    problems = [p for check in checks if (p := check(cfg)) is not None]
    if problems:
        raise ConfigError("the config cannot train:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- output folders
def check_writable(folder: str | os.PathLike, key: str, keep: bool = True) -> Path:
    """Create `folder` and write, fsync and remove a probe file in it, so an unwritable or full output folder
    stops the run naming `key` and the path before any time is spent; returns the folder. keep=False removes
    the folders the probe created (eval.py creates its out_dir only once it has results)."""
    folder = Path(folder).expanduser()
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {folder}: {e.strerror or e} (errno {e.errno}).\n  fix: choose a "
                          f"writable folder with free space ({key}=DIR), or fix the permissions of {folder}") from None
    if not keep and created is not None:
        shutil.rmtree(created, ignore_errors=True)
    return folder


def state_bytes(*modules) -> int:
    """Bytes of the tensors in the modules' state dicts (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


def check_free_space(folder: str | os.PathLike, need_bytes: int, key: str, what: str) -> None:
    """Stop before training when the disk holding `folder` has less than `need_bytes` free."""
    free = shutil.disk_usage(folder).free
    if free >= need_bytes:
        return
    raise ConfigError(f"{key}: the disk holding {folder} has {free / 2 ** 20:.0f} MB free, and {what} needs about "
                      f"{need_bytes / 2 ** 20:.0f} MB.\n  fix: free space there or choose another folder ({key}=DIR)")
