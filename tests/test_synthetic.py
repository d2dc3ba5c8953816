"""Procedural hands: determinism, labels vs image, anatomy and chirality, joint limits, the fixed
vertex topology, background versions, and dataset items that keep the contract."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cliphand3d.data.hand_model import CHAINS, LIMITS_HI, LIMITS_LO, MIN_VERTS, flexion_angles, surface_layout
from cliphand3d.data.render import _draw_order, render
from cliphand3d.data.sample import check_item
from cliphand3d.data.synthetic import UPRIGHT_TILT_DEG, SyntheticHands, render_hand, sample_hand
from cliphand3d.data.transforms import CropAugment
from cliphand3d.geometry import project
from cliphand3d.skeleton import BONES, rhd_to_mpii

RHD_JSON = Path(__file__).resolve().parents[2] / "shared" / "real_samples" / "rhd" / "test_rhd.json"
S = 224


@pytest.fixture(scope="module")
def hands():
    return [sample_hand(11, i) for i in range(60)]


def _palm_normal(xyz):
    """(index MCP - little MCP) x (wrist -> middle MCP): out of the palm for a right hand."""
    y = xyz[9] - xyz[0]
    n = np.cross(xyz[5] - xyz[17], y)
    return n / np.linalg.norm(n)


# --------------------------------------------------------------------------- determinism
def test_same_key_same_sample_and_different_index_differs():
    a, b = render_hand(3, 7), render_hand(3, 7)
    for k in ("image", "mask", "K", "xyz", "verts"):
        np.testing.assert_array_equal(a[k], b[k])
    c = render_hand(3, 8)
    assert not np.array_equal(a["image"], c["image"])
    assert np.abs(a["xyz"] - c["xyz"]).max() > 1e-3
    d = render_hand(4, 7)  # another seed is another stream
    assert np.abs(a["xyz"] - d["xyz"]).max() > 1e-3


def test_render_outputs_and_bad_keys():
    out = render_hand(0, 1)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (S, S, 3)
    assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) <= {0, 1}
    assert out["xyz"].shape == (21, 3) and out["xyz"].dtype == np.float64
    assert render_hand(0, 1, img_size=128)["image"].shape == (128, 128, 3)
    with pytest.raises(ValueError, match="seed"):
        sample_hand(-1, 0)
    with pytest.raises(ValueError, match="index"):
        sample_hand(0, 1.5)
    with pytest.raises(ValueError, match="background"):
        render(sample_hand(0, 0), background=-1)


# --------------------------------------------------------------------------- labels vs image
def test_joints_inside_image_covered_by_mask_and_hand_fills_the_crop(hands):
    inside, covered, fill = [], [], []
    for h in hands:
        image, mask = render(h, blur=False)
        assert (h.xyz[:, 2] > 0).all() and (h.verts[:, 2] > 0).all()
        uv = project(h.xyz, h.K)
        inside.append(((uv >= 0) & (uv <= S - 1)).all())
        near = cv2.dilate(mask, np.ones((5, 5), np.uint8))  # a joint may sit on the silhouette's edge
        ij = np.clip(np.round(uv).astype(int), 0, S - 1)
        covered.append(near[ij[:, 1], ij[:, 0]].mean())
        fill.append(np.ptp(project(h.verts, h.K), axis=0).max() / S)
        ys, xs = np.nonzero(mask)
        # the mask sits on the projected surface: its box is no larger than the vertices' box
        assert max(np.ptp(xs), np.ptp(ys)) / S <= fill[-1] + 0.05
    assert np.mean(inside) >= 0.95
    assert np.mean(covered) >= 0.9  # only the forearm may hide joints
    assert 0.45 <= min(fill) and max(fill) <= 0.85  # FreiHAND-like: the hand fills most of the crop


def test_vertices_project_onto_the_mask(hands):
    for h in hands[:10]:
        _, mask = render(h, blur=False)
        near = cv2.dilate(mask, np.ones((5, 5), np.uint8))
        ij = np.clip(np.round(project(h.verts, h.K)).astype(int), 0, S - 1)
        # visible or hidden behind the hand itself; only the forearm can cover hand surface
        assert near[ij[:, 1], ij[:, 0]].mean() > 0.85


# --------------------------------------------------------------------------- anatomy, order, chirality
def test_mpii_order_and_anatomy(hands):
    for h in hands:
        x = h.xyz
        lengths = np.array([np.linalg.norm(x[c] - x[p]) for p, c in BONES])
        assert (lengths > 0.012).all() and (lengths < 0.12).all()
        assert 0.065 < np.linalg.norm(x[9] - x[0]) < 0.115  # wrist -> middle MCP, adult range
        mcp = x[[5, 9, 13, 17]]
        # MCPs are the knuckle line, ~9 cm from the wrist; the thumb base (1) is much nearer
        assert (np.linalg.norm(mcp - x[0], axis=1) > 0.055).all()
        assert np.linalg.norm(x[1] - x[0]) < 0.6 * np.linalg.norm(x[9] - x[0])
        # knuckles run index -> little away from the thumb
        d = np.linalg.norm(mcp - x[1], axis=1)
        assert (np.diff(d) > 0).all()
        # straight-ish fingers: tip beyond the MCP
        for c in range(1, 5):
            if h.angles_deg[c, 1:].sum() < 60:
                tip, base = CHAINS[c][3], CHAINS[c][0]
                assert np.linalg.norm(x[tip] - x[0]) > np.linalg.norm(x[base] - x[0])


def _rhd_right_hands():
    data = json.loads(RHD_JSON.read_text())
    out = []
    for a in data["annotations"]:
        x = rhd_to_mpii(np.asarray(a["joint_cam"], dtype=np.float64) / 1000.0)
        out.append(x * [-1.0, 1.0, 1.0] if a["hand_type"] == "left" else x)
    return out


@pytest.mark.skipif(not RHD_JSON.is_file(), reason="real RHD samples not present")
def test_chirality_and_flexion_sign_match_real_right_hands(hands):
    """The conventions the synthetic hands are checked with, first checked on real labels."""
    for x in _rhd_right_hands():
        n = _palm_normal(x)
        assert (x[1] - x[[0, 5, 9, 13, 17]].mean(0)) @ n > 0.005  # thumb base bulges palmar
        assert (flexion_angles(x)[1:, 0] > 10).all()  # real fingers bend towards the palm...
        assert (flexion_angles(x * [-1.0, 1.0, 1.0])[1:, 0] < -10).all()  # ...a mirrored hand would not
    for h in hands:
        n = _palm_normal(h.xyz)
        assert (h.xyz[1] - h.xyz[[0, 5, 9, 13, 17]].mean(0)) @ n > 0.005


def test_joint_limits_hold_geometrically(hands):
    for h in hands:
        bend = flexion_angles(h.xyz)  # measured from the joints alone
        assert (bend >= LIMITS_LO[:, 2:] - 1e-6).all() and (bend <= LIMITS_HI[:, 2:] + 1e-6).all()
        np.testing.assert_allclose(bend, h.angles_deg[:, 2:], atol=1e-6)  # kinematics == its angles
        n = _palm_normal(h.xyz)
        for c in range(1, 5):  # MCP flexion: proximal phalanx out of the palm plane
            a = h.xyz[CHAINS[c][1]] - h.xyz[CHAINS[c][0]]
            mcp = np.degrees(np.arcsin(a @ n / np.linalg.norm(a)))
            assert LIMITS_LO[c, 1] - 3 <= mcp <= LIMITS_HI[c, 1] + 3  # palm normal ~2 deg off the model's
    sampled = np.stack([h.angles_deg for h in hands])
    assert (sampled[:, 1:, 2].max() > 80) and (sampled[:, 1:, 2].min() < 10)  # fists and open hands


def test_curled_fingers_are_drawn_on_the_correct_side_of_the_palm():
    """Painter's order: a fist's fingertips cover the palm when the palm faces the camera and hide
    behind it when the back of the hand does."""
    seen = {True: 0, False: 0}
    for i in range(300):
        h = sample_hand(21, i)
        toward = _palm_normal(h.xyz) @ -h.xyz[0] / np.linalg.norm(h.xyz[0])
        if abs(toward) < 0.7:
            continue
        behind, front = _draw_order(h)
        for c in range(1, 5):
            if h.angles_deg[c, 1] > 40 and h.angles_deg[c, 2] > 70:
                distal = 3 + 3 * c  # segment index (hand_model.SEGMENTS)
                assert distal in (front if toward > 0 else behind), (i, c)
                seen[toward > 0] += 1
    assert seen[True] > 3 and seen[False] > 3


# --------------------------------------------------------------------------- vertex set
def test_vertex_topology_is_fixed_and_joints_are_linear_in_vertices():
    ds = SyntheticHands(length=330, seed=2)
    xyz, verts = ds.all_labels()
    assert verts.shape == (330, 778, 3) and xyz.shape == (330, 21, 3)
    assert sample_hand(0, 5, num_verts=300).verts.shape == (300, 3)
    # a least-squares joint regressor fitted on 300 hands predicts the other 30 (the mesh template's J)
    A = verts[:300].astype(np.float64).transpose(0, 2, 1).reshape(-1, 778)
    B = xyz[:300].astype(np.float64).transpose(0, 2, 1).reshape(-1, 21)
    J = np.linalg.lstsq(A, B, rcond=None)[0].T  # (21, 778)
    pred = np.einsum("jv,mvc->mjc", J, verts[300:].astype(np.float64))
    assert np.abs(pred - xyz[300:]).max() < 5e-4  # metres
    # fixed meaning: vertex k stays on the same part of the hand, near the same joint
    nearest = np.linalg.norm(verts[:, :, None] - xyz[:, None], axis=-1).argmin(-1)  # (M, V)
    agree = (nearest == np.median(nearest, axis=0)).mean()
    assert agree > 0.8


def test_num_verts_validation():
    assert surface_layout(MIN_VERTS).num_verts == MIN_VERTS
    with pytest.raises(ValueError, match="num_verts"):
        surface_layout(MIN_VERTS - 1)
    with pytest.raises(ValueError, match="num_verts"):
        SyntheticHands(length=2, num_verts=50)


# --------------------------------------------------------------------------- backgrounds
def test_background_versions_change_only_the_background():
    h = sample_hand(9, 4)
    imgs, masks = zip(*(render(h, background=k, blur=False) for k in range(4)))
    for k in range(1, 4):
        np.testing.assert_array_equal(masks[k], masks[0])
        hand_px = masks[0] == 1
        np.testing.assert_array_equal(imgs[k][hand_px], imgs[0][hand_px])
        changed = (imgs[k] != imgs[0]).any(-1)
        assert changed[~hand_px].mean() > 0.5  # a different background, not a tweak
    blurred, mask_b = render(h, background=0, blur=True)
    np.testing.assert_array_equal(mask_b, masks[0])
    assert not np.array_equal(blurred, imgs[0])


# --------------------------------------------------------------------------- dataset
def test_dataset_items_keep_the_contract():
    from cliphand3d.data.prompts import PromptGenerator

    ds = SyntheticHands(length=4, seed=1, img_size=128, num_verts=200, augment=CropAugment(),
                        prompts=PromptGenerator())
    assert len(ds) == 4
    for i in range(2):
        item = ds[i]
        check_item(item, 128)
        assert item["image"].dtype == torch.uint8  # bytes through the loader; the model's input on the device
        for k in ("joints_xyz", "joints_uvd", "K", "root_depth", "bone", "verts_xyz"):
            assert item[k].dtype == torch.float32, k
        assert item["verts_xyz"].shape == (200, 3)
        assert set(item["prompts"]) == {"x", "y", "z"}
        uv = project(item["joints_xyz"].double(), item["K"].double())
        np.testing.assert_allclose(uv, item["joints_uvd"][:, :2].double() * 128 - 0.5, atol=1e-3)
        assert abs(item["root_depth"] - item["joints_xyz"][0, 2]) < 1e-6
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["joints_xyz"], b["joints_xyz"])
    for split in ("val", "test"):
        ev = SyntheticHands(length=4, seed=1, split=split)
        assert np.abs(ev.hand(0).xyz - ds.hand(0).xyz).max() > 1e-3  # disjoint streams
    with pytest.raises(ValueError, match="split"):
        SyntheticHands(length=4, split="eval")
    with pytest.raises(ValueError, match="length"):
        SyntheticHands(length=0)


# --------------------------------------------------------------------------- viewpoint priors
def test_upright_view_keeps_fingers_up_and_palm_or_back_to_the_camera():
    tilt = np.cos(np.radians(UPRIGHT_TILT_DEG)) - 1e-9
    seen = {True: 0, False: 0}
    for i in range(80):
        h = sample_hand(5, i, view="upright")
        R = h.rotation
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) > 0  # still a right hand
        assert -R[1, 1] >= tilt, i  # hand Y (wrist -> middle MCP) within the tilt of image up
        assert abs(R[2, 2]) >= tilt, i  # palm normal within the tilt of the optical axis
        seen[bool(R[2, 2] < 0)] += 1  # palmar axis towards the camera: the palm is seen
        # the labels follow the rotation: wrist -> middle MCP points up the image
        d = project(h.xyz[9:10], h.K)[0] - project(h.xyz[:1], h.K)[0]
        assert d[1] < 0, i
    assert seen[True] > 20 and seen[False] > 20  # palms and backs both common
    # the prior changes only the rotation (and what follows from it): same hand shape and pose
    u, v = sample_hand(5, 3), sample_hand(5, 3, view="upright")
    np.testing.assert_array_equal(u.angles_deg, v.angles_deg)
    # the uniform prior reaches views the upright one never draws
    assert min(-sample_hand(5, i).rotation[1, 1] for i in range(80)) < 0


def test_unknown_view_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="upright"):
        sample_hand(0, 0, view="sideways")
    with pytest.raises(ValueError, match="data.view"):
        SyntheticHands(length=2, view="sideways")
    ds = SyntheticHands(length=2, seed=3, view="upright", img_size=64)
    np.testing.assert_array_equal(ds.hand(1).rotation, sample_hand(3, 1, view="upright").rotation)


def test_box_from_mask_equals_the_box_around_every_pixel():
    from cliphand3d.data.transforms import box_from_mask
    from cliphand3d.geometry import square_box
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.zeros((int(rng.integers(5, 60)), int(rng.integers(5, 60))), np.uint8)
        n = int(rng.integers(1, 20))
        mask[rng.integers(0, mask.shape[0], n), rng.integers(0, mask.shape[1], n)] = 1
        ys, xs = np.nonzero(mask)
        want = square_box(np.stack([xs, ys], 1), scale=1.0)
        # uint8 and bool go through OpenCV, other types through numpy; views need not be contiguous
        for m in (mask, mask > 0, mask.astype(np.int32), (mask > 0)[:, ::-1][:, ::-1], mask.T.T):
            assert box_from_mask(m) == want
        flipped = mask[:, ::-1]
        assert box_from_mask(flipped) == square_box(np.stack([mask.shape[1] - 1 - xs, ys], 1), scale=1.0)
    for empty in (np.zeros((4, 4), np.uint8), np.zeros((4, 4), bool), np.zeros((4, 4), np.int32)):
        with pytest.raises(ValueError, match="no points"):
            box_from_mask(empty)
