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
        """The crop's draws from `rng`, in order: scale, shift (x, y), whether to rotate, the angle (only when
        rotating), colour (3, only when on), channel gains (3, only when on); each a uniform in +- its range.
        Drawn as a few blocks of rng.random: the same numbers as one rng.uniform call per draw (uniform(lo, hi)
        is lo + (hi - lo) * random()), in a third of the time, and the rng left where those calls leave it."""
        if not self.train or rng is None:
            return {"scale": self.scale, "shift": (0.0, 0.0), "rot": 0.0, "color": None, "channels": None}
        u_scale, u_x, u_y, u_rot = rng.random(4).tolist()
        scale = self.scale * (1.0 + _uniform(u_scale, self.scale_jitter))
        shift = (_uniform(u_x, self.shift_jitter), _uniform(u_y, self.shift_jitter))
        rot = math.radians(_uniform(rng.random(), self.rot_max_deg)) if u_rot < self.rot_prob else 0.0
        ranges = [r for r in (self.color_jitter, self.channel_noise) if r > 0]
        u = rng.random(3 * len(ranges)).tolist() if ranges else []
        gains = [tuple(1.0 + _uniform(x, r) for x in u[3 * k:3 * k + 3]) for k, r in enumerate(ranges)]
        color = gains.pop(0) if self.color_jitter > 0 else None
        channels = gains.pop(0) if self.channel_noise > 0 else None
        return {"scale": scale, "shift": shift, "rot": rot, "color": color, "channels": channels}


def _uniform(u: float, half_range) -> float:
    """rng.uniform(-half_range, half_range) given the rng.random() it would draw: numpy's lo + (hi - lo) * u."""
    lo = -float(half_range)
    return lo + (float(half_range) - lo) * u


EVAL_CROP = CropAugment(train=False)

MEAN, STD = 0.5, 0.5  # (x/255 - 0.5) / 0.5, the demo repo's normalisation


def image_tensor(image_u8: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> uint8 3xHxW: an item's image. Crops travel as bytes (through a loader worker's
    shared memory, pinning and the host-to-device copy: 4x fewer than float32) and become the model's
    input on the device (`model_input`)."""
    return torch.from_numpy(np.ascontiguousarray(channels_first(image_u8)))


def channels_first(image: np.ndarray) -> np.ndarray:
    """The 3xHxW view of an HxWx3 image: an item's image layout (`image_tensor`, `crop_into`)."""
    return image.transpose(2, 0, 1)


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
    g0, g1, g2 = (1.0, 1.0, 1.0) if channels is None else (float(x) for x in channels)
    b, c, s = (1.0, 1.0, 1.0) if factors is None else (float(f) for f in factors)
    m0, m1, m2 = (float(x) for x in channel_means[:3])
    t = (1.0 - c) * (b * (g0 * m0 + g1 * m1 + g2 * m2) / 3.0)
    # plain floats, written out: numpy's per-call overhead on 3 x 4 numbers, or loops over them, would cost as
    # much as the pass itself
    cb = c * b
    off, on = cb * ((1.0 - s) / 3.0), cb * ((1.0 - s) / 3.0 + s)
    return np.array([[on * g0, off * g1, off * g2, t], [off * g0, on * g1, off * g2, t],
                     [off * g0, off * g1, on * g2, t]])


def jitter_color(image: np.ndarray, factors: tuple[float, float, float] | None,
                 channels: tuple[float, float, float] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """A uint8 RGB image with per-channel gains `channels` (R, G, B), then brightness, contrast and saturation
    `factors`; either may be None (not applied). One float32 pass of their composed map (`color_matrix`),
    rounded to the nearest level and clipped to [0, 255]: a 256 px crop takes 0.1 ms where the step-by-step
    float passes took 2 ms, most of a loader worker's time. Written into `out` (the image itself may be it)
    when given."""
    if factors is None and channels is None:
        if out is not None and out is not image:
            np.copyto(out, image)
        return image if out is None else out
    # float32 in: OpenCV transforms uint8 with 10-bit fixed-point coefficients, up to 0.4 of a level off
    mapped = cv2.transform(image.astype(np.float32), color_matrix(cv2.mean(image)[:3], factors, channels))
    # saturating, rounding float -> uint8
    return cv2.addWeighted(mapped, 1.0, mapped, 0.0, 0.0, dst=out, dtype=cv2.CV_8U)


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
    """(centre, side, rotation) of the crop `augment` draws from `rng` about `box`: the crop `crop_into`
    makes from the same draw (two-pass framing maps predictions on it back to the image, data/reframe.py)."""
    p = (augment if augment is not None else EVAL_CROP).sample(rng)
    center, side = crop_box(box, p)
    return center, side, p["rot"]


def crop_labels(xyz: np.ndarray, K: np.ndarray, R: np.ndarray, img_size: int, verts: np.ndarray | None = None,
                out: dict | None = None) -> dict:
    """Camera-frame labels in the crop's camera (K, R from `crop_intrinsics`): the label keys of an item, for
    one sample ((21, 3), (3, 3), ...) or a stack of them ((B, 21, 3), (B, 3, 3), ...). Every operation
    broadcasts over the leading axis, so a stack gives each sample's labels bit for bit.

    out: arrays per key (`label_buffers`), filled with every key, each computed in float64 and rounded once.
    The float64 joint keys are still returned (prompts sort them), the vertex keys only into `out`: 778 points
    per hand are most of a loader worker's label work, and are written once instead of copied twice."""
    Rt = np.swapaxes(R, -1, -2)
    xyz = xyz @ Rt
    uvd, root, bone = xyz_to_uvd(xyz, K, img_size)
    labels = {"joints_xyz": xyz, "joints_uvd": uvd, "K": K, "root_depth": np.asarray(root), "bone": np.asarray(bone)}
    if out is not None:
        for k, v in labels.items():
            np.copyto(out[k], v, casting="same_kind")
    if verts is not None:
        verts_xyz = verts @ Rt
        if out is None:
            labels["verts_xyz"] = verts_xyz
            labels["verts_uvd"] = points_to_uvd(verts_xyz, K, img_size, labels["root_depth"], labels["bone"])
        else:
            np.copyto(out["verts_xyz"], verts_xyz, casting="same_kind")
            points_to_uvd(verts_xyz, K, img_size, labels["root_depth"], labels["bone"], out=out["verts_uvd"])
    return labels


def label_targets(raw: RawSample, *, img_size: int, augment: CropAugment | None = None,
                  rng: np.random.Generator | None = None) -> dict:
    """The labels `build_items` gives the same raw sample and rng, without an image (float64 numpy)."""
    p = (augment if augment is not None else EVAL_CROP).sample(rng)
    center, side = crop_box(raw.box, p)
    K, R = crop_intrinsics(raw.K, center, side, img_size, p["rot"])
    return crop_labels(raw.xyz, K, R, img_size, raw.verts)


def label_buffers(batch: int, num_joints: int, num_verts: int | None = None, dtype=np.float32) -> dict:
    """Arrays for the label keys of `batch` items (no vertex keys when num_verts is None), all views of one flat
    buffer: `crop_labels(out=...)` fills them and torch.from_numpy shares them, so a loader worker's labels
    become tensors with no concatenation or per-key conversion (a crop takes a few hundred microseconds)."""
    shapes = {"joints_xyz": (num_joints, 3), "joints_uvd": (num_joints, 3), "K": (3, 3), "root_depth": (), "bone": ()}
    if num_verts is not None:
        shapes.update(verts_xyz=(int(num_verts), 3), verts_uvd=(int(num_verts), 3))
    sizes = [batch * math.prod(shape) for shape in shapes.values()]
    flat = np.empty(sum(sizes), dtype)
    ends = np.cumsum(sizes).tolist()
    return {k: flat[end - n:end].reshape((batch, *shape))
            for (k, shape), n, end in zip(shapes.items(), sizes, ends)}


def new_crops(batch: int, img_size: int) -> np.ndarray:
    """The uint8 stack (B, 3, S, S) of a batch's item images, filled by `crop_into`."""
    return np.empty((batch, 3, img_size, img_size), np.uint8)


def crop_into(raw: RawSample, params: dict, img_size: int, out: np.ndarray) -> tuple[tuple[float, float], float, float]:
    """Warp raw.image's crop for the augmentation `params` (`CropAugment.sample`), coloured when drawn so, into
    `out` (3, S, S: an item's image, as `image_tensor` lays it out); returns the crop's (centre, side, rotation)
    for its labels (`items_from_crops`). A worker crops each picture right after decoding it, and lays each crop
    out while it is in the CPU's cache: at 256 px, transposing the whole batch afterwards cost as much as the
    warp."""
    center, side = crop_box(raw.box, params)
    crop = warp_crop(raw.image, crop_affine(center, side, img_size, params["rot"]), img_size)
    if params["color"] is not None or params["channels"] is not None:
        crop = jitter_color(crop, params["color"], params["channels"], out=crop)
    np.copyto(out, channels_first(crop))
    return center, side, params["rot"]


def items_from_crops(raws: list[RawSample], crops: np.ndarray, frames: list, *, indices: list[int], img_size: int,
                     prompts=None, rngs: list) -> list[dict]:
    """Items of docs/conventions.md from the raw samples (their images no longer needed), their crops (`new_crops`)
    and frames (`crop_into`): the labels in every crop's camera and the prompts, computed at once (a loader
    worker's batch), each item's exactly as alone. The rngs have drawn the crops; they draw the prompts next."""
    centres, sides, rots = (np.array([f[k] for f in frames]) for k in range(3))
    K, R = crop_intrinsics(np.stack([raw.K for raw in raws]), centres, sides, img_size, rots)
    xyz = np.stack([raw.xyz for raw in raws])
    verts = np.stack([raw.verts for raw in raws]) if all(raw.verts is not None for raw in raws) else None
    buffers = label_buffers(len(raws), xyz.shape[1], None if verts is None else verts.shape[1])
    labels = crop_labels(xyz, K, R, img_size, verts, out=buffers)
    # each key's per-item views in one call (unbind), not one indexing call per item and key
    per_item = {"image": torch.from_numpy(crops), **{k: torch.from_numpy(v) for k, v in buffers.items()}}
    per_item = {k: v.unbind(0) for k, v in per_item.items()}
    sentences = prompts.batch(labels["joints_xyz"], rngs) if prompts is not None else [{} for _ in raws]
    items = []
    for i, raw in enumerate(raws):
        item = {k: v[i] for k, v in per_item.items()}
        item["prompts"] = sentences[i]
        item["meta"] = {"index": int(indices[i]), "file": raw.file}
        if raw.visible is not None:
            item["visible"] = torch.as_tensor(np.asarray(raw.visible, dtype=bool))
        items.append(item)
    return items


def build_items(raws: list[RawSample], *, indices: list[int], img_size: int, augment: CropAugment | None = None,
                prompts=None, rngs: list) -> list[dict]:
    """Decoded raw samples -> their items: each cropped on its own (`crop_into`), then labelled together
    (`items_from_crops`). Each item's rng draws its augmentation, then its prompts."""
    aug = augment if augment is not None else EVAL_CROP
    crops = new_crops(len(raws), img_size)
    frames = [crop_into(raw, aug.sample(rng), img_size, out) for raw, rng, out in zip(raws, rngs, crops)]
    return items_from_crops(raws, crops, frames, indices=indices, img_size=img_size, prompts=prompts, rngs=rngs)


def build_item(raw: RawSample, *, index: int, img_size: int, augment: CropAugment | None = None,
               prompts=None, rng: np.random.Generator | None = None) -> dict:
    """One raw sample -> its item (`build_items` of one)."""
    return build_items([raw], indices=[index], img_size=img_size, augment=augment, prompts=prompts, rngs=[rng])[0]
