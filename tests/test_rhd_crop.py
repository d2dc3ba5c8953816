"""RHD crops about all 21 projected joints (crop=joints) keep a fingertip that the visible mask leaves out."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from cliphand3d.data import rhd as rhd_mod
from cliphand3d.data.base import load_plain_pickle
from cliphand3d.data.rhd import RHD
from cliphand3d.data.sample import check_item
from cliphand3d.data.transforms import CropAugment, box_from_mask
from cliphand3d.data.writers import write_rhd
from cliphand3d.errors import DatasetError
from cliphand3d.skeleton import FINGER_CHAINS, FINGERS, mpii_to_rhd

REPO = Path(__file__).resolve().parents[1]
S, SCALE = 64, 1.3
EVAL = CropAugment(train=False, scale=SCALE)


@pytest.fixture(scope="module")
def rhd_root(fixture_dir):
    return fixture_dir("rhd_crop", write_rhd, num_train=4, num_eval=0, seed=0)


def finger_ids(side: str, finger: int) -> list[int]:
    """The mask classes of a finger's three segments (writers._part_ids: 3 per finger, then the palm)."""
    first = rhd_mod.LEFT_IDS[0] if side == "left" else rhd_mod.RIGHT_IDS[0]
    return [first + 3 * finger + k for k in range(3)]


def hide_a_finger(root: Path, out: Path) -> tuple[int, int]:
    """A copy of `root` where one finger is hidden (occluded): its mask pixels become background and its
    keypoints invisible, chosen so that its tip lies outside the x1.3 crop about the remaining mask.
    Returns (sample index, MPII joint of the tip)."""
    ds = RHD(root, val_fraction=0.0)
    for i in range(len(ds)):
        mask, side = ds.read_mask(i), ds.load_raw(i).extra["side"]
        hand = rhd_mod.hand_mask(mask, side)
        uv = ds.load_raw(i).extra["uv"]  # mirrored with the hand, as the mask box is below
        for f, name in enumerate(FINGERS):
            rest = hand & ~np.isin(mask, finger_ids(side, f))
            if not rest.any():
                continue
            cx, cy, size = box_from_mask(rest[:, ::-1] if side == "left" else rest)
            tip = FINGER_CHAINS[name][3]
            if np.abs(uv[tip] - (cx, cy)).max() > SCALE * size / 2 + 2:  # outside the mask crop
                shutil.copytree(root, out)
                mask[np.isin(mask, finger_ids(side, f))] = rhd_mod.BACKGROUND
                cv2.imwrite(str(ds.mask_path(i)).replace(str(root), str(out)), mask)
                anno_path = out / "training" / "anno_training.pickle"
                anno = load_plain_pickle(anno_path, "")
                slots = rhd_mod.hand_slots(side)
                vis = np.zeros(21)
                vis[list(FINGER_CHAINS[name])] = 1
                entry = anno[ds.ids[i]]
                entry["uv_vis"][slots, 2] *= 1 - mpii_to_rhd(vis[:, None])[:, 0]
                with open(anno_path, "wb") as fh:
                    pickle.dump(anno, fh, protocol=2)
                return i, tip
    raise AssertionError("no finger of the fixture reaches out of the mask crop once hidden")


def tip_uv(item, tip: int) -> np.ndarray:
    return item["joints_uvd"][tip, :2].numpy()


def test_an_occluded_fingertip_outside_the_mask_crop_is_inside_the_joints_crop(rhd_root, tmp_path):
    i, tip = hide_a_finger(rhd_root, tmp_path / "hidden")
    by_mask = RHD(tmp_path / "hidden", val_fraction=0.0, img_size=S, augment=EVAL)
    by_joints = RHD(tmp_path / "hidden", val_fraction=0.0, img_size=S, augment=EVAL, crop="joints")
    assert by_mask.crop == "mask" and not by_mask.load_raw(i).visible[tip]  # the default, today's crop
    cut, kept = by_mask[i], by_joints[i]
    check_item(kept, S)
    assert not ((tip_uv(cut, tip) >= 0) & (tip_uv(cut, tip) <= 1)).all()  # the mask crop cuts the tip off
    uv = kept["joints_uvd"][:, :2].numpy()
    assert ((uv >= 0) & (uv <= 1)).all()  # every joint, the hidden tip included, is in the joints crop
    # the box is the joints' own: the tight box of the uv spans 1 / 1.3 of the crop, centred
    assert (uv.max(0) - uv.min(0)).max() == pytest.approx(1 / SCALE, abs=1e-5)
    np.testing.assert_allclose((uv.max(0) + uv.min(0)) / 2, 0.5, atol=1e-5)


def test_joints_crop_follows_a_left_hand_through_the_mirror(rhd_root):
    ds = RHD(rhd_root, val_fraction=0.0, img_size=S, augment=EVAL, crop="joints")
    left = [i for i in range(len(ds)) if ds.load_raw(i).extra["side"] == "left"]
    assert left
    for i in left:
        uv = ds[i]["joints_uvd"][:, :2].numpy()
        np.testing.assert_allclose((uv.max(0) + uv.min(0)) / 2, 0.5, atol=1e-5)
    with pytest.raises(DatasetError, match="RHD crop 'box'"):
        RHD(rhd_root, crop="box")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, "run_dir=/tmp/unused"])


def test_the_rhd_experiment_crops_every_split_from_the_joints():
    cfg = compose_cfg("+experiment=rhd")
    for split in ("train", "val", "test"):
        assert cfg.data[split].crop == "joints" and cfg.data[split].augment.scale == 1.5
    assert cfg.data.train.augment.train and not cfg.data.val.augment.train and not cfg.data.test.augment.train
    assert cfg.data.val.augment.get("channel_noise", 0.0) == 0.0  # no colour outside training
    # the data config alone frames as before the option: the mask box x1.3 (val / test: EVAL_CROP's 1.3)
    plain = compose_cfg("data=rhd")
    assert [plain.data[split].crop for split in ("train", "val", "test")] == ["mask"] * 3
    assert plain.data.train.augment.scale == 1.3 and plain.data.val.augment is None and plain.data.test.augment is None
    assert CropAugment(train=False).scale == 1.3
