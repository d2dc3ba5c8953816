"""What a cliphand3d checkpoint holds, in one place: its entries, how they are made from a run's objects and
how they are read back; the RNG states and the config it stores.

Two kinds of file share the layout (everything loads under weights-only loading, checkpoint/io.py):
- a training checkpoint (train/run.py, `training_checkpoint`): every entry of TRAINING_ENTRIES, enough for
  `resume=auto` to continue exactly;
- an inference checkpoint (the authors' released weights after apps/released.py, `inference_checkpoint`):
  INFERENCE_ENTRIES, plus what the import did under "imported".
Both are read by build.load_model (eval.py, the demo, export) and by `init_from=`.
"""
from __future__ import annotations

import inspect
import logging
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..models.template import MeshTemplate

log = logging.getLogger(__name__)

# model: the network's state dict (CLIPHand3D); train_heads: the training-only modules' (text adapters,
# the loss's logit scales), keyed as in TrainingModule without "model."; template: the data-derived mesh
# template's arrays; config: the resolved config the run used; protocol: the data's evaluation protocol.
INFERENCE_ENTRIES = ("model", "train_heads", "template", "config", "protocol")
TRAINING_ENTRIES = INFERENCE_ENTRIES + ("optimizer", "scheduler", "scaler", "ema", "train_state", "rng",
                                        "skipped_bad")
# Entries that hold weights: never written with a NaN or inf in them (io.save_checkpoint checks).
WEIGHT_ENTRIES = ("model", "train_heads", "ema")


# ----------------------------------------------------------------------------- the entries
def template_state(template: MeshTemplate) -> dict:
    return {k: torch.as_tensor(v) for k, v in template.to_dict().items()}


def template_from_state(state: dict) -> MeshTemplate:
    return MeshTemplate.from_dict({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()})


def split_training_module(module: torch.nn.Module) -> tuple[dict, dict]:
    """A TrainingModule's weights as (model, train_heads): the network's, and the rest without "model."."""
    heads = {k: v for k, v in module.state_dict().items() if not k.startswith("model.")}
    return module.model.state_dict(), heads


def inference_checkpoint(*, model: dict, train_heads: dict, template: MeshTemplate, config: Any,
                         protocol: str, **extra) -> dict:
    """The entries every checkpoint has; `extra` adds others (the released import records what it did)."""
    return {"model": model, "train_heads": train_heads, "template": template_state(template),
            "config": config_to_container(config), "protocol": protocol, **extra}


def training_checkpoint(*, module: torch.nn.Module, template: MeshTemplate, config: Any, protocol: str,
                        optimizer, scheduler, scaler, ema, train_state: dict, skipped_bad: int) -> dict:
    """Everything `resume=auto` needs to continue a run exactly (module: the unwrapped TrainingModule)."""
    model, heads = split_training_module(module)
    return {"model": model, "train_heads": heads, "template": template_state(template),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "train_state": train_state, "rng": capture_rng_state(), "config": config_to_container(config),
            "protocol": protocol, "skipped_bad": int(skipped_bad)}


def model_weights(ckpt: dict, use_ema: bool = True) -> dict:
    """The network's weights to evaluate: the EMA copy when there is one and `use_ema`, else `model`."""
    if use_ema and ckpt.get("ema") and "module" in ckpt["ema"]:
        return ckpt["ema"]["module"]
    return ckpt["model"]


def head_weights(ckpt: dict) -> dict:
    """The training-only modules' weights (text adapters, logit scales), keyed as in TrainingModule."""
    return ckpt.get("train_heads", {})


def adapter_weights(ckpt: dict) -> dict:
    """The trained text adapters' weights ({} when the run trained no text branch)."""
    return {k[len("adapters."):]: v for k, v in head_weights(ckpt).items() if k.startswith("adapters.")}


def module_weights(ckpt: dict) -> dict:
    """A training checkpoint's weights as one TrainingModule state dict ("model." + the network's, the heads)."""
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **head_weights(ckpt)}


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
    if isinstance(cfg, (DictConfig, ListConfig)):
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
    dotted keys left out, with everything under them; a `*` part matches any one key (data.sets.*.skip_bad).
    """
    saved, current = config_to_container(saved), config_to_container(current)
    groups = sorted(set(saved) | set(current)) if keys is None else list(keys)
    out: list[str] = []
    for g in groups:
        if g not in saved and g not in current:
            continue
        _diff(saved.get(g, _MISSING), current.get(g, _MISSING), g, out)
    skip = [i.split(".") for i in ignore]
    return [k for k in out if not any(_under(k.split("."), i) for i in skip)]


def _under(key: list[str], pattern: list[str]) -> bool:
    """Whether dotted key `key` is `pattern` or lies under it, `*` in the pattern matching any one part."""
    return len(key) >= len(pattern) and all(p in ("*", k) for p, k in zip(pattern, key))


def constructor_defaults(target: str) -> dict[str, Any]:
    """The keyword defaults of the callable a `_target_` names, as config values (tuples as lists); {} when
    it cannot be located. Defaults that are not plain data are left out: no config value can equal them."""
    try:
        params = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    out = {}
    for name, p in params.items():
        if p.default is inspect.Parameter.empty:
            continue
        try:
            out[name] = _plain(p.default, name)
        except TypeError:
            continue
    return out


def with_constructor_defaults(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """`saved` (a plain nested config) where every node that builds the same `_target_` as `current`'s has each
    key it lacks and `current` has filled with that constructor's default. Constructor defaults keep the
    behaviour from before a keyword existed (docs/conventions.md), so a key absent from an older run's config
    means what its constructor then did: adding an option never strands a running experiment."""
    out = dict(saved)
    target = current.get("_target_")
    if isinstance(target, str) and saved.get("_target_") == target:
        defaults = constructor_defaults(target)
        out.update({k: defaults[k] for k in current if k not in out and k in defaults})
    for k, v in current.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = with_constructor_defaults(out[k], v)
    return out


def config_value(cfg: Mapping[str, Any], key: str, missing: Any = "<absent>") -> Any:
    """The value at dotted `key` of a nested mapping, or `missing`."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node
