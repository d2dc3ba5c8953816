"""One hand before and after the crop pipeline: the raw sample a dataset loads, and the item contract
(docs/conventions.md) that `transforms.build_item` turns it into.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DatasetError
from ..skeleton import NUM_JOINTS


@dataclass
class RawSample:
    """One hand as stored on disk, before cropping: full image and camera-frame labels (right hand)."""

    image: np.ndarray | None  # uint8 (H, W, 3) RGB; None from `label_sample` (labels only)
    K: np.ndarray  # (3, 3)
    xyz: np.ndarray  # (21, 3) metres, MPII order, right hand
    box: tuple[float, float, float]  # tight square box (cx, cy, size) in pixels, before the crop scale
    file: str = ""
    verts: np.ndarray | None = None  # (N, 3) metres
    visible: np.ndarray | None = None  # (21,) bool
    extra: dict = field(default_factory=dict)


ITEM_KEYS = ("image", "joints_xyz", "joints_uvd", "K", "root_depth", "bone", "prompts", "meta")


def check_item(item: dict, img_size: int | None = None) -> None:
    """Assert an item keeps the contract of docs/conventions.md (used by tests and check_data.py)."""
    missing = [k for k in ITEM_KEYS if k not in item]
    if missing:
        raise DatasetError(f"item is missing keys {missing}")
    img = item["image"]
    if not (isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3):
        raise DatasetError(f"item['image'] must be uint8 3xSxS, got {getattr(img, 'dtype', type(img))} "
                           f"{tuple(getattr(img, 'shape', ()))}")
    if img_size is not None and tuple(img.shape[1:]) != (img_size, img_size):
        raise DatasetError(f"item['image'] is {tuple(img.shape[1:])}, expected {(img_size, img_size)}")
    for k in ("joints_xyz", "joints_uvd"):
        if tuple(item[k].shape) != (NUM_JOINTS, 3):
            raise DatasetError(f"item['{k}'] must be ({NUM_JOINTS}, 3), got {tuple(item[k].shape)}")
    if tuple(item["K"].shape) != (3, 3):
        raise DatasetError(f"item['K'] must be 3x3, got {tuple(item['K'].shape)}")
