"""The inference path over a loader, and how its uvd becomes metres: what train-time validation and eval.py
both run. Returns numpy arrays for `cliphand3d.metrics`.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..data.transforms import batch_to_device
from ..errors import ConfigError, DatasetError
from ..geometry import root_and_bone_from_uvd, uvd_to_xyz
from ..runtime import guard_shared_memory
from ..skeleton import SCALE_BONE

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
    check_placement(placement)
    model.eval()
    acc: dict[str, list] = {}

    def add(k, v):
        acc.setdefault(k, []).append(v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v)

    for batch in guard_shared_memory(loader):
        batch = batch_to_device(batch, device)  # the loader's bytes become the model's input there
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


def check_placement(placement: str, dataset=None, split: str = "test") -> str:
    """eval.py's placement=, before predictions are spent on it: a known name, and labels when it is gt."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement={placement!r} is not one of {PLACEMENTS} (eval.py placement=...)")
    if dataset is not None and placement == "gt" and not getattr(dataset, "has_labels", True):
        raise DatasetError(f"placement=gt places predictions at the true root depth and bone, and the {split} "
                           f"split has no ground truth here.\n  fix: {dataset.labels_hint()}; or use "
                           "placement=estimated")
    return placement
