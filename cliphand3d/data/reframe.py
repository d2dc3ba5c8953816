"""Two-pass framing: every item cropped a second time about the 2D joints a first prediction found on it.

A test crop that needs no labels (FreiHAND's whole image or centre box) frames each hand a little
differently from the training crops. The second pass crops the square box around the first pass's
predicted joints, times `scale` (1.3: the training crops' mask / joints box scale), the way a detector's box
would be used. Only the box changes: the same raw sample, item rng and crop pipeline build the second
item (`HandDataset.reframed_item`), so its labels are in its own crop's camera and scoring is unchanged.
eval.py (framing=two_pass) and the demo use it.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..geometry import crop_affine, square_box, uv_to_pixels
from .transforms import CropAugment

FRAMINGS = ("single", "two_pass")  # single: one crop, as the data config frames it (every figure before)


def check_framing(framing: str, scale: float, where: str = "eval.py") -> str:
    """`framing=` / `two_pass_scale=` of eval.py or the demo: a known name and a positive scale."""
    if framing not in FRAMINGS:
        raise ConfigError(f"framing={framing!r} is not one of {FRAMINGS} ({where} framing=...)")
    if not float(scale) > 0:
        raise ConfigError(f"two_pass_scale={scale} must be > 0: the second crop's side over the predicted joints' "
                          f"box side (1.3 as in training; {where} two_pass_scale=...)")
    return framing


def box_around(uv: np.ndarray, frame, img_size: int, pixel_offset: float = 0.5) -> tuple[float, float, float]:
    """The tight square box (cx, cy, side), in the image's pixels, around joints predicted at normalised crop
    uv (N, >=2) on the crop `frame` = (centre, side, rotation) of an img_size crop (`transforms.crop_frame`).
    pixel_offset: the model's uv convention (`geometry.uv_to_pixels`)."""
    center, side, rot = frame
    A = crop_affine(center, side, img_size, rot)
    crop_px = uv_to_pixels(np.asarray(uv, np.float64)[..., :2], img_size, pixel_offset)
    image_px = (crop_px - A[:2, 2]) @ np.linalg.inv(A[:2, :2]).T
    return square_box(image_px, scale=1.0)


class Reframed(Dataset):
    """`dataset`'s items cropped about the box around `uv[i]` (the first pass's predicted normalised crop uv of
    item i, in dataset order) times `scale`, without jitter. Labels, prompts and metadata are the dataset's;
    `label_targets` gives the float64 labels of the new crops (evaluation.predict.exact_labels)."""

    def __init__(self, dataset, uv: np.ndarray, *, scale: float, pixel_offset: float = 0.5):
        uv = np.asarray(uv, np.float64)
        if len(uv) != len(dataset):
            raise ValueError(f"Reframed: {len(uv)} predictions for {len(dataset)} items; the first pass must "
                             "cover the dataset in order")
        self.dataset, self.uv, self.pixel_offset = dataset, uv, float(pixel_offset)
        self.augment = CropAugment(train=False, scale=float(scale))
        self.img_size = dataset.img_size
        self.protocol = getattr(dataset, "protocol", "freihand")
        self.has_labels = getattr(dataset, "has_labels", True)
        self.has_verts = getattr(dataset, "has_verts", False)

    def __len__(self) -> int:
        return len(self.dataset)

    def _reframe(self, index: int):
        return lambda frame: box_around(self.uv[index], frame, self.img_size, self.pixel_offset)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return self.dataset.reframed_item(index, self._reframe(index), self.augment)

    def label_targets(self, index: int) -> dict:
        index = int(index)
        return self.dataset.reframed_label_targets(index, self._reframe(index), self.augment)
