"""Transformer blocks shared by the mesh regressor and the text adapters.

`ClipResidualBlock` is CLIP's residual attention block (pre-norm LayerNorm, multi-head attention,
an MLP of `mlp_ratio` x width with QuickGELU), the block of the authors' released network
(docs/released.md). Parameter names follow CLIP's (attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2), so the
released weights map onto it by renaming alone.
"""
from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's approximation of GELU (its weights were trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipResidualBlock(nn.Module):
    """(B, L, C) -> (B, L, C); attention runs over L (dim 1)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"ClipResidualBlock: heads={heads} must divide the width {width}")
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * mlp_ratio))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * mlp_ratio, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))
