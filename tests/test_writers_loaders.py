"""FreiHAND / RHD writers and loaders on fixtures written in the official layouts."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cliphand3d.data import rhd as rhd_mod
from cliphand3d.data.freihand import FreiHAND
from cliphand3d.data.prompts import PromptGenerator
from cliphand3d.data.render import render
from cliphand3d.data.rhd import RHD, decode_depth, read_depth
from cliphand3d.data.sample import check_item
from cliphand3d.data.synthetic import EVAL_SEED_OFFSET, frame_like_freihand, sample_hand
from cliphand3d.data.transforms import CropAugment, denormalize_image
from cliphand3d.data.writers import encode_depth, write_freihand, write_rhd
from cliphand3d.geometry import crop_affine, mirror_lr, project
from cliphand3d.skeleton import NUM_JOINTS, mpii_to_rhd, rhd_to_mpii

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_EVAL, SEED, S = 4, 3, 0, 128
ALL = 0.0  # val_fraction: these tests read every training hand (tests/test_splits.py covers the hold-out)
ROT_AUG = CropAugment(train=True, rot_prob=1.0, rot_max_deg=90.0, color_jitter=0.2)


@pytest.fixture(scope="module")
def frei(fixture_dir):
    return fixture_dir("freihand", write_freihand, num_train=N_TRAIN, num_eval=N_EVAL, seed=SEED)


@pytest.fixture(scope="module")
def rhd_root(fixture_dir):
    return fixture_dir("rhd", write_rhd, num_train=N_TRAIN, num_eval=2, seed=SEED)


def apply(A: np.ndarray, uv: np.ndarray) -> np.ndarray:
    return uv @ A[:2, :2].T + A[:2, 2]


def mask_box(mask: np.ndarray) -> tuple[float, float, float]:
    """Reference box: centre of the pixel bounds and their larger extent."""
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, float(max(np.ptp(xs), np.ptp(ys)))


def expected_uv(uv_raw, box, aug: CropAugment, rng) -> tuple[np.ndarray, float]:
    """Raw 2D labels mapped through the crop the augmentation draws (reference for the loaders)."""
    p = aug.sample(rng)
    cx, cy, size = box
    side = size * p["scale"]
    A = crop_affine((cx + p["shift"][0] * side, cy + p["shift"][1] * side), side, S, p["rot"])
    return apply(A, uv_raw), p["rot"]


def item_uv(item) -> np.ndarray:
    return project(item["joints_xyz"].double().numpy(), item["K"].double().numpy())


# --------------------------------------------------------------------------- FreiHAND
def test_freihand_layout(frei):
    rgb = sorted(p.name for p in (frei / "training" / "rgb").iterdir())
    assert rgb == [f"{i:08d}.jpg" for i in range(N_TRAIN * 4)]
    assert sorted(p.name for p in (frei / "training" / "mask").iterdir()) == [f"{i:08d}.jpg" for i in range(N_TRAIN)]
    assert len(list((frei / "evaluation" / "rgb").iterdir())) == N_EVAL
    js = {k: json.loads((frei / f"training_{k}.json").read_text()) for k in ("K", "xyz", "verts", "scale", "mano")}
    assert all(isinstance(v, list) and len(v) == N_TRAIN for v in js.values())
    assert np.array(js["mano"]).shape == (N_TRAIN, 1, 61) and not np.any(js["mano"])
    xyz = np.array(js["xyz"])
    np.testing.assert_allclose(js["scale"], np.linalg.norm(xyz[:, 9] - xyz[:, 10], axis=1))
    assert np.array(js["verts"]).shape == (N_TRAIN, 778, 3) and np.array(js["K"]).shape == (N_TRAIN, 3, 3)
    for k in ("K", "scale", "xyz", "verts"):
        assert len(json.loads((frei / f"evaluation_{k}.json").read_text())) == N_EVAL


def test_freihand_versions_are_one_hand_over_new_backgrounds(frei):
    ds = FreiHAND(frei, versions=(0, 1, 2, 3), img_size=S, val_fraction=ALL)
    assert len(ds) == 4 * N_TRAIN and ds.num_unique == N_TRAIN
    assert [Path(ds.load_raw(i).file).name for i in (1, 5, 9, 13)] == \
        [f"{1 + N_TRAIN * v:08d}.jpg" for v in range(4)]
    only2 = FreiHAND(frei, versions=(2,), img_size=S, val_fraction=ALL)
    assert Path(only2.image_path(1)).name == f"{1 + 2 * N_TRAIN:08d}.jpg"
    mask = ds.read_mask(1)
    a, b = (ds.load_raw(i).image.astype(float) for i in (1, 5))
    diff = np.abs(a - b).mean(-1)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert diff[inner].mean() < 4 < diff[~mask].mean()  # same hand pixels, new background


def test_freihand_reprojection_subpixel(frei):
    ds = FreiHAND(frei, versions=(0, 3), img_size=S, crop="mask", val_fraction=ALL)
    K_all = np.array(json.loads((frei / "training_K.json").read_text()))
    xyz_all = np.array(json.loads((frei / "training_xyz.json").read_text()))
    for i in range(len(ds)):
        uid = i % N_TRAIN
        mask = cv2.imread(str(frei / "training" / "mask" / f"{uid:08d}.jpg"), cv2.IMREAD_GRAYSCALE) > 127
        want, _ = expected_uv(project(xyz_all[uid], K_all[uid]), mask_box(mask), CropAugment(train=False), None)
        item = ds[i]
        check_item(item, S)
        np.testing.assert_allclose(item_uv(item), want, atol=1e-3)
        np.testing.assert_allclose(item["joints_uvd"][:, :2].numpy(), (want + 0.5) / S, atol=1e-5)
        np.testing.assert_allclose(item["joints_xyz"].numpy(), xyz_all[uid], atol=1e-6)  # no rotation


def test_freihand_augmentation_moves_labels_with_pixels(frei):
    ds = FreiHAND(frei, versions=(0, 1), img_size=S, augment=ROT_AUG, val_fraction=ALL)
    K_all = np.array(json.loads((frei / "training_K.json").read_text()))
    xyz_all = np.array(json.loads((frei / "training_xyz.json").read_text()))
    rots = []
    for i in range(len(ds)):
        uid = i % N_TRAIN
        item = ds[i]
        want, rot = expected_uv(project(xyz_all[uid], K_all[uid]), mask_box(ds.read_mask(i)), ROT_AUG,
                                ds.rng_for(i))
        rots.append(abs(rot))
        np.testing.assert_allclose(item_uv(item), want, atol=1e-3)
        # rigid: bone lengths unchanged by the in-plane rotation
        np.testing.assert_allclose(torch.cdist(item["joints_xyz"], item["joints_xyz"]).numpy(),
                                   np.linalg.norm(xyz_all[uid][:, None] - xyz_all[uid][None], axis=-1), atol=1e-6)
    assert max(rots) > 0.3

    class MaskAsImage(FreiHAND):  # the same pipeline carries the mask instead of the photo
        def load_raw(self, index):
            raw = super().load_raw(index)
            raw.image = np.repeat(self.read_mask(index)[..., None].astype(np.uint8) * 255, 3, axis=2)
            return raw

    mds = MaskAsImage(frei, versions=(0, 1), img_size=S, augment=ROT_AUG, val_fraction=ALL)
    hits, total = 0, 0
    for i in range(len(mds)):
        item = mds[i]
        crop_mask = cv2.dilate((denormalize_image(item["image"])[..., 0] > 127).astype(np.uint8), np.ones((3, 3)))
        for pts in (item_uv(item), project(item["verts_xyz"].double().numpy(), item["K"].double().numpy())):
            px = np.clip(np.round(pts).astype(int), 0, S - 1)
            hits += crop_mask[px[:, 1], px[:, 0]].sum()
            total += len(px)
    assert hits / total > 0.97


def test_freihand_eval_full_image(frei):
    ds = FreiHAND(frei, split="eval", img_size=S)
    assert ds.crop == "full" and len(ds) == N_EVAL and ds.has_labels
    K_all = np.array(json.loads((frei / "evaluation_K.json").read_text()))
    xyz_all = np.array(json.loads((frei / "evaluation_xyz.json").read_text()))
    for i in range(N_EVAL):
        item = ds[i]
        check_item(item, S)
        # the whole 224 image scaled to S: pixel edges map to edges
        want = (project(xyz_all[i], K_all[i]) + 0.5) * S / 224 - 0.5
        np.testing.assert_allclose(item_uv(item), want, atol=1e-3)
        hand = sample_hand(SEED + EVAL_SEED_OFFSET, i, img_size=224)
        np.testing.assert_allclose(item["joints_xyz"].numpy(), hand.xyz, atol=1e-6)


def test_freihand_eval_without_released_labels(fixture_dir):
    root = fixture_dir("freihand_nogt", write_freihand, num_train=1, num_eval=2, seed=1, versions=1, eval_gt=False)
    ds = FreiHAND(root, split="eval", img_size=S, require_gt=False)
    assert not ds.has_labels and len(ds) == 2
    item = ds[1]
    assert set(item) == {"image", "K", "scale", "meta"} and item["image"].shape == (3, S, S)
    scale = json.loads((root / "evaluation_scale.json").read_text())
    assert item["scale"].item() == pytest.approx(scale[1], rel=1e-6)
    K = np.array(json.loads((root / "evaluation_K.json").read_text()))[1]
    s = S / 224  # the whole image scaled: pixel p -> s * (p + 0.5) - 0.5
    A = np.array([[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2], [0, 0, 1]])
    np.testing.assert_allclose(item["K"].double().numpy(), A @ K, rtol=1e-6, atol=1e-4)


def test_labels_for_template_reads_json(frei):
    ds = FreiHAND(frei, versions=(0, 1, 2, 3), val_fraction=ALL)
    xyz, verts = ds.labels_for_template()
    assert xyz.shape == (N_TRAIN, 21, 3) and verts.shape == (N_TRAIN, 778, 3) and verts.dtype == np.float32
    np.testing.assert_array_equal(xyz, json.loads((frei / "training_xyz.json").read_text()))
    assert len(ds.labels_for_template(limit=2)[1]) == 2
    np.testing.assert_allclose(verts[2], sample_hand(SEED, 2).verts, atol=1e-7)
    assert FreiHAND.protocol == "freihand" and FreiHAND.has_verts


def test_items_are_reproducible_and_collate(frei, rhd_root):
    prompts = PromptGenerator()
    ds = FreiHAND(frei, versions=(0, 1), img_size=S, augment=ROT_AUG, prompts=prompts, seed=3, val_fraction=ALL)
    a, b = ds[2], ds[2]
    assert torch.equal(a["image"], b["image"]) and a["prompts"] == b["prompts"]
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], a["image"])  # a new epoch draws a new augmentation
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, S, S) and batch["verts_xyz"].shape == (4, 778, 3)
    assert set(batch["prompts"]) == {"x", "y", "z"} and len(batch["prompts"]["x"]) == 4
    r = RHD(rhd_root, img_size=S, augment=ROT_AUG, prompts=prompts, val_fraction=ALL)
    rb = default_collate([r[i] for i in range(len(r))])
    assert rb["visible"].dtype == torch.bool and rb["visible"].shape == (N_TRAIN, NUM_JOINTS)
    assert "verts_xyz" not in rb and RHD.protocol == "rhd" and not RHD.has_verts


# --------------------------------------------------------------------------- RHD
def test_rhd_layout(rhd_root):
    for split, n in (("training", N_TRAIN), ("evaluation", 2)):
        for sub in ("color", "mask", "depth"):
            assert sorted(p.name for p in (rhd_root / split / sub).iterdir()) == [f"{i:05d}.png" for i in range(n)]
        raw = (rhd_root / split / f"anno_{split}.pickle").read_bytes()
        assert raw[:2] == b"\x80\x02" and b"_codecs" not in raw  # protocol 2, Python-2 style strings
        anno = pickle.loads(raw, encoding="latin1")
        assert sorted(anno) == list(range(n))
        for i, a in anno.items():
            assert a["xyz"].shape == (42, 3) and a["uv_vis"].shape == (42, 3) and a["K"].shape == (3, 3)
            mask = cv2.imread(str(rhd_root / split / "mask" / f"{i:05d}.png"), cv2.IMREAD_UNCHANGED)
            assert mask.ndim == 2 and mask.shape == (320, 320)
            ids = set(np.unique(mask).tolist()) - {0, 1}
            lo, hi = rhd_mod.LEFT_IDS if i % 2 else rhd_mod.RIGHT_IDS
            assert ids and all(lo <= v <= hi for v in ids) and len(ids) >= 8
            own = slice(0, 21) if i % 2 else slice(21, 42)
            other = slice(21, 42) if i % 2 else slice(0, 21)
            assert a["uv_vis"][own, 2].any() and not a["uv_vis"][other, 2].any()
            assert (a["xyz"][other, 2] > 0).all()  # the unseen hand is a real hand, not zeros
            outside = a["uv_vis"][other, :2]
            assert ((outside < 0) | (outside > 319)).any(1).all()
    masks = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (rhd_root / "training" / "mask").iterdir()]
    assert any((m == rhd_mod.PERSON).sum() > 50 for m in masks)


def test_rhd_order_and_mirroring_round_trip(rhd_root):
    x = np.random.default_rng(0).normal(size=(2, 21, 3))
    np.testing.assert_array_equal(rhd_to_mpii(mpii_to_rhd(x)), x)
    ds = RHD(rhd_root, img_size=S, val_fraction=ALL)
    template_xyz, none = ds.labels_for_template()
    assert none is None and template_xyz.shape == (N_TRAIN, 21, 3)
    for i in range(N_TRAIN):
        raw = ds.load_raw(i)
        np.testing.assert_allclose(template_xyz[i], raw.xyz, atol=1e-6)  # same hand without reading masks
        hand = sample_hand(SEED, i, img_size=320)
        image, _ = render(hand)
        assert raw.extra["side"] == ("left" if i % 2 else "right")
        # written right hand -> (mirrored, RHD order on disk) -> read: the exact source hand
        np.testing.assert_array_equal(raw.image, image)
        np.testing.assert_allclose(raw.xyz, hand.xyz, atol=1e-6)
        np.testing.assert_allclose(raw.K, hand.K, rtol=1e-6, atol=1e-4)
    img = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    K = np.array([[300.0, 0, 100], [0, 300, 90], [0, 0, 1]])
    xyz = np.random.default_rng(1).normal(size=(21, 3)) + [0, 0, 3]
    im2, xyz2, K2 = mirror_lr(*mirror_lr(img, xyz, K, 5), 5)
    np.testing.assert_array_equal(im2, img)
    np.testing.assert_allclose(xyz2, xyz)
    np.testing.assert_allclose(K2, K)


def test_rhd_reprojection_and_visibility(rhd_root):
    anno = pickle.loads((rhd_root / "evaluation" / "anno_evaluation.pickle").read_bytes(), encoding="latin1")
    ds = RHD(rhd_root, split="eval", img_size=S)
    for i in range(len(ds)):
        a, left = anno[i], i % 2 == 1
        own = slice(0, 21) if left else slice(21, 42)
        uv = rhd_to_mpii(a["uv_vis"][own])[:, :2].astype(np.float64)
        mask = cv2.imread(str(rhd_root / "evaluation" / "mask" / f"{i:05d}.png"), cv2.IMREAD_UNCHANGED)
        lo, hi = rhd_mod.LEFT_IDS if left else rhd_mod.RIGHT_IDS
        hand = (mask >= lo) & (mask <= hi)
        if left:
            uv[:, 0] = 319 - uv[:, 0]
            hand = hand[:, ::-1]
        want, _ = expected_uv(uv, mask_box(hand), CropAugment(train=False), None)
        item = ds[i]
        check_item(item, S)
        np.testing.assert_allclose(item_uv(item), want, atol=1e-3)
        np.testing.assert_array_equal(item["visible"].numpy(), rhd_to_mpii(a["uv_vis"][own])[:, 2] > 0)
    flags = np.concatenate([RHD(rhd_root, split=s, val_fraction=ALL).load_raw(j).visible for s in ("train", "eval")
                            for j in range(2)])
    assert 0 < flags.mean() < 1  # some joints occluded, so the order of the flags is actually tested


def test_rhd_picks_the_hand_with_more_pixels(rhd_root, tmp_path):
    root = tmp_path / "rhd"
    shutil.copytree(rhd_root, root)
    path = root / "training" / "mask" / "00000.png"  # a right hand
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    n_right = int((mask >= 18).sum())
    free = np.argwhere(mask == 0)[: n_right + 10]
    mask[free[:, 0], free[:, 1]] = 5  # more left-hand pixels than right-hand ones
    cv2.imwrite(str(path), mask)
    anno = pickle.loads((root / "training" / "anno_training.pickle").read_bytes(), encoding="latin1")
    raw = RHD(root, val_fraction=ALL).load_raw(0)
    assert raw.extra["side"] == "left"
    _, want, _ = mirror_lr(None, rhd_to_mpii(anno[0]["xyz"][:21].astype(np.float64)), np.eye(3), 320)
    np.testing.assert_allclose(raw.xyz, want, atol=1e-6)


def test_rhd_hand_pixel_counts_are_the_pixels_of_each_id_range():
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16):
        mask = rng.integers(0, 40, size=(50, 70)).astype(dtype)
        for lo_hi, side in ((rhd_mod.LEFT_IDS, "left"), (rhd_mod.RIGHT_IDS, "right")):
            want = sum(int((mask == k).sum()) for k in range(lo_hi[0], lo_hi[1] + 1))
            assert rhd_mod.hand_pixel_counts(mask)[side] == want
            assert rhd_mod.hand_pixel_counts(mask[:, ::-1])[side] == want


def test_rhd_depth_code(rhd_root):
    d = np.random.default_rng(0).uniform(0, 4.99, (7, 9))
    np.testing.assert_allclose(decode_depth(encode_depth(d)), d, atol=5 / 65535 / 2 + 1e-7)
    # known answer: 0.3 m -> code 3932 = 15 * 256 + 92, R high byte, G low byte
    assert encode_depth(np.array([[0.3]]))[0, 0].tolist() == [15, 92, 0]
    assert decode_depth(np.array([[[15, 92, 0]]], np.uint8))[0, 0] == pytest.approx(3932 / 65535 * 5)
    path = rhd_root / "training" / "depth" / "00000.png"
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # OpenCV order: the high byte is channel 2
    depth = read_depth(path)
    np.testing.assert_allclose(depth, (bgr[..., 2] * 256.0 + bgr[..., 1]) / 65535 * 5, rtol=1e-6)
    mask = cv2.imread(str(rhd_root / "training" / "mask" / "00000.png"), cv2.IMREAD_UNCHANGED)
    z = sample_hand(SEED, 0, img_size=320).xyz[:, 2]
    hand_d = depth[mask >= 18]
    assert z.min() - 0.02 < hand_d.min() and hand_d.max() < z.max() + 0.02
    assert depth[mask == 0].min() > 1.9


def test_make_synthetic_script(tmp_path):
    out = tmp_path / "rhd_cli"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "format=rhd", f"out={out}",
                          "num_train=2", "num_eval=1", "seed=5"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ds = RHD(out, val_fraction=ALL)
    assert len(ds) == 2 and len(RHD(out, split="eval")) == 1
    np.testing.assert_allclose(ds.load_raw(0).xyz, sample_hand(5, 0, img_size=320).xyz, atol=1e-6)
    assert not list(tmp_path.glob("outputs"))  # Hydra leaves no run folder behind


def test_make_synthetic_freihand_with_the_upright_view(tmp_path):
    out = tmp_path / "fh_cli"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "format=freihand",
                          f"out={out}", "num_train=2", "num_eval=1", "seed=5", "versions=1", "img_size=64",
                          "view=upright"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    xyz = np.array(json.loads((out / "training_xyz.json").read_text()))
    # framed as the release (make_synthetic.yaml framing=freihand): the drawn hand, moved
    for i in range(2):
        np.testing.assert_allclose(xyz[i], frame_like_freihand(sample_hand(5, i, img_size=64, view="upright")).xyz,
                                   atol=1e-6)
    ev = np.array(json.loads((out / "evaluation_xyz.json").read_text()))
    np.testing.assert_allclose(
        ev[0], frame_like_freihand(sample_hand(5 + EVAL_SEED_OFFSET, 0, img_size=64, view="upright")).xyz, atol=1e-6)
    assert not np.allclose(xyz[0], sample_hand(5, 0, img_size=64).xyz, atol=1e-3)  # not the uniform draw
    with pytest.raises(ValueError, match="view='sideways'"):
        write_freihand(tmp_path / "never", num_train=1, num_eval=0, seed=0, view="sideways")
    assert not (tmp_path / "never").exists()


def test_package_exports():
    import cliphand3d.data as data
    from cliphand3d.data.synthetic import SyntheticHands
    from cliphand3d.data.transforms import CropAugment as CA

    assert (data.FreiHAND, data.RHD, data.SyntheticHands, data.PromptGenerator, data.CropAugment) == \
        (FreiHAND, RHD, SyntheticHands, PromptGenerator, CA)
    with pytest.raises(AttributeError):
        data.NoSuchDataset
