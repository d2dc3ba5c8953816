"""Procedural synthetic hands: the embedded default data, no download needed.

`sample_hand(seed, index)` draws a hand (shape, pose within joint limits, rotation, camera) and its
labels; `render(hand, background=k)` draws it with OpenCV over background version k, so one hand can
be shown over several backgrounds as FreiHAND does; `SyntheticHands` serves items through the shared
crop pipeline. Everything is a pure function of (seed, index[, background]); no global random state.

Drawing is a painter's algorithm over shaded tapered capsules (one per finger segment, the thenar and
the forearm) and a palm slab: capsules on the far side of the palm go first, then the palm, then the
near ones, each group far to near. The mask covers the visible hand (not the forearm), like FreiHAND's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import ConfigError
from ..geometry import project, square_box
from .base import HandDataset, RawSample
from .hand_model import (DISTAL, HandShape, capsules, forward, palm_edges, palm_outline, sample_angles,
                         sample_shape, surface_layout, surface_points)
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
HAND, FOREARM, SLEEVE = 0, 1, 2
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT

# Skin tones (RGB), light to dark; a hand gets a blend of two neighbours.
SKIN_TONES = np.array([[255, 224, 200], [241, 196, 160], [224, 172, 132], [198, 140, 100],
                       [160, 106, 72], [112, 74, 50], [78, 52, 38]], dtype=np.float64)
PALM_TINT = np.array([255.0, 205.0, 185.0])  # palms and nails are lighter and pinker than the back
NAIL_TINT = np.array([250.0, 222.0, 215.0])


@dataclass
class HandSample:
    """One drawn hand: labels in the camera frame plus what the renderer needs."""

    seed: int
    index: int
    img_size: int
    xyz: np.ndarray  # (21, 3) metres, camera frame, right hand, MPII order
    verts: np.ndarray  # (num_verts, 3) metres, fixed topology (hand_model.surface_layout)
    K: np.ndarray  # (3, 3)
    angles_deg: np.ndarray  # (5, 4), layout of hand_model.LIMITS_LO
    shape: HandShape
    rotation: np.ndarray  # (3, 3) hand frame -> camera; the hand frame's origin is the wrist, xyz[0]
    cap_start: np.ndarray  # (M, 3) capsules: 16 hand segments, then forearm (and sleeve)
    cap_end: np.ndarray  # (M, 3)
    cap_r0: np.ndarray  # (M,) radius at start, metres
    cap_r1: np.ndarray  # (M,)
    cap_kind: np.ndarray  # (M,) HAND, FOREARM or SLEEVE
    seg_frames: np.ndarray  # (16, 3, 3) camera-frame segment frames (columns: flexion axis, bone, palmar)
    palm: np.ndarray  # (16, 3) camera-frame corners of the palm slab
    skin: np.ndarray  # (3,) RGB 0-255
    sleeve: np.ndarray  # (3,) RGB 0-255
    light: np.ndarray  # (3,) unit vector towards the light, camera frame
    ambient: float
    diffuse: float
    blur: bool  # default for render(blur=None)
    blur_sigma: float  # pixels, used whenever blur is on


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


# --------------------------------------------------------------------------- backgrounds
def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 RGB: smooth colour noise, a gradient or a flat colour, fine texture, clutter shapes.

    Everything starts small and is resized, so a background costs well under a millisecond.
    """
    kind = rng.integers(3)
    if kind == 0:
        g = int(rng.integers(2, 10))
        img = cv2.resize(rng.integers(0, 256, (g, g, 3), dtype=np.uint8), (size, size),
                         interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # bilinear blend of four corner colours
        img = cv2.resize(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    else:
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    if rng.random() < 0.5:
        g = int(rng.integers(16, 80))
        tex = cv2.resize(rng.integers(0, 256, (g, g, 3), dtype=np.uint8), (size, size),
                         interpolation=cv2.INTER_LINEAR)
        a = float(rng.uniform(0.05, 0.3))
        img = cv2.addWeighted(img, 1.0 - a, tex, a, 0.0)
    for _ in range(int(rng.integers(0, 10))):
        _clutter(img, rng, size)
    return img


def _clutter(img: np.ndarray, rng: np.random.Generator, size: int) -> None:
    if rng.random() < 0.15:  # skin-coloured distractors, so "skin = hand" is not a shortcut
        color = tuple(float(v) for v in SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.8, 1.1))
    else:
        color = tuple(float(v) for v in rng.integers(0, 256, 3))
    cx, cy = rng.uniform(-0.1, 1.1, 2) * size
    r = rng.uniform(0.03, 0.35) * size
    kind = rng.integers(4)
    if kind == 0:
        cv2.circle(img, (int(cx), int(cy)), int(r), color, -1)
    elif kind == 1:  # rotated rectangle
        a = rng.uniform(0, math.pi)
        w, h = r, r * rng.uniform(0.2, 1.0)
        d = np.array([[w, h], [-w, h], [-w, -h], [w, -h]]) @ np.array([[math.cos(a), math.sin(a)],
                                                                       [-math.sin(a), math.cos(a)]])
        cv2.fillConvexPoly(img, (d + [cx, cy]).astype(np.int32), color)
    elif kind == 2:
        ex, ey = rng.uniform(-0.1, 1.1, 2) * size
        cv2.line(img, (int(cx), int(cy)), (int(ex), int(ey)), color, int(rng.integers(1, max(2, size // 16))))
    else:  # triangle
        p = rng.uniform(-r, r, (3, 2)) + [cx, cy]
        cv2.fillConvexPoly(img, p.astype(np.int32), color)


# --------------------------------------------------------------------------- drawing
def _fixed(p) -> tuple[int, int]:
    return int(round(p[0] * _ONE)), int(round(p[1] * _ONE))


def _capsule_geometry(c0: np.ndarray, c1: np.ndarray, r0: np.ndarray, r1: np.ndarray) -> list[tuple]:
    """Fixed-point discs and tangent quad of many image-plane capsules at once (centres (..., 2),
    radii (...)), flattened to one (centre0, centre1, radius0, radius1, quad or None) per capsule."""
    d = c1 - c0
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    perp = np.concatenate([-d[..., 1:], d[..., :1]], -1) / np.maximum(n, 1e-9)
    quad = np.stack([c0 + r0[..., None] * perp, c1 + r1[..., None] * perp,
                     c1 - r1[..., None] * perp, c0 - r0[..., None] * perp], -2)
    quads = np.round(quad * _ONE).astype(np.int32).reshape(-1, 4, 2)
    e0 = np.round(c0 * _ONE).astype(np.int64).reshape(-1, 2).tolist()
    e1 = np.round(c1 * _ONE).astype(np.int64).reshape(-1, 2).tolist()
    q0 = np.maximum(1, (r0 * _ONE).astype(np.int64)).ravel().tolist()
    q1 = np.maximum(1, (r1 * _ONE).astype(np.int64)).ravel().tolist()
    long = (n[..., 0] > 1e-3).ravel().tolist()
    return [(tuple(e0[i]), tuple(e1[i]), q0[i], q1[i], quads[i] if long[i] else None) for i in range(len(e0))]


def _fill_capsule(img: np.ndarray, geom: tuple, color) -> None:
    e0, e1, q0, q1, quad = geom
    cv2.circle(img, e0, q0, color, -1, cv2.LINE_8, _SHIFT)
    cv2.circle(img, e1, q1, color, -1, cv2.LINE_8, _SHIFT)
    if quad is not None:
        cv2.fillConvexPoly(img, quad, color, cv2.LINE_8, _SHIFT)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _draw_order(hand: HandSample) -> tuple[list[int], list[int]]:
    """Capsules behind the palm and in front of it, each far to near.

    A capsule is in front when it is nearer the camera than the closest point of the palm's mid-plane
    rectangle: fingers curled towards the camera, a forearm pointing at it, straight fingers seen
    from their tips all land on the right side of the palm.
    """
    R, wrist = hand.rotation, hand.xyz[0]
    mid = 0.5 * (hand.cap_start + hand.cap_end)
    ctrl, _ = palm_edges(hand.shape)
    local = (mid - wrist) @ R
    local[:, 0] = np.clip(local[:, 0], ctrl[:, 0].min(), ctrl[:, 0].max())
    local[:, 1] = np.clip(local[:, 1], 0.0, ctrl[:, 1].max())
    local[:, 2] = 0.0
    q = local @ R.T + wrist
    depth = np.linalg.norm(mid, axis=1)
    front = depth < np.linalg.norm(q, axis=1)
    order = np.argsort(-depth, kind="stable")
    return [int(i) for i in order if not front[i]], [int(i) for i in order if front[i]]


# Shading passes per capsule: (radius scale, shift towards the lit side in radii, brightness).
_PASSES = ((1.0, 0.0, 0.55), (0.74, 0.3, 0.85), (0.42, 0.65, 1.0))


def _draw_hand(img: np.ndarray, mask: np.ndarray, hand: HandSample) -> None:
    """Fake cylinder shading: each capsule is drawn three times, narrower, brighter and shifted
    towards its lit side; the widest pass doubles as the silhouette in the mask."""
    K, f = hand.K, hand.K[0, 0]
    a, b = hand.cap_start, hand.cap_end
    pa, pb = project(a, K), project(b, K)
    ra, rb = f * hand.cap_r0 / a[:, 2], f * hand.cap_r1 / b[:, 2]
    view = _unit_rows(-0.5 * (a + b))
    axis = _unit_rows(b - a)
    L = hand.light
    lperp = L - (axis @ L)[:, None] * axis  # lit side of each capsule, across its axis
    lp = np.linalg.norm(lperp, axis=1)
    nh = lperp / np.maximum(lp, 1e-9)[:, None]
    facing = np.clip(np.einsum("ij,ij->i", nh, view), 0.0, 1.0)
    lam = lp * (0.55 + 0.45 * facing)
    base = np.where((hand.cap_kind == SLEEVE)[:, None], hand.sleeve, hand.skin)
    scale, shift, bright = (np.array(v) for v in zip(*_PASSES))
    off = (nh[:, :2] * (facing * ra)[:, None])[:, None, :] * shift[None, :, None]  # (M, passes, 2)
    geom = _capsule_geometry(pa[:, None] + off, pb[:, None] + off, ra[:, None] * scale, rb[:, None] * scale)
    shade = base[:, None] * (hand.ambient + hand.diffuse * lam[:, None] * bright)[..., None]
    shade[:, -1] += 25.0 * (lam ** 8)[:, None]  # a faint specular sheen
    shade = np.clip(shade, 0, 255).tolist()
    in_mask = (hand.cap_kind == HAND).tolist()
    nail = _nails(hand)
    P = len(_PASSES)

    def capsule(i: int) -> None:
        for k in range(P):
            _fill_capsule(img, geom[i * P + k], shade[i][k])
        _fill_capsule(mask, geom[i * P], 1 if in_mask[i] else 0)
        if i in nail:
            center, axes, angle, color = nail[i]
            cv2.ellipse(img, center, axes, angle, 0, 360, color, -1, cv2.LINE_8, _SHIFT)

    behind, front = _draw_order(hand)
    for i in behind:
        capsule(i)
    _draw_palm(img, mask, hand)
    for i in front:
        capsule(i)


def _draw_palm(img: np.ndarray, mask: np.ndarray, hand: HandSample) -> None:
    uv = project(hand.palm, hand.K)
    hull = cv2.convexHull(np.round(uv * _ONE).astype(np.int32))
    normal = hand.rotation[:, 2]  # palmar
    centre = hand.palm.mean(0)
    palmar = normal @ -centre > 0
    face = normal if palmar else -normal
    skin = hand.skin + (0.3 if palmar else 0.0) * (PALM_TINT - hand.skin)
    lam = max(0.0, float(face @ hand.light))
    color = np.clip(skin * (hand.ambient + hand.diffuse * lam), 0, 255)
    rim = np.clip(skin * (hand.ambient + hand.diffuse * 0.45 * lam), 0, 255)
    # rim, body and a soft highlight towards the light, as for the capsules
    cv2.fillConvexPoly(img, hull, rim.tolist(), cv2.LINE_8, _SHIFT)
    cv2.fillConvexPoly(mask, hull, 1, cv2.LINE_8, _SHIFT)
    pts = hull.reshape(-1, 2).astype(np.float64)
    c = pts.mean(0)
    toward = hand.light[:2] * 0.12 * np.ptp(pts, axis=0).max()
    inner = np.round(c + 0.88 * (pts - c)).astype(np.int32)
    cv2.fillConvexPoly(img, inner, color.tolist(), cv2.LINE_8, _SHIFT)
    high = np.clip(skin * (hand.ambient + hand.diffuse * (0.25 + lam)), 0, 255)
    inner = np.round(c + toward + 0.55 * (pts - c)).astype(np.int32)
    cv2.fillConvexPoly(img, inner, (0.5 * (color + high)).tolist(), cv2.LINE_8, _SHIFT)


def _nails(hand: HandSample) -> dict[int, tuple]:
    """Nail ellipses on distal segments whose back faces the camera: front/back cues for the model."""
    out = {}
    K, f = hand.K, hand.K[0, 0]
    for s in np.flatnonzero(DISTAL):
        fr = hand.seg_frames[s]
        end, start, r = hand.cap_end[s], hand.cap_start[s], hand.cap_r1[s]
        view = -end / np.linalg.norm(end)
        back = -fr[:, 2]
        vis = float(back @ view)
        if vis < 0.25:
            continue
        length = float(np.linalg.norm(end - start)) + r
        centre = end - 0.3 * length * fr[:, 1] + 0.85 * r * back
        ends = project(np.stack([centre - 0.28 * length * fr[:, 1], centre + 0.28 * length * fr[:, 1]]), K)
        d = ends[1] - ends[0]
        half_len = max(0.5, 0.5 * float(np.hypot(*d)))
        half_wid = max(0.5, 0.62 * f * r / centre[2] * vis)
        c = project(centre[None], K)[0]
        angle = math.degrees(math.atan2(d[1], d[0]))
        color = np.clip((0.55 * hand.skin + 0.45 * NAIL_TINT) * (hand.ambient + hand.diffuse * 0.9), 0, 255)
        out[int(s)] = (_fixed(c), (int(half_len * _ONE), int(half_wid * _ONE)), angle, color.tolist())
    return out


def render(hand: HandSample, *, background: int = 0, blur: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8 HxWx3 RGB) and mask (uint8 HxW, 1 = visible hand) of a sampled hand.

    `background` picks background version k: the hand's pixels are identical across versions (unless
    blur mixes in a few edge pixels), like FreiHAND's 4 versions of each training image. `blur=None`
    uses the hand's own draw.
    """
    if not isinstance(background, (int, np.integer)) or background < 0:
        raise ValueError(f"background must be a non-negative int (the background version), got {background!r}")
    S = hand.img_size
    img = make_background(np.random.default_rng([hand.seed, hand.index, 1, int(background)]), S)
    mask = np.zeros((S, S), np.uint8)
    _draw_hand(img, mask, hand)
    if hand.blur if blur is None else blur:
        img = cv2.GaussianBlur(img, (0, 0), hand.blur_sigma)
    return img, mask


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
