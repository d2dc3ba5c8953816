"""Training losses as a dict of named terms; the weighted sum happens in one place (`weighted_total`).

Terms (DESIGN 1.9): `joints_coarse` (L_P on the 1D-heatmap joints P), `joints` (final joints J @ V),
`verts` (L_V, only where the data has meshes), `stages` (deep supervision of the coarse-to-fine
regressor's intermediate levels against the ground truth at their nodes), `clip_<axis>` (L_CLIP per axis, from
`models.contrastive.PerAxisContrastiveLoss`), and `heatmap`, an auxiliary term of ours (cross-entropy
of the 1D heatmaps against Gaussians at the true coordinates: dense targets that speed early learning
from scratch; computed only when its weight is on). Weights, L1 vs L2 and extra terms are not published:
they are config values (configs/loss/).

Units (`units`): the point terms compare normalised uvd as it is (`uvd`: u, v in crop units, d in bones),
or both prediction and target lifted to the camera (`metric`: `geometry.uvd_to_xyz` with the batch's crop
intrinsics, image size, true root depth and bone), taken relative to the root's depth and divided by the
bone, so an error costs the same along every axis and at any crop scale.

Mesh regularisers (MobRecon, I2L-MeshNet), on the final vertices where the data has meshes, always in that
metric frame: `edge`, mean over the template graph's edges (i, j) of | |p_i - p_j| - |t_i - t_j| |, and
`normal`, mean over its triangles and their three sides of |cos| between the predicted side and the true
triangle's normal. The graph is the template's (`MeshTemplate.mesh_graph`), given by `build.build_criterion`.

Per-sample masks (data=mix, data/mix.py): a batch with `has_mesh` mixes samples with meshes and samples without
(RHD), whose `verts_*` are placeholder zeros. Every term read off the mesh (`verts`, `edge`, `normal`, and
`stages` where they supervise vertices) is then the mean over the mesh samples only: a sample without a mesh adds
exactly 0 to it and to its gradient, and a batch without any mesh sample gives 0. Without `has_mesh` nothing is
masked and each term is the plain mean over the batch, as it always was.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping

import torch
from torch import nn
import torch.nn.functional as F

from .errors import ConfigError
from .geometry import uvd_to_xyz
from .models.joint_regressor import bin_centres, depth_to_unit
from .models.template import MeshTemplate

# Names that are logged but never summed into the objective.
MONITOR_PREFIXES = ("acc_", "scale_")
# Terms a weight can name (besides clip_<axis>); the models' parameter_terms speak of the same names.
TERMS = ("joints_coarse", "joints", "verts", "stages", "heatmap", "clip", "edge", "normal")
# The terms that read the template's neighbour graph (build.build_criterion hands it over when one weighs).
MESH_TERMS = ("edge", "normal")
UNITS = ("uvd", "metric")


def masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B,) values over the samples where the (B,) bool `mask` holds. The others add exactly 0 (whatever
    they hold: where, not a product, so a NaN stays out) and no gradient; no sample at all gives 0."""
    kept = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    return kept.sum() / mask.sum().clamp(min=1).to(per_sample.dtype)


def point_errors(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The error of each point (l2: (B, N)) or coordinate (l1, smooth_l1: (B, N, 3)) of (B, N, 3) points."""
    if kind == "l1":
        return (pred - target).abs()
    if kind == "l2":
        return (pred - target).pow(2).sum(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=0.01, reduction="none")
    raise ConfigError(f"loss.kind={kind!r} is not one of l1, l2, smooth_l1")


def point_error(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean error over points of (B, N, 3) coordinates (in the loss's units); with a (B,) bool `mask`, the
    mean over the points of the samples it keeps (`masked_mean` of each sample's mean)."""
    err = point_errors(pred, target, kind)
    return err.mean() if mask is None else masked_mean(err.flatten(1).mean(1), mask)


def bone_frame(uvd: torch.Tensor, batch: Mapping) -> torch.Tensor:
    """(B, N, 3) normalised uvd -> camera points minus (0, 0, true root depth), in bones (z is d itself).

    Lifted by `geometry.uvd_to_xyz` with the batch's crop intrinsics K, its image size, true root depth and
    bone, in float32 with autocast off: the differences taken from it are millimetres out of metres, which
    bf16 (8 mantissa bits) would round away.
    """
    cast = torch.autocast(uvd.device.type, enabled=False) if torch.is_autocast_enabled(uvd.device.type) \
        else nullcontext()
    with cast:
        bone, root = batch["bone"].float(), batch["root_depth"].float()
        xyz = uvd_to_xyz(uvd.float(), batch["K"].float(), batch["image"].shape[-1], root, bone)
        xyz = xyz - F.pad(root[:, None, None], (2, 0))
        return xyz / bone[:, None, None]


def edge_length_error(pred: torch.Tensor, target: torch.Tensor, edges: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch (the samples a (B,) bool `mask` keeps) and the (E, 2) edges of
    | |p_i - p_j| - |t_i - t_j| | ((B, N, 3) points)."""
    length = lambda x: torch.linalg.vector_norm(x[:, edges[:, 0]] - x[:, edges[:, 1]], dim=-1)  # noqa: E731
    err = (length(pred) - length(target)).abs()
    return err.mean() if mask is None else masked_mean(err.mean(1), mask)


def normal_error(pred: torch.Tensor, target: torch.Tensor, triangles: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch (the samples a (B,) bool `mask` keeps), the (F, 3) triangles and their three sides
    of |cos| between the predicted side and the true triangle's unit normal: 0 when every predicted triangle
    lies in its true one's plane. A degenerate true triangle (no normal) adds 0."""
    t0, t1, t2 = (target[:, triangles[:, i]] for i in range(3))
    normal = F.normalize(torch.linalg.cross(t1 - t0, t2 - t0, dim=-1), dim=-1)
    p0, p1, p2 = (pred[:, triangles[:, i]] for i in range(3))
    sides = torch.stack([p1 - p0, p2 - p0, p2 - p1], 0)
    cos = (F.normalize(sides, dim=-1) * normal).sum(-1).abs()  # (3, B, F)
    return cos.mean() if mask is None else masked_mean(cos.mean((0, 2)), mask)


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
    """Pose, vertex and contrastive terms as a named dict; `total()` sums them with the config weights.

    units: `uvd` or `metric` (module docstring). template: the mesh template (a build argument, never config:
    `build.build_criterion` passes it when `edge` or `normal` weighs); graph_neighbours: the k of its graph.
    """

    def __init__(self, *, weights: Mapping[str, float], kind: str = "l1", contrastive: nn.Module | None = None,
                 depth_range: float = 3.0, heatmap_sigma: float = 0.04, units: str = "uvd",
                 template: MeshTemplate | dict | None = None, graph_neighbours: int = 5):
        super().__init__()
        self.depth_range, self.heatmap_sigma = float(depth_range), float(heatmap_sigma)
        for key, v in (("loss.depth_range", self.depth_range), ("loss.heatmap_sigma", self.heatmap_sigma)):
            if not v > 0:
                raise ConfigError(f"{key}={v} must be > 0 (depth_range follows model.depth_range; heatmap_sigma "
                                 f"is a Gaussian width in [0, 1] units, e.g. 0.04)")
        if units not in UNITS:
            raise ConfigError(f"loss.units={units!r} is not one of {', '.join(UNITS)} (uvd: normalised uvd as "
                              "it is; metric: lifted to the camera, in bones)")
        self.units = units
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
        self.graph = self._mesh_graph(template, graph_neighbours)
        self._graph_on: dict = {}  # device -> (edges, triangles) tensors, made once per device

    def _mesh_graph(self, template, k):
        if not any(self.weighs(t) for t in MESH_TERMS):
            return None
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError(f"loss.graph_neighbours={k!r} must be an int >= 1 (the k nearest vertices each "
                              "template vertex is joined to, e.g. 5)")
        if template is None:
            return None  # refused at the first batch with meshes (`_graph`): the released import builds no graph
        template = template if isinstance(template, MeshTemplate) else MeshTemplate.from_dict(template)
        return template.mesh_graph(min(k, template.num_verts - 1))

    @property
    def uses_text(self) -> bool:
        return self.contrastive is not None

    def weighs(self, term: str) -> bool:
        """Whether `term` enters the objective (a zero weight drops it, see `weighted_total`)."""
        return weight_for(term, self.weights) != 0.0

    def forward(self, outputs: dict, batch: dict, text_feats: Mapping[str, torch.Tensor] | None = None) -> dict:
        target = batch["joints_uvd"]
        space = (lambda x: bone_frame(x, batch)) if self.units == "metric" else (lambda x: x)
        t_joints = space(target)
        terms = {
            "joints_coarse": point_error(space(outputs["joints_coarse"]), t_joints, self.kind),
            "joints": point_error(space(outputs["joints"]), t_joints, self.kind),
        }
        if self.weights.get("heatmap", 0.0) > 0:
            terms["heatmap"] = self._heatmap(outputs, target)
        t_dense, mask = t_joints, None
        if outputs.get("verts") is not None and "verts_uvd" in batch:
            # data=mix: only the samples with a mesh count in the terms read off it (module docstring)
            pred, t_dense, mask = space(outputs["verts"]), space(batch["verts_uvd"]), batch.get("has_mesh")
            terms["verts"] = point_error(pred, t_dense, self.kind, mask)
            if any(self.weighs(t) for t in MESH_TERMS):  # in the bone frame whatever the units
                graph, metric = self._graph(pred), self.units == "metric"
                terms.update(self._regularisers(graph, pred if metric else bone_frame(outputs["verts"], batch),
                                                t_dense if metric else bone_frame(batch["verts_uvd"], batch), mask))
        if outputs.get("stages"):
            terms["stages"] = sum(point_error(space(pred), t_dense[:, idx], self.kind, mask)
                                  for pred, idx in zip(outputs["stages"], outputs["stage_index"])) / len(outputs["stages"])
        if self.contrastive is not None:
            if text_feats is None or "pose_feats" not in outputs:
                raise ConfigError("the contrastive loss is on (loss.weights.clip > 0) but no text features were "
                                 "computed; check that the dataset has a prompt generator (prompt=...)")
            prompts = batch.get("prompts") or None
            terms.update(self.contrastive(outputs["pose_feats"], text_feats, prompts))
        return terms

    def _heatmap(self, outputs: dict, target: torch.Tensor) -> torch.Tensor:
        if outputs.get("logits") is None:
            raise ConfigError("loss.weights.heatmap > 0 but the model returned no 1D-heatmap logits "
                             "(outputs['logits']); set loss.weights.heatmap=0 for such a model")
        t01 = torch.cat([target[..., :2], depth_to_unit(target[..., 2:], self.depth_range)], -1)
        lg = outputs["logits"]
        return sum(heatmap_ce(lg[a], t01[..., k], self.heatmap_sigma) for k, a in enumerate(("x", "y", "z"))) / 3.0

    def _regularisers(self, graph: tuple, pred: torch.Tensor, true: torch.Tensor, mask=None) -> dict:
        """`edge` and `normal` (those that weigh) of (B, N, 3) vertices in the bone frame (over `mask`'s samples)."""
        edges, triangles = graph
        out = {}
        if self.weighs("edge"):
            out["edge"] = edge_length_error(pred, true, edges, mask)
        if self.weighs("normal"):
            out["normal"] = normal_error(pred, true, triangles, mask)
        return out

    def _graph(self, verts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            raise ConfigError("loss.weights.edge / loss.weights.normal > 0 but the loss was built without the mesh "
                              "template they read their graph from: build it with build.build_criterion(cfg, "
                              "template), or CLIPHand3DLoss(template=...); or set those weights to 0")
        if verts.shape[1] != self.graph.num_verts:
            raise ValueError(f"the loss's mesh graph has {self.graph.num_verts} vertices, the predicted mesh "
                             f"{verts.shape[1]}: the loss and the model were built from different templates")
        if verts.device not in self._graph_on:
            self._graph_on[verts.device] = tuple(torch.as_tensor(a, device=verts.device)
                                                 for a in (self.graph.edges, self.graph.triangles))
        return self._graph_on[verts.device]

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(terms, self.weights)
