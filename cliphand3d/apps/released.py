"""The authors' released checkpoint (CLIP_Hand_3D_PE_0604_44.pth.tar) -> a cliphand3d checkpoint.

`import_released(src, out)` reads the file without unpickling code (weights_only, plus exactly numpy's
scalar types, which training scripts of that era stored beside the weights), renames every tensor to
the modules of configs/model/released.yaml, and writes a checkpoint that scripts/eval.py and
scripts/train.py (init_from=...) accept. What the released network does, and where it is broken:
docs/released.md. The mapping is a prefix table, so it reads both ways: released -> ours to import,
ours -> released to say which released keys a file must hold.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..build import build_adapters, build_criterion, build_model, compose_config, embed_dim
from ..checkpoint.io import save_checkpoint
from ..checkpoint.state import inference_checkpoint
from ..errors import ReleasedCheckpointError
from ..models.template import MeshTemplate, palm_frames
from ..serialization import load_torch_file, refused_object
from ..skeleton import MANO_TO_MPII, NUM_JOINTS, REF_BONE

log = logging.getLogger(__name__)

RELEASED_FILE = "CLIP_Hand_3D_PE_0604_44.pth.tar"
# The released preset as a training config: our FreiHAND data, the released network, the demo's text
# encoder (OpenAI CLIP ViT-B/32) with its per-axis heads (CLIP blocks over the batch, 16 heads, MLP 4x)
# and its initial logit scale log(100).
CONFIG_OVERRIDES = (
    "data=freihand", "model=released", "text=vit_b32_openai", "prompt=order_are", "name=released", "run_dir=.",
    "text.adapters.kind=batch_attention", "+text.adapters.block=clip", "text.adapters.hidden=2048",
    "text.adapters.layers=2", "text.adapters.heads=16", "loss.contrastive.init_logit_scale=4.605170185988092",
)
STAGES = ("MR_21_98_", "MR_98_195", "MR_195_389", "MR_389_778")
LEVELS = (98, 195, 389, 778)
AXIS_NAMES = {"x": ("lr", "lr"), "y": ("tb", "td"), "z": ("nf", "nf")}  # text encoder, logit scale
# Training-only parts our code does not have: the mask decoder (used only with text) and three logit
# scales the released forward pass never reads.
DROPPED_PREFIXES = ("Seg_Decoder.", "logit_scale_xz", "logit_scale_yz", "logit_scale_xy")
# Keys only the released network has: a file with none of them is some other checkpoint.
SIGNATURE = ("Pose2Feat_.conv0.0.weight", "Feat_down_.0.weight", "MR_21_98_.UP_Layer.fc.weight", "J_Reg",
             "PoseNet.conv_z_2.0.weight")


def _rules() -> list[tuple[str, str]]:
    """(released prefix, our prefix); ours start with model. / train_heads. for the two state dicts."""
    m = "model."
    rules = [("Encoder.", m + "backbone."), ("PoseNet.deconv.", m + "joint_regressor.deconv."),
             ("PoseNet.conv_x.0.", m + "joint_regressor.head_x."), ("PoseNet.conv_y.0.", m + "joint_regressor.head_y."),
             ("PoseNet.conv_z_1.0.", m + "joint_regressor.head_z."),
             ("PoseNet.conv_z_1.1.", m + "joint_regressor.head_z_bn."),
             ("PoseNet.conv_z_2.0.", m + "joint_regressor.head_z_mix."),
             ("Pose2Feat_.conv0.0.", m + "joint_features.conv1."), ("Pose2Feat_.conv0.1.", m + "joint_features.bn1."),
             ("Pose2Feat_.conv1.0.", m + "joint_features.conv2."), ("Pose2Feat_.conv1.1.", m + "joint_features.bn2."),
             ("Feat_down_.0.", m + "joint_features.proj.")]
    for l, s in enumerate(STAGES):
        ours = f"{m}regressor.stages.{l}."
        rules += [(f"{s}.UP_Layer.fc.", ours + "upsample."), (f"{s}.Dim_Down.", ours + "narrow."),
                  (f"{s}.Attn_Layer.resblocks.", ours + "blocks."), (f"{s}.Dim_Project.", ours + "cue_proj."),
                  (f"{s}.Num_Project.", ours + "cue_spread.")]
        rules.append((f"Vertx_{LEVELS[l]}", f"{m}regressor.level_pos_{l}"))
    rules += [("Out_Layer.", f"{m}regressor.stages.{len(STAGES) - 1}.head."), ("J_Reg", m + "regressor.J")]
    for a, (text, scale) in AXIS_NAMES.items():
        rules += [(f"latent_{a}_layer.", f"{m}pose_heads.proj.{a}."),
                  (f"text_{text}_encoder.", f"train_heads.adapters.heads.{a}."),
                  (f"logit_scale_{scale}", f"train_heads.criterion.contrastive.logit_scale.{a}")]
    return rules


def _swap(key: str, rules: Sequence[tuple[str, str]], src: int) -> str | None:
    for rule in rules:
        pre = rule[src]
        exact = not pre.endswith(".")
        if (exact and key == pre) or (not exact and key.startswith(pre)):
            return rule[1 - src] + key[len(pre):]
    return None


def released_to_ours(key: str) -> str | None:
    """'Encoder.conv1.weight' -> 'model.backbone.conv1.weight'; None for dropped or unknown keys."""
    return _swap(key, _rules(), 0)


def ours_to_released(key: str) -> str | None:
    return _swap(key, _rules(), 1)


def _convert(ours: str, value: torch.Tensor) -> torch.Tensor:
    """Released tensor -> the layout our module holds."""
    if ours == "model.joint_regressor.head_z.weight" and value.dim() == 3:
        return value[..., 0]  # Conv1d(k=1) on a (B, C, 1) column is a Linear
    if ours == "model.regressor.J":
        return value[list(MANO_TO_MPII)]
    return value


# ----------------------------------------------------------------------------- reading the file

def _numpy_scalar_globals() -> list:
    """Exactly what a pickled numpy scalar needs (the scalar constructor, np.dtype and the dtype classes
    of bool / int / float), under the names numpy 1 and 2 write; nothing that can run other code."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *{type(np.dtype(k)) for k in kinds}]


def read_released(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, other plain entries such as best_acc) of the released file, safely loaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"src={path}: no such file; download {RELEASED_FILE} by hand from the link in "
                                "the README of github.com/ShaoXiang23/CLIP_Hand_Demo and pass its path")
    try:
        obj = load_torch_file(path, safe_globals=_numpy_scalar_globals())
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        text = str(e)
        refusal = refused_object(e)
        if refusal is not None:
            raise ReleasedCheckpointError(
                f"{path} holds pickled objects beyond tensors and numbers "
                f"({refusal}); refusing to unpickle it (that would "
                f"run code from the file). The released {RELEASED_FILE} holds only tensors and numbers: "
                "download it again from the authors' link") from None
        raise ReleasedCheckpointError(
            f"{path} is not a readable torch file (truncated, corrupt or another format: {type(e).__name__}: "
            f"{text[:200]}); download {RELEASED_FILE} again and check its size") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, extras = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, extras = obj, {}
    else:
        raise ReleasedCheckpointError(f"{path} holds a {type(obj).__name__} without a 'state_dict' of tensors; "
                                      f"it is not the released {RELEASED_FILE}")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    if not any(k in state for k in SIGNATURE):
        raise ReleasedCheckpointError(
            f"{path} is not the released CLIP-Hand3D checkpoint (class CLIP_Hand_3D_PE): it has none of its keys "
            f"{list(SIGNATURE)}; its first keys are {sorted(state)[:5]}. A cliphand3d checkpoint needs no import: "
            "pass it to scripts/eval.py ckpt=... directly")
    return state, {k: _plain(v) for k, v in extras.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return f"<{type(v).__name__}, not kept>"


# ----------------------------------------------------------------------------- building ours

def released_config(overrides: Sequence[str] = ()):
    """The training config of the released preset (train.yaml + CONFIG_OVERRIDES + `overrides`)."""
    return compose_config("train", [*CONFIG_OVERRIDES, *overrides], fresh=True)


def released_template(state: Mapping[str, torch.Tensor]):
    """Our MeshTemplate from the released buffers: Vertx_778 as the vertices, J_Reg in MPII order; each
    coarse level's nodes are the vertices nearest to its Vertx_* positions (exact when they are a subset;
    only the deep-supervision targets of fine-tuning read these indices)."""
    want = {"J_Reg": (NUM_JOINTS, LEVELS[-1]), **{f"Vertx_{n}": (n, 3) for n in LEVELS}}
    bad = [f"{k}: {tuple(state[k].shape) if k in state else 'missing'} (want {s})" for k, s in want.items()
           if k not in state or tuple(state[k].shape) != s]
    if bad:
        raise ReleasedCheckpointError("the released template buffers are missing or misshapen: " + "; ".join(bad))
    verts = state["Vertx_778"].double().numpy()
    J = state["J_Reg"].double().numpy()[list(MANO_TO_MPII)]
    levels = []
    for n in LEVELS[:-1]:
        pos = state[f"Vertx_{n}"].double().numpy()
        levels.append(((pos[:, None] - verts[None]) ** 2).sum(-1).argmin(1))
    # our template's frame (wrist origin, bone units, palm axes), as the mean-shape baseline expects; the
    # network keeps the released positions (its level_pos buffers are mapped from Vertx_*)
    joints = J @ verts
    bone = np.linalg.norm(joints[REF_BONE[1]] - joints[REF_BONE[0]])
    if not np.isfinite(bone) or bone < 1e-12:
        raise ReleasedCheckpointError("J_Reg @ Vertx_778 puts the wrist on the middle MCP: not the released template")
    R = palm_frames((joints - joints[0]) / bone)
    canon = lambda p: ((p - joints[0]) / bone) @ R.T  # noqa: E731
    return MeshTemplate(verts=canon(verts), joints=canon(joints), levels=levels + [np.arange(len(verts))], J=J)


def _listing(title: str, keys: Sequence[str], limit: int = 12) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def map_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict:
    """Released tensors -> {our key: tensor}; refuses missing, extra and misshapen keys, listing them.
    `expected`: our "model."/"train_heads."-prefixed state dict the result must fit."""
    mapped, dropped, extra, wrong = {}, [], [], []
    for key, value in state.items():
        if key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        ours = released_to_ours(key)
        if ours is None or ours not in expected:
            extra.append(key)
            continue
        value = _convert(ours, value)
        if tuple(value.shape) != tuple(expected[ours].shape):
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(expected[ours].shape)}")
            continue
        mapped[ours] = value.to(expected[ours].dtype)
    needed = {ours_to_released(k): k for k in expected if ours_to_released(k) is not None}
    missing = sorted(k for k in needed if k not in state)
    if missing or extra or wrong:
        parts = [f"the file does not hold exactly the released CLIP_Hand_3D_PE network ({RELEASED_FILE}):"]
        parts += [_listing(t, ks) for t, ks in (("missing", missing), ("unexpected", sorted(extra)),
                                                 ("shape mismatch (file vs released network)", wrong)) if ks]
        parts.append("download the released file again; other checkpoints cannot be imported")
        raise ReleasedCheckpointError("\n  ".join(parts))
    fresh = sorted(k for k in expected if k not in mapped)
    return {"mapped": mapped, "dropped": sorted(dropped), "fresh": fresh}


def _build(cfg, template):
    """(model, {"adapters": ..., "criterion": ...}) of the released preset; new-only parameters (the
    intermediate stage heads) start from a fixed seed, so an import is reproducible."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(cfg, template)
        adapters = build_adapters(cfg, embed_dim(cfg))
        criterion = build_criterion(cfg)
    return model, {"adapters": adapters, "criterion": criterion}


def import_released(src: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Read the released file, map it, write our checkpoint to `out`; returns what was done."""
    state, extras = read_released(src)
    template = released_template(state)
    cfg = released_config(overrides)
    model, heads = _build(cfg, template)
    expected = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, mod in heads.items():
        expected.update({f"train_heads.{name}.{k}": v for k, v in mod.state_dict().items()})
    res = map_state(state, expected)
    full = {**expected, **res["mapped"]}
    model.load_state_dict({k[len("model."):]: v for k, v in full.items() if k.startswith("model.")})
    train_heads = {k[len("train_heads."):]: v for k, v in full.items() if k.startswith("train_heads.")}
    fresh = [k for k in res["fresh"] if not k.startswith("model.regressor.level_idx_")
             and k not in ("model.regressor.template_verts", "model.regressor.template_joints")]
    info = {"source": str(Path(src).name), "released_keys": len(state), "mapped": len(res["mapped"]),
            "dropped": res["dropped"], "initialised_here": fresh, "file_entries": extras}
    save_checkpoint(out, inference_checkpoint(model=model.state_dict(), train_heads=train_heads, template=template,
                                              config=cfg, protocol="freihand", imported=info))
    log.info("imported %s: %d tensors mapped, %d dropped, %d initialised here", src, info["mapped"],
             len(info["dropped"]), len(fresh))
    return info
