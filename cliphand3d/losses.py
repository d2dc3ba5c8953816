"""Training losses as a dict of named terms; the weighted sum happens in one place (`weighted_total`).

Terms (DESIGN 1.9): `joints_coarse` (L_P on the 1D-heatmap joints P), `joints` (final joints J @ V),
`verts` (L_V, only where the data has meshes), `stages` (deep supervision of the coarse-to-fine
regressor's intermediate levels against the ground truth at their nodes), `clip_<axis>` (L_CLIP per axis, from
`models.contrastive.PerAxisContrastiveLoss`), and `heatmap`, an auxiliary term of ours (cross-entropy
of the 1D heatmaps against Gaussians at the true coordinates: dense targets that speed early learning
from scratch; computed only when its weight is on). Weights, L1 vs L2 and extra terms are not published:
they are config values (configs/loss/).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
import torch.nn.functional as F

from .errors import ConfigError
from .models.joint_regressor import bin_centres, depth_to_unit

# Names that are logged but never summed into the objective.
MONITOR_PREFIXES = ("acc_", "scale_")
# Terms a weight can name (besides clip_<axis>); the models' parameter_terms speak of the same names.
TERMS = ("joints_coarse", "joints", "verts", "stages", "heatmap", "clip")


def point_error(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean error over points of (B, N, 3) normalised-uvd coordinates."""
    if kind == "l1":
        return (pred - target).abs().mean()
    if kind == "l2":
        return (pred - target).pow(2).sum(-1).mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=0.01)
    raise ConfigError(f"loss.kind={kind!r} is not one of l1, l2, smooth_l1")


def heatmap_ce(logits: torch.Tensor, target01: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy of (B, J, n) 1D-heatmap logits against Gaussians of width `sigma` (in [0, 1]
    units) centred on the (B, J) targets, over the bins that soft_argmax_1d reads."""
    centres = bin_centres(logits.shape[-1], logits)
    t = target01.clamp(0.0, 1.0).unsqueeze(-1)
    p = torch.softmax(-0.5 * ((centres - t) / sigma) ** 2, dim=-1)
    return -(p * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def weight_for(name: str, weights: Mapping[str, float]) -> float:
    """`clip` weighs every `clip_<axis>` term unless a per-axis weight is given."""
    if name in weights:
        return float(weights[name])
    if name.startswith("clip_") and "clip" in weights:
        return float(weights["clip"])
    return 0.0


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The training objective: the one place where weights meet terms."""
    total = None
    for name, value in terms.items():
        if name.startswith(MONITOR_PREFIXES):
            continue
        w = weight_for(name, weights)
        if w == 0.0:
            continue
        total = w * value if total is None else total + w * value
    if total is None:
        raise ConfigError(f"every loss weight is zero for terms {sorted(terms)}; set loss.weights")
    return total


class CLIPHand3DLoss(nn.Module):
    """Pose, vertex and contrastive terms as a named dict; `total()` sums them with the config weights."""

    def __init__(self, *, weights: Mapping[str, float], kind: str = "l1", contrastive: nn.Module | None = None,
                 depth_range: float = 3.0, heatmap_sigma: float = 0.04):
        super().__init__()
        self.depth_range, self.heatmap_sigma = float(depth_range), float(heatmap_sigma)
        for key, v in (("loss.depth_range", self.depth_range), ("loss.heatmap_sigma", self.heatmap_sigma)):
            if not v > 0:
                raise ConfigError(f"{key}={v} must be > 0 (depth_range follows model.depth_range; heatmap_sigma "
                                 f"is a Gaussian width in [0, 1] units, e.g. 0.04)")
        self.weights = {k: float(v) for k, v in dict(weights).items()}
        # a misspelt weight would otherwise be ignored, leaving the term it meant at its default
        known = TERMS + tuple(f"clip_{a}" for a in getattr(contrastive, "axes", ("x", "y", "z")))
        unknown = [k for k in self.weights if k not in known]
        if unknown:
            raise ConfigError(f"loss.weights.{unknown[0]} is not a loss term; choose from {list(known)}")
        self.kind = kind
        point_error(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), kind)  # fail on a bad kind at build time
        self.contrastive = contrastive if self.weights.get("clip", 0.0) > 0 or any(
            k.startswith("clip_") and v > 0 for k, v in self.weights.items()) else None

    @property
    def uses_text(self) -> bool:
        return self.contrastive is not None

    def weighs(self, term: str) -> bool:
        """Whether `term` enters the objective (a zero weight drops it, see `weighted_total`)."""
        return weight_for(term, self.weights) != 0.0

    def forward(self, outputs: dict, batch: dict, text_feats: Mapping[str, torch.Tensor] | None = None) -> dict:
        target = batch["joints_uvd"]
        terms = {
            "joints_coarse": point_error(outputs["joints_coarse"], target, self.kind),
            "joints": point_error(outputs["joints"], target, self.kind),
        }
        if self.weights.get("heatmap", 0.0) > 0:
            if outputs.get("logits") is None:
                raise ConfigError("loss.weights.heatmap > 0 but the model returned no 1D-heatmap logits "
                                 "(outputs['logits']); set loss.weights.heatmap=0 for such a model")
            t01 = torch.cat([target[..., :2], depth_to_unit(target[..., 2:], self.depth_range)], -1)
            lg = outputs["logits"]
            terms["heatmap"] = sum(heatmap_ce(lg[a], t01[..., k], self.heatmap_sigma)
                                   for k, a in enumerate(("x", "y", "z"))) / 3.0
        dense = target
        if outputs.get("verts") is not None and "verts_uvd" in batch:
            dense = batch["verts_uvd"]
            terms["verts"] = point_error(outputs["verts"], dense, self.kind)
        if outputs.get("stages"):
            terms["stages"] = sum(point_error(pred, dense[:, idx], self.kind)
                                  for pred, idx in zip(outputs["stages"], outputs["stage_index"])) / len(outputs["stages"])
        if self.contrastive is not None:
            if text_feats is None or "pose_feats" not in outputs:
                raise ConfigError("the contrastive loss is on (loss.weights.clip > 0) but no text features were "
                                 "computed; check that the dataset has a prompt generator (prompt=...)")
            prompts = batch.get("prompts") or None
            terms.update(self.contrastive(outputs["pose_feats"], text_feats, prompts))
        return terms

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(terms, self.weights)
