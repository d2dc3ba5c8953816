"""Checkpoint files: the atomic save and the weights-only load, with errors that name the file and the fix.

A checkpoint is a plain dict (its entries: checkpoint/state.py).
Everything in it must load under `torch.load(weights_only=True)` (tensors, Python scalars, str,
bytes, None, dict/list/tuple/set, torch.Size/dtype/device), so loading a checkpoint never runs
pickled code. `save_checkpoint` checks that before writing, because a numpy scalar slipped into the
state would otherwise only fail much later, when the run is resumed.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..serialization import load_torch_file, refused_object, temp_pattern, write_atomic
from .state import WEIGHT_ENTRIES

log = logging.getLogger(__name__)

_SAFE_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)
# Exact types: numpy scalars subclass float/int but pickle as numpy objects, which weights_only
# loading refuses.
_SAFE_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None))

MAX_LISTED = 10  # names shown in a message that lists many


# ----------------------------------------------------------------------------- save / load

def _unsafe_entry(obj: Any, where: str) -> tuple[str, str] | None:
    """First (path, type name) in `obj` that weights_only loading would reject, else None."""
    if isinstance(obj, _SAFE_TORCH) or type(obj) in _SAFE_PRIMITIVES:
        return None
    if isinstance(obj, Mapping):
        if not isinstance(obj, (dict, collections.OrderedDict)):
            return where, type(obj).__qualname__
        for k, v in obj.items():
            bad = _unsafe_entry(k, f"{where}[key {k!r}]") or _unsafe_entry(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple, set, frozenset)):
        if type(obj) not in (list, tuple, set, frozenset):  # namedtuples etc. pickle by class
            return where, type(obj).__qualname__
        for i, v in enumerate(obj):
            bad = _unsafe_entry(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return where, f"{type(obj).__module__}.{type(obj).__qualname__}"


def _non_finite_weights(obj: Any, where: str, out: list[str]) -> list[str]:
    """Dotted names of the floating-point tensors in `obj` (nested dicts) holding a NaN or inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            out.append(where)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _non_finite_weights(v, f"{where}.{k}", out)
    return out


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write `state` to `path` atomically; returns the path.

    torch.save goes through serialization.write_atomic: a crash at any point leaves either the old file or
    the new one, never a partial one; on an error the temp file is removed and the error re-raised. Weights (the `model`, `train_heads` and
    `ema` entries) with a NaN or inf are refused with a CheckpointError: the file on disk stays the
    last good checkpoint.
    """
    path = Path(path)
    bad_weights: list[str] = []
    for key in WEIGHT_ENTRIES:
        _non_finite_weights(state.get(key), key, bad_weights)
    if bad_weights:
        shown = ", ".join(bad_weights[:MAX_LISTED]) + (
            f" and {len(bad_weights) - MAX_LISTED} more" if len(bad_weights) > MAX_LISTED else "")
        raise CheckpointError(
            f"refusing to write {path}: non-finite weights in {shown}; the file on disk (if any) stays the "
            "last good checkpoint. The run diverged: lower optim.lr or trainer.grad_clip, or check the data "
            "with scripts/check_data.py, and resume from that checkpoint or start afresh")
    bad = _unsafe_entry(dict(state), "state")
    if bad:
        where, kind = bad
        raise TypeError(f"cannot save checkpoint {path}: {where} is a {kind}, which "
                        "torch.load(weights_only=True) refuses; store tensors, Python numbers, "
                        "str, lists or dicts instead (e.g. float(x) for a numpy scalar, "
                        "torch.from_numpy(a) for an array, config_to_container(cfg) for a config)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        return write_atomic(path, lambda f: torch.save(dict(state), f))
    except OSError as e:
        raise _write_error(path, e) from e


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` left by a process killed mid-write (SIGKILL skips the cleanup): each can be
    as big as a checkpoint, so a run killed often would otherwise fill its disk. One writer per file
    (rank 0), so a temp file of this name found here is never one being written."""
    for stale in path.parent.glob(temp_pattern(path)):
        try:
            stale.unlink()
            log.info("removed %s, left by a checkpoint write that was interrupted", stale)
        except FileNotFoundError:
            pass


def _write_error(path: Path, e: OSError) -> CheckpointError:
    """An OSError while writing `path` (disk full, folder not writable, quota) as an error naming the file."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MB free"
        except OSError:
            free = "free space unknown"
        fix = f"free space on the disk holding {path.parent} ({free}) or point run_dir elsewhere"
    else:
        fix = f"make {path.parent} writable or point run_dir (eval.py: out_dir) at a writable folder"
    kept = "the previous file is kept unchanged" if path.is_file() else "no earlier file existed"
    return CheckpointError(f"cannot write checkpoint {path}: {reason} (errno {e.errno}); {kept}.\n  fix: {fix}, "
                           "then resume=auto continues from the last good checkpoint")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(path, weights_only=True) with errors that say which file and what to do."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {what}; pass the .pt file written by training "
                                "(<run dir>/checkpoints/last.pt or best.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): not a checkpoint, or a copy that did not "
                              "finish; use another checkpoint (best.pt, an older copy) or start afresh with "
                              "resume=none")
    try:
        state = load_torch_file(path, map_location=map_location)
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, EOFError, RuntimeError, ...
        text = str(e)
        detail = refused_object(e)
        if detail is not None:
            raise CheckpointError(
                f"checkpoint {path} holds objects that weights_only loading refuses ({detail}); "
                "it was not written by cliphand3d.checkpoint.io.save_checkpoint. Re-save its state "
                "dicts as plain tensors/dicts from a trusted session.") from e
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch checkpoint (truncated, corrupt or another "
            f"format: {type(e).__name__}: {text[:200]}); use another checkpoint (best.pt, an "
            "older copy) or start afresh with resume=none") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not the dict "
                              "save_checkpoint writes; it is not a cliphand3d checkpoint")
    return state
