"""Trainable per-axis heads on top of the frozen text encoder (DESIGN 1.2). Used only in training.

kind="mlp" (default): a residual MLP per axis, applied to each sample on its own.
kind="batch_attention": the demo repository's head, a pre-norm transformer applied to the (B, D)
batch as ONE sequence of length B, so each sample's text feature attends to the others in the batch
(its output depends on batch composition and, under DDP, sees only the local batch).
block="clip" builds that transformer from CLIP's residual blocks (QuickGELU), exactly the released
network's text encoders, so their weights import (docs/released.md); "torch" is nn.TransformerEncoderLayer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .blocks import ClipResidualBlock

KINDS = ("mlp", "batch_attention")
BLOCKS = ("torch", "clip")


class ResidualMLP(nn.Module):
    """x + MLP(LayerNorm(x)) with `layers` linear layers; the last starts at zero, so the head
    starts as the identity and training begins from the frozen CLIP feature itself."""

    def __init__(self, dim: int, hidden: int, layers: int):
        super().__init__()
        widths = [dim] + [hidden] * (layers - 1) + [dim]
        blocks: list[nn.Module] = [nn.LayerNorm(dim)]
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                blocks.append(nn.GELU())
            blocks.append(nn.Linear(w_in, w_out))
        self.mlp = nn.Sequential(*blocks)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class BatchAttention(nn.Module):
    """Transformer over the batch axis: (B, D) is treated as one sequence of B tokens."""

    def __init__(self, dim: int, hidden: int, layers: int, heads: int, block: str = "torch"):
        super().__init__()
        if block == "clip":
            if hidden % dim:
                raise ConfigError(f"text.adapters.block=clip: hidden={hidden} must be a multiple of {dim}")
            self.resblocks = nn.Sequential(*[ClipResidualBlock(dim, heads, hidden // dim) for _ in range(layers)])
            return
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=hidden, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "resblocks"):
            return self.resblocks(x.unsqueeze(0)).squeeze(0)
        return self.encoder(x.unsqueeze(0)).squeeze(0)


class AxisAdapters(nn.Module):
    """One trainable head per axis: {axis: (B, D)} -> {axis: (B, D) L2-normalised}.

    embed_dim: D, the text encoder's output width.
    axes: axis names (keys of the input and output dicts).
    kind: "mlp" or "batch_attention" (see the module docstring).
    hidden: MLP hidden width (default D) or the transformer's feed-forward width (default 4 D).
    layers: linear layers of the MLP, or transformer layers (the demo: 2).
    heads: attention heads of batch_attention (the demo: 16); must divide D.
    block: the batch_attention transformer's block (BLOCKS; "clip" = the released network's).
    """

    def __init__(
        self,
        embed_dim: int,
        axes: Sequence[str] = ("x", "y", "z"),
        kind: str = "mlp",
        hidden: int | None = None,
        layers: int = 2,
        heads: int = 16,
        block: str = "torch",
    ):
        super().__init__()
        axes = (axes,) if isinstance(axes, str) else tuple(str(a) for a in axes)
        if not axes or len(set(axes)) != len(axes):
            raise ConfigError(f"text adapter axes must be distinct axis names, got {list(axes)}")
        if kind not in KINDS:
            raise ConfigError(f"text.adapters.kind={kind!r} is unknown; use one of {list(KINDS)}")
        if block not in BLOCKS:
            raise ConfigError(f"text.adapters.block={block!r} is unknown; use one of {list(BLOCKS)}")
        if embed_dim < 1 or layers < 1:
            raise ConfigError(f"text.adapters needs embed_dim >= 1 and layers >= 1, got {embed_dim}, {layers}")
        if kind == "batch_attention" and embed_dim % heads != 0:
            raise ConfigError(
                f"text.adapters.kind=batch_attention: heads={heads} must divide embed_dim={embed_dim} (text.adapters.heads)"
            )
        self.axes = axes
        self.kind = kind
        self.embed_dim = int(embed_dim)
        if kind == "mlp":
            width = int(hidden or embed_dim)
            self.heads = nn.ModuleDict({a: ResidualMLP(embed_dim, width, layers) for a in axes})
        else:
            width = int(hidden or 4 * embed_dim)
            self.heads = nn.ModuleDict({a: BatchAttention(embed_dim, width, layers, heads, block) for a in axes})

    def forward(self, text_feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [a for a in self.axes if a not in text_feats]
        if missing:
            raise KeyError(f"AxisAdapters: no text features for axes {missing} (got {sorted(text_feats)})")
        out = {}
        for a in self.axes:
            x = text_feats[a]
            if x.ndim != 2 or x.shape[1] != self.embed_dim:
                raise ValueError(f"AxisAdapters: text_feats[{a!r}] must be (B, {self.embed_dim}), "
                                 f"got {tuple(x.shape)}")
            out[a] = F.normalize(self.heads[a](x), dim=-1)
        return out
