"""The CLIP-Hand3D network, assembled by one plain constructor (DESIGN 1.3-1.8).

`model(images)` is the inference path: image -> joints (and vertices) in normalised uvd. It never
touches text; the pose-aware features that the contrastive loss aligns with text are computed only
when asked for (`pose_features=True`, training).

The keywords after `axes` are named choices of the module that owns each one (JointRegressor,
JointFeatures, CoarseToFineRegressor); their defaults are this project's design and
configs/model/released.yaml sets them to the authors' released network (docs/released.md).
joints_from: where J acts at evaluation, "uvd" (J @ uvd vertices, then back-projection) or "xyz"
(back-project the vertices, then J @ metric vertices, as the released evaluation does).
uv_pixel_offset: pixel = u * S - offset when back-projecting (0.5 ours, 0 released).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..geometry import uvd_to_xyz
from .backbone import ResNetBackbone
from .joint_features import JointFeatures
from .joint_regressor import JointRegressor, PoseFeatureHeads, unit_to_depth
from .regressor import CoarseToFineRegressor
from .template import MeshTemplate

JOINTS_FROM = ("uvd", "xyz")


class CLIPHand3D(nn.Module):
    def __init__(
        self, *, template: MeshTemplate | dict, img_size: int = 256,
        # image encoder and the 1D-heatmap joint regressor
        backbone: str = "resnet50", pretrained: str | None = None, backbone_stages: int = 4,
        input_norm: str = "symmetric", deconv_channels: int = 256, num_deconv: int = 2, depth_bins: int = 64, depth_range: float = 3.0,
        # per-joint features from the heat volume
        joint_feature_impl: str = "factorized", joint_feature_sigma: float = 2.5, joint_feature_hidden: int = 256,
        # the coarse-to-fine regressor
        token_dim: int = 512, widths: Sequence[int] = (512, 256, 128, 64, 32),
        blocks_per_stage: int | Sequence[int] = 2, heads: int = 4,
        # pose-aware features aligned with text
        embed_dim: int = 512, axes: Sequence[str] = ("x", "y", "z"),
        # named choices, set to the released network's by configs/model/released.yaml (docs/released.md)
        z_head: str = "linear", coord_units: str = "unit", bin_offset: float = 0.5, heat_grid: str = "centres",
        joint_feature_conv_bias: bool = False, joint_tokens: str = "pool", cue_maps: str = "pyramid",
        cue_padding: str = "border", cue_placement: str = "before", block: str = "torch", mlp_ratio: int = 4,
        stage_head: str = "norm_linear", attention_over: str = "nodes", joints_from: str = "uvd",
        uv_pixel_offset: float = 0.5,
        channels_last: bool = False,  # a speed option (NHWC), not a design choice
    ):
        super().__init__()
        if joints_from not in JOINTS_FROM:
            raise ConfigError(f"model.joints_from={joints_from!r} is unknown; choose from {list(JOINTS_FROM)}")
        self.joints_from, self.uv_pixel_offset = joints_from, float(uv_pixel_offset)
        self.img_size = int(img_size)
        self.depth_range = float(depth_range)
        self.axes = tuple(axes)
        # built in this order, which fixes how the seeded initialisation is shared out among the parts
        self._build_joint_path(backbone=backbone, pretrained=pretrained, backbone_stages=backbone_stages,
                               input_norm=input_norm, deconv_channels=deconv_channels, num_deconv=num_deconv, depth_bins=depth_bins,
                               z_head=z_head, coord_units=coord_units, bin_offset=bin_offset, embed_dim=embed_dim)
        self.joint_features = JointFeatures(in_channels=self.backbone.channels[0], depth_bins=depth_bins,
                                            sigma=joint_feature_sigma, hidden=joint_feature_hidden,
                                            out_dim=token_dim, impl=joint_feature_impl, heat_grid=heat_grid,
                                            conv_bias=joint_feature_conv_bias, tokens=joint_tokens,
                                            map_size=-(-self.img_size // 4))  # F0 side: stride 4, rounded up
        self._build_mesh_path(template=template, token_dim=token_dim, widths=widths,
                              blocks_per_stage=blocks_per_stage, heads=heads, cue_maps=cue_maps,
                              cue_padding=cue_padding, cue_placement=cue_placement, block=block,
                              mlp_ratio=mlp_ratio, stage_head=stage_head, attention_over=attention_over)
        # A speed option, not a design choice: the same function (to float rounding). oneDNN's
        # convolutions, batch norms and max-pool run faster in NHWC on CPU, and on CUDA with AMP.
        self.channels_last = bool(channels_last)
        if self.channels_last:
            for part in (self.backbone, self.joint_regressor, self.joint_features):
                part.to(memory_format=torch.channels_last)

    def _build_joint_path(self, *, backbone, pretrained, backbone_stages, input_norm, deconv_channels, num_deconv,
                          depth_bins, z_head, coord_units, bin_offset, embed_dim) -> None:
        """The image encoder, the 1D-heatmap joint regressor on its F4, and the per-axis pose heads."""
        self.backbone = ResNetBackbone(name=backbone, pretrained=pretrained, stages=backbone_stages,
                                       input_norm=input_norm)
        self.joint_regressor = JointRegressor(in_channels=self.backbone.channels[4], deconv_channels=deconv_channels,
                                              num_deconv=num_deconv, depth_bins=depth_bins, z_head=z_head,
                                              coord_units=coord_units, bin_offset=bin_offset,
                                              in_stride=self.backbone.strides[4])
        bins = self.joint_regressor.bins(self.img_size)
        self.pose_heads = PoseFeatureHeads(bins={a: bins[a] for a in self.axes}, embed_dim=embed_dim,
                                           axes=self.axes)

    def _build_mesh_path(self, *, template, token_dim, widths, blocks_per_stage, heads, cue_maps, cue_padding,
                         cue_placement, block, mlp_ratio, stage_head, attention_over) -> None:
        """The coarse-to-fine regressor and which backbone maps give it image cues."""
        ch = self.backbone.channels
        self.per_stage_cues = cue_maps == "per_stage"
        cue_channels = (ch[4], ch[3], ch[2], ch[1]) if self.per_stage_cues else (ch[3], ch[2], ch[1])
        self.regressor = CoarseToFineRegressor(template=template, token_dim=token_dim, widths=tuple(widths),
                                               cue_channels=cue_channels,
                                               blocks_per_stage=blocks_per_stage, heads=heads,
                                               cue_maps=cue_maps, cue_padding=cue_padding,
                                               cue_placement=cue_placement, block=block, mlp_ratio=mlp_ratio,
                                               head=stage_head, attention_over=attention_over)

    def forward(self, images: torch.Tensor, pose_features: bool = False) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIPHand3D expects images of shape (B, 3, S, S), got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        f0, f1, f2, f3, f4 = self.backbone(images)
        jr = self.joint_regressor(f4)
        uvz, unit = jr["uvz"], jr["uvz_unit"]
        coarse = torch.cat([unit[..., :2], unit_to_depth(unit[..., 2:], self.depth_range)], -1)
        # The heat volume carries no gradient (DESIGN 1.7); the regressor learns from its own losses.
        # Volume and cues read the soft-argmax in its configured units (model.coord_units).
        tokens = self.joint_features(uvz.detach(), f0)
        feats = [f4, f3, f2, f1] if self.per_stage_cues else [f3, f2, f1]
        mesh = self.regressor(tokens, feats, uvz[..., :2].detach())
        verts = None if self.regressor.joints_only else mesh["verts"]
        out = {"joints_coarse": coarse, "joints": mesh["joints"], "verts": verts,
               "stages": mesh["stages"][:-1], "logits": jr["logits"],
               # which nodes each intermediate stage predicts, for its deep-supervision target
               "stage_index": [self.regressor.level_index(l) for l in range(self.regressor.num_levels - 1)]}
        if pose_features:
            out["pose_feats"] = self.pose_heads(jr["logits"])
        return out

    @property
    def mixes_batch(self) -> bool:
        """Do outputs depend on their batch-mates (attention_over=batch, the released network's bug)?"""
        return any(getattr(s, "attention_over", "nodes") == "batch" for s in self.regressor.stages)

    def parameter_terms(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefix -> the loss terms (cliphand3d.losses) whose gradient reaches it; the
        longest prefix that matches a parameter's name applies. Training freezes what only zero-weighted
        terms reach (TrainingModule), so DDP never waits for a gradient that cannot come.

        Read off `forward`: the heatmap joints reach the mesh regressor only detached, so F4 (layer4) and
        the joint regressor learn from the heatmap terms and the pose heads alone; deconv feeds x and y
        only; an intermediate stage's head serves only deep supervision, the last stage only the final
        joints and vertices (the latter exist only with a mesh template).
        """
        heat = ("joints_coarse", "heatmap")
        clip = {a: (f"clip_{a}",) if a in self.axes else () for a in ("x", "y", "z")}
        # the mesh regularisers (edge, normal) read the final vertices only
        final = ("joints",) if self.regressor.joints_only else ("joints", "verts", "edge", "normal")
        inter = ("stages",) if self.regressor.num_levels > 1 else ()
        last = self.regressor.num_levels - 1
        all_clip = clip["x"] + clip["y"] + clip["z"]
        # per-stage cues (the released network) sample F4 too, so the mesh terms reach layer4
        f4_mesh = final + inter if self.per_stage_cues else ()
        return {
            "backbone": heat + all_clip + final + inter,
            "backbone.layer4": heat + all_clip + f4_mesh,
            "joint_regressor.deconv": heat + clip["x"] + clip["y"],
            **{f"joint_regressor.head_{a}": heat + clip[a] for a in ("x", "y", "z")},
            # the released z head's BatchNorm and joint mixing (z_head=bn_relu_mix)
            **{f"joint_regressor.head_z_{m}": heat + clip["z"] for m in ("bn", "mix")},
            **{f"pose_heads.proj.{a}": (f"clip_{a}",) for a in self.axes},
            "joint_features": final + inter,
            "regressor": final + inter,
            f"regressor.stages.{last}": final,
            **{f"regressor.stages.{l}.head": inter for l in range(last)},
        }

    @torch.no_grad()
    def predict_xyz(self, images: torch.Tensor, K: torch.Tensor, root_depth: torch.Tensor,
                    bone: torch.Tensor) -> dict:
        """Camera-frame joints (and vertices) in metres, with the ground-truth root depth and bone
        (the demo's evaluation protocol, DESIGN 1.10)."""
        return self.outputs_to_xyz(self.forward(images), K, root_depth, bone)

    def outputs_to_xyz(self, out: dict, K: torch.Tensor, root_depth: torch.Tensor, bone: torch.Tensor,
                       img_size: int | None = None) -> dict:
        """forward()'s uvd outputs -> {"joints_xyz" (B, 21, 3) MPII order, "verts_xyz" (B, N, 3) when
        there is a mesh}, camera frame, metres; J acts where `joints_from` says."""
        S = self.img_size if img_size is None else int(img_size)
        res = {}
        if out["verts"] is not None:
            res["verts_xyz"] = uvd_to_xyz(out["verts"], K, S, root_depth, bone, self.uv_pixel_offset)
        if self.joints_from == "xyz" and out["verts"] is not None:
            res["joints_xyz"] = self.regressor.J.to(res["verts_xyz"].dtype) @ res["verts_xyz"]
        else:
            res["joints_xyz"] = uvd_to_xyz(out["joints"], K, S, root_depth, bone, self.uv_pixel_offset)
        return res
