"""Per-joint tokens F_J from the predicted joints and the stem features F0 (DESIGN 1.7).

A Gaussian heat volume (B, J, D, H, W) is built on the F0 grid from the joints P (uvz in [0, 1]^3,
voxel centres at (i + 0.5) / n, no gradient), reshaped to J*D channels, concatenated after F0 and
passed through two conv3x3+BN+ReLU. With J*D = 1344 channels at 64x64 the first convolution is the
whole cost, and the volume is a product of three 1D Gaussians, so `impl="factorized"` computes that
convolution exactly without building it: the conv weights are contracted with the depth Gaussian,
then the 3x3 taps with shifted copies of the y and x Gaussians (zero padding becomes zeros at the
ends of the 1D Gaussians). `impl="naive"` builds the volume and is the reference. Both use the same
parameters, so one checkpoint serves either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

IMPLS = ("factorized", "naive")
# Where a joint at c lands on the n cells: "centres" at c * n - 0.5 (cell i's centre is (i + 0.5) / n,
# the project's convention); "integer" at c * n, the released network's grid (docs/released.md).
HEAT_GRIDS = {"centres": 0.5, "integer": 0.0}
# Per-joint tokens: "pool" = each joint's Gaussian-weighted mean of the `hidden` maps, then Linear
# (hidden -> out_dim); "flatten" = the released network's one map per joint (hidden = num_joints),
# flattened and Linear(H*W -> out_dim).
TOKENS = ("pool", "flatten")


def gaussian_1d(centres: torch.Tensor, n: int, sigma: float, offset: float = 0.5) -> torch.Tensor:
    """(...,) positions in [0, 1] -> (..., n) unnormalised Gaussians (peak 1) over n cells.

    Cell i has its centre at (i + offset) / n (HEAT_GRIDS); sigma is in cells.
    """
    idx = torch.arange(n, device=centres.device, dtype=centres.dtype)
    return torch.exp(-(idx - (centres[..., None] * n - offset)) ** 2 / (2.0 * sigma ** 2))


def heat_volume(uvz: torch.Tensor, depth_bins: int, height: int, width: int,
                sigma: float) -> torch.Tensor:
    """(B, J, 3) joints in [0, 1]^3 -> (B, J, D, H, W) product of the three 1D Gaussians."""
    gx = gaussian_1d(uvz[..., 0], width, sigma)
    gy = gaussian_1d(uvz[..., 1], height, sigma)
    gz = gaussian_1d(uvz[..., 2], depth_bins, sigma)
    return gz[..., :, None, None] * gy[..., None, :, None] * gx[..., None, None, :]


def separable_volume_conv(weight: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor,
                          gz: torch.Tensor) -> torch.Tensor:
    """conv2d(heat volume as J*D channels, weight, stride 1, 'same' zero padding), never built.

    weight (O, J*D, k, k) with k odd; gx (B, J, W), gy (B, J, H), gz (B, J, D) -> (B, O, H, W).
    """
    out_ch, _, k, _ = weight.shape
    b, j, d = gz.shape
    h, w, p = gy.shape[-1], gx.shape[-1], k // 2
    # a[n, o, j, s, t] = sum_d weight[o, j*D + d, s, t] * gz[n, j, d]
    a = torch.einsum("ojdst,njd->nojst", weight.view(out_ch, j, d, k, k), gz)
    # shifted[n, j, s, y] = padded g[n, j, y + s]: the value tap s reads at output row y.
    sx = F.pad(gx, (p, p)).unfold(-1, w, 1)
    sy = F.pad(gy, (p, p)).unfold(-1, h, 1)
    ax = torch.einsum("nojst,njtx->nojsx", a, sx)
    return torch.einsum("nojsx,njsy->noyx", ax, sy)


class JointFeatures(nn.Module):
    """(uvz (B, J, 3) in [0, 1]^3, F0 (B, C, H, W)) -> per-joint tokens F_J (B, J, out_dim).

    heat_grid (HEAT_GRIDS), conv_bias, tokens (TOKENS) and map_size (F0's side, for
    tokens="flatten") select the released network's variants; the defaults are the project's.
    """

    def __init__(self, in_channels: int, num_joints: int = 21, depth_bins: int = 64,
                 sigma: float = 2.5, hidden: int = 256, out_dim: int = 512,
                 impl: str = "factorized", heat_grid: str = "centres", conv_bias: bool = False,
                 tokens: str = "pool", map_size: int | None = None):
        super().__init__()
        if impl not in IMPLS:
            raise ConfigError(f"model.joint_feature_impl={impl!r} is unknown; choose from {list(IMPLS)}")
        if heat_grid not in HEAT_GRIDS:
            raise ConfigError(f"model.heat_grid={heat_grid!r} is unknown; choose from {list(HEAT_GRIDS)}")
        if tokens not in TOKENS:
            raise ConfigError(f"model.joint_tokens={tokens!r} is unknown; choose from {list(TOKENS)}")
        if tokens == "flatten" and (hidden != num_joints or not map_size):
            raise ConfigError(f"model.joint_tokens=flatten keeps one map per joint: it needs "
                             f"model.joint_feature_hidden={num_joints} (got {hidden}) and the F0 map size "
                             f"(got {map_size})")
        self.in_channels, self.num_joints, self.depth_bins = in_channels, num_joints, depth_bins
        self.sigma, self.impl = float(sigma), impl
        self.grid_offset, self.tokens, self.map_size = HEAT_GRIDS[heat_grid], tokens, map_size
        # Input channels: F0 first, then the volume as channel j * D + d.
        self.conv1 = nn.Conv2d(in_channels + num_joints * depth_bins, hidden, 3, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.proj = nn.Linear(hidden if tokens == "pool" else map_size * map_size, out_dim)

    def forward(self, uvz: torch.Tensor, f0: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        impl = impl or self.impl
        if impl not in IMPLS:
            raise ValueError(f"JointFeatures impl={impl!r}; choose one of {IMPLS}")
        self._check(uvz, f0)
        # The volume is a fixed input (no gradient into P). Its Gaussians are built in fp32 and only the
        # result is cast: in bf16 the centres would sit on a 0.25-0.5 cell grid.
        uvz = uvz.detach().float()
        h, w = f0.shape[-2:]
        gx, gy, gz = (gaussian_1d(uvz[..., k], n, self.sigma, self.grid_offset).to(f0.dtype)
                      for k, n in enumerate((w, h, self.depth_bins)))
        c = self.in_channels
        if impl == "naive":
            vol = gz[..., :, None, None] * gy[..., None, :, None] * gx[..., None, None, :]
            x = self.conv1(torch.cat([f0, vol.flatten(1, 2)], dim=1))
        else:
            x = (F.conv2d(f0, self.conv1.weight[:, :c], self.conv1.bias, padding=1)
                 + separable_volume_conv(self.conv1.weight[:, c:], gx, gy, gz))
        x = F.relu(self.bn1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        if self.tokens == "flatten":
            if (h, w) != (self.map_size, self.map_size):
                raise ValueError(f"JointFeatures: joint_tokens=flatten was built for {self.map_size}^2 F0 maps, "
                                 f"got {h}x{w}; the crop size (data.img_size) must match the model's")
            return self.proj(x.flatten(2))
        return self.proj(self._pool(x, uvz))

    def _pool(self, feat: torch.Tensor, uvz: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, J, C): each joint's Gaussian-weighted mean of the map.

        The joint's own 2D Gaussian says where its evidence is, and it is exact and cheap (no
        sampling or rounding, the same separable weights as the volume). Weights sum to one so the
        token's scale does not depend on sigma or the grid size; centres are clamped into the crop
        so a joint outside it reads the nearest border instead of all-zero weights.
        """
        h, w = feat.shape[-2:]
        inside = uvz[..., :2].clamp(0.0, 1.0)
        wx = gaussian_1d(inside[..., 0], w, self.sigma)
        wy = gaussian_1d(inside[..., 1], h, self.sigma)
        wx = (wx / wx.sum(-1, keepdim=True)).to(feat.dtype)
        wy = (wy / wy.sum(-1, keepdim=True)).to(feat.dtype)
        return torch.einsum("njy,njx,ncyx->njc", wy, wx, feat)

    def _check(self, uvz: torch.Tensor, f0: torch.Tensor) -> None:
        if uvz.dim() != 3 or uvz.shape[1:] != (self.num_joints, 3):
            raise ValueError(f"JointFeatures: uvz must be (B, {self.num_joints}, 3), got "
                             f"{tuple(uvz.shape)}")
        if f0.dim() != 4 or f0.shape[1] != self.in_channels:
            raise ValueError(f"JointFeatures: F0 must be (B, {self.in_channels}, H, W), got "
                             f"{tuple(f0.shape)}; set in_channels to the backbone's channels[0]")
        if uvz.shape[0] != f0.shape[0]:
            raise ValueError(f"JointFeatures: batch sizes differ (uvz {uvz.shape[0]}, "
                             f"F0 {f0.shape[0]})")
