"""The crop pipeline shared by every dataset: box jitter, in-plane rotation, colour, normalisation.

Image and labels go through one affine map (`geometry.crop_affine`), so they cannot drift apart.
Defaults follow the demo repo's FreiHAND training (DESIGN 1): box scale 1.3, scale jitter +-0.2,
rotation up to +-90 deg with p=0.6, shift jitter, no flip, optional colour jitter and per-channel gains.
Every random draw comes from the item's generator (`HandDataset.rng_for`), so a crop is a function of
(seed, epoch, index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..geometry import crop_affine, crop_intrinsics, points_to_uvd, square_box, warp_crop, xyz_to_uvd
from ..runtime import to_device
from .sample import RawSample


@dataclass
class CropAugment:
    """How a raw sample becomes a crop. `train=False` gives the deterministic evaluation crop."""

    train: bool = True
    scale: float = 1.3  # crop side / tight hand box side
    scale_jitter: float = 0.2  # +- relative change of the side (train only)
    shift_jitter: float = 0.1  # +- fraction of the side the centre may move (train only)
    rot_max_deg: float = 90.0
    rot_prob: float = 0.6
    color_jitter: float = 0.0  # +- relative brightness / contrast / saturation change (train only)
    # each RGB channel multiplied by U(1 - n, 1 + n) (train only; SimpleHand's RandomChannelNoise); 0 = off.
    # Drawn after everything above, and only when on, so configs without it draw exactly what they drew before
    channel_noise: float = 0.0

    def sample(self, rng: np.random.Generator | None) -> dict:
        if not self.train or rng is None:
            return {"scale": self.scale, "shift": (0.0, 0.0), "rot": 0.0, "color": None, "channels": None}
        scale = self.scale * (1.0 + rng.uniform(-self.scale_jitter, self.scale_jitter))
        shift = tuple(rng.uniform(-self.shift_jitter, self.shift_jitter, size=2))
        rot = math.radians(rng.uniform(-self.rot_max_deg, self.rot_max_deg)) if rng.random() < self.rot_prob else 0.0
        color = tuple(1.0 + rng.uniform(-self.color_jitter, self.color_jitter, size=3)) if self.color_jitter > 0 else None
        channels = (tuple(1.0 + rng.uniform(-self.channel_noise, self.channel_noise, size=3))
                    if self.channel_noise > 0 else None)
        return {"scale": scale, "shift": shift, "rot": rot, "color": color, "channels": channels}


EVAL_CROP = CropAugment(train=False)

MEAN, STD = 0.5, 0.5  # (x/255 - 0.5) / 0.5, the demo repo's normalisation


def image_tensor(image_u8: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> uint8 3xHxW: an item's image. Crops travel as bytes (through a loader worker's
    shared memory, pinning and the host-to-device copy: 4x fewer than float32) and become the model's
    input on the device (`model_input`)."""
    return torch.from_numpy(np.ascontiguousarray(image_u8.transpose(2, 0, 1)))


def model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 3xHxW crops (or a batch of them), on any device -> what the model takes: float32 in [-1, 1],
    (x / 255 - 0.5) / 0.5. Floating-point images are taken as already normalised and returned as they are."""
    if images.is_floating_point():
        return images
    return (images.float() / 255.0 - MEAN) / STD


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch moved to `device`, its images made the model's input there (`model_input`): what
    the training loop, prediction and the benchmark feed the model."""
    batch = to_device(batch, device)
    batch["image"] = model_input(batch["image"])
    return batch


def normalize_image(image_u8: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 3xHxW in [-1, 1] (the model's input; the demo's crops)."""
    return model_input(image_tensor(image_u8))


def denormalize_image(image: torch.Tensor) -> np.ndarray:
    """An item's image (uint8 3xHxW) or the model's input (float 3xHxW in [-1, 1]) -> uint8 HxWx3 RGB for
    display."""
    if not image.is_floating_point():
        return image.detach().cpu().permute(1, 2, 0).numpy()
    a = ((image.detach().cpu().float() * STD + MEAN) * 255.0).clamp(0, 255).round().byte()
    return a.permute(1, 2, 0).numpy()


def color_matrix(channel_means, factors: tuple[float, float, float] | None,
                 channels: tuple[float, float, float] | None = None) -> np.ndarray:
    """The (3, 4) affine map [L | t] of RGB values that `jitter_color` applies to an image whose channel means
    are `channel_means`: per-channel gains g, then brightness b, contrast c about the image mean m, saturation
    s about each pixel's grey (the mean of its channels). Each step is affine in the pixel, so their
    composition is one map: L = c b (s diag(g) + (1 - s) / 3 * 1 g^T), t = (1 - c) m, m = b mean(g * means)."""
    g = (1.0, 1.0, 1.0) if channels is None else tuple(float(x) for x in channels)
    b, c, s = (1.0, 1.0, 1.0) if factors is None else (float(f) for f in factors)
    m = b * sum(gk * float(mk) for gk, mk in zip(g, channel_means)) / 3.0
    # plain floats: numpy's per-call overhead on 3 x 4 numbers would cost a quarter of the pass itself
    rows = [[c * b * ((1.0 - s) / 3.0 + (s if j == k else 0.0)) * g[j] for j in range(3)] + [(1.0 - c) * m]
            for k in range(3)]
    return np.array(rows)


def jitter_color(image: np.ndarray, factors: tuple[float, float, float] | None,
                 channels: tuple[float, float, float] | None = None) -> np.ndarray:
    """A uint8 RGB image with per-channel gains `channels` (R, G, B), then brightness, contrast and saturation
    `factors`; either may be None (not applied). One float32 pass of their composed map (`color_matrix`),
    rounded to the nearest level and clipped to [0, 255]: a 256 px crop takes 0.1 ms where the step-by-step
    float passes took 2 ms, most of a loader worker's time."""
    if factors is None and channels is None:
        return image
    # float32 in: OpenCV transforms uint8 with 10-bit fixed-point coefficients, up to 0.4 of a level off
    out = cv2.transform(image.astype(np.float32), color_matrix(cv2.mean(image)[:3], factors, channels))
    return cv2.addWeighted(out, 1.0, out, 0.0, 0.0, dtype=cv2.CV_8U)  # saturating, rounding float -> uint8


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float]:
    """Tight square box (cx, cy, size) around the non-zero pixels of a mask."""
    # The bounds alone decide the box: two corners instead of every pixel. OpenCV finds them ~3x faster
    # than numpy's row / column scans on a 320 px mask (every RHD and synthetic crop computes one).
    mask = np.asarray(mask)
    if mask.ndim == 2 and mask.dtype in (np.bool_, np.uint8):
        x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
        if w == 0:
            return square_box(np.zeros((0, 2)), scale=1.0)  # its error names the empty mask
        return square_box(np.array([[x, y], [x + w - 1, y + h - 1]]), scale=1.0)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return square_box(np.zeros((0, 2)), scale=1.0)
    return square_box(np.array([[cols[0], rows[0]], [cols[-1], rows[-1]]]), scale=1.0)


def crop_box(box: tuple[float, float, float], params: dict) -> tuple[tuple[float, float], float]:
    """The tight hand box and sampled augmentation -> (crop centre, crop side) in pixels."""
    cx, cy, side = box
    side = side * params["scale"]
    return (cx + params["shift"][0] * side, cy + params["shift"][1] * side), side


def crop_frame(box: tuple[float, float, float], augment: CropAugment | None,
               rng: np.random.Generator | None) -> tuple[tuple[float, float], float, float]:
    """(centre, side, rotation) of the crop `augment` draws from `rng` about `box`: the crop `sample_crops`
    makes from the same draw (two-pass framing maps predictions on it back to the image, data/reframe.py)."""
    p = (augment if augment is not None else EVAL_CROP).sample(rng)
    center, side = crop_box(box, p)
    return center, side, p["rot"]


def crop_labels(xyz: np.ndarray, K: np.ndarray, R: np.ndarray, img_size: int, verts: np.ndarray | None = None) -> dict:
    """Camera-frame labels in the crop's camera (K, R from `crop_intrinsics`): the label keys of an item, for
    one sample ((21, 3), (3, 3), ...) or a stack of them ((B, 21, 3), (B, 3, 3), ...). Every operation
    broadcasts over the leading axis, so a stack gives each sample's labels bit for bit."""
    Rt = np.swapaxes(R, -1, -2)
    xyz = xyz @ Rt
    uvd, root, bone = xyz_to_uvd(xyz, K, img_size)
    out = {"joints_xyz": xyz, "joints_uvd": uvd, "K": K, "root_depth": np.asarray(root), "bone": np.asarray(bone)}
    if verts is not None:
        out["verts_xyz"] = verts @ Rt
        out["verts_uvd"] = points_to_uvd(out["verts_xyz"], K, img_size, out["root_depth"], out["bone"])
    return out


def label_targets(raw: RawSample, *, img_size: int, augment: CropAugment | None = None,
                  rng: np.random.Generator | None = None) -> dict:
    """The labels `build_items` gives the same raw sample and rng, without an image (float64 numpy)."""
    p = (augment if augment is not None else EVAL_CROP).sample(rng)
    center, side = crop_box(raw.box, p)
    K, R = crop_intrinsics(raw.K, center, side, img_size, p["rot"])
    return crop_labels(raw.xyz, K, R, img_size, raw.verts)


LABEL_KEYS = ("joints_xyz", "joints_uvd", "K", "root_depth", "bone", "verts_xyz", "verts_uvd")


def label_tensors(labels: dict) -> dict:
    """Label keys (numpy, any leading shape) as float32 tensors, converted in one go and split as numpy views:
    a loader worker builds a crop every few hundred microseconds, and per-key conversions cost a tenth of it."""
    keys = [k for k in LABEL_KEYS if k in labels]
    arrays = [np.asarray(labels[k]) for k in keys]
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float32)
    out, start = {}, 0
    for k, a in zip(keys, arrays):
        out[k] = torch.from_numpy(flat[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def sample_crops(raws: list[RawSample], img_size: int, augment: CropAugment | None,
                 rngs: list) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(uint8 crops, their K (B, 3, 3), the rotations R (B, 3, 3) their labels take): each sample's augmentation
    drawn from its rng, the crops' maps computed at once (`geometry.crop_affine` batched, each as alone)."""
    aug = augment if augment is not None else EVAL_CROP
    params = [aug.sample(rng) for rng in rngs]
    frames = [crop_box(raw.box, p) for raw, p in zip(raws, params)]
    centres, sides = np.array([f[0] for f in frames]), np.array([f[1] for f in frames])
    rots = np.array([p["rot"] for p in params])
    maps = crop_affine(centres, sides, img_size, rots)
    K, R = crop_intrinsics(np.stack([raw.K for raw in raws]), centres, sides, img_size, rots)
    crops = []
    for raw, p, A in zip(raws, params, maps):
        crop = warp_crop(raw.image, A, img_size)
        if p["color"] is not None or p["channels"] is not None:
            crop = jitter_color(crop, p["color"], p["channels"])
        crops.append(crop)
    return crops, K, R


def build_items(raws: list[RawSample], *, indices: list[int], img_size: int, augment: CropAugment | None = None,
                prompts=None, rngs: list) -> list[dict]:
    """Raw samples -> items of docs/conventions.md (crop, labels in the crop's camera, prompts). Each image is
    cropped on its own; the crops' maps and the labels of all are computed at once (a loader worker's batch),
    each item's exactly as alone. Each item's rng draws its augmentation, then its prompts."""
    crops, K, R = sample_crops(raws, img_size, augment, rngs)
    with_verts = all(raw.verts is not None for raw in raws)
    labels = crop_labels(np.stack([raw.xyz for raw in raws]), K, R, img_size,
                         np.stack([raw.verts for raw in raws]) if with_verts else None)
    # each key's per-item views in one call (unbind), not one indexing call per item and key
    per_item = {k: v.unbind(0) for k, v in label_tensors(labels).items()}
    sentences = prompts.batch(labels["joints_xyz"], rngs) if prompts is not None else [{} for _ in raws]
    items = []
    for i, (raw, crop) in enumerate(zip(raws, crops)):
        item = {"image": image_tensor(crop), **{k: v[i] for k, v in per_item.items()}}
        item["prompts"] = sentences[i]
        item["meta"] = {"index": int(indices[i]), "file": raw.file}
        if raw.visible is not None:
            item["visible"] = torch.as_tensor(np.asarray(raw.visible, dtype=bool))
        items.append(item)
    return items


def build_item(raw: RawSample, *, index: int, img_size: int, augment: CropAugment | None = None,
               prompts=None, rng: np.random.Generator | None = None) -> dict:
    """One raw sample -> its item (`build_items` of one)."""
    return build_items([raw], indices=[index], img_size=img_size, augment=augment, prompts=prompts, rngs=[rng])[0]
