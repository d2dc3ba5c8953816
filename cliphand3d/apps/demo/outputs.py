"""What the demo writes: the JSON entries (a video's written frame by frame), the skeleton picture and 3D view.
The annotated video's writer: video.py."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ... import viz
from ...skeleton import SCALE_BONE
from .inputs import Settings

JOINT_ORDER = ("MPII/FreiHAND: 0 wrist; thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20; "
               "each finger base -> tip")
FRAME = "camera frame of the input image (the crop changes only the intrinsics): x right, y down, z forward, metres"


def _r(a, nd: int):
    return np.round(np.asarray(a, np.float64), nd).tolist()


def hand_record(res: dict) -> dict:
    """What the JSON says about one hand: 2D joints, 3D joints and vertices, and how they were placed."""
    rec = {
        "joints_2d_px": _r(res["joints_2d"], 3),
        "joints_xyz_m": _r(res["joints_xyz"], 7),
        "root_depth_m": round(res["root_depth"], 7),
        "bone_m": round(res["bone"], 7),
        "placement_exact": res["exact"],
        "K_crop": _r(res["K_crop"], 6),
        "crop": {"center_px": _r(res["crop_center"], 3), "side_px": round(float(res["crop_size"]), 3)},
    }
    if "verts_xyz" in res:
        rec["verts_xyz_m"] = _r(res["verts_xyz"], 7)
    return rec


def placement_note(hand_scale: float) -> str:
    return (f"assumed hand size: |joint {SCALE_BONE[0]} - joint {SCALE_BONE[1]}| (middle MCP -> PIP) = {hand_scale} m "
            "(hand_scale=); root depth and bone (|joint 0 - joint 9|) follow from it and the predicted uvd "
            "(geometry.root_and_bone_from_uvd); distances scale with that assumption and the focal length")


def header(path: Path, s: Settings, size_wh, box, K: np.ndarray, k_note: str, hand_scale: float) -> dict:
    """The JSON entries that say what was run and how to read the numbers."""
    return {"file": str(path), "hand": s.hand, "image_size_wh": list(size_wh),
            "box_xywh": None if box is None else list(box), "K": _r(K, 6), "K_source": k_note,
            "joint_order": JOINT_ORDER, "coordinates": FRAME, "placement": placement_note(hand_scale)}


def save_views(stem: str, out: Path, image: np.ndarray, res: dict) -> list[Path]:
    paths = [out / f"{stem}_skeleton.png", out / f"{stem}_3d.png"]
    drawn = viz.draw_skeleton(image, res["joints_2d"])
    if not cv2.imwrite(str(paths[0]), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {paths[0]}")
    fig = viz.skeleton_3d_figure(res["joints_xyz"], res.get("verts_xyz"), title=stem)
    viz.save_figure(fig, paths[1], dpi=100)
    return paths


class FrameLog:
    """A video's JSON, written as its frames come so that memory holds one frame however long a camera runs:
    the header's entries, "frames": [...] (each frame flushed to disk), then the closing entries (close()).
    A run killed outright, not stopped with Ctrl-C, leaves the file without its closing "]}"."""

    def __init__(self, path: Path, head: dict):
        self.path, self.count = path, 0
        self.file = open(path, "w", encoding="utf-8")
        body = json.dumps(head)[1:-1]
        self.file.write("{" + body + (", " if body else "") + '"frames": [')

    def add(self, record: dict) -> None:
        self.file.write(("," if self.count else "") + "\n" + json.dumps(record))
        self.file.flush()
        self.count += 1

    def close(self, **tail) -> None:
        if self.file.closed:
            return
        self.file.write("\n]" + "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in tail.items()) + "}\n")
        self.file.close()
