"""Per-axis CLIP loss between pose-aware features and text features (DESIGN 1.6).

For each axis a B x B similarity matrix `scale * norm(pose) @ norm(text).T` is scored with the
symmetric InfoNCE of CLIP (mean of the pose->text and text->pose cross-entropies). Each axis has its
own learnable log-scale, kept in [log min_scale, log max_scale] by `clamp_scales_`, which the training
loop calls after every optimiser step (CLIP's convention); the forward uses exp(log-scale) unclamped.

Samples whose prompts are identical are positives for each other. Under torch.distributed the
features of all ranks are gathered, so negatives span the global batch (see cliphand3d.dist for the
gradient convention), and prompt identity travels as int64 hashes.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..errors import ConfigError


def prompt_hash(prompt: str) -> int:
    """Stable (process- and run-independent, unlike hash()) signed 64-bit id of a prompt."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def positive_mask(ids: torch.Tensor) -> torch.Tensor:
    """(N,) ids -> (N, N) bool, True where two samples share an id (the diagonal included)."""
    return ids[:, None] == ids[None, :]


def multi_positive_clip_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on (N, N) logits with targets spread uniformly over each row's positives.

    Why uniform soft targets: identical prompts give identical text features, so no pose feature
    can score one copy above another. A one-hot target would then be unreachable and its gradient
    would push a pose feature away from its own (duplicated) text; the uniform target is the one
    the model can reach, the gradient between duplicates vanishes, and the loss is bounded below
    by log(#positives) instead of 0. With all prompts distinct it is exactly the CLIP loss.
    """
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    # The mask is symmetric, so the same targets serve the text->pose direction.
    pose_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_pose = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return 0.5 * (pose_to_text + text_to_pose)


class PerAxisContrastiveLoss(nn.Module):
    """CLIP loss per axis with a learnable temperature per axis, clamped after each optimiser step.

    axes: axis names; the feature and prompt dicts are keyed by them.
    init_logit_scale: initial log of the scale (CLIP: log(1/0.07); the demo repo: log(100)).
    min_scale, max_scale: bounds of exp(logit_scale), applied to the parameter by `clamp_scales_()`.
    gather: under torch.distributed with world size > 1, gather features from all ranks.

    forward(pose_feats, text_feats, prompts=None) -> {clip_<a>, acc_<a>, scale_<a>} per axis:
    the loss, top-1 pose->text retrieval accuracy (a positive counts; detached) and the scale
    (detached). prompts=None treats every sample as distinct.
    """

    def __init__(
        self,
        axes: Sequence[str] = ("x", "y", "z"),
        init_logit_scale: float = math.log(1 / 0.07),
        min_scale: float = 1.0,
        max_scale: float = 100.0,
        gather: bool = True,
    ):
        super().__init__()
        axes = (axes,) if isinstance(axes, str) else tuple(str(a) for a in axes)
        if not axes or len(set(axes)) != len(axes):
            raise ConfigError(f"loss.axes must be distinct axis names, got {list(axes)}")
        if not 0 < min_scale <= max_scale:
            raise ConfigError(
                f"loss scale clamp needs 0 < min_scale <= max_scale, got min_scale={min_scale}, "
                f"max_scale={max_scale}"
            )
        if not math.log(min_scale) <= init_logit_scale <= math.log(max_scale):
            raise ConfigError(
                f"loss.contrastive.init_logit_scale={init_logit_scale} is outside [log(min_scale), log(max_scale)] = "
                f"[{math.log(min_scale):.4g}, {math.log(max_scale):.4g}]; e.g. log(1/0.07) = 2.659 (CLIP)"
            )
        self.axes = axes
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.gather = bool(gather)
        self.logit_scale = nn.ParameterDict(
            {a: nn.Parameter(torch.tensor(float(init_logit_scale))) for a in axes}
        )

    def scale(self, axis: str) -> torch.Tensor:
        return self.logit_scale[axis].exp()

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        """Clamp every log-scale into [log min_scale, log max_scale]; call it after each optimiser step.

        On the parameter rather than in forward: a clamp in forward has zero gradient outside its
        bounds, so a scale that overshot them (Adam does) could never come back.
        """
        lo, hi = math.log(self.min_scale), math.log(self.max_scale)
        for p in self.logit_scale.values():
            p.clamp_(lo, hi)

    def _stack(self, feats: Mapping[str, torch.Tensor], what: str) -> torch.Tensor:
        missing = [a for a in self.axes if a not in feats]
        if missing:
            raise KeyError(f"PerAxisContrastiveLoss: {what} has no features for axes {missing} "
                           f"(has {sorted(feats)}, loss.axes={list(self.axes)})")
        shapes = {a: tuple(feats[a].shape) for a in self.axes}
        first = shapes[self.axes[0]]
        if len(first) != 2 or any(s != first for s in shapes.values()):
            raise ValueError(f"PerAxisContrastiveLoss: {what} must be (B, D) and equal on every axis, "
                             f"got {shapes}")
        # float32: the softmax over a global batch is not safe in fp16 under autocast.
        return torch.stack([F.normalize(feats[a].float(), dim=-1) for a in self.axes], dim=1)

    def _prompt_ids(self, prompts: Mapping[str, Sequence[str]], batch: int, device) -> torch.Tensor:
        cols = []
        for a in self.axes:
            if a not in prompts:
                raise KeyError(f"PerAxisContrastiveLoss: prompts has no axis {a!r} (has {sorted(prompts)})")
            p = prompts[a]
            if isinstance(p, str) or len(p) != batch:
                raise ValueError(f"PerAxisContrastiveLoss: prompts[{a!r}] must be a list of {batch} "
                                 f"strings (one per sample), got {type(p).__name__} of length {len(p)}")
            cols.append([prompt_hash(s) for s in p])
        return torch.tensor(cols, dtype=torch.int64, device=device).t()  # (B, A)

    def forward(
        self,
        pose_feats: Mapping[str, torch.Tensor],
        text_feats: Mapping[str, torch.Tensor],
        prompts: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, torch.Tensor]:
        pose = self._stack(pose_feats, "pose_feats")  # (B, A, D)
        text = self._stack(text_feats, "text_feats")
        if pose.shape != text.shape:
            raise ValueError(f"PerAxisContrastiveLoss: pose features {tuple(pose.shape)} and text features "
                             f"{tuple(text.shape)} differ (expected (B, axes, D) for both)")
        ids = None if prompts is None else self._prompt_ids(prompts, pose.shape[0], pose.device)

        if self.gather and dist.get_world_size() > 1:
            pose = dist.all_gather_with_grad(pose)
            text = dist.all_gather_with_grad(text)
            if ids is not None:
                ids = dist.all_gather_no_grad(ids)

        n = pose.shape[0]
        out: dict[str, torch.Tensor] = {}
        for k, a in enumerate(self.axes):
            scale = self.scale(a)
            logits = scale * pose[:, k] @ text[:, k].t()
            if ids is None:
                positives = torch.eye(n, dtype=torch.bool, device=logits.device)
            else:
                positives = positive_mask(ids[:, k])
            out[f"clip_{a}"] = multi_positive_clip_loss(logits, positives)
            with torch.no_grad():
                hit = positives[torch.arange(n, device=logits.device), logits.argmax(dim=1)]
                out[f"acc_{a}"] = hit.float().mean()
            out[f"scale_{a}"] = scale.detach()
        return out
