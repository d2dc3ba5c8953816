"""Evaluation metrics: the one home for train-time validation and eval.py (DESIGN 3).

Inputs are in metres (numpy arrays or torch tensors, any device); everything is computed in float64
numpy; keys ending in `_mm` are millimetres, AUCs and F-scores are fractions in [0, 1].

Semantics follow the reference scorers so figures are comparable with published tables:
- FreiHAND (lmb-freiburg/freihand eval.py + EvalUtil): per-keypoint mean distance, then the mean over
  keypoints; PCK counts `d <= t` (non-strict); AUC = trapezoid area of the per-keypoint PCK curve over
  `linspace(0, 0.05, 100)` divided by the range, then the mean over keypoints; Procrustes is
  `geometry.procrustes_align` (reflections allowed); vertices are aligned with their own Procrustes fit;
  F-score per sample counts nearest-neighbour distances `d < t` (strict) both ways, then the mean over
  samples.
- RHD (lmb-freiburg/hand3d eval_full.py + EvalUtil): both hands root-relative (joint 0), the prediction
  rescaled so that its middle MCP -> PIP bone (hand3d's `keypoint_scale`, skeleton.RHD_EVAL_BONE) equals
  the ground truth's; a keypoint contributes only from samples where it is visible and keypoints never
  visible are skipped; mean and median EPE per keypoint, then the mean over keypoints; PCK counts
  `d <= t`; `auc_0_50` over hand3d's 20 thresholds `linspace(0, 50 mm, 20)`, and `auc_20_50` is its
  `calc_auc` over the last 12 of those thresholds (21.05 ... 50 mm) of the keypoint-mean PCK curve.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from .geometry import procrustes_align, trapezoid
from .skeleton import NUM_JOINTS, RHD_EVAL_BONE, ROOT

FREIHAND_PCK_RANGE = (0.0, 0.05, 100)  # (lo m, hi m, steps), official FreiHAND scorer
RHD_PCK_RANGE = (0.0, 0.05, 20)  # hand3d eval_full.get_measures(0.0, 0.050, 20)
RHD_AUC_20_50_FROM = 8  # eval_full's "20-50 mm" AUC: thresholds[8:] of that grid, 21.05 ... 50 mm
F_THRESHOLDS = (0.005, 0.015)  # F@5 mm, F@15 mm
PROTOCOLS = ("freihand", "rhd", "synthetic")


# --------------------------------------------------------------------------- input checks
def _as_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _points(x, name: str, n_points: int | None = None) -> np.ndarray:
    """Any (N, P, 3) point array (a single (P, 3) set becomes N = 1), finite, float64."""
    a = _as_float64(x, name)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[-1] != 3 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (N, P, 3) with N >= 1, got {a.shape}")
    if n_points is not None and a.shape[1] != n_points:
        raise ValueError(f"{name}: expected {n_points} points per sample, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int(np.argwhere(~np.isfinite(a))[0, 0])
        raise ValueError(f"{name}: contains NaN/inf (first at sample {bad}); check the model output")
    return a


def _pair(pred, gt, pred_name: str, gt_name: str, n_points: int | None = None):
    p = _points(pred, pred_name, n_points)
    g = _points(gt, gt_name, n_points)
    if p.shape != g.shape:
        raise ValueError(f"{pred_name} and {gt_name} must have the same shape, got {p.shape} vs {g.shape}")
    return p, g


def _visibility(visible, shape: tuple[int, int]) -> np.ndarray | None:
    if visible is None:
        return None
    if isinstance(visible, torch.Tensor):
        visible = visible.detach().cpu().numpy()
    v = np.asarray(visible)
    if v.ndim == 1 and shape[0] == 1:
        v = v[None]
    if v.shape != shape:
        raise ValueError(f"visible: expected shape {shape} (samples, keypoints) to match pred_xyz, got {v.shape}")
    return v.astype(bool)


def _thresholds(lo: float, hi: float, steps: int) -> np.ndarray:
    if not (hi > lo and steps >= 2):
        raise ValueError(f"PCK thresholds: need hi > lo and steps >= 2, got lo={lo}, hi={hi}, steps={steps}")
    return np.linspace(lo, hi, steps)


# --------------------------------------------------------------------------- distances
def keypoint_distances(pred, gt) -> np.ndarray:
    """Euclidean distance per sample and point, (N, P, 3) x 2 -> (N, P), metres."""
    p, g = _pair(pred, gt, "pred", "gt")
    return np.linalg.norm(p - g, axis=-1)


def root_relative(xyz: np.ndarray, root_xyz: np.ndarray | None = None) -> np.ndarray:
    """Subtract joint 0 of `root_xyz` (default: `xyz` itself, which must then be joints) per sample."""
    ref = xyz if root_xyz is None else root_xyz
    return xyz - ref[:, ROOT:ROOT + 1]


def hand3d_normalise(pred_xyz, gt_xyz) -> tuple[np.ndarray, np.ndarray]:
    """hand3d RHD protocol: (pred root-relative and rescaled so that its RHD_EVAL_BONE (middle MCP -> PIP)
    has the gt's length, gt root-relative)."""
    p, g = _pair(pred_xyz, gt_xyz, "pred_xyz", "gt_xyz", NUM_JOINTS)
    p_rr, g_rr = root_relative(p), root_relative(g)
    a, b = RHD_EVAL_BONE
    bone_p, bone_g = (np.linalg.norm(x[:, a] - x[:, b], axis=-1) for x in (p, g))
    # a collapsed prediction (bone 0) stays collapsed rather than turning into NaN
    scale = bone_g / np.maximum(bone_p, 1e-8)
    return p_rr * scale[:, None, None], g_rr


# --------------------------------------------------------------------------- EvalUtil-style reductions
def _valid(dists: np.ndarray, visible) -> np.ndarray:
    d = np.asarray(dists, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"dists: expected shape (samples, keypoints), got {d.shape}")
    v = _visibility(visible, d.shape)
    v = np.ones(d.shape, dtype=bool) if v is None else v
    if not v.any():
        raise ValueError("visible: no keypoint is visible in any sample; nothing to evaluate")
    return v


def mean_error(dists, visible=None) -> float:
    """Per-keypoint mean over (visible) samples, then the mean over keypoints seen at least once. Metres."""
    v = _valid(dists, visible)
    d = np.asarray(dists, dtype=np.float64)
    seen = v.any(0)
    per_kp = np.where(v, d, 0.0).sum(0)[seen] / v.sum(0)[seen]
    return float(per_kp.mean())


def median_error(dists, visible=None) -> float:
    """hand3d's 'average median EPE': per-keypoint median over (visible) samples, mean over keypoints."""
    v = _valid(dists, visible)
    d = np.where(v, np.asarray(dists, dtype=np.float64), np.nan)
    seen = v.any(0)
    return float(np.nanmedian(d[:, seen], axis=0).mean())


def pck_per_keypoint(dists, thresholds, visible=None) -> np.ndarray:
    """Fraction of (visible) samples with `d <= t` per keypoint seen at least once: (K_seen, T)."""
    v = _valid(dists, visible)
    d = np.where(v, np.asarray(dists, dtype=np.float64), np.inf)
    t = np.asarray(thresholds, dtype=np.float64)
    seen = np.flatnonzero(v.any(0))
    d_sorted = np.sort(d[:, seen], axis=0)
    # side="right" counts d <= t, the reference scorers' non-strict inequality
    hits = np.stack([np.searchsorted(d_sorted[:, j], t, side="right") for j in range(len(seen))])
    return hits / v.sum(0)[seen][:, None]


def pck_curve(dists, visible=None, lo: float = 0.0, hi: float = 0.05,
              steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds in mm (T,), PCK averaged over keypoints (T,)) for distances in metres (N, K)."""
    t = _thresholds(lo, hi, steps)
    return t * 1000.0, pck_per_keypoint(dists, t, visible).mean(0)


def auc(dists, visible=None, lo: float = 0.0, hi: float = 0.05, steps: int = 100) -> float:
    """Area under each keypoint's PCK curve divided by (hi - lo), then the mean over keypoints."""
    t = _thresholds(lo, hi, steps)
    per_kp = trapezoid(pck_per_keypoint(dists, t, visible), t) / (hi - lo)
    return float(per_kp.mean())


# --------------------------------------------------------------------------- F-score
def fscores(pred_verts, gt_verts, thresholds: Sequence[float] = F_THRESHOLDS) -> np.ndarray:
    """Per-sample F-score at each threshold (metres): (N, Vp, 3), (N, Vg, 3) -> (N, T).

    precision = share of predicted points whose nearest gt point is closer than t, recall = share of
    gt points whose nearest predicted point is closer than t (strict, as the official scorer; its
    variable names swap the two, which leaves F unchanged). F = 0 when both are 0.
    """
    # point counts may differ: the F-score needs no correspondence
    p, g = _points(pred_verts, "pred_verts"), _points(gt_verts, "gt_verts")
    if len(p) != len(g):
        raise ValueError(f"pred_verts has {len(p)} samples but gt_verts has {len(g)}")
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0 or (t <= 0).any():
        raise ValueError(f"fscores: thresholds must be a non-empty list of positive metres, got {thresholds}")
    bound = float(t.max())
    out = np.empty((len(p), len(t)))
    for i in range(len(p)):
        # KD-trees with an upper bound stop searching beyond the largest threshold: ~1 ms a sample
        d_pg = cKDTree(g[i], leafsize=32).query(p[i], k=1, distance_upper_bound=bound)[0]
        d_gp = cKDTree(p[i], leafsize=32).query(g[i], k=1, distance_upper_bound=bound)[0]
        prec = (d_pg[:, None] < t).mean(0)
        rec = (d_gp[:, None] < t).mean(0)
        denom = prec + rec
        out[i] = np.where(denom > 0, 2 * prec * rec / np.where(denom > 0, denom, 1.0), 0.0)
    return out


# --------------------------------------------------------------------------- protocols
def _joint_distances(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Procrustes-aligned, root-relative) per-joint distances, (N, 21) each, metres."""
    d_pa = np.linalg.norm(procrustes_align(p, g) - g, axis=-1)
    d_rr = np.linalg.norm(root_relative(p) - root_relative(g), axis=-1)
    return d_pa, d_rr


def per_sample_errors(pred_xyz, gt_xyz, visible=None) -> dict[str, np.ndarray]:
    """Per-sample PA-MPJPE and root-relative MPJPE in mm, (N,) each; NaN where no joint is visible."""
    p, g = _pair(pred_xyz, gt_xyz, "pred_xyz", "gt_xyz", NUM_JOINTS)
    v = _visibility(visible, p.shape[:2])
    v = np.ones(p.shape[:2], dtype=bool) if v is None else v
    d_pa, d_rr = _joint_distances(p, g)
    n = v.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "pa_mpjpe_mm": np.where(v, d_pa, 0.0).sum(1) / n * 1000.0,
            "mpjpe_mm": np.where(v, d_rr, 0.0).sum(1) / n * 1000.0,
        }


def freihand_metrics(pred_xyz, gt_xyz, pred_verts=None, gt_verts=None) -> dict[str, float]:
    """FreiHAND protocol (official scorer). Joint keys always; vertex keys when both vertex sets are given.

    pa_mpjpe_mm / auc_pa_0_50: Procrustes-aligned joints; mpjpe_mm: root-relative (joint 0);
    kp_error_mm / auc_0_50: unaligned, as the official `xyz_mean3d` / `xyz_auc3d`.
    pa_mpvpe_mm, f5, f15: vertices aligned by their own Procrustes fit; mpvpe_mm: vertices relative to
    their skeleton's joint 0; verts_error_mm, f5_unaligned, f15_unaligned: unaligned.
    """
    p, g = _pair(pred_xyz, gt_xyz, "pred_xyz", "gt_xyz", NUM_JOINTS)
    d_raw = np.linalg.norm(p - g, axis=-1)
    d_pa, d_rr = _joint_distances(p, g)
    lo, hi, steps = FREIHAND_PCK_RANGE
    out = {
        "pa_mpjpe_mm": mean_error(d_pa) * 1000.0,
        "mpjpe_mm": mean_error(d_rr) * 1000.0,
        "kp_error_mm": mean_error(d_raw) * 1000.0,
        "auc_pa_0_50": auc(d_pa, lo=lo, hi=hi, steps=steps),
        "auc_0_50": auc(d_raw, lo=lo, hi=hi, steps=steps),
    }
    if (pred_verts is None) != (gt_verts is None):
        missing = "gt_verts" if gt_verts is None else "pred_verts"
        raise ValueError(f"freihand_metrics: {missing} is missing; pass both vertex sets or neither")
    if pred_verts is None:
        return out
    pv, gv = _pair(pred_verts, gt_verts, "pred_verts", "gt_verts")
    if len(pv) != len(p):
        raise ValueError(f"pred_verts has {len(pv)} samples but pred_xyz has {len(p)}")
    pv_al = procrustes_align(pv, gv)
    f_al, f_raw = fscores(pv_al, gv), fscores(pv, gv)
    out.update(
        pa_mpvpe_mm=float(np.linalg.norm(pv_al - gv, axis=-1).mean() * 1000.0),
        mpvpe_mm=float(np.linalg.norm(root_relative(pv, p) - root_relative(gv, g), axis=-1).mean() * 1000.0),
        verts_error_mm=float(np.linalg.norm(pv - gv, axis=-1).mean() * 1000.0),
        f5=float(f_al[:, 0].mean()), f15=float(f_al[:, 1].mean()),
        f5_unaligned=float(f_raw[:, 0].mean()), f15_unaligned=float(f_raw[:, 1].mean()),
    )
    return out


def rhd_metrics(pred_xyz, gt_xyz, visible=None) -> dict[str, float]:
    """RHD protocol (hand3d): EPE mean/median in mm and AUCs on root-relative, bone-rescaled joints.

    With a (N, 21) visibility mask only visible keypoints count, in every key (the Procrustes fit of
    pa_mpjpe_mm still uses all 21 joints, whose 3D labels RHD provides).
    """
    p, g = _pair(pred_xyz, gt_xyz, "pred_xyz", "gt_xyz", NUM_JOINTS)
    v = _visibility(visible, p.shape[:2])
    p_s, g_rr = hand3d_normalise(p, g)
    d = np.linalg.norm(p_s - g_rr, axis=-1)
    t = _thresholds(*RHD_PCK_RANGE)
    per_kp = pck_per_keypoint(d, t, v)
    # get_measures: per-keypoint AUC, then the mean; the 20-50 figure is calc_auc on the tail of the
    # keypoint-mean curve, normalised by the tail's own range
    curve, k = per_kp.mean(0), RHD_AUC_20_50_FROM
    out = {
        "epe_mean_mm": mean_error(d, v) * 1000.0,
        "epe_median_mm": median_error(d, v) * 1000.0,
        "auc_20_50": float(trapezoid(curve[k:], t[k:]) / (t[-1] - t[k])),
        "auc_0_50": float((trapezoid(per_kp, t) / (t[-1] - t[0])).mean()),
    }
    d_pa, d_rr = _joint_distances(p, g)
    out.update(pa_mpjpe_mm=mean_error(d_pa, v) * 1000.0, mpjpe_mm=mean_error(d_rr, v) * 1000.0)
    return out


def protocol_pck_curve(protocol: str, pred_xyz, gt_xyz, visible=None) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds in mm, keypoint-mean PCK) of the curve whose area the protocol reports: Procrustes-aligned
    joints on FreiHAND's 100 thresholds (`auc_pa_0_50`) for 'freihand' / 'synthetic'; for 'rhd' the
    hand3d-normalised joints, visible ones only, on its 20 thresholds (`auc_0_50`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol_pck_curve: unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    p, g = _pair(pred_xyz, gt_xyz, "pred_xyz", "gt_xyz", NUM_JOINTS)
    if protocol == "rhd":
        p_s, g_rr = hand3d_normalise(p, g)
        lo, hi, steps = RHD_PCK_RANGE
        return pck_curve(np.linalg.norm(p_s - g_rr, axis=-1), visible, lo=lo, hi=hi, steps=steps)
    if visible is not None:
        raise ValueError(f"protocol_pck_curve: visible is only used by the 'rhd' protocol, not {protocol!r}")
    lo, hi, steps = FREIHAND_PCK_RANGE
    return pck_curve(np.linalg.norm(procrustes_align(p, g) - g, axis=-1), lo=lo, hi=hi, steps=steps)


def protocol_joint_errors(protocol: str, pred_xyz, gt_xyz, visible=None) -> np.ndarray:
    """(N, 21) mm: the per-joint distances the protocol's headline error averages (FreiHAND / synthetic:
    Procrustes-aligned, `pa_mpjpe_mm`; RHD: hand3d-normalised, `epe_mean_mm`), NaN where a joint is not
    visible (RHD). nanmean over samples gives the per-joint error, over joints the per-sample error."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol_joint_errors: unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    p, g = _pair(pred_xyz, gt_xyz, "pred_xyz", "gt_xyz", NUM_JOINTS)
    if protocol != "rhd":
        return np.linalg.norm(procrustes_align(p, g) - g, axis=-1) * 1000.0
    p_s, g_rr = hand3d_normalise(p, g)
    d = np.linalg.norm(p_s - g_rr, axis=-1) * 1000.0
    v = _visibility(visible, d.shape)
    return d if v is None else np.where(v, d, np.nan)


# Metrics where a larger value is better; every other key (errors in mm) is lower-is-better.
HIGHER_IS_BETTER_PREFIXES = ("auc_", "f5", "f15", "retrieval_")


def higher_is_better(name: str) -> bool:
    """Direction of a metric key, for choosing best.pt by `trainer.monitor`."""
    return str(name).startswith(HIGHER_IS_BETTER_PREFIXES)


def evaluate(protocol: str, pred_xyz, gt_xyz, pred_verts=None, gt_verts=None, visible=None) -> dict[str, float]:
    """Dispatch to the protocol's metrics: 'freihand' | 'synthetic' (FreiHAND protocol) | 'rhd'."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate: unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "rhd":
        if pred_verts is not None or gt_verts is not None:
            raise ValueError("evaluate: the 'rhd' protocol has no meshes; drop pred_verts/gt_verts")
        return rhd_metrics(pred_xyz, gt_xyz, visible=visible)
    if visible is not None:
        raise ValueError(f"evaluate: visible is only used by the 'rhd' protocol, not {protocol!r}")
    return freihand_metrics(pred_xyz, gt_xyz, pred_verts=pred_verts, gt_verts=gt_verts)


# --------------------------------------------------------------------------- retrieval
def _features(x, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name}: expected shape (batch, dim) with batch >= 1, got {tuple(t.shape)}")
    return torch.nn.functional.normalize(t.to(torch.float32), dim=-1)


def retrieval_top1(pose_feats, text_feats, prompts: Sequence[str] | None = None) -> float:
    """Pose -> text top-1 accuracy within one batch (cosine similarity).

    A retrieved text counts as correct when it is the query's own or, given prompts, when its prompt
    string equals the query's (identical sentences are indistinguishable, DESIGN 1.6).
    """
    p, t = _features(pose_feats, "pose_feats"), _features(text_feats, "text_feats")
    if p.shape != t.shape:
        raise ValueError(f"pose_feats and text_feats must have the same shape, got {tuple(p.shape)} vs {tuple(t.shape)}")
    best = (p @ t.to(p.device).T).argmax(1).cpu().numpy()
    correct = best == np.arange(len(best))
    if prompts is not None:
        prompts = list(prompts)
        if len(prompts) != len(best):
            raise ValueError(f"prompts: {len(prompts)} strings for a batch of {len(best)} features")
        correct |= np.array([prompts[j] == prompts[i] for i, j in enumerate(best)])
    return float(correct.mean())


def retrieval_by_batch(pose_feats, text_feats, prompts: Sequence[str] | None = None,
                       batch_sizes: Sequence[int] = (16, 64, 256)) -> dict[int, float]:
    """Mean `retrieval_top1` over consecutive chunks of each batch size (ragged tail dropped).

    A batch size larger than the set gives NaN, so a table keeps its columns.
    """
    p, t = _features(pose_feats, "pose_feats"), _features(text_feats, "text_feats")
    n = len(p)
    if len(t) != n or (prompts is not None and len(prompts) != n):
        raise ValueError(f"retrieval_by_batch: lengths differ, pose_feats {n}, text_feats {len(t)}, "
                         f"prompts {None if prompts is None else len(prompts)}")
    prompts = None if prompts is None else list(prompts)
    out: dict[int, float] = {}
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"retrieval_by_batch: batch sizes must be >= 1, got {b}")
        scores = [retrieval_top1(p[s:s + b], t[s:s + b], None if prompts is None else prompts[s:s + b])
                  for s in range(0, n - b + 1, b)]
        out[int(b)] = float(np.mean(scores)) if scores else float("nan")
    return out


# --------------------------------------------------------------------------- 2D keypoints (demo)
def mean_error_2d(pred_uv, gt_uv) -> tuple[float, np.ndarray]:
    """Mean 2D keypoint error and the per-sample means (N,), in the inputs' units (pixels); (N, P, 2) or (P, 2)."""
    p, g = _as_float64(pred_uv, "pred_uv"), _as_float64(gt_uv, "gt_uv")
    p, g = (a[None] if a.ndim == 2 else a for a in (p, g))
    if p.shape != g.shape or p.ndim != 3 or p.shape[-1] != 2 or p.shape[0] == 0:
        raise ValueError(f"mean_error_2d: expected two (N, P, 2) arrays of one shape, got {p.shape} and {g.shape}")
    if not (np.isfinite(p).all() and np.isfinite(g).all()):
        raise ValueError("mean_error_2d: NaN/inf in the keypoints")
    per_sample = np.linalg.norm(p - g, axis=-1).mean(-1)
    return float(per_sample.mean()), per_sample
