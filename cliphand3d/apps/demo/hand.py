"""One hand through the model: the square crop about its box, the network, and the placement in metres in the
image's camera frame (a left hand mirrored in and back out)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from omegaconf import DictConfig

from ...data.reframe import check_framing
from ...data.transforms import normalize_image
from ...errors import InputError
from ...geometry import crop_and_rotate, mirror_lr, project, root_and_bone_from_uvd, square_box, uv_to_pixels

# Shrink (INTER_AREA) before cropping when the box is over this many times the model's input side: the
# crop's bilinear resampling then reduces by at most this factor, as in training, without aliasing.
MAX_CROP_REDUCTION = 2.0


def crop_square(box, width: int, height: int, box_scale: float, where: str):
    """(centre (pixel-centre coordinates), side) of the square crop: about the box, or the whole image."""
    if box is None:
        return ((width - 1) / 2, (height - 1) / 2), float(max(width, height))
    x, y, w, h = box
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise InputError(f"{where}: box [x, y, w, h] = {list(box)} lies outside the {width}x{height} image")
    return (x + w / 2 - 0.5, y + h / 2 - 0.5), max(w, h) * float(box_scale)


def make_crop(image: np.ndarray, K: np.ndarray, center, size: float, img_size: int):
    """(crop uint8 S x S x 3, K of the crop, 3x3 map image pixel -> crop pixel). Parts of the box off the
    image are black, as training crops are padded."""
    P = np.eye(3)
    f = max(min(1.0, MAX_CROP_REDUCTION * img_size / size), 1.0 / min(image.shape[:2]))  # >= 1 px left
    if f < 1.0:
        # fx = fy = f (no dsize): OpenCV then maps edges to edges at exactly f, (p + 0.5) * f - 0.5, so the
        # crop and its K are those of the original box
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        P = np.array([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5], [0.0, 0.0, 1.0]])
        center, size = P[:2, :2] @ np.asarray(center, np.float64) + P[:2, 2], size * f
    crop, K_crop, _ = crop_and_rotate(image, P @ K, center, size, img_size)
    return crop, K_crop, K_crop @ np.linalg.inv(K)


@dataclass
class DemoModel:
    """The network and the assumptions that turn its uvd into metres."""

    model: torch.nn.Module
    device: torch.device
    hand_scale: float
    config: DictConfig | None = None  # the checkpoint's: where the mean-pose baseline's training data is
    # demo.yaml framing / two_pass_scale: two_pass crops each hand again about the joints the first crop gave
    # (cliphand3d/data/reframe.py; eval.py's option of the same name)
    framing: str = "single"
    two_pass_scale: float = 1.3

    def __post_init__(self):
        check_framing(self.framing, self.two_pass_scale, "demo.py")

    @property
    def img_size(self) -> int:
        return int(self.model.img_size)

    @torch.no_grad()
    def place(self, crop: np.ndarray, K_crop: np.ndarray) -> dict:
        """A right-hand crop -> joints (and vertices) in metres in the crop's camera frame, and the uvd."""
        m, S = self.model, self.img_size
        out = m(normalize_image(crop)[None].to(self.device))
        uvd = {k: None if out.get(k) is None else out[k].double().cpu() for k in ("joints", "verts")}
        K = torch.as_tensor(K_crop, dtype=torch.float64)[None]
        offset = getattr(m, "uv_pixel_offset", 0.5)
        root, bone, exact = root_and_bone_from_uvd(uvd["joints"], K, S, torch.tensor([self.hand_scale]).double(),
                                                   offset)
        xyz = m.outputs_to_xyz(uvd, K, root, bone, img_size=S)
        res = {"joints_xyz": xyz["joints_xyz"][0].numpy(), "uvd": uvd["joints"][0].numpy(),
               "root_depth": float(root[0]), "bone": float(bone[0]), "exact": bool(exact[0]), "uv_offset": offset}
        if "verts_xyz" in xyz:
            res["verts_xyz"] = xyz["verts_xyz"][0].numpy()
        return res


def predict_hand(dm: DemoModel, image: np.ndarray, K: np.ndarray, box, *, hand: str, box_scale: float,
                 where: str) -> dict:
    """One hand in one RGB image -> joints_2d (original pixels), joints_xyz / verts_xyz (metres, the image's
    camera frame), the crop shown to the model and the map from its pixels to the image's. dm.framing
    two_pass: all of it from a second crop, about the square box around the first crop's joints_2d times
    dm.two_pass_scale (the first's joints_2d kept as first_pass_joints_2d)."""
    res = _predict_once(dm, image, K, box, hand=hand, box_scale=box_scale, where=where)
    if dm.framing == "two_pass":
        cx, cy, side = square_box(res["joints_2d"], scale=1.0)
        second = [cx + 0.5 - side / 2, cy + 0.5 - side / 2, side, side]  # [x, y, w, h], as crop_square reads it
        first = res["joints_2d"]
        res = _predict_once(dm, image, K, second, hand=hand, box_scale=dm.two_pass_scale,
                            where=f"{where} (two_pass: the box around the first pass's joints)")
        res["first_pass_joints_2d"] = first
    return res


def _predict_once(dm: DemoModel, image: np.ndarray, K: np.ndarray, box, *, hand: str, box_scale: float,
                  where: str) -> dict:
    H, W = image.shape[:2]
    left = hand == "left"
    if left:  # the model knows right hands: mirror the image, its camera and the box in ...
        image, _, K_in = mirror_lr(image, np.zeros((1, 3)), K, W)
        if box is not None:
            box = (W - box[0] - box[2], box[1], box[2], box[3])
    else:
        K_in = K
    center, size = crop_square(box, W, H, box_scale, where)
    crop, K_crop, A = make_crop(image, K_in, center, size, dm.img_size)
    res = dm.place(crop, K_crop)
    crop_to_image = np.linalg.inv(A)  # pixels of the crop the model saw -> the image's
    image_to_crop = A  # the image's pixels -> the crop of the image as given (unmirrored)
    if left:  # ... and the prediction back out: x negated, u -> W - 1 - u
        for k in ("joints_xyz", "verts_xyz"):
            if k in res:
                res[k] = mirror_lr(None, res[k], K_in, W)[1]
        crop_to_image = flip_u(W) @ crop_to_image
        image_to_crop = flip_u(dm.img_size) @ A @ flip_u(W)
        center = (W - 1 - center[0], center[1])
    res.update(joints_2d=project(res["joints_xyz"], K), K=K, crop=crop, crop_to_image=crop_to_image,
               K_crop=image_to_crop @ K, crop_center=center, crop_size=size)
    return res


def flip_u(width: int) -> np.ndarray:
    """The pixel map of a horizontal flip, u -> width - 1 - u (pixel centres at integers, geometry.mirror_lr)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def crop_uv_to_image(uv_norm: np.ndarray, res: dict, img_size: int, offset: float = 0.5) -> np.ndarray:
    """Normalised crop uv (the model's output space, as the model saw the crop) -> original image pixels."""
    p = uv_to_pixels(np.asarray(uv_norm, np.float64), img_size, offset)
    q = np.concatenate([p, np.ones_like(p[..., :1])], -1) @ res["crop_to_image"].T
    return q[..., :2] / q[..., 2:]
