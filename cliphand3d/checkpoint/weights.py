"""Model weights into modules: every difference between a state dict and the module listed at once.

`check_state_dict_compat` names the missing, unexpected and misshapen keys and the config group that most
likely differs between the run that wrote the weights and this one; `load_model_weights` loads strictly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..runtime import unwrap
from .io import MAX_LISTED

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


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _listing(title: str, lines: Sequence[str]) -> str:
    head = f"  {title} ({len(lines)}):"
    body = [f"    {s}" for s in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        body.append(f"    ... and {len(lines) - MAX_LISTED} more")
    return "\n".join([head, *body])


def check_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """Raise one CheckpointError listing missing keys, unexpected keys and shape mismatches.

    Checked before `load_state_dict` so the user sees every difference at once, with the config
    group that most likely differs between the run that wrote `where` and this one.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where}: the model state is a {type(state_dict).__name__}, "
                              "not a state dict")
    expected = unwrap(model).state_dict()
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
                     "DDP wrapper; save unwrap(model).state_dict() instead")
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
    inner = unwrap(model)
    inner.load_state_dict(state_dict, strict=True)
    return model
