"""How a synthetic hand is drawn: `HandSample` (what `synthetic.sample_hand` draws) and `render`.

Drawing is a painter's algorithm over shaded tapered capsules (one per finger segment, the thenar and
the forearm) and a palm slab: capsules on the far side of the palm go first, then the palm, then the
near ones, each group far to near. The mask covers the visible hand (not the forearm), like FreiHAND's.
Backgrounds (`make_background`) are smooth colour noise, gradients or flat colours with clutter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..geometry import project
from .hand_model import DISTAL, HandShape, palm_edges

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
