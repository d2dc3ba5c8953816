"""Framing without labels at test time: FreiHAND's centre crop, two-pass re-cropping (eval.py and the demo),
the experiment presets' train / val / test framing, and synthetic FreiHAND files framed as the release is."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cliphand3d.apps.demo import run as demo_run
from cliphand3d.apps.demo.hand import DemoModel, crop_uv_to_image, predict_hand
from cliphand3d.data.freihand import CENTRE_FRACTION, FreiHAND
from cliphand3d.data.reframe import FRAMINGS, Reframed, box_around, check_framing
from cliphand3d.data.rhd import RHD
from cliphand3d.data.sample import check_item
from cliphand3d.data.synthetic import FREIHAND_JOINT_FILL
from cliphand3d.data.transforms import CropAugment, model_input
from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.errors import ConfigError, DatasetError
from cliphand3d.evaluation.run import _framed_predictions
from cliphand3d.geometry import crop_affine, project, square_box, uvd_to_xyz
from cliphand3d.train.resume import resume_mismatches

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real_samples" / "freihand"
S, IMAGE = 64, 224


@pytest.fixture(scope="module")
def frei(fixture_dir):
    return fixture_dir("frei_framing", write_freihand, num_train=3, num_eval=3, seed=2, versions=1)


def compose_cfg(*overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


# --------------------------------------------------------------------------- the centre crop
@pytest.mark.parametrize("split", ["train", "eval"])
def test_centre_crop_is_the_middle_square_of_the_image(frei, split):
    ds = FreiHAND(frei, split=split, img_size=S, crop="centre", centre_fraction=0.5, val_fraction=0.0)
    raw = ds.load_raw(1)
    assert raw.box == ((IMAGE - 1) / 2, (IMAGE - 1) / 2, 0.5 * IMAGE)
    item = ds[1]
    check_item(item, S)
    # no jitter, scale 1: the 112 px box in the middle becomes the crop, edges on edges
    np.testing.assert_allclose(item["K"].double().numpy(), crop_affine(raw.box[:2], 112.0, S) @ raw.K, rtol=1e-6)
    half_of_full = FreiHAND(frei, split=split, img_size=S, crop="full", val_fraction=0.0,
                            augment=CropAugment(train=False, scale=0.5))
    assert torch.equal(item["image"], half_of_full[1]["image"])
    assert ds.label_sample(1).box == raw.box  # from the file header, without decoding
    assert FreiHAND(frei, split="eval", crop="centre").centre_fraction == pytest.approx(130 / 224)
    with pytest.raises(DatasetError, match="centre_fraction=1.5"):
        FreiHAND(frei, crop="centre", centre_fraction=1.5)


def test_centre_crop_needs_no_labels(frei, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(frei, bare, ignore=shutil.ignore_patterns("evaluation_xyz.json", "evaluation_verts.json"))
    unlabelled = FreiHAND(bare, split="eval", img_size=S, crop="centre", require_gt=False)
    labelled = FreiHAND(frei, split="eval", img_size=S, crop="centre")
    assert not unlabelled.has_labels
    for i in range(len(labelled)):
        assert torch.equal(unlabelled[i]["image"], labelled[i]["image"])
        assert torch.allclose(unlabelled[i]["K"], labelled[i]["K"])


def test_the_freihand_experiment_trains_on_mask_boxes_and_validates_and_tests_on_the_centre_crop():
    cfg = compose_cfg("+experiment=freihand", "run_dir=/tmp/unused")
    assert (cfg.data.train.crop, cfg.data.val.crop, cfg.data.test.crop) == ("mask", "centre", "centre")
    assert cfg.data.val.centre_fraction == cfg.data.test.centre_fraction == pytest.approx(130 / 224)
    assert cfg.data.train.augment.scale == 1.3 and cfg.data.val.augment is None  # val frames exactly as test
    plain = compose_cfg("data=freihand", "run_dir=/tmp/unused")  # the data config alone: as before
    assert (plain.data.train.crop, plain.data.val.crop, plain.data.test.crop) == ("full", "full", "full")
    assert FreiHAND.__init__.__defaults__ is not None and CENTRE_FRACTION == 130 / 224
    # a crop crop_scale does not list (centre) trains on its box as it is
    assert compose_cfg("data=freihand", "data.train.crop=centre", "run_dir=/tmp/unused").data.augment.scale == 1.0


# The data keys outside constructors (no `_target_` above them) that data=freihand and data=rhd had before
# these options (composed at the commit before them; the experiments add none)
PLAIN_BEFORE = {
    "freihand": {"crop_scale.full", "crop_scale.joints", "crop_scale.mask", "format", "holdout_seed", "img_size",
                 "name", "root", "skip_bad", "val_fraction", "versions"},
    "rhd": {"format", "holdout_seed", "img_size", "name", "root", "skip_bad", "val_fraction"},
}
# (data config, the overrides that give back the framing and colour of before the options, the constructor
# keywords that did not exist then)
BEFORE = {
    "data=freihand": ("freihand", [], {"channel_noise", "centre_fraction"}),
    "data=rhd": ("rhd", [], {"channel_noise", "crop"}),
    "+experiment=freihand": ("freihand", ["data.train.crop=full", "data.val.crop=full", "data.test.crop=full"],
                             {"channel_noise", "centre_fraction"}),
    "+experiment=rhd": ("rhd", ["data.train.crop=mask", "data.val.crop=mask", "data.test.crop=mask",
                                "data.augment.scale=1.3", "data.val.augment=null", "data.test.augment=null"],
                        {"channel_noise", "crop"}),
}


def as_before(node: dict, plain: set, new_keywords: set, prefix: str = "", built: bool = False) -> dict:
    """`node` shaped as a config saved before the options: outside constructors only the keys in `plain`,
    inside them (a `_target_` at or above) none of `new_keywords`."""
    built = built or "_target_" in node
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out[k] = as_before(v, plain, new_keywords, f"{prefix}{k}.", built)
        elif (k not in new_keywords) if built else (prefix + k in plain):
            out[k] = v
    return out


@pytest.mark.parametrize("preset", list(BEFORE))
def test_a_run_from_before_the_options_resumes_with_them_switched_off(preset):
    """The options add no data key outside a constructor (a key a saved run lacks would keep it from
    resuming), only constructor keywords, which absent mean their defaults, the behaviour before them: a run
    saved then resumes when today's defaults are overridden back to its values."""
    name, back, new_keywords = BEFORE[preset]
    colour_off = ["data.augment.color_jitter=0", "data.augment.channel_noise=0"]
    now = OmegaConf.to_container(compose_cfg(preset, "run_dir=/tmp/unused", "data.root=/tmp/r", *back, *colour_off),
                                 resolve=True)
    saved = {**now, "data": as_before(now["data"], PLAIN_BEFORE[name], new_keywords)}
    state = {"config": saved, "train_state": {"world_size": 1, "batch_size": 1}}
    assert [k for k in resume_mismatches(state, now, world_size=1, batch_size=1) if k.startswith("data")] == []


# --------------------------------------------------------------------------- two-pass framing
def test_box_around_inverts_the_crop_known_answer():
    """Points placed in a rotated crop at known image pixels come back to those pixels."""
    frame = ((100.0, 80.0), 90.0, np.radians(30.0))
    image_px = np.array([[70.0, 60.0], [130.0, 60.0], [100.0, 120.0]])
    A = crop_affine(*frame[:2], S, frame[2])
    crop_px = image_px @ A[:2, :2].T + A[:2, 2]
    for offset in (0.5, 0.0):
        uv = (crop_px + offset) / S
        assert box_around(uv, frame, S, offset) == pytest.approx((100.0, 90.0, 60.0))


def exact_model(*datasets):
    """The true uvd of whichever crop it is shown, looked up by its pixels: predictions are exact, so any error
    in how the second crop is made or placed shows."""
    table = {}
    for ds in datasets:
        for i in range(len(ds)):
            item = ds[i]
            table[model_input(item["image"]).numpy().tobytes()] = (item["joints_uvd"], item["verts_uvd"])

    class Exact(torch.nn.Module):
        mixes_batch = False

        def forward(self, images, pose_features=False):
            rows = [table[im.numpy().tobytes()] for im in images]
            return {"joints": torch.stack([r[0] for r in rows]), "verts": torch.stack([r[1] for r in rows])}

    return Exact()


def test_two_pass_recrops_about_the_predicted_joints(frei):
    """An exact first pass on the whole image: the second crops are exactly the joints' box x two_pass_scale,
    the crops `crop=joints` makes (same pixels, K, labels), and the second prediction, placed with the new
    crop's intrinsics, lands on the true xyz."""
    full = FreiHAND(frei, split="eval", img_size=S)  # crop=full, the default
    joints = FreiHAND(frei, split="eval", img_size=S, crop="joints", augment=CropAugment(train=False, scale=1.3))
    model, cpu = exact_model(full, joints), torch.device("cpu")
    cfg = OmegaConf.create({"batch_size": 2, "num_workers": 0, "two_pass_scale": 1.3})
    single, items = _framed_predictions(cfg, "single", model, full, cpu, None, "auto")
    assert items is full
    two, items = _framed_predictions(cfg, "two_pass", model, full, cpu, None, "auto")
    assert isinstance(items, Reframed) and list(two["index"]) == list(range(len(full)))
    for i in range(len(full)):
        again, want = items[i], joints[i]
        check_item(again, S)
        assert torch.equal(again["image"], want["image"])
        for key in ("K", "joints_uvd", "joints_xyz", "verts_uvd"):
            torch.testing.assert_close(again[key], want[key], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(two["K"], np.stack([joints[i]["K"].numpy() for i in range(len(joints))]), atol=1e-4)
    assert not np.allclose(two["K"], single["K"])  # the first framing was not kept
    np.testing.assert_allclose(two["pred_xyz"], two["gt_xyz"], atol=2e-6)  # scoring in xyz unchanged
    np.testing.assert_allclose(two["gt_xyz"], single["gt_xyz"], atol=1e-12)


def test_two_pass_without_labels_crops_as_with_them(frei, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(frei, bare, ignore=shutil.ignore_patterns("evaluation_xyz.json", "evaluation_verts.json"))
    labelled = FreiHAND(frei, split="eval", img_size=S)
    unlabelled = FreiHAND(bare, split="eval", img_size=S, require_gt=False)
    uv = np.stack([labelled[i]["joints_uvd"].double().numpy() for i in range(len(labelled))])
    a, b = Reframed(labelled, uv, scale=1.3), Reframed(unlabelled, uv, scale=1.3)
    for i in range(len(labelled)):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.allclose(a[i]["K"], b[i]["K"])
        assert "joints_xyz" not in b[i] and float(b[i]["scale"]) > 0


def test_two_pass_on_rhd_follows_left_hands_through_the_mirror(fixture_dir):
    """RHD mirrors left hands into right ones before cropping: the true uvd of each mask crop, re-cropped by
    two_pass, gives exactly the crop=joints item (box x1.3), left hands included."""
    root = fixture_dir("rhd_crop", write_rhd, num_train=4, num_eval=0, seed=0)  # tests/test_rhd_crop.py's
    by_mask = RHD(root, val_fraction=0.0, img_size=S)
    by_joints = RHD(root, val_fraction=0.0, img_size=S, crop="joints", augment=CropAugment(train=False, scale=1.3))
    uv = np.stack([by_mask[i]["joints_uvd"].double().numpy() for i in range(len(by_mask))])
    again = Reframed(by_mask, uv, scale=1.3)
    sides = {by_mask.load_raw(i).extra["side"] for i in range(len(by_mask))}
    assert sides == {"left", "right"}
    for i in range(len(by_mask)):
        a, b = again[i], by_joints[i]
        # the box from float32 uv is the joints' box to ~1e-5 px, which may move a pixel of the warp by one level
        assert (a["image"].int() - b["image"].int()).abs().max() <= 1
        for key in ("K", "joints_uvd", "joints_xyz"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(torch.as_tensor(again.label_targets(i)["joints_uvd"]),
                                   b["joints_uvd"].double(), rtol=1e-5, atol=1e-5)


def test_framing_option_defaults_to_single_and_checks_its_values():
    cfg = compose_cfg(config="eval")
    assert cfg.framing == "single" and cfg.two_pass_scale == 1.3 and FRAMINGS == ("single", "two_pass")
    demo = OmegaConf.load(REPO / "configs" / "demo.yaml")
    assert demo.framing == "single" and demo.two_pass_scale == 1.3
    with pytest.raises(ConfigError, match="framing='twice'"):
        check_framing("twice", 1.3)
    with pytest.raises(ConfigError, match="two_pass_scale=0"):
        check_framing("two_pass", 0)


class ConstantHand(torch.nn.Module):
    """Always the same hand at normalised crop uvd `uvd`, placed with the true root depth and bone."""

    def __init__(self, uvd, root, bone):
        super().__init__()
        self.img_size, self.uvd, self.root, self.bone = S, uvd, root, bone

    def forward(self, images, pose_features=False):
        return {"joints": self.uvd[None].float()}

    def outputs_to_xyz(self, out, K, root, bone, img_size):
        return {"joints_xyz": uvd_to_xyz(out["joints"], K, img_size, root, bone)}


def test_demo_two_pass_crops_the_box_around_its_first_joints(frei):
    item = FreiHAND(frei, split="eval", img_size=S)[0]
    model = ConstantHand(item["joints_uvd"].double(), item["root_depth"], item["bone"])
    image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    K = np.array([[500.0, 0, 111.5], [0, 500.0, 111.5], [0, 0, 1]])
    kw = dict(hand="right", box_scale=1.3, where="x.png")
    one = predict_hand(DemoModel(model, torch.device("cpu"), 0.03), image, K, None, **kw)
    assert one["crop_size"] == IMAGE and "first_pass_joints_2d" not in one
    two = predict_hand(DemoModel(model, torch.device("cpu"), 0.03, framing="two_pass", two_pass_scale=1.5),
                       image, K, None, **kw)
    cx, cy, side = square_box(one["joints_2d"], scale=1.0)
    assert two["crop_center"] == pytest.approx((cx, cy), abs=1e-9) and two["crop_size"] == pytest.approx(1.5 * side)
    np.testing.assert_array_equal(two["first_pass_joints_2d"], one["joints_2d"])
    np.testing.assert_allclose(crop_uv_to_image(item["joints_uvd"].numpy(), two, S), two["joints_2d"], atol=1e-3)
    with pytest.raises(ConfigError, match="framing='twice'"):
        DemoModel(model, torch.device("cpu"), 0.03, framing="twice")


def test_demo_script_config_reaches_the_model_and_the_json(frei, tmp_path, monkeypatch):
    """demo.yaml framing=two_pass end to end (run_demo, the model stubbed): the crop in the JSON is the box
    around the joints the first crop gave x two_pass_scale, and the JSON says so; a bad framing is refused
    before the checkpoint is read."""
    item = FreiHAND(frei, split="eval", img_size=S)[0]
    model = ConstantHand(item["joints_uvd"].double(), item["root_depth"], item["bone"])
    monkeypatch.setattr(demo_run, "load_model", lambda *a, **k: (model, OmegaConf.create({}), None))
    image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    assert cv2.imwrite(str(tmp_path / "hand.png"), image)
    args = [f"ckpt={tmp_path / 'none.pt'}", f"input={tmp_path / 'hand.png'}", "device=cpu"]
    for framing in ("single", "two_pass"):
        cfg = compose_cfg(*args, f"out={tmp_path / framing}", f"framing={framing}", "two_pass_scale=1.5",
                          config="demo")
        assert demo_run.run_demo(cfg)[:2] == (0, 1)
    one, two = (json.loads((tmp_path / f / "hand.json").read_text()) for f in ("single", "two_pass"))
    assert (one["framing"], two["framing"], two["two_pass_scale"]) == ("single", "two_pass", 1.5)
    assert one["crop"]["side_px"] == IMAGE  # no box: the image is the crop
    cx, cy, side = square_box(np.array(one["joints_2d_px"]), scale=1.0)
    assert two["crop"]["side_px"] == pytest.approx(1.5 * side, abs=2e-3)
    assert two["crop"]["center_px"] == pytest.approx([cx, cy], abs=2e-3)
    with pytest.raises(ConfigError, match="framing='twice'"):  # not "none.pt does not exist": checked first
        demo_run.run_demo(compose_cfg(*args, f"out={tmp_path / 'x'}", "framing=twice", config="demo"))


# --------------------------------------------------------------------------- synthetic files framed as the release
def joint_boxes(xyz, K) -> np.ndarray:
    """(M, 3): centre x, centre y, longer side of each hand's projected joints' box."""
    uv = project(np.asarray(xyz, np.float64), np.asarray(K, np.float64))
    lo, hi = uv.min(1), uv.max(1)
    return np.concatenate([(lo + hi) / 2, (hi - lo).max(1, keepdims=True)], 1)


def test_release_framing_measured_on_the_real_photos():
    if not REAL.is_dir():
        pytest.skip(f"real samples not found at {REAL}")
    data = json.loads((REAL / "test_freihand.json").read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for ann in data["annotations"]:
        kp = np.array(ann["keypoints"], np.float64).reshape(21, 3)[:, :2]
        w, h = size[ann["image_id"]]
        cx, cy, side = square_box(kp, scale=1.0)
        assert side / w == pytest.approx(FREIHAND_JOINT_FILL, abs=0.01)
        assert abs(cx - (w - 1) / 2) < 0.03 * w and abs(cy - (h - 1) / 2) < 0.03 * h


@pytest.mark.parametrize("view", ["uniform", "upright"])
def test_make_synthetic_frames_freihand_hands_as_the_release(tmp_path, view):
    cfg = OmegaConf.load(REPO / "configs" / "make_synthetic.yaml")
    assert cfg.framing == "freihand"  # the script's default
    out = write_freihand(tmp_path / "fh", num_train=3, num_eval=2, seed=1, versions=1, view=view, framing=cfg.framing)
    for split in ("training", "evaluation"):
        xyz, K = (json.loads((out / f"{split}_{k}.json").read_text()) for k in ("xyz", "K"))
        boxes = joint_boxes(xyz, K)
        np.testing.assert_allclose(boxes[:, 2] / IMAGE, FREIHAND_JOINT_FILL, atol=0.005)
        np.testing.assert_allclose(boxes[:, :2], (IMAGE - 1) / 2, atol=0.01 * IMAGE)
    drawn = write_freihand(tmp_path / "drawn", num_train=3, num_eval=0, seed=1, versions=1, view=view)
    sides = joint_boxes(json.loads((drawn / "training_xyz.json").read_text()),
                        json.loads((drawn / "training_K.json").read_text()))[:, 2] / IMAGE
    assert np.abs(sides - FREIHAND_JOINT_FILL).max() > 0.05  # the writer's default keeps the drawn framing
