"""Joint regressor with 1D heatmaps per axis (DESIGN 1.4) and the pose-aware feature heads (1.5).

Every coordinate the regressor returns lies in [0, 1]: a 1D heatmap with n bins has its bin centres
at (i + 0.5) / n (docs/conventions.md), so u, v are directly the normalised crop coordinates and z
maps to the normalised depth d (bone units) through a fixed `depth_range` R: d = (z - 0.5) * 2R.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

AXES = ("x", "y", "z")
# Soft-argmax output convention: "unit" divides the expected bin position by the bin count (DESIGN
# 1.4); "bins" returns it in bins, as the authors' released code does (docs/released.md).
COORD_UNITS = ("unit", "bins")
# z head: "linear" (pooled F4 -> Linear); "bn_relu_mix", the released network's (Linear, BatchNorm1d,
# ReLU, then a 1x1 convolution that mixes the 21 joints' depth logits).
Z_HEADS = ("linear", "bn_relu_mix")


def bin_centres(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) centres (i + 0.5) / n of a 1D heatmap's bins in [0, 1], on `like`'s device and dtype."""
    return (torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) / n


def soft_argmax_1d(logits: torch.Tensor, units: str = "unit", offset: float = 0.5) -> torch.Tensor:
    """(..., n) logits -> (...,) expected bin position, bin i sitting at i + offset bins.

    units="unit" divides by n: with offset 0.5 that is the bin centre in [0, 1] (`bin_centres`);
    offset 0 is the released network's integer bin index.
    """
    n = logits.shape[-1]
    pos = torch.arange(n, device=logits.device, dtype=logits.dtype) + offset
    if units == "unit":
        pos = pos / n
    return (F.softmax(logits, dim=-1) * pos).sum(-1)


def depth_to_unit(d, depth_range: float):
    """Normalised depth d (bone units, root-relative) -> z in [0, 1] (inside +-depth_range)."""
    return d / (2.0 * depth_range) + 0.5


def unit_to_depth(z01, depth_range: float):
    """Inverse of `depth_to_unit`."""
    return (z01 - 0.5) * (2.0 * depth_range)


class JointRegressor(nn.Module):
    """F4 -> {"uvz": (B, J, 3) in [0, 1]^3, "logits": {"x": (B, J, W), "y": (B, J, H), "z": (B, J, D)}}.

    x/y: `num_deconv` stride-2 deconvolutions lift F4 (stride `in_stride`: 32, or 16 for a backbone
    cut after layer3) to stride in_stride / 2**num_deconv,
    the map is averaged over the other image axis and a 1x1 conv1d gives per-joint 1D logits.
    z: globally pooled F4 -> Linear -> per-joint depth logits over `depth_bins` (z_head, Z_HEADS).
    coord_units / bin_offset: the soft-argmax convention (COORD_UNITS, `soft_argmax_1d`); "uvz" is
    in that convention and "uvz_unit" always in [0, 1] units (the same tensor for "unit").
    """

    def __init__(self, in_channels: int, num_joints: int = 21, deconv_channels: int = 256,
                 num_deconv: int = 2, depth_bins: int = 64, z_head: str = "linear",
                 coord_units: str = "unit", bin_offset: float = 0.5, in_stride: int = 32):
        super().__init__()
        if z_head not in Z_HEADS:
            raise ConfigError(f"model.z_head={z_head!r} is unknown; choose from {list(Z_HEADS)}")
        if coord_units not in COORD_UNITS:
            raise ConfigError(f"model.coord_units={coord_units!r} is unknown; choose from {list(COORD_UNITS)}")
        self.in_channels, self.num_joints, self.depth_bins = in_channels, num_joints, depth_bins
        self.num_deconv, self.in_stride = num_deconv, int(in_stride)
        self.z_head, self.coord_units, self.bin_offset = z_head, coord_units, float(bin_offset)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(num_deconv):
            # kernel 4 / stride 2 / padding 1 doubles the size exactly.
            layers += [nn.ConvTranspose2d(c, deconv_channels, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(deconv_channels), nn.ReLU(inplace=True)]
            c = deconv_channels
        self.deconv = nn.Sequential(*layers)
        self.head_x = nn.Conv1d(c, num_joints, kernel_size=1)
        self.head_y = nn.Conv1d(c, num_joints, kernel_size=1)
        self.head_z = nn.Linear(in_channels, num_joints * depth_bins)
        if z_head == "bn_relu_mix":
            self.head_z_bn = nn.BatchNorm1d(num_joints * depth_bins)
            self.head_z_mix = nn.Conv1d(num_joints, num_joints, kernel_size=1)

    def bins(self, image_size: int) -> dict[str, int]:
        """Heatmap lengths per axis for a square `image_size` input (feeds PoseFeatureHeads)."""
        n = -(-image_size // self.in_stride) * 2 ** self.num_deconv  # ResNet F4 side is ceil(S / stride)
        return {"x": n, "y": n, "z": self.depth_bins}

    def forward(self, f4: torch.Tensor) -> dict:
        if f4.dim() != 4 or f4.shape[1] != self.in_channels:
            raise ValueError(f"JointRegressor expects F4 of shape (B, {self.in_channels}, H, W), got "
                             f"{tuple(f4.shape)}; set in_channels to the backbone's channels[4]")
        up = self.deconv(f4)
        logits = {
            "x": self.head_x(up.mean(dim=2)),
            "y": self.head_y(up.mean(dim=3)),
            "z": self._z_logits(f4),
        }
        uvz = torch.stack([soft_argmax_1d(logits[a], self.coord_units, self.bin_offset) for a in AXES], dim=-1)
        if self.coord_units == "unit":
            return {"uvz": uvz, "uvz_unit": uvz, "logits": logits}
        n = torch.tensor([logits[a].shape[-1] for a in AXES], device=uvz.device, dtype=uvz.dtype)
        return {"uvz": uvz, "uvz_unit": uvz / n, "logits": logits}

    def _z_logits(self, f4: torch.Tensor) -> torch.Tensor:
        z = self.head_z(f4.mean(dim=(2, 3)))
        if self.z_head == "bn_relu_mix":
            z = self.head_z_mix(F.relu(self.head_z_bn(z)).reshape(-1, self.num_joints, self.depth_bins))
        return z.reshape(-1, self.num_joints, self.depth_bins)


class PoseFeatureHeads(nn.Module):
    """Per axis: flattened (B, J, bins) heatmap logits -> Linear -> L2-normalised (B, embed_dim)."""

    def __init__(self, bins: Mapping[str, int], num_joints: int = 21, embed_dim: int = 512,
                 axes: Sequence[str] = AXES):
        super().__init__()
        self.axes = tuple(axes)
        missing = [a for a in self.axes if a not in bins]
        if missing:
            raise ValueError(f"PoseFeatureHeads: bins has no entry for axes {missing} (got "
                             f"{dict(bins)}); give bins={{x: S/8, y: S/8, z: depth_bins}}")
        self.bins = {a: int(bins[a]) for a in self.axes}
        self.num_joints = num_joints
        self.proj = nn.ModuleDict({a: nn.Linear(num_joints * self.bins[a], embed_dim) for a in self.axes})

    def forward(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for a in self.axes:
            x = logits[a]
            if x.shape[1:] != (self.num_joints, self.bins[a]):
                raise ValueError(
                    f"PoseFeatureHeads: {a} logits have shape {tuple(x.shape)}, expected "
                    f"(B, {self.num_joints}, {self.bins[a]}); bins[{a!r}] must match the regressor "
                    f"(JointRegressor.bins(image_size))")
            out[a] = F.normalize(self.proj[a](x.flatten(1)), dim=-1)
        return out
