"""Coarse-to-fine mesh regressor (DESIGN 1.8): per-joint tokens -> template levels -> vertices.

Stage l maps nodes n_{l-1} -> n_l (21 joints first): a Linear over the node axis upsamples, a Linear
narrows the width to w_l - 3, the fixed template positions of level l are concatenated, image cues
are added and `blocks_per_stage` transformer blocks mix the nodes (one count for every stage, or one
per stage: 0 leaves a stage to its node-axis Linears); a head reads (B, n_l, 3).

Image cues: F3, F2, F1 are bilinearly sampled at the predicted 2D joints (plus those joints' u, v),
projected to the stage width and spread from the 21 joints to the level's nodes by a Linear over
the node axis. Every stage sees all three maps: the learned projection decides how much coarse
context and fine detail each level uses.

Outputs are the model's normalised uvd (u, v in [0, 1] of the crop, d in bones from the root,
DESIGN 1.10), predicted directly rather than as template offsets: the template lives in a canonical,
rotation-free frame in bone units, while uvd carries the crop's scale, position and up to +-90 deg
of in-plane augmentation, so "template + offset" would need offsets as large as the positions.
The template instead gives every node a fixed identity (the concatenated positions) and
initialises the node-axis Linears (each node starts from its nearest coarser node / joint).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..skeleton import NUM_JOINTS
from .blocks import ClipResidualBlock
from .template import MeshTemplate

# Named choices (defaults first: the project's design; the others reproduce the authors' released
# network, docs/released.md).
CUE_MAPS = ("pyramid", "per_stage")      # F3+F2+F1 (+uv) at every stage | F4, F3, F2, F1, one per stage
CUE_PADDINGS = ("border", "zeros")       # grid_sample padding for joints off the crop
CUE_PLACEMENTS = ("before", "after")     # cues added before the transformer blocks | after them
BLOCKS = ("torch", "clip")               # nn.TransformerEncoderLayer (GELU, MLP 2x) | CLIP's block
HEADS = ("norm_linear", "linear")        # per-stage output head: LayerNorm + Linear | Linear
# Compatibility switch, not a design choice: "batch" reproduces a bug of the released code, whose
# attention mixes the samples of a batch instead of a hand's nodes. Only for the released weights.
ATTENTION_OVER = ("nodes", "batch")


def _choice(key: str, value: str, choices) -> str:
    if value not in choices:
        raise ConfigError(f"model.{key}={value!r} is unknown; choose from {list(choices)}")
    return value


def _blocks_per_stage(value, n_levels: int) -> list[int]:
    """model.blocks_per_stage as one count per stage: an int applies to every stage, a list gives each its own."""
    counts = [value] * n_levels if isinstance(value, (int, np.integer)) else list(value)
    if len(counts) != n_levels or any(not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
        raise ConfigError(f"model.blocks_per_stage={value!r}: give one count >= 0 for every stage, or a list of "
                          f"{n_levels} (one per template level)")
    return [int(c) for c in counts]


def sample_at_joints(feat: torch.Tensor, uv: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Bilinear samples of feat (B, C, H, W) at uv (B, K, 2) in [0, 1] of the crop -> (B, K, C).

    align_corners=False makes [-1, 1] span the map's outer pixel edges, the same as [0, 1] spanning
    the crop's edges in the project's uvd convention, so any stride lines up without offsets.
    'border' padding: joints pushed just off the crop by augmentation still read the nearest
    evidence instead of a zero vector.
    """
    grid = (uv * 2 - 1).unsqueeze(2).to(feat.dtype)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.squeeze(-1).transpose(1, 2)


def _nearest_one_hot(dst: np.ndarray, src: np.ndarray) -> torch.Tensor:
    """(len(dst), len(src)) matrix copying each dst point's nearest src point."""
    d = ((dst[:, None] - src[None]) ** 2).sum(-1)
    w = np.zeros_like(d)
    w[np.arange(len(dst)), d.argmin(1)] = 1.0
    return torch.as_tensor(w, dtype=torch.float32)


class _NodeLinear(nn.Linear):
    """Linear over the node axis: (B, n_in, C) -> (B, n_out, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


@contextmanager
def sdpa_attention():
    """Attention through scaled_dot_product_attention in inference too.

    Without grad, nn.TransformerEncoderLayer and nn.MultiheadAttention take PyTorch's "fast path",
    which on the CPU materialises each N x N attention matrix (bmm + softmax): over the 778 mesh nodes
    at batch 32 that cost ~10% of the paper-sized model's forward (docs/performance.md). Training
    already runs the SDPA kernels; this makes inference run the same ones (the same function, to
    float rounding). The switch is PyTorch's global one, restored on exit."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


class _Stage(nn.Module):
    def __init__(self, *, n_in: int, n_out: int, w_in: int, w_out: int, cue_dim: int, blocks: int,
                 heads: int, dropout: float, up_init: torch.Tensor, spread_init: torch.Tensor,
                 block: str = "torch", mlp_ratio: int = 4, head: str = "norm_linear",
                 cue_placement: str = "before", attention_over: str = "nodes"):
        super().__init__()
        self.cue_placement, self.attention_over = cue_placement, attention_over
        self.upsample = _NodeLinear(n_in, n_out)
        self.narrow = nn.Linear(w_in, w_out - 3)
        self.cue_proj = nn.Linear(cue_dim, w_out)
        self.cue_spread = _NodeLinear(NUM_JOINTS, n_out)
        with torch.no_grad():
            self.upsample.weight.copy_(up_init)
            self.upsample.bias.zero_()
            self.cue_spread.weight.copy_(spread_init)
            self.cue_spread.bias.zero_()
        if block == "clip":
            self.blocks = nn.ModuleList(ClipResidualBlock(w_out, heads, mlp_ratio) for _ in range(blocks))
        else:
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(w_out, heads, dim_feedforward=2 * w_out, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
                for _ in range(blocks))
        if head == "linear":
            self.head = nn.Linear(w_out, 3)
            last = self.head
        else:
            self.head = nn.Sequential(nn.LayerNorm(w_out), nn.Linear(w_out, 3))
            last = self.head[1]
        with torch.no_grad():
            # Start every node at the crop centre at the root's depth rather than at (0, 0, 0).
            last.bias.copy_(torch.tensor([0.5, 0.5, 0.0]))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cues: torch.Tensor):
        x = self.narrow(self.upsample(x))
        x = torch.cat([x, pos.to(x.dtype).expand(x.shape[0], -1, -1)], -1)
        cue = self.cue_spread(self.cue_proj(cues))
        if self.cue_placement == "before":
            x = x + cue
        # (B, N, C) -> (N, B, C) makes the blocks attend across the batch, as the released code does
        x = x.transpose(0, 1) if self.attention_over == "batch" else x
        with sdpa_attention():
            for block in self.blocks:
                x = block(x)
        x = x.transpose(0, 1) if self.attention_over == "batch" else x
        if self.cue_placement == "after":
            x = x + cue
        return x, full_precision(self.head, x)


def full_precision(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) in float32 even under autocast: the stage heads and J make the outputs (uvd, where one bf16 step
    of u near 1 is about a pixel at FreiHAND's framing), so they never run in half precision. Without
    autocast, fn(x) itself."""
    if not torch.is_autocast_enabled(x.device.type):
        return fn(x)
    with torch.autocast(x.device.type, enabled=False):
        return fn(x.float())


def _redecide_joints_only(module: "CoarseToFineRegressor", incompatible_keys) -> None:
    module._joints_only = module._is_joints_only()


class CoarseToFineRegressor(nn.Module):
    """forward(tokens (B,21,token_dim), feats [F3, F2, F1], joints_uv (B,21,2) in [0,1]) ->
    {"verts": (B,N,3), "joints": (B,21,3) = J @ verts, "stages": [(B,n_l,3) per level]} in uvd.

    template: MeshTemplate or its to_dict(); stored as buffers so checkpoints carry it. With a
    joints_only_template every stage runs on the 21 joints and J is the identity.
    widths: stage input width, then one per level (len = number of template levels + 1).
    detach_uv: sample cues at detached 2D joints; the joints get their own loss (L_P), and gradients
    through bilinear sampling positions are local and noisy.
    cue_maps, cue_padding, cue_placement, block (+ mlp_ratio), head, attention_over: the named
    choices at the top of this module; with cue_maps="per_stage", cue_channels and feats give one
    map per stage (the released network: F4, F3, F2, F1) and the joints' u, v are not appended.
    """

    def __init__(self, template: MeshTemplate | dict, token_dim: int = 512,
                 widths: Sequence[int] = (512, 256, 128, 64, 32),
                 cue_channels: Sequence[int] = (1024, 512, 256), blocks_per_stage: int | Sequence[int] = 2,
                 heads: int = 4, dropout: float = 0.0, detach_uv: bool = True,
                 cue_maps: str = "pyramid", cue_padding: str = "border", cue_placement: str = "before",
                 block: str = "torch", mlp_ratio: int = 4, head: str = "norm_linear",
                 attention_over: str = "nodes"):
        super().__init__()
        self.cue_maps = _choice("cue_maps", cue_maps, CUE_MAPS)
        self.cue_padding = _choice("cue_padding", cue_padding, CUE_PADDINGS)
        stage_kw = {"cue_placement": _choice("cue_placement", cue_placement, CUE_PLACEMENTS),
                    "block": _choice("block", block, BLOCKS), "mlp_ratio": int(mlp_ratio),
                    "head": _choice("stage_head", head, HEADS),
                    "attention_over": _choice("attention_over", attention_over, ATTENTION_OVER)}
        if not isinstance(template, MeshTemplate):
            template = MeshTemplate.from_dict(template)
        widths = [int(w) for w in widths]
        n_levels = len(template.levels)
        if len(widths) != n_levels + 1:
            raise ConfigError(f"model.widths={list(widths)}: need {n_levels + 1} entries (the input width, then one per "
                             f"template level; the template has levels {template.level_sizes})")
        for w in widths[1:]:
            if w <= 3 or w % heads:
                raise ConfigError(f"model.widths={list(widths)}: every stage width must be > 3 (3 channels hold the "
                                 f"template positions) and divisible by heads={heads}; {w} is not")
        blocks = _blocks_per_stage(blocks_per_stage, n_levels)
        if not cue_channels:
            raise ValueError("cue_channels: give the channels of F3, F2, F1 (e.g. (1024, 512, 256) for resnet50)")
        self.cue_channels = [int(c) for c in cue_channels]
        self.detach_uv = detach_uv

        self.register_buffer("J", torch.as_tensor(template.J, dtype=torch.float32))
        self.register_buffer("template_verts", torch.as_tensor(template.verts, dtype=torch.float32))
        self.register_buffer("template_joints", torch.as_tensor(template.joints, dtype=torch.float32))
        for l, idx in enumerate(template.levels):
            self.register_buffer(f"level_idx_{l}", torch.as_tensor(idx, dtype=torch.long))
            self.register_buffer(f"level_pos_{l}", torch.as_tensor(template.verts[idx], dtype=torch.float32))

        if cue_maps == "per_stage" and len(self.cue_channels) != n_levels:
            raise ValueError(f"cue_maps=per_stage: cue_channels={self.cue_channels} must give one map per "
                             f"stage ({n_levels} template levels)")
        self.input_proj = nn.Identity() if token_dim == widths[0] else nn.Linear(token_dim, widths[0])
        cue_dim = sum(self.cue_channels) + 2
        stages, prev = [], template.joints
        for l, idx in enumerate(template.levels):
            pos = template.verts[idx]
            stages.append(_Stage(n_in=len(prev), n_out=len(idx), w_in=widths[l], w_out=widths[l + 1],
                                 cue_dim=cue_dim if cue_maps == "pyramid" else self.cue_channels[l],
                                 blocks=blocks[l], heads=heads, dropout=dropout,
                                 up_init=_nearest_one_hot(pos, prev),
                                 spread_init=_nearest_one_hot(pos, template.joints), **stage_kw))
            prev = pos
        self.stages = nn.ModuleList(stages)
        # Decided here (and again when weights are loaded), not per forward: torch.equal is a host sync.
        self._joints_only = self._is_joints_only()
        self.register_load_state_dict_post_hook(_redecide_joints_only)

    @property
    def num_levels(self) -> int:
        return len(self.stages)

    @property
    def num_verts(self) -> int:
        return int(self.J.shape[1])

    @property
    def joints_only(self) -> bool:
        """True for a joints_only_template: 21 nodes at every level and J the identity."""
        return self._joints_only

    def _is_joints_only(self) -> bool:
        return self.num_verts == NUM_JOINTS and bool(torch.equal(self.J, torch.eye(NUM_JOINTS, device=self.J.device)))

    def level_index(self, level: int) -> torch.Tensor:
        return getattr(self, f"level_idx_{level}")

    def stage_targets(self, verts: torch.Tensor) -> list[torch.Tensor]:
        """Ground truth for each entry of "stages": verts (B, N, 3) gathered at each level's nodes
        (in joints-only mode pass the joints)."""
        return [verts[:, self.level_index(l)] for l in range(self.num_levels)]

    def _check(self, tokens, feats, joints_uv) -> None:
        if tokens.dim() != 3 or tokens.shape[1] != NUM_JOINTS:
            raise ValueError(f"tokens: expected (B, {NUM_JOINTS}, token_dim), got {tuple(tokens.shape)}")
        if joints_uv.shape != (tokens.shape[0], NUM_JOINTS, 2):
            raise ValueError(f"joints_uv: expected ({tokens.shape[0]}, {NUM_JOINTS}, 2), got {tuple(joints_uv.shape)}")
        got = [int(f.shape[1]) for f in feats]
        if got != self.cue_channels:
            raise ValueError(f"feats: expected {len(self.cue_channels)} maps ({self.cue_maps} cues) with channels "
                             f"{self.cue_channels}, got channels {got}; set cue_channels to match the backbone")

    def forward(self, tokens: torch.Tensor, feats: Sequence[torch.Tensor], joints_uv: torch.Tensor) -> dict:
        self._check(tokens, feats, joints_uv)
        uv = joints_uv.detach() if self.detach_uv else joints_uv
        if self.cue_maps == "per_stage":
            per_stage = [sample_at_joints(f, uv, self.cue_padding).to(tokens.dtype) for f in feats]
        else:
            cues = torch.cat([sample_at_joints(f, uv, self.cue_padding).to(tokens.dtype) for f in feats]
                             + [uv.to(tokens.dtype)], -1)
            per_stage = [cues] * self.num_levels
        x = self.input_proj(tokens)
        outs = []
        for l, stage in enumerate(self.stages):
            x, out = stage(x, getattr(self, f"level_pos_{l}"), per_stage[l])
            outs.append(out)
        verts = outs[-1]
        return {"verts": verts, "joints": full_precision(lambda v: self.J.to(v.dtype) @ v, verts), "stages": outs}
