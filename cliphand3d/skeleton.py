"""The one home of joint names, joint orders, bones and order conversions.

Inside the code every hand is a right hand in the FreiHAND/MPII order:
0 wrist; thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20; each finger base -> tip.
"""
from __future__ import annotations

import numpy as np

NUM_JOINTS = 21
ROOT = 0
# Bone used to normalise depth (DESIGN 1.10): wrist -> middle MCP.
REF_BONE = (0, 9)
# FreiHAND's metric scale (training/evaluation_scale.json, DESIGN 2): |xyz[9] - xyz[10]|, middle MCP -> PIP.
SCALE_BONE = (9, 10)

FINGERS = ("thumb", "index", "middle", "ring", "little")
JOINT_KINDS = ("MCP", "PIP", "DIP", "fingertip")

# Demo-repo naming, used by the default prompts.
JOINT_NAMES: tuple[str, ...] = ("wrist",) + tuple(f"{f} {k}" for f in FINGERS for k in JOINT_KINDS)

# Anatomical thumb naming (CMC, MCP, IP, tip) as an alternative naming scheme for prompts.
ANATOMICAL_JOINT_NAMES: tuple[str, ...] = (
    ("wrist", "thumb CMC", "thumb MCP", "thumb IP", "thumb tip")
    + tuple(f"{f} {k}" for f in FINGERS[1:] for k in ("MCP", "PIP", "DIP", "tip"))
)

FINGER_CHAINS: dict[str, tuple[int, ...]] = {
    f: tuple(1 + 4 * i + k for k in range(4)) for i, f in enumerate(FINGERS)
}

PARENTS: tuple[int, ...] = (-1,) + tuple(0 if k == 0 else 1 + 4 * i + k - 1 for i in range(5) for k in range(4))

BONES: tuple[tuple[int, int], ...] = tuple((p, c) for c, p in enumerate(PARENTS) if p >= 0)

# RHD stores each finger tip -> base. Reversing each finger's 4 entries reaches MPII order;
# the permutation is its own inverse.
RHD_TO_MPII: tuple[int, ...] = (0,) + tuple(1 + 4 * i + (3 - k) for i in range(5) for k in range(4))
MPII_TO_RHD: tuple[int, ...] = RHD_TO_MPII

# hand3d's RHD evaluation bone (its `keypoint_scale`, data/BinaryDbReader.py: RHD keypoints 12 -> 11),
# middle MCP -> PIP in MPII order (DESIGN 3). Only the RHD protocol rescales with it; the model-space
# normalisation keeps REF_BONE.
RHD_EVAL_BONE: tuple[int, int] = (MPII_TO_RHD[12], MPII_TO_RHD[11])

RHD_NUM_KEYPOINTS = 42  # 0-20 left hand, 21-41 right hand

# MANO's joint order (the released CLIP-Hand3D network's J_Reg rows): 0 wrist; 1-3 index, 4-6 middle,
# 7-9 little, 10-12 ring, 13-15 thumb (each base -> DIP/IP); then the tips of index, middle, little,
# ring, thumb (16-20). MANO_TO_MPII[i] is the MANO index of MPII joint i: mpii = mano[MANO_TO_MPII].
MANO_TO_MPII: tuple[int, ...] = (0, 13, 14, 15, 20, 1, 2, 3, 16, 4, 5, 6, 17, 10, 11, 12, 19, 7, 8, 9, 18)


def rhd_to_mpii(joints):
    """(..., 21, C) in RHD per-hand order -> MPII order. Works on numpy arrays and torch tensors."""
    return joints[..., list(RHD_TO_MPII), :]


def mpii_to_rhd(joints):
    return joints[..., list(MPII_TO_RHD), :]


def bone_length(xyz):
    """Reference bone |joint0 - joint9| over the last two axes (..., 21, 3) -> (...)."""
    d = xyz[..., REF_BONE[0], :] - xyz[..., REF_BONE[1], :]
    if isinstance(d, np.ndarray):
        return np.linalg.norm(d, axis=-1)
    return d.norm(dim=-1)


def check_joints(joints, name: str = "joints") -> None:
    """Raise a clear error when an array is not (..., 21, C)."""
    shape = tuple(joints.shape)
    if len(shape) < 2 or shape[-2] != NUM_JOINTS:
        raise ValueError(f"{name}: expected shape (..., {NUM_JOINTS}, C), got {shape}")
