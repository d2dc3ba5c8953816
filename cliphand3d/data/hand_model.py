"""The procedural right hand: shape and pose priors with joint limits, forward kinematics in the MPII
joint order, and a fixed-topology surface point set (the stand-in for MANO's 778 vertices).

Hand frame: X radial (towards the thumb), Y distal (wrist -> middle MCP), Z palmar, origin at the
wrist. X x Y = Z, so the frame is right-handed and every proper rotation keeps the hand a right hand:
(index MCP - little MCP) x (middle MCP - wrist) points out of the palm, as it does for real right
hands (checked against RHD's labels in the tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import ConfigError

# --------------------------------------------------------------------------- nominal adult hand (metres)
# Proportions follow RHD's skeleton (wrist -> MCP ~ 9 cm, MCP span ~ 6 cm).
MCP = np.array([[0.028, 0.0876, 0.004], [0.007, 0.0917, 0.0], [-0.013, 0.0870, 0.002], [-0.032, 0.0755, 0.006]])
THUMB_CMC = np.array([0.022, 0.030, 0.013])
# bone lengths per chain, base -> tip; row 0 thumb (CMC->MCP, MCP->IP, IP->tip), rows 1-4 fingers
LENGTHS = np.array([[0.042, 0.033, 0.026], [0.036, 0.026, 0.025], [0.037, 0.028, 0.027],
                    [0.033, 0.027, 0.026], [0.030, 0.020, 0.020]])
# surface radius at each chain's 4 joints (thumb: CMC, MCP, IP, tip; fingers: MCP, PIP, DIP, tip)
RADII = np.array([[0.0125, 0.0105, 0.0092, 0.0080], [0.0095, 0.0085, 0.0075, 0.0068],
                  [0.0098, 0.0088, 0.0078, 0.0070], [0.0092, 0.0082, 0.0074, 0.0066],
                  [0.0082, 0.0074, 0.0066, 0.0060]])
PALM_HALF_THICKNESS = 0.013
WRIST_HALF_WIDTH = 0.027
SPLAY_DEG = np.array([7.0, 0.0, -7.0, -15.0])  # rest direction of each finger in the palm plane, + radial


def _thumb_frame() -> np.ndarray:
    """Thumb chain's rest frame: y along the thumb (radial-distal, a little palmar), z the way it curls.

    The thumb is pronated against the fingers: it flexes across the palm (ulnar, a little palmar)
    and abducts away from it (x, mostly palmar), not about the fingers' axes."""
    y = np.array([0.55, 0.80, 0.25])
    y /= np.linalg.norm(y)
    z = np.array([-1.0, 0.0, 0.35])
    z -= (z @ y) * y
    z /= np.linalg.norm(z)
    return np.stack([np.cross(y, z), y, z], axis=1)


THUMB_FRAME = _thumb_frame()

# Joint limits in degrees, per chain (row 0 thumb, rows 1-4 index..little) and per angle:
# [abduction (+ radial), base flexion, middle flexion, distal flexion]; flexion + bends palmar.
LIMITS_LO = np.array([[-20.0, -20.0, -10.0, -15.0]] + [[-18.0, -20.0, 0.0, 0.0]] * 4)
LIMITS_HI = np.array([[35.0, 50.0, 60.0, 80.0]] + [[18.0, 85.0, 110.0, 80.0]] * 4)

# Chains in MPII order: joint ids base -> tip.
CHAINS = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20]])
# Surface segments: the thenar (wrist -> thumb CMC), then 3 per chain; (parent joint, child joint).
SEGMENTS = ((0, 1),) + tuple((int(c[k]), int(c[k + 1])) for c in CHAINS for k in range(3))
NUM_SEGMENTS = len(SEGMENTS)  # 16
DISTAL = np.array([b in (4, 8, 12, 16, 20) for _, b in SEGMENTS])
MIN_VERTS = 160  # 6 points per segment (2 rings of 3), tip apexes and two palm faces


@dataclass(frozen=True)
class HandShape:
    """One hand's proportions, in metres, in the hand frame."""

    mcp: np.ndarray  # (4, 3) finger MCP positions
    thumb_cmc: np.ndarray  # (3,)
    lengths: np.ndarray  # (5, 3)
    radii: np.ndarray  # (5, 4)
    splay_deg: np.ndarray  # (4,)
    palm_half_thickness: float
    wrist_half_width: float

    @property
    def size(self) -> float:
        return float(np.linalg.norm(self.mcp[1]))


NEUTRAL_SHAPE = HandShape(MCP, THUMB_CMC, LENGTHS, RADII, SPLAY_DEG, PALM_HALF_THICKNESS, WRIST_HALF_WIDTH)


def sample_shape(rng: np.random.Generator) -> HandShape:
    """Overall size (child to large adult), palm width/length, finger length, thickness, per-bone noise."""
    s = rng.uniform(0.85, 1.15)
    palm = np.array([rng.uniform(0.92, 1.08), rng.uniform(0.94, 1.06), 1.0])
    finger = rng.uniform(0.9, 1.1)
    thick = rng.uniform(0.85, 1.15)
    bone_noise = 1.0 + np.clip(0.04 * rng.standard_normal((5, 3)), -0.1, 0.1)
    radius_noise = 1.0 + np.clip(0.03 * rng.standard_normal((5, 4)), -0.08, 0.08)
    return HandShape(
        mcp=MCP * palm * s,
        thumb_cmc=THUMB_CMC * palm * s,
        lengths=LENGTHS * (s * finger) * bone_noise,
        radii=RADII * (s * thick) * radius_noise,
        splay_deg=SPLAY_DEG + rng.normal(0.0, 2.0, 4),
        palm_half_thickness=PALM_HALF_THICKNESS * s * thick,
        wrist_half_width=WRIST_HALF_WIDTH * s * palm[0],
    )


def sample_angles(rng: np.random.Generator) -> np.ndarray:
    """(5, 4) joint angles in degrees (layout of LIMITS_LO), clipped to the limits.

    A shared curl makes fists, open hands and everything between; some fingers curl on their own,
    which gives pointing, pinching and counting poses. DIP follows PIP as real tendons couple them.
    """
    curl = np.clip(rng.uniform(0.0, 1.0) + rng.normal(0.0, 0.18, 5), 0.0, 1.0)
    own = rng.random(5) < 0.25
    curl[own] = rng.uniform(0.0, 1.0, int(own.sum()))
    a = np.empty((5, 4))
    c = curl[1:]
    a[1:, 1] = -12.0 + 97.0 * c + rng.normal(0.0, 8.0, 4)
    a[1:, 2] = 105.0 * c + rng.normal(0.0, 10.0, 4)
    a[1:, 3] = a[1:, 2] * rng.uniform(0.45, 0.85, 4) + rng.normal(0.0, 5.0, 4)
    spread = rng.uniform(-0.3, 1.0)
    a[1:, 0] = spread * np.array([8.0, 2.0, -6.0, -12.0]) * (1.0 - c) + rng.normal(0.0, 3.0, 4)
    t = curl[0]
    a[0, 0] = rng.uniform(-15.0, 30.0)
    a[0, 1] = -15.0 + 60.0 * t + rng.normal(0.0, 8.0)
    a[0, 2] = 55.0 * t + rng.normal(0.0, 8.0)
    a[0, 3] = -10.0 + 85.0 * t + rng.normal(0.0, 10.0)
    return np.clip(a, LIMITS_LO, LIMITS_HI)


# --------------------------------------------------------------------------- kinematics
def _rot_x(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    m = np.zeros(a.shape + (3, 3))
    m[..., 0, 0] = 1.0
    m[..., 1, 1], m[..., 1, 2], m[..., 2, 1], m[..., 2, 2] = c, -s, s, c
    return m


def _rot_z(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    m = np.zeros(a.shape + (3, 3))
    m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1] = c, -s, s, c
    m[..., 2, 2] = 1.0
    return m


def forward(shape: HandShape, angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joints (21, 3) in the hand frame and one frame (16, 3, 3) per surface segment.

    Each chain: base frame (thumb pronated, fingers splayed) -> abduction about the base's z ->
    flexion about x at every joint. Frame columns are x (flexion axis), y (along the bone), z (palmar).
    """
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    if a.shape != (5, 4):
        raise ValueError(f"forward: angles must be (5, 4) degrees, got {a.shape}")
    base = np.empty((5, 3, 3))
    base[0] = THUMB_FRAME
    base[1:] = _rot_z(-np.radians(shape.splay_deg))  # rot_z(-a) turns y towards +X (radial)
    f0 = base @ _rot_z(-a[:, 0]) @ _rot_x(a[:, 1])
    f1 = f0 @ _rot_x(a[:, 2])
    f2 = f1 @ _rot_x(a[:, 3])
    frames = np.stack([f0, f1, f2], 1)  # (5, 3, 3, 3): chain, segment, matrix
    p = np.empty((5, 4, 3))
    p[0, 0] = shape.thumb_cmc
    p[1:, 0] = shape.mcp
    for k in range(3):
        p[:, k + 1] = p[:, k] + shape.lengths[:, k, None] * frames[:, k, :, 1]
    joints = np.zeros((21, 3))
    joints[1:] = p.reshape(20, 3)
    seg = np.empty((NUM_SEGMENTS, 3, 3))
    seg[0] = _frame_along(joints[1] - joints[0], np.array([0.0, 0.0, 1.0]))
    seg[1:] = frames.reshape(15, 3, 3)
    return joints, seg


def _frame_along(direction: np.ndarray, up: np.ndarray) -> np.ndarray:
    y = direction / np.linalg.norm(direction)
    z = up - (up @ y) * y
    z /= np.linalg.norm(z)
    return np.stack([np.cross(y, z), y, z], axis=1)


def flexion_angles(xyz: np.ndarray) -> np.ndarray:
    """Signed bend (degrees) at each chain's 2nd and 3rd joint, (5, 2), measured from the joints alone.

    Both joints of a chain bend about one axis, the normal of the chain's bend plane; its sign comes
    from the palm (fingers: proximal bone x palm normal; thumb: the pronated rest axis), so positive
    means towards the palm. Independent of the sampler, so tests can check limits geometrically.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    y_h = _unit(xyz[9] - xyz[0])
    n = _unit(np.cross(xyz[5] - xyz[17], y_h))  # palmar normal of a right hand
    hand = np.stack([np.cross(y_h, n), y_h, n], axis=1)
    out = np.zeros((5, 2))
    for c, chain in enumerate(CHAINS):
        bones = np.diff(xyz[chain], axis=0)
        plane = np.cross(bones[0], bones[1]) + np.cross(bones[1], bones[2])
        if np.linalg.norm(plane) < 1e-12 * np.linalg.norm(bones[0]) ** 2:
            continue  # straight chain: no bend
        ref = hand @ THUMB_FRAME[:, 0] if c == 0 else np.cross(bones[0], n)
        axis = _unit(plane) * (1.0 if plane @ ref >= 0 else -1.0)
        for k in range(2):
            u, v = bones[k], bones[k + 1]
            out[c, k] = math.degrees(math.atan2(np.cross(u, v) @ axis, u @ v))
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- capsules and palm
def capsules(shape: HandShape, joints: np.ndarray, frames: np.ndarray):
    """Per surface segment: axis start (16, 3), axis end (16, 3), radius at start and end (16,) each.

    A distal segment's axis stops one tip radius short of the fingertip joint, so the rounded tip
    ends exactly at the joint (FreiHAND's fingertips sit on the skin, not inside the finger).
    """
    parent = np.array([p for p, _ in SEGMENTS])
    child = np.array([c for _, c in SEGMENTS])
    r = shape.radii
    ra = np.concatenate([[0.8 * r[0, 0]], r[:, :3].ravel()])
    rb = np.concatenate([[r[0, 0]], r[:, 1:].ravel()])
    start = joints[parent]
    end = joints[child] - (DISTAL * rb)[:, None] * frames[:, :, 1]
    return start, end, ra, rb


def palm_edges(shape: HandShape) -> tuple[np.ndarray, np.ndarray]:
    """Knuckle-line control points (6, 3), ulnar -> radial, and their arc-length parameters (6,)."""
    side = np.array([1.0, 0.0, 0.0])
    ctrl = np.stack([shape.mcp[3] - shape.radii[4, 0] * side, shape.mcp[3], shape.mcp[2], shape.mcp[1],
                     shape.mcp[0], shape.mcp[0] + shape.radii[1, 0] * side])
    knots = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
    return ctrl, knots / knots[-1]


def palm_points(shape: HandShape, u: np.ndarray, w: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Points on the palm slab: u ulnar -> radial, w wrist -> knuckles, side +1 palmar / -1 dorsal.

    The slab is ruled between the wrist edge and the knuckle line; the palmar face bulges over the
    pads but not at the edges, so the 4 wrist corners still average to the wrist joint.
    """
    ctrl, knots = palm_edges(shape)
    knuckle = np.stack([np.interp(u, knots, ctrl[:, d]) for d in range(3)], -1)
    wrist = np.stack([(2.0 * u - 1.0) * shape.wrist_half_width, np.zeros_like(u), np.zeros_like(u)], -1)
    p = (1.0 - w)[:, None] * wrist + w[:, None] * knuckle
    bulge = np.where(side > 0, 0.35 * np.sin(np.pi * u) * np.sin(np.pi * w), 0.0)
    p[:, 2] += side * shape.palm_half_thickness * (1.0 + bulge)
    return p


def palm_outline(shape: HandShape) -> np.ndarray:
    """(16, 3) corners of the palm slab (both faces), whose projected hull is the drawn palm."""
    ctrl, _ = palm_edges(shape)
    ring = np.concatenate([[[-shape.wrist_half_width, 0.0, 0.0], [shape.wrist_half_width, 0.0, 0.0]], ctrl])
    h = np.array([0.0, 0.0, shape.palm_half_thickness])
    return np.concatenate([ring + h, ring - h])


# --------------------------------------------------------------------------- surface point set
@dataclass(frozen=True)
class SurfaceLayout:
    """Where each surface point sits; fixed for a given count. Capsule points first, then the palm."""

    seg: np.ndarray  # (Nc,) surface segment
    t: np.ndarray  # (Nc,) along the segment's axis, 0 base .. 1 end
    theta: np.ndarray  # (Nc,) around the axis: 0 = frame x, pi/2 = palmar
    psi: np.ndarray  # (Nc,) latitude on the tip cap: 0 on the cylinder, pi/2 at the fingertip
    u: np.ndarray  # (Np,) palm, ulnar 0 .. radial 1
    w: np.ndarray  # (Np,) palm, wrist 0 .. knuckles 1
    side: np.ndarray  # (Np,) +1 palmar face, -1 dorsal face

    @property
    def num_verts(self) -> int:
        return len(self.seg) + len(self.u)


def _split(total: int, weights: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Integer shares of `total` proportional to weights on top of per-part minimums (largest remainder)."""
    share = (total - minimum.sum()) * weights / weights.sum()
    n = minimum + np.floor(share).astype(int)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    n[order[: total - n.sum()]] += 1
    return n


def _segment_layout(n: int, distal: bool, length: float, radius: float):
    """Rings of points along one capsule (plus the tip cap and apex for a distal segment)."""
    m = n - int(distal)
    arc = length + (0.5 * math.pi * radius if distal else 0.0)
    k = int(np.clip(round(math.sqrt(m * 2.0 * math.pi * radius / arc)), 3, 16))
    rings = max(2, m // k)
    k = min(k, m // rings)
    extra = m - rings * k
    ncap = min(rings - 1, max(1, round(rings * 0.5 * math.pi * radius / arc))) if distal else 0
    ncyl = rings - ncap
    ring_t = np.concatenate([np.linspace(0.0, 1.0, ncyl) if ncyl > 1 else [0.0], np.ones(ncap)])
    ring_psi = np.concatenate([np.zeros(ncyl), np.linspace(0.0, 0.5 * math.pi, ncap + 2)[1:-1]])
    t, theta, psi = [], [], []
    for i in range(rings):
        t += [ring_t[i]] * k
        psi += [ring_psi[i]] * k
        theta += list(2.0 * math.pi * (np.arange(k) + 0.5 * (i % 2)) / k)
    t += [0.5] * extra  # the points that do not fill a ring go around the middle
    psi += [0.0] * extra
    theta += list(2.0 * math.pi * (np.arange(extra) + 0.25) / max(extra, 1))
    if distal:
        t, psi, theta = t + [1.0], psi + [0.5 * math.pi], theta + [0.0]
    return np.array(t), np.array(theta), np.array(psi)


def _palm_face(nf: int) -> tuple[np.ndarray, np.ndarray]:
    """A grid over the face (rows at the wrist and knuckle edges) plus an R2 sequence for the rest."""
    nw = max(2, int(math.sqrt(1.5 * nf)))
    nu = max(2, nf // nw)
    while nu * nw > nf:
        nw -= 1
    uu, ww = np.meshgrid(np.linspace(0.0, 1.0, nu), np.linspace(0.0, 1.0, nw))
    j = np.arange(nf - nu * nw)
    eu = 0.1 + 0.8 * np.mod(0.5 + j * 0.7548776662466927, 1.0)
    ew = 0.1 + 0.8 * np.mod(0.5 + j * 0.5698402909980532, 1.0)
    return np.concatenate([uu.ravel(), eu]), np.concatenate([ww.ravel(), ew])


@lru_cache(maxsize=8)
def surface_layout(num_verts: int = 778) -> SurfaceLayout:
    """The fixed topology for `num_verts` points: the same count and meaning for every hand.

    Every joint is an exact fixed average of points (a full ring at each segment end, the apex at each
    fingertip, the 4 wrist corners of the palm), so a linear joint regressor from points is exact.
    """
    if not isinstance(num_verts, (int, np.integer)) or num_verts < MIN_VERTS:
        raise ConfigError(f"num_verts must be an int >= {MIN_VERTS}, got {num_verts!r}")
    num_verts = int(num_verts)
    joints, frames = forward(NEUTRAL_SHAPE, np.zeros((5, 4)))
    start, end, ra, rb = capsules(NEUTRAL_SHAPE, joints, frames)
    length = np.linalg.norm(end - start, axis=1)
    radius = 0.5 * (ra + rb)
    n_palm = max(12, round(0.3 * num_verts))
    per_seg = _split(num_verts - n_palm, length * radius + DISTAL * rb ** 2, 6 + DISTAL.astype(int))
    parts = [_segment_layout(int(n), bool(d), float(L), float(r))
             for n, d, L, r in zip(per_seg, DISTAL, length, radius)]
    seg = np.concatenate([np.full(int(n), s) for s, n in enumerate(per_seg)])
    t, theta, psi = (np.concatenate([p[i] for p in parts]) for i in range(3))
    faces = [_palm_face((n_palm + 1) // 2), _palm_face(n_palm // 2)]
    u = np.concatenate([f[0] for f in faces])
    w = np.concatenate([f[1] for f in faces])
    side = np.concatenate([np.ones(len(faces[0][0])), -np.ones(len(faces[1][0]))])
    out = SurfaceLayout(seg, t, theta, psi, u, w, side)
    for a in (seg, t, theta, psi, u, w, side):
        a.flags.writeable = False  # shared through the cache
    assert out.num_verts == num_verts, (out.num_verts, num_verts)
    return out


def surface_points(shape: HandShape, joints: np.ndarray, frames: np.ndarray, layout: SurfaceLayout) -> np.ndarray:
    """(num_verts, 3) points on the hand's surface in the hand frame, in the layout's fixed order."""
    start, end, ra, rb = capsules(shape, joints, frames)
    s, t = layout.seg, layout.t[:, None]
    axis = start[s] + t * (end[s] - start[s])
    r = ra[s] + layout.t * (rb[s] - ra[s])
    f = frames[s]
    cp = np.cos(layout.psi)[:, None]
    around = np.cos(layout.theta)[:, None] * f[:, :, 0] + np.sin(layout.theta)[:, None] * f[:, :, 2]
    caps = axis + r[:, None] * (cp * around + np.sin(layout.psi)[:, None] * f[:, :, 1])
    palm = palm_points(shape, layout.u, layout.w, layout.side)
    return np.concatenate([caps, palm])
