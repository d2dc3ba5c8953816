"""Conventions checked against real labels (../shared/real_samples, see its README): 3 RHD renders with
3D joints in mm (COCO-like json) rebuilt into the RHD layout, and 8 FreiHAND photos with 2D keypoints."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cliphand3d.data import rhd as rhd_mod
from cliphand3d.data.freihand import RELEASE_UNIQUE_TRAIN, file_id
from cliphand3d.data.rhd import RHD
from cliphand3d.data.transforms import CropAugment
from cliphand3d.data.writers import encode_depth
from cliphand3d.geometry import crop_affine, project
from cliphand3d.skeleton import BONES, FINGER_CHAINS, NUM_JOINTS, rhd_to_mpii

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_samples"
S = 256


def needs(sub: str) -> Path:
    path = REAL / sub
    if not path.is_dir():
        pytest.skip(f"real samples not found at {path}")
    return path


def chirality(xyz: np.ndarray) -> float:
    """> 0 for right hands when the fingers bend at all: they curl towards the palm side, and
    (index MCP - little MCP) x (middle MCP - wrist) points out of a right hand's palm."""
    n = np.cross(xyz[5] - xyz[17], xyz[9] - xyz[0])
    return float(np.mean([(xyz[c[3]] - xyz[c[0]]) @ n for c in FINGER_CHAINS.values()]))


def wrist_first(pts: np.ndarray) -> bool:
    """In MPII order every finger starts at its base, next to the wrist, and ends at its tip."""
    base = sum(np.linalg.norm(pts[c[0]] - pts[0]) for c in FINGER_CHAINS.values())
    tip = sum(np.linalg.norm(pts[c[3]] - pts[0]) for c in FINGER_CHAINS.values())
    return base < tip


def rhd_layout_from_json(src: Path, out: Path) -> list[dict]:
    """Test helper: the COCO-like json -> RHD's evaluation layout. Masks are painted along the labelled
    skeleton with the hand's class ids (the json has no masks); depth is a constant 1 m."""
    data = json.loads((src / "test_rhd.json").read_text())
    split = out / "evaluation"
    for sub in ("color", "mask", "depth"):
        (split / sub).mkdir(parents=True, exist_ok=True)
    anno, records = {}, []
    for img, ann in zip(data["images"], data["annotations"]):
        assert img["id"] == ann["image_id"]
        sid, side = img["id"], ann["hand_type"]
        name = f"{sid:05d}.png"
        assert name == img["file_name"]
        shutil.copy(src / name, split / "color" / name)
        kp = np.array(ann["keypoints"], np.float64)
        first = rhd_mod.LEFT_IDS[0] if side == "left" else rhd_mod.RIGHT_IDS[0]
        mask = np.zeros((img["height"], img["width"]), np.uint8)
        for a, b in BONES:  # BONES index MPII order; the json is in RHD order
            pa, pb = rhd_to_mpii(kp)[[a, b], :2]
            cv2.line(mask, tuple(np.round(pa).astype(int)), tuple(np.round(pb).astype(int)), first + 3, 7)
        cv2.imwrite(str(split / "mask" / name), mask)
        cv2.imwrite(str(split / "depth" / name), cv2.cvtColor(encode_depth(np.ones(mask.shape)), cv2.COLOR_RGB2BGR))
        (fx, fy), (cx, cy) = img["cam_param"]["focal"], img["cam_param"]["princpt"]
        slots = slice(0, NUM_JOINTS) if side == "left" else slice(NUM_JOINTS, None)
        xyz, uv_vis = np.zeros((42, 3)), np.zeros((42, 3))
        xyz[slots] = np.array(ann["joint_cam"]) / 1000.0  # mm -> m
        uv_vis[slots] = kp
        # plain lists are plain data too; the loader turns them into arrays
        anno[sid] = {"xyz": xyz.tolist(), "uv_vis": uv_vis.tolist(), "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]}
        records.append({"id": sid, "side": side, "kp": kp, "xyz": np.array(ann["joint_cam"]) / 1000.0, "mask": mask})
    with open(split / "anno_evaluation.pickle", "wb") as f:
        pickle.dump(anno, f, protocol=2)
    return sorted(records, key=lambda r: r["id"])


def test_real_rhd_samples_load_as_right_hands(tmp_path):
    src = needs("rhd")
    records = rhd_layout_from_json(src, tmp_path / "rhd")
    ds = RHD(tmp_path / "rhd", split="eval", img_size=S)
    assert len(ds) == 3 and {r["side"] for r in records} == {"left", "right"}
    for i, rec in enumerate(records):
        raw = ds.load_raw(i)
        assert raw.extra["side"] == rec["side"] and raw.extra["id"] == rec["id"]
        left = rec["side"] == "left"
        # the labels themselves: chirality says which hand the json holds (RHD order -> MPII first)
        assert (chirality(rhd_to_mpii(rec["xyz"])) > 0) == (not left)
        assert not wrist_first(rec["xyz"])  # RHD order is tip -> base, so this check can fail
        # loaded: wrist at 0, every hand a right hand
        assert wrist_first(raw.xyz) and chirality(raw.xyz) > 0
        colour = cv2.cvtColor(cv2.imread(str(src / f"{rec['id']:05d}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(raw.image, colour[:, ::-1] if left else colour)
        # reprojection of the 3D labels onto the labelled 2D keypoints, in the full image ...
        kp = rhd_to_mpii(rec["kp"])[:, :2]
        if left:
            kp[:, 0] = 319 - kp[:, 0]
        assert np.abs(project(raw.xyz, raw.K) - kp).max() < 1.0
        # ... and in the crop, with the box taken from the painted mask
        hand = rec["mask"][:, ::-1] if left else rec["mask"]
        ys, xs = np.nonzero(hand)
        size = max(np.ptp(xs), np.ptp(ys)) * CropAugment(train=False).scale
        A = crop_affine(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2), size, S)
        item = ds[i]
        uv = project(item["joints_xyz"].double().numpy(), item["K"].double().numpy())
        assert np.abs(uv - (kp @ A[:2, :2].T + A[:2, 2])).max() < 1.0 * S / size + 1e-6
        assert item["joints_uvd"][0, 2].item() == 0.0 and item["visible"].all()


def test_real_freihand_keypoints_match_our_order_and_version_ids():
    src = needs("freihand")
    data = json.loads((src / "test_freihand.json").read_text())
    kp = {a["image_id"]: np.array(a["keypoints"], np.float64).reshape(NUM_JOINTS, 3)[:, :2]
          for a in data["annotations"]}
    assert {p.stem.lstrip("0") for p in src.glob("*.jpg")} == {str(i) for i in kp}
    for uid in (355, 17620):
        ids = [file_id(uid, v, RELEASE_UNIQUE_TRAIN) for v in range(4)]
        assert all(i in kp for i in ids)  # the loader's id scheme names exactly the released versions
        for i in ids[1:]:
            np.testing.assert_array_equal(kp[i], kp[ids[0]])
        pts = kp[uid]
        assert wrist_first(pts) and not wrist_first(rhd_to_mpii(pts))
        # 2D bones of our skeleton are short; the same indices read in RHD order give longer ones
        ours = np.mean([np.linalg.norm(pts[a] - pts[b]) for a, b in BONES])
        swapped = np.mean([np.linalg.norm(rhd_to_mpii(pts)[a] - rhd_to_mpii(pts)[b]) for a, b in BONES])
        assert ours < swapped
