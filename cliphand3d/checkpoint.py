"""Checkpoints: atomic save, weights_only load, RNG capture, config and state-dict checks, resume.

A checkpoint is a plain dict the engine builds, typically
`{"model", "optimizer", "scheduler", "scaler", "ema", "step", "epoch", "rng", "config", ...}`.
Everything in it must load under `torch.load(weights_only=True)` (tensors, Python scalars, str,
bytes, None, dict/list/tuple/set, torch.Size/dtype/device), so loading a checkpoint never runs
pickled code. `save_checkpoint` checks that before writing, because a numpy scalar slipped into the
state would otherwise only fail much later, when the run is resumed.
"""
from __future__ import annotations

import collections
import errno
import glob
import logging
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

_SAFE_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)
# Exact types: numpy scalars subclass float/int but pickle as numpy objects, which weights_only
# loading refuses.
_SAFE_PRIMITIVES = (bool, int, float, complex, str, bytes, type(None))
# How torch's weights-only unpickler says "this object type is not allowed" (as opposed to a
# corrupt stream, which it reports as e.g. "Unsupported operand").
_REFUSAL_MARKS = ("Unsupported global", "Unsupported class", "unrecognized function")

# First path component of a model key -> the config keys that decide those parameters
# (configs/model/*.yaml; the template comes from the data it was derived from).
_MESH = ("the mesh template / levels (model.widths, model.token_dim, model.blocks_per_stage, "
         "model.heads, and the template derived from data.*)")
_GROUP_HINTS: dict[str, str] = {
    "backbone": "model.backbone (resnet18/34/50: the depth changes every backbone.* shape)",
    "joint_regressor": "model.deconv_channels / model.num_deconv / model.depth_bins / "
                       "data.img_size",
    "joint_features": "model.joint_feature_hidden / model.depth_bins / model.token_dim",
    "pose_heads": "model.embed_dim / model.depth_bins / data.img_size / prompt.axes",
    "regressor": _MESH,
    "template": _MESH,
    "text_encoder": "text.* (the CLIP text model)",
    "adapters": "text.* (the per-axis text adapters)",
    "criterion": "loss.*",
}
_MAX_LISTED = 10
# Entries of a training checkpoint that hold weights: never written with a NaN or inf in them.
_WEIGHT_ENTRIES = ("model", "train_heads", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not fit the model / config it is loaded into."""


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


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give the checkpoint the mode a plain open() would (umask applied)
    # so colleagues sharing the run folder can read it.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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

    torch.save goes to a temp file in the same folder (same file system, so the rename is atomic),
    which is flushed and fsynced before `os.replace` puts it in place and the folder is fsynced.
    A crash at any point leaves either the old file or the new one, never a partial one; on an
    error the temp file is removed and the error re-raised. Weights (the `model`, `train_heads` and
    `ema` entries) with a NaN or inf are refused with a CheckpointError: the file on disk stays the
    last good checkpoint.
    """
    path = Path(path)
    bad_weights: list[str] = []
    for key in _WEIGHT_ENTRIES:
        _non_finite_weights(state.get(key), key, bad_weights)
    if bad_weights:
        shown = ", ".join(bad_weights[:_MAX_LISTED]) + (
            f" and {len(bad_weights) - _MAX_LISTED} more" if len(bad_weights) > _MAX_LISTED else "")
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
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _default_file_mode())
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    _fsync_dir(path.parent)
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` left by a process killed mid-write (SIGKILL skips the cleanup): each can be
    as big as a checkpoint, so a run killed often would otherwise fill its disk. One writer per file
    (rank 0), so a temp file of this name found here is never one being written."""
    for stale in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp"):
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
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, EOFError, RuntimeError, ...
        text = str(e)
        refusal = [ln.strip() for ln in text.splitlines()
                   if any(m in ln for m in _REFUSAL_MARKS)]
        if isinstance(e, pickle.UnpicklingError) and refusal:
            detail = refusal[0].split(" was not an allowed global")[0]
            raise CheckpointError(
                f"checkpoint {path} holds objects that weights_only loading refuses ({detail}); "
                "it was not written by cliphand3d.checkpoint.save_checkpoint. Re-save its state "
                "dicts as plain tensors/dicts from a trusted session.") from e
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch checkpoint (truncated, corrupt or another "
            f"format: {type(e).__name__}: {text[:200]}); use another checkpoint (best.pt, an "
            "older copy) or start afresh with resume=none") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not the dict "
                              "save_checkpoint writes; it is not a cliphand3d checkpoint")
    return state


# ----------------------------------------------------------------------------- RNG

def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of python `random`, numpy's global generator, torch CPU and every CUDA device.

    Stored as tensors, ints, floats, str and lists so the dict loads with weights_only=True.
    `generators` (e.g. {"sampler": the DataLoader's torch.Generator}) are captured too, under
    "generators", so a resumed run can replay the same data order.
    """
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in mt],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    if generators:
        out["generators"] = {name: g.get_state() for name, g in generators.items()}
    return out


def restore_rng_state(state: Mapping[str, Any],
                      generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored on as many devices as both the
    checkpoint and this machine have (a warning says when those counts differ)."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise KeyError(f"RNG state lacks {missing}; expected the dict capture_rng_state returns")
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    keys = np.asarray(torch.as_tensor(npy["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = list(state.get("cuda", []))
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != here and (cuda_states or here):
        log.warning("checkpoint has CUDA RNG states for %d device(s), this machine has %d; "
                    "restoring the first %d", len(cuda_states), here, min(len(cuda_states), here))
    for i in range(min(len(cuda_states), here)):
        torch.cuda.set_rng_state(torch.as_tensor(cuda_states[i], dtype=torch.uint8).cpu(), i)
    saved_gens = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved_gens:
            raise KeyError(f"RNG state has no generator {name!r} (it has {sorted(saved_gens)}); "
                           "capture it with capture_rng_state(generators={...})")
        g.set_state(torch.as_tensor(saved_gens[name], dtype=torch.uint8).cpu())


# ----------------------------------------------------------------------------- configs

def _plain(obj: Any, where: str) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"config value {where} is a {type(obj).__qualname__}; only str, numbers, "
                    "bool, null, lists and mappings can be stored in a checkpoint")


def config_to_container(cfg: Any) -> dict[str, Any]:
    """Resolved OmegaConf config (or a mapping) -> plain dict of str/numbers/bool/None/lists.

    Interpolations are resolved so the stored config is what the run actually used.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # plain dicts still work without omegaconf
        DictConfig = ListConfig = ()  # type: ignore[assignment]
    if DictConfig and isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"config_to_container expects a mapping or DictConfig, got "
                        f"{type(cfg).__qualname__}")
    return _plain(cfg, "cfg")


_MISSING = object()


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}.{k}" if prefix else str(k),
                  out)
    elif a is _MISSING or b is _MISSING or a != b:
        out.append(prefix)


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any],
                    keys: Iterable[str] | None = ("model", "data", "text", "prompt", "loss"),
                    ignore: Iterable[str] = ()) -> list[str]:
    """Sorted dotted keys under the top-level groups `keys` (None: all) whose values differ.

    A key present on one side only counts as differing. Lists compare as whole values. `ignore`:
    dotted keys left out, with everything under them.
    """
    saved, current = config_to_container(saved), config_to_container(current)
    groups = sorted(set(saved) | set(current)) if keys is None else list(keys)
    out: list[str] = []
    for g in groups:
        if g not in saved and g not in current:
            continue
        _diff(saved.get(g, _MISSING), current.get(g, _MISSING), g, out)
    skip = tuple(ignore)
    return [k for k in out if not any(k == i or k.startswith(i + ".") for i in skip)]


def config_value(cfg: Mapping[str, Any], key: str, missing: Any = "<absent>") -> Any:
    """The value at dotted `key` of a nested mapping, or `missing`."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


# ----------------------------------------------------------------------------- model weights

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper, else `model`."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _listing(title: str, lines: Sequence[str]) -> str:
    head = f"  {title} ({len(lines)}):"
    body = [f"    {s}" for s in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        body.append(f"    ... and {len(lines) - _MAX_LISTED} more")
    return "\n".join([head, *body])


def check_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches.

    Checked before `load_state_dict` so the user sees every difference at once, with the config
    group that most likely differs between the run that wrote `where` and this one.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where}: the model state is a {type(state_dict).__name__}, "
                              "not a state dict")
    expected = unwrap_model(model).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, _shape(state_dict[k]), _shape(v)) for k, v in expected.items()
                  if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"checkpoint {where} does not fit the model built from the current config:"]
    if missing:
        parts.append(_listing("missing from the checkpoint", missing))
    if unexpected:
        parts.append(_listing("unexpected in the checkpoint", unexpected))
    if mismatched:
        parts.append(_listing("shape mismatch (name: checkpoint shape vs model shape)",
                              [f"{k}: {list(c) if c is not None else c} vs "
                               f"{list(m) if m is not None else m}" for k, c, m in mismatched]))
    involved = missing + unexpected + [k for k, _, _ in mismatched]
    if unexpected and all(k.startswith("module.") for k in state_dict):
        parts.append("  hint: every checkpoint key starts with 'module.': it was saved from a "
                     "DDP wrapper; save unwrap_model(model).state_dict() instead")
    else:
        prefixes = sorted({k.split(".", 1)[0] for k in involved})
        hints = [f"{p}.* -> {_GROUP_HINTS.get(p, f'model.{p}')}" for p in prefixes]
        parts.append("  probably differing config: " + "; ".join(hints))
    parts.append("  use the config the checkpoint was trained with (saved in its 'config' entry "
                 "and in the run's .hydra/config.yaml) or another checkpoint")
    raise CheckpointError("\n".join(parts))


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> nn.Module:
    """check_state_dict_compat, then load_state_dict(strict=True) into the unwrapped model."""
    check_state_dict_compat(model, state_dict, where)
    inner = unwrap_model(model)
    inner.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------- resume

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
