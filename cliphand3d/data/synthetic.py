"""Procedural synthetic hands: the embedded default data, no download needed.

`sample_hand(seed, index)` draws a hand (shape, pose within joint limits, rotation, camera) and its
labels; `render(hand, background=k)` draws it with OpenCV over background version k, so one hand can
be shown over several backgrounds as FreiHAND does; `SyntheticHands` serves items through the shared
crop pipeline. Everything is a pure function of (seed, index[, background]); no global random state.

How a hand is drawn (capsules, palm, backgrounds): render.py.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import ConfigError
from ..geometry import project, square_box
from .base import HandDataset
from .hand_model import (HandShape, capsules, forward, palm_outline, sample_angles, sample_shape, surface_layout,
                         surface_points)
from .render import FOREARM, HAND, SKIN_TONES, SLEEVE, HandSample, render
from .sample import RawSample
from .transforms import box_from_mask

Z_MIN = 0.25  # metres: nearest hand centre, so perspective stays plausible and every z > 0
FOCAL_RANGE = (1.8, 3.2)  # focal length / image side (FreiHAND-like crops)
FILL_RANGE = (0.5, 0.8)  # hand's extent / image side
EVAL_SEED_OFFSET = 1 << 31  # held-out streams start here, far from any train seed (seeds are < 2**31)
# Each split's streams get their own range of stream numbers, so no two splits draw the same hand:
# train [0, 2**31), val [2**31, 2**31 + 2**30), test [2**31 + 2**30, 2**32). Streams stay below 2**32:
# numpy's SeedSequence splits bigger ints into 32-bit words and pads keys with zeros, so the key
# [2**32, 0] = words [0, 1, 0] is the key [0, 1] of train hand 1.
SPLIT_OFFSETS = {"train": 0, "val": EVAL_SEED_OFFSET, "test": EVAL_SEED_OFFSET + (1 << 30)}
SPLIT_SEEDS = {"train": 1 << 31, "val": 1 << 30, "test": 1 << 30}  # seeds allowed per split: [0, n)


# --------------------------------------------------------------------------- sampling
def _check_key(seed: int, index: int) -> None:
    for name, v in (("seed", seed), ("index", index)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform over SO(3) (normalised Gaussian quaternion)."""
    w, x, y, z = rng.standard_normal(4)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


# Viewpoint priors: "uniform" draws the hand's rotation uniformly over SO(3); "upright" is FreiHAND-like,
# fingers up in the image and the palm or the back towards the camera, tilted by up to UPRIGHT_TILT_DEG
# about a random axis. Crop-time rotation (CropAugment.rot_max_deg) still turns either one in-plane.
VIEWS = ("uniform", "upright")
UPRIGHT_TILT_DEG = 50.0


def _upright_rotation(rng: np.random.Generator) -> np.ndarray:
    """Hand Y (distal) to image up (-y), hand Z (palmar) to -z (palm seen) or +z (back seen), then a
    rotation by an angle uniform in [0, UPRIGHT_TILT_DEG] about a uniformly drawn axis (Rodrigues)."""
    s = 1.0 if rng.random() < 0.5 else -1.0
    base = np.array([[s, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -s]]).T  # columns: camera images of X, Y, Z
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.0, UPRIGHT_TILT_DEG))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    tilt = np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * k @ k
    return tilt @ base


def _place(pts: np.ndarray, img_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Camera (K) and translation putting the rotated surface points `pts` inside the image.

    The hand's extent is a drawn fraction of the image; the focal length is drawn too, and the depth
    follows from both (a very close hand instead gets a shorter focal length). Then a few fixed-point
    steps correct perspective: rescale the distance to hit the fill, shift to stay inside.
    """
    S = img_size
    f = S * rng.uniform(*FOCAL_RANGE)
    c = (S - 1) / 2 + rng.uniform(-0.04, 0.04, 2) * S
    target = S * rng.uniform(*FILL_RANGE)
    lo, hi = pts.min(0), pts.max(0)
    centre = (lo + hi) / 2
    ext = max(hi[0] - lo[0], hi[1] - lo[1])
    z = f * ext / target
    if z < Z_MIN:
        z, f = Z_MIN, target * Z_MIN / ext
    K = np.array([[f, 0.0, c[0]], [0.0, f, c[1]], [0.0, 0.0, 1.0]])
    slack = 0.4 * (S - target)
    px = (S - 1) / 2 + rng.uniform(-slack, slack, 2)
    pos = np.array([(px[0] - c[0]) * z / f, (px[1] - c[1]) * z / f, z])
    margin = 2.0
    rel = pts - centre
    for _ in range(3):
        lo_px, hi_px = _bounds(rel + pos, K)
        pos *= (hi_px - lo_px).max() / target  # along the ray: keeps the centre pixel
        lo_px, hi_px = _bounds(rel + pos, K)
        shift = np.maximum(0.0, margin - lo_px) - np.maximum(0.0, hi_px - (S - 1 - margin))
        if not shift.any():
            break
        pos[:2] += shift * pos[2] / f
    return K, pos - centre


def _bounds(p: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel bounding box of camera points."""
    uv = project(p, K)
    return uv.min(0), uv.max(0)


def _forearm(shape: HandShape, R: np.ndarray, wrist: np.ndarray, rng: np.random.Generator):
    """Forearm (and sometimes a sleeve) capsules leaving the wrist, kept well in front of the camera."""
    back = -R[:, 1]
    length = shape.size * rng.uniform(0.7, 1.8)
    if back[2] < 0:  # pointing at the camera: stop before it gets huge or crosses z = 0
        length = min(length, 0.25 * wrist[2] / -back[2])
    w = shape.wrist_half_width
    start = wrist + 0.012 * R[:, 1]
    caps = []
    cuff = shape.size * rng.uniform(0.2, 0.7) if rng.random() < 0.35 else np.inf
    skin_end = min(length, cuff)
    caps.append((start, wrist + skin_end * back, 0.8 * w, (0.8 + 0.2 * skin_end / shape.size) * w, FOREARM))
    if cuff < length:
        caps.append((wrist + cuff * back, wrist + length * back, 1.25 * w, 1.35 * w, SLEEVE))
    return caps


def sample_hand(seed: int, index: int, *, num_verts: int = 778, img_size: int = 224,
                view: str = "uniform") -> HandSample:
    """Draw hand `index` of stream `seed`: shape, pose, rotation (from the `view` prior, see VIEWS),
    camera, colours, light."""
    _check_key(seed, index)
    if view not in VIEWS:
        raise ConfigError(f"view={view!r} is not a synthetic viewpoint prior; choose one of {VIEWS} "
                         f"(data.view=...)")
    draw_rotation = _random_rotation if view == "uniform" else _upright_rotation
    rng = np.random.default_rng([int(seed), int(index)])
    shape = sample_shape(rng)
    angles = sample_angles(rng)
    joints, frames = forward(shape, angles)
    verts_h = surface_points(shape, joints, frames, surface_layout(num_verts))
    R = draw_rotation(rng)
    for _ in range(20):  # a forearm aimed within ~45 deg of the lens would hide the hand behind it
        if R[2, 1] < 0.7:
            break
        R = draw_rotation(rng)
    verts = verts_h @ R.T
    K, t = _place(verts, img_size, rng)
    verts += t
    xyz = joints @ R.T + t
    start, end, r0, r1 = capsules(shape, joints, frames)
    caps = [(s @ R.T + t, e @ R.T + t, a, b, HAND) for s, e, a, b in zip(start, end, r0, r1)]
    caps += _forearm(shape, R, xyz[0], rng)
    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    i = int(tone)
    skin = SKIN_TONES[i] + (tone - i) * (SKIN_TONES[min(i + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[i])
    skin = np.clip(skin * rng.uniform(0.92, 1.08, 3), 0, 255)
    light = np.array([rng.normal(0, 0.7), rng.normal(0, 0.7), -1.0])  # mostly from the camera's side
    light /= np.linalg.norm(light)
    blur = bool(rng.random() < 0.3)
    return HandSample(
        seed=int(seed), index=int(index), img_size=int(img_size), xyz=xyz, verts=verts, K=K,
        angles_deg=angles, shape=shape, rotation=R,
        cap_start=np.array([c[0] for c in caps]), cap_end=np.array([c[1] for c in caps]),
        cap_r0=np.array([c[2] for c in caps]), cap_r1=np.array([c[3] for c in caps]),
        cap_kind=np.array([c[4] for c in caps]), seg_frames=R @ frames,
        palm=palm_outline(shape) @ R.T + t, skin=skin, sleeve=rng.uniform(20, 235, 3),
        light=light, ambient=float(rng.uniform(0.35, 0.6)), diffuse=float(rng.uniform(0.45, 0.75)),
        blur=blur, blur_sigma=float(rng.uniform(0.5, 1.4)),
    )


# How `frame_like_freihand` places a hand: FreiHAND's images are crops centred on the hand, its joints' box
# spanning 0.38 of the 224 px side (measured on ../shared/real_samples/freihand: 84.9 and 85.1 px, 0.379 and
# 0.380, box centres 3-6 px from the image centre; tests/test_framing.py measures it again)
FREIHAND_JOINT_FILL = 0.38


def frame_like_freihand(hand: HandSample, fill: float = FREIHAND_JOINT_FILL, steps: int = 8) -> HandSample:
    """`hand` moved (translated, not turned; same camera) so that its projected joints' box is centred in the
    image and its longer side is `fill` of the image side: along the ray to scale it, then sideways to centre
    it, a few fixed-point steps because perspective couples the two."""
    S, K = hand.img_size, hand.K
    target = fill * S
    centre = np.array([(S - 1) / 2.0, (S - 1) / 2.0])
    t = np.zeros(3)
    for _ in range(steps):
        ref = hand.xyz.mean(0) + t
        lo, hi = _bounds(hand.xyz + t, K)
        t += ref * ((hi - lo).max() / target) - ref  # about the camera centre: the hand's pixels keep their centre
        lo, hi = _bounds(hand.xyz + t, K)
        t[:2] += (centre - (lo + hi) / 2) * (hand.xyz[:, 2].mean() + t[2]) / np.array([K[0, 0], K[1, 1]])
    return dataclasses.replace(hand, xyz=hand.xyz + t, verts=hand.verts + t, cap_start=hand.cap_start + t,
                               cap_end=hand.cap_end + t, palm=hand.palm + t)


def render_hand(seed: int, index: int, *, img_size: int = 224, num_verts: int = 778, background: int = 0) -> dict:
    """One synthetic sample: dict(image, mask, K, xyz, verts)."""
    hand = sample_hand(seed, index, num_verts=num_verts, img_size=img_size)
    image, mask = render(hand, background=background)
    return {"image": image, "mask": mask, "K": hand.K, "xyz": hand.xyz, "verts": hand.verts}


# --------------------------------------------------------------------------- dataset
class SyntheticHands(HandDataset):
    """`length` procedural hands rendered at `render_size` (FreiHAND-like), cropped by the shared pipeline.

    `split` ("train", "val" or "test") picks disjoint streams: stream = `seed` + SPLIT_OFFSETS[split]. The
    data config gives val and test their own fixed seeds, so they do not move with the training seed.
    Items follow docs/conventions.md, with `verts_xyz` (fixed topology of `num_verts` points).
    """

    protocol = "freihand"
    has_verts = True

    def __init__(self, *, length: int, seed: int = 0, split: str = "train", img_size: int = 256,
                 num_verts: int = 778, augment=None, prompts=None, render_size: int = 224,
                 view: str = "uniform", skip_bad: bool = False):
        super().__init__(img_size=img_size, augment=augment, prompts=prompts, seed=seed, skip_bad=skip_bad)
        if view not in VIEWS:
            raise ConfigError(f"SyntheticHands: data.view={view!r} is not one of {VIEWS}")
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise ConfigError(f"SyntheticHands: length must be a positive int, got {length!r}")
        if split not in SPLIT_OFFSETS:
            raise ConfigError(f"SyntheticHands: split must be one of {tuple(SPLIT_OFFSETS)} (data.<entry>.split), "
                             f"got {split!r}")
        top = SPLIT_SEEDS[split]
        if not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= top:
            key = {"train": "seed", "val": "data.holdout_seed", "test": "data.test_seed"}[split]
            raise ConfigError(f"SyntheticHands: the {split} seed ({key}) must be an int in [0, {top}), got {seed!r}")
        surface_layout(num_verts)  # fail now, with the message about num_verts, not in a worker
        self.length = int(length)
        self.split = split
        self.num_verts = int(num_verts)
        self.render_size = int(render_size)
        self.view = view
        self.stream = int(seed) + SPLIT_OFFSETS[split]

    def __len__(self) -> int:
        return self.length

    def hand(self, index: int) -> HandSample:
        return sample_hand(self.stream, int(index), num_verts=self.num_verts, img_size=self.render_size,
                           view=self.view)

    def load_raw(self, index: int) -> RawSample:
        hand = self.hand(index)
        image, mask = render(hand)
        if mask.any():
            box = box_from_mask(mask)
        else:  # the forearm hid the whole hand (not seen in practice): crop around the joints instead
            box = square_box(project(hand.xyz, hand.K), scale=1.0)
        return RawSample(image=image, K=hand.K, xyz=hand.xyz, box=box, verts=hand.verts,
                         file=f"synthetic/{self.split}/{self.seed}/{int(index):08d}")

    def all_labels(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Camera-frame labels of the first `limit` (default all) samples, without rendering:
        xyz (M, 21, 3) and verts (M, num_verts, 3), float32 (778 points x 32,560 hands is 300 MB)."""
        m = self.length if limit is None else min(int(limit), self.length)
        xyz = np.empty((m, 21, 3), np.float32)
        verts = np.empty((m, self.num_verts, 3), np.float32)
        for i in range(m):
            h = self.hand(i)
            xyz[i], verts[i] = h.xyz, h.verts
        return xyz, verts
