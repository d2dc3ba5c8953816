"""Two constant predictors every evaluation is read against: the mean pose of the training labels, and the
data-derived mean shape with an oracle rotation (eval.py's baseline rows)."""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import root_and_bone_from_uvd, uvd_to_xyz
from ..skeleton import bone_length
from .scoring import score_predictions

BASELINES = ("mean-pose baseline", "mean shape, oracle rotation")


def training_mean_uvd(train_set, num_samples: int) -> dict:
    """Mean joints (and vertices) in the model's output space over `num_samples` training items spread
    evenly over the set, with the training augmentation: what a regressor that learned nothing from the
    image would output. Computed from the labels (`label_targets`): no RGB image is decoded."""
    n = min(int(num_samples), len(train_set))
    # evenly spaced, not the first n: FreiHAND's ids follow capture order (and versions come in blocks)
    indices = np.unique(np.linspace(0, len(train_set) - 1, n).round().astype(int))
    sums: dict[str, np.ndarray] = {}
    for i in indices:
        t = train_set.label_targets(int(i))
        for k in ("joints_uvd", "verts_uvd"):
            if k in t:
                sums[k] = sums.get(k, 0) + t[k]
    return {k: v / len(indices) for k, v in sums.items()}


def baseline_predictions(preds: dict, img_size: int, *, mean_uvd: dict | None = None, template=None,
                         joints_only: bool = False):
    """Two constant predictors placed as the model's predictions are (`preds`):
    - `mean_uvd`: the training labels' mean in the model's output space (the mean-pose baseline), at the
      true root depth and bone, or, when `preds` were placed without them (placement=estimated), at the
      root depth and bone estimated from the mean pose itself, each sample's K and scale;
    - `template`: the data-derived mean shape in its canonical orientation at the true root and bone
      (under Procrustes alignment this is the mean articulation with an oracle rotation: a stronger bar
      than any constant in uvd)."""
    K = torch.as_tensor(preds["K"], dtype=torch.float64)
    want_verts = preds.get("gt_verts") is not None and not joints_only
    if mean_uvd is not None:
        joints = torch.as_tensor(mean_uvd["joints_uvd"], dtype=torch.float64)[None].expand(len(K), -1, -1)
        if "scale" in preds:
            root, bone, _ = root_and_bone_from_uvd(joints, K, img_size, torch.as_tensor(preds["scale"]))
        else:
            root = torch.as_tensor(preds["root_depth"], dtype=torch.float64)
            bone = torch.as_tensor(preds["bone"], dtype=torch.float64)

        def place(m):
            u = torch.as_tensor(m, dtype=torch.float64)[None].expand(len(K), -1, -1)
            return uvd_to_xyz(u, K, img_size, root, bone).numpy()

        verts = place(mean_uvd["verts_uvd"]) if want_verts and "verts_uvd" in mean_uvd else None
        return place(mean_uvd["joints_uvd"]), verts
    gt_xyz = preds["gt_xyz"]
    b = bone_length(np.asarray(gt_xyz, dtype=np.float64))[:, None, None]
    r = gt_xyz[:, :1]
    tj = np.asarray(template.joints)
    verts = r + (np.asarray(template.verts) - tj[:1])[None] * b if want_verts else None
    return r + (tj - tj[:1])[None] * b, verts


def score_baselines(protocol: str, preds: dict, img_size: int, *, mean_uvd: dict, template,
                    joints_only: bool) -> tuple[dict, dict]:
    """({name: metrics}, {name: predicted xyz}) of the BASELINES, placed and scored as the model's `preds`."""
    scores, placed = {}, {}
    for name, kw in zip(BASELINES, ({"mean_uvd": mean_uvd}, {"template": template})):
        bx, bv = baseline_predictions(preds, img_size, joints_only=joints_only, **kw)
        placed[name] = bx
        scores[name] = score_predictions(protocol, {"pred_xyz": bx, "gt_xyz": preds["gt_xyz"], "pred_verts": bv,
                                                    "gt_verts": preds.get("gt_verts") if bv is not None else None,
                                                    "visible": preds.get("visible")})
    return scores, placed
