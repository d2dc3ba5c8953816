"""Procedural hands written in the exact on-disk layouts of FreiHAND v2 and RHD.

These folders are the fixtures of the real loaders (`FreiHAND`, `RHD`) and of scripts/check_data.py,
so the readers are tested on files shaped like the downloads, not on in-memory shortcuts. Hands come
from `synthetic.sample_hand` / `synthetic.render`; this module only adds what each format stores.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np

from ..geometry import mirror_lr, project
from ..skeleton import BONES, FINGER_CHAINS, FINGERS, NUM_JOINTS, mpii_to_rhd
from . import rhd
from .hand_model import SEGMENTS
from .render import render
from .synthetic import EVAL_SEED_OFFSET, VIEWS, frame_like_freihand, sample_hand

JPEG_QUALITY = 95
MANO_PARAMS = 61  # FreiHAND's training_mano entries are 1 x 61; we have no MANO fit and write zeros
RHD_SIZE = 320
OTHER_HAND_STREAM = 1 << 30  # the unseen second hand of an RHD sample is drawn from its own stream
# write_freihand's framing: "drawn" = where sample_hand puts the hand (fill 0.5-0.8 of the image, anywhere
# inside it); "freihand" = as the release frames its hands (synthetic.frame_like_freihand: the joints' box
# centred, 0.38 of the image side)
FREIHAND_FRAMINGS = ("drawn", "freihand")


# --------------------------------------------------------------------------- file helpers
def _write_image(path: Path, rgb: np.ndarray, jpeg: bool = False) -> None:
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if jpeg else []
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write {path}")


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with raw bytes written as Python 2 `str` opcodes, as in RHD's own pickles (made by
    Python 2). Python 3's protocol 2 wraps bytes in `_codecs.encode(...)` calls instead, which a
    plain-data unpickler rightly refuses; the real files never contain them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _eval_stream(seed: int) -> int:
    return int(seed) + EVAL_SEED_OFFSET


# --------------------------------------------------------------------------- FreiHAND v2
def write_freihand(out: str | Path, num_train: int, num_eval: int, seed: int, versions: int = 4,
                   img_size: int = 224, eval_gt: bool = True, view: str = "uniform", framing: str = "drawn") -> Path:
    """FreiHAND_pub_v2 layout under `out` (plus the FreiHAND_pub_v2_eval ground truth when eval_gt).

    `view` is the viewpoint prior of `synthetic.sample_hand` ("upright" is FreiHAND-like); `framing` where
    the hand sits in the image (FREIHAND_FRAMINGS; "freihand" as the release, "drawn" as sample_hand draws it).
    Training: `num_train` unique hands, each rendered over `versions` backgrounds; file id =
    hand + num_train * version, as the release's hand + 32560 * version. Masks for unique ids only.
    training_mano entries are 1x61 zeros (no MANO fit exists for procedural hands).
    """
    if num_train < 1 or num_eval < 0 or not 1 <= versions <= 4:
        raise ValueError(f"write_freihand: need num_train >= 1, num_eval >= 0, versions in 1..4; got "
                         f"{num_train}, {num_eval}, {versions}")
    if view not in VIEWS:
        raise ValueError(f"write_freihand: view={view!r} is not one of {VIEWS}")
    if framing not in FREIHAND_FRAMINGS:
        raise ValueError(f"write_freihand: framing={framing!r} is not one of {FREIHAND_FRAMINGS}")

    def draw(stream: int, index: int):
        hand = sample_hand(stream, index, img_size=img_size, view=view)
        return frame_like_freihand(hand) if framing == "freihand" else hand

    out = Path(out)
    rgb_dir, mask_dir, eval_dir = out / "training" / "rgb", out / "training" / "mask", out / "evaluation" / "rgb"
    for d in (rgb_dir, mask_dir, eval_dir):
        d.mkdir(parents=True, exist_ok=True)
    labels: dict[str, list] = {"K": [], "xyz": [], "verts": [], "scale": [], "mano": []}
    for i in range(num_train):
        hand = draw(int(seed), i)
        for v in range(versions):
            image, mask = render(hand, background=v)
            _write_image(rgb_dir / f"{i + num_train * v:08d}.jpg", image, jpeg=True)
            if v == 0:
                _write_image(mask_dir / f"{i:08d}.jpg", mask * np.uint8(255), jpeg=True)
        _append_labels(labels, hand)
        labels["mano"].append([[0.0] * MANO_PARAMS])
    for key, value in labels.items():
        _write_json(out / f"training_{key}.json", value)
    ev: dict[str, list] = {"K": [], "xyz": [], "verts": [], "scale": []}
    for j in range(num_eval):
        hand = draw(_eval_stream(seed), j)
        image, _ = render(hand, background=0)
        _write_image(eval_dir / f"{j:08d}.jpg", image, jpeg=True)
        _append_labels(ev, hand)
    _write_json(out / "evaluation_K.json", ev["K"])
    _write_json(out / "evaluation_scale.json", ev["scale"])
    if eval_gt:
        _write_json(out / "evaluation_xyz.json", ev["xyz"])
        _write_json(out / "evaluation_verts.json", ev["verts"])
        _write_json(out / "evaluation_mano.json", [[[0.0] * MANO_PARAMS] for _ in range(num_eval)])
    return out


def _append_labels(labels: dict, hand) -> None:
    labels["K"].append(hand.K.tolist())
    labels["xyz"].append(hand.xyz.tolist())
    labels["verts"].append(hand.verts.tolist())
    # FreiHAND's metric scale: the length of the middle finger's first bone (MCP -> PIP)
    labels["scale"].append(float(np.linalg.norm(hand.xyz[9] - hand.xyz[10])))


# --------------------------------------------------------------------------- RHD
def encode_depth(depth_m: np.ndarray) -> np.ndarray:
    """Metres (H, W) -> RHD depth as RGB uint8 (H, W, 3): 16-bit code over 0..5 m, R high byte, G low."""
    code = np.clip(np.round(np.asarray(depth_m, np.float64) / rhd.DEPTH_MAX_M * 65535.0), 0, 65535).astype(np.uint16)
    rgb = np.zeros(code.shape + (3,), np.uint8)
    rgb[..., 0], rgb[..., 1] = code >> 8, code & 0xFF
    return rgb


def _segment_distance(px: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (P, S) from points (P, 2) to segments a->b (S, 2), and the segment parameter t (P, S)."""
    d = b - a
    t = np.clip(((px[:, None] - a[None]) * d[None]).sum(-1) / np.maximum((d * d).sum(-1), 1e-9)[None], 0.0, 1.0)
    closest = a[None] + t[..., None] * d[None]
    return np.linalg.norm(px[:, None] - closest, axis=-1), t


def _part_ids() -> np.ndarray:
    """Mask class offset (0..15) for each skeleton bone, RHD-style: per finger 3 classes listed tip
    first, then one palm class for the wrist->base bones."""
    ids = []
    for parent, child in BONES:
        if parent == 0:
            ids.append(15)
            continue
        finger = next(i for i, f in enumerate(FINGERS) if child in FINGER_CHAINS[f])
        seg = FINGER_CHAINS[FINGERS[finger]].index(child) - 1  # 0 proximal .. 2 distal
        ids.append(3 * finger + (2 - seg))
    return np.array(ids)


def _label_hand(mask: np.ndarray, xyz: np.ndarray, K: np.ndarray, first_id: int):
    """Per-pixel class ids (nearest skeleton bone in the image) and depth (that bone's depth there)."""
    ys, xs = np.nonzero(mask)
    uv = project(xyz, K)
    a = uv[[p for p, _ in BONES]]
    b = uv[[c for _, c in BONES]]
    dist, t = _segment_distance(np.stack([xs, ys], 1).astype(np.float64), a, b)
    nearest = dist.argmin(1)
    za, zb = xyz[[p for p, _ in BONES], 2], xyz[[c for _, c in BONES], 2]
    tn = t[np.arange(len(xs)), nearest]
    labels = np.zeros(mask.shape, np.uint8)
    depth = np.zeros(mask.shape, np.float64)
    labels[ys, xs] = first_id + _part_ids()[nearest]
    depth[ys, xs] = za[nearest] + tn * (zb[nearest] - za[nearest])
    return labels, depth


def _visible(hand, mask: np.ndarray) -> np.ndarray:
    """A joint is visible when it is in the image, on the hand mask and no capsule that does not hold
    it lies in front of it along its ray (occlusion by another finger or the forearm)."""
    uv = project(hand.xyz, hand.K)
    S = mask.shape[0]
    inside = np.all((uv >= 0) & (uv <= S - 1), axis=1)
    px = np.clip(np.round(uv).astype(int), 0, S - 1)
    on_mask = mask[px[:, 1], px[:, 0]] > 0
    a3, b3 = hand.cap_start, hand.cap_end
    a, b = project(a3, hand.K), project(b3, hand.K)
    dist, t = _segment_distance(uv, a, b)
    f = hand.K[0, 0]
    z = a3[None, :, 2] + t * (b3[None, :, 2] - a3[None, :, 2])
    r3 = hand.cap_r0[None] + t * (hand.cap_r1 - hand.cap_r0)[None]
    covers = dist < f * r3 / z
    in_front = z + r3 < hand.xyz[:, 2:3] - 0.002
    holds = np.zeros_like(covers)  # capsule i < 16 is segment i; the rest are forearm/sleeve
    for i, (p, c) in enumerate(SEGMENTS):
        holds[[p, c], i] = True
    occluded = (covers & in_front & ~holds).any(1)
    return inside & on_mask & ~occluded


def _rhd_sample(seed: int, index: int, left: bool, rng: np.random.Generator):
    """One RHD sample: colour, mask ids, depth code and the 42-keypoint annotation."""
    hand = sample_hand(seed, index, img_size=RHD_SIZE)
    image, mask = render(hand, background=0)
    # pixels that do not change with the background are foreground; outside the hand mask, the forearm
    second, _ = render(hand, background=1)
    same = np.all(image == second, axis=-1) & (mask == 0)
    person = cv2.morphologyEx(same.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    labels, depth = _label_hand(mask, hand.xyz, hand.K, rhd.RIGHT_IDS[0])
    labels[person] = rhd.PERSON
    background = rng.uniform(2.0, 4.5)  # a wall behind the scene, well inside the 5 m code range
    depth[labels == rhd.BACKGROUND] = background
    depth[person] = hand.xyz[0, 2]
    visible = _visible(hand, mask)
    # the second hand: a mirrored (left) procedural hand beside the field of view, so never visible
    other = sample_hand(seed + OTHER_HAND_STREAM, index, img_size=RHD_SIZE).xyz * np.array([-1.0, 1.0, 1.0])
    side = rng.choice([-1.0, 1.0])
    other = other + np.array([side * other[0, 2] * 1.5 * RHD_SIZE / hand.K[0, 0], 0.0, 0.0])
    xyz, K = hand.xyz, hand.K
    if left:  # mirror the whole scene: the drawn hand becomes a left hand, the unseen one a right hand
        image, xyz, K = mirror_lr(image, xyz, K, RHD_SIZE)
        _, other, _ = mirror_lr(None, other, hand.K, RHD_SIZE)
        labels, depth = labels[:, ::-1].copy(), depth[:, ::-1].copy()
        hand_px = labels >= rhd.RIGHT_IDS[0]
        labels[hand_px] -= rhd.RIGHT_IDS[0] - rhd.LEFT_IDS[0]
    uv_vis = np.zeros((2 * NUM_JOINTS, 3))
    xyz42 = np.zeros((2 * NUM_JOINTS, 3))
    own, unseen = slice(0, NUM_JOINTS), slice(NUM_JOINTS, None)  # RHD: left hand first
    if not left:
        own, unseen = unseen, own
    xyz42[own], xyz42[unseen] = mpii_to_rhd(xyz), mpii_to_rhd(other)
    uv_vis[own, :2], uv_vis[unseen, :2] = mpii_to_rhd(project(xyz, K)), mpii_to_rhd(project(other, K))
    uv_vis[own, 2] = mpii_to_rhd(visible[:, None])[:, 0]
    anno = {"xyz": xyz42.astype(np.float32), "uv_vis": uv_vis.astype(np.float32), "K": K.astype(np.float32)}
    return image, labels, encode_depth(depth), anno


def write_rhd(out: str | Path, num_train: int, num_eval: int, seed: int) -> Path:
    """RHD_published_v2 layout under `out`: {training,evaluation}/{color,mask,depth}/%05d.png and
    anno_{split}.pickle (protocol 2, plain dicts of numpy arrays). Every second sample is a left hand
    (the procedural right hand, mirrored); the other hand's 21 slots hold an unseen hand, all invisible."""
    if num_train < 1 or num_eval < 0:
        raise ValueError(f"write_rhd: need num_train >= 1 and num_eval >= 0, got {num_train}, {num_eval}")
    out = Path(out)
    for split, n, stream in (("training", num_train, int(seed)), ("evaluation", num_eval, _eval_stream(seed))):
        dirs = {k: out / split / k for k in ("color", "mask", "depth")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        anno = {}
        for i in range(n):
            rng = np.random.default_rng([stream, i, 7])
            image, labels, depth_rgb, anno[i] = _rhd_sample(stream, i, left=i % 2 == 1, rng=rng)
            _write_image(dirs["color"] / f"{i:05d}.png", image)
            _write_image(dirs["mask"] / f"{i:05d}.png", labels)
            _write_image(dirs["depth"] / f"{i:05d}.png", depth_rgb)
        with open(out / split / f"anno_{split}.pickle", "wb") as f:
            _Py2Pickler(f, protocol=2).dump(anno)
    return out
