"""scripts/demo.py: images, odd formats, a video and broken files end to end; the pixel convention, the
reprojection of the JSON's 3D joints, left-hand mirroring; imported released weights; the real photos."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cliphand3d import metrics
from cliphand3d.apps.demo import run as demo
from cliphand3d.apps.demo.hand import DemoModel, crop_square, crop_uv_to_image, make_crop, predict_hand
from cliphand3d.apps.demo.inputs import default_K
from cliphand3d.build import model_from_checkpoint
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import normalize_image
from cliphand3d.errors import ConfigError, InputError
from cliphand3d.geometry import crop_intrinsics, project

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# ../shared beside the clone (tests/test_real_samples.py); from a git worktree, the nearest such ancestor
REAL = next((p / "shared" / "real_samples" / "freihand" for p in REPO.parents if (p / "shared" / "real_samples").is_dir()),
            REPO.parent / "shared" / "real_samples" / "freihand")
S = 64
TINY = [
    "data.img_size=64", "data.num_train=8", "data.num_val=8", "data.num_verts=200",
    "model_template.build.levels=[40,80,120]", "model_template.num_samples=8", "model.backbone=resnet18",
    "model.pretrained=null", "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16",
    "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
    "trainer.max_steps=2", "trainer.batch_size=4", "trainer.val_batch_size=8", "trainer.num_workers=0",
    "logger.tensorboard=false", "text.pretrained=null",
]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), *map(str, args)], env=env(),
                          capture_output=True, text=True, timeout=600)


def rgb_write(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)
    return path


def load(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny trained checkpoint of the default (synthetic) preset: a mesh, joints J @ uvd, offset 0.5."""
    from cliphand3d.train.run import train

    run = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"run_dir={run}", *TINY])
    train(cfg)
    return run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def hands():
    """Two rendered hands: a 64 px crop and a 224 px render with its true square box."""
    ds = SyntheticHands(length=2, split="test", img_size=S, num_verts=200, view="upright")
    from cliphand3d.data.transforms import denormalize_image

    raw = ds.load_raw(1)
    cx, cy, side = raw.box
    box = [cx + 0.5 - side / 2, cy + 0.5 - side / 2, side, side]  # pixel-centre centre -> corner, edges
    return {"crop": denormalize_image(ds[0]["image"]), "render": raw.image, "box": box, "box_center": (cx, cy)}


@pytest.fixture(scope="module")
def folder_run(ckpt, hands, tmp_path_factory):
    """One run of scripts/demo.py over good images, odd formats, a video and broken files."""
    src, out = tmp_path_factory.mktemp("inputs"), tmp_path_factory.mktemp("out")
    img = hands["crop"]
    rgb_write(src / "good.png", img)
    rgb_write(src / "boxed.png", hands["render"])
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    rgb_write(src / "gray.png", gray)  # one channel on disk
    rgb_write(src / "gray_rgb.png", np.repeat(gray[..., None], 3, axis=2))
    assert cv2.imwrite(str(src / "rgba.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGRA))
    assert cv2.imwrite(str(src / "sixteen.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    rgb_write(src / "huge.png", np.tile(img[:48, :1], (1, 8200, 1)))  # 8200 x 48
    rgb_write(src / "tiny.png", img[:20, :20])
    rgb_write(src / "offbox.png", img)
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 10)
    (src / "broken.mp4").write_bytes(os.urandom(2000))
    writer = cv2.VideoWriter(str(src / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5, (S, S))
    for k in range(3):
        writer.write(cv2.cvtColor(np.roll(img, 2 * k, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    names = sorted(p.name for p in src.iterdir())
    boxes = {n: None for n in names}
    boxes["boxed.png"] = hands["box"]
    boxes["offbox.png"] = [S + 5, 10, 20, 20]  # right of the image
    (src.parent / f"{src.name}_boxes.json").write_text(json.dumps(boxes))
    res = run_script(f"ckpt={ckpt}", f"input={src}", f"out={out}", f"boxes={src.parent / (src.name + '_boxes.json')}")
    return {"src": src, "out": out, "res": res, "names": names, "boxes": boxes, "box_center": hands["box_center"]}


# ----------------------------------------------------------------------------- end to end
def test_folder_run_writes_every_output_and_counts_the_failures(folder_run):
    res, out = folder_run["res"], folder_run["out"]
    failed = {"tiny.png", "corrupt.jpg", "offbox.png", "broken.mp4"}
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{len(failed)} of {len(folder_run['names'])} inputs failed: ")
    for name, why in (("tiny.png", "min_side"), ("corrupt.jpg", "not a readable image"), ("offbox.png", "outside"),
                      ("broken.mp4", "video")):
        assert name in last and why in last.split(name, 1)[1].split(";")[0], last
    for name in folder_run["names"]:
        stem = Path(name).stem
        assert (out / f"{stem}.json").is_file() == (name not in failed), name
    for stem in ("good", "boxed", "gray", "rgba", "sixteen", "huge"):
        rec = load(out, stem)
        assert np.asarray(rec["joints_2d_px"]).shape == (21, 2) and np.asarray(rec["joints_xyz_m"]).shape == (21, 3)
        assert np.asarray(rec["verts_xyz_m"]).shape == (200, 3)  # the synthetic preset predicts a mesh
        drawn = cv2.imread(str(out / f"{stem}_skeleton.png"))
        assert drawn.shape[:2] == tuple(reversed(rec["image_size_wh"]))
        assert cv2.imread(str(out / f"{stem}_3d.png")).shape[0] > 100
        assert "hand size" in rec["placement"] and rec["K_source"].startswith("default")
    assert load(out, "huge")["image_size_wh"] == [8200, 48]


def test_json_2d_joints_are_the_projection_of_its_3d_joints(folder_run):
    """Known-answer invariant: 2D (image pixels) = K @ xyz; K_crop maps the same joints into the crop."""
    for stem in ("good", "boxed", "huge"):
        rec = load(folder_run["out"], stem)
        xyz, K, uv = (np.asarray(rec[k]) for k in ("joints_xyz_m", "K", "joints_2d_px"))
        assert np.abs(project(xyz, K) - uv).max() < 1e-2
        # the crop's K is the crop of the image's K (crop_and_rotate's), about the box given
        Kc, _ = crop_intrinsics(K, rec["crop"]["center_px"], rec["crop"]["side_px"], S)
        np.testing.assert_allclose(np.asarray(rec["K_crop"]), Kc, rtol=1e-5, atol=1e-3)
        assert np.all(np.asarray(rec["joints_xyz_m"])[:, 2] > 0)
    box = folder_run["boxes"]["boxed.png"]
    crop = load(folder_run["out"], "boxed")["crop"]
    assert crop["side_px"] == pytest.approx(max(box[2:]) * 1.3, rel=1e-6)  # box_scale 1.3
    # [x, y, w, h] in edge coordinates is centred where the dataset's square box (pixel centres) is
    assert crop["center_px"] == pytest.approx(list(folder_run["box_center"]), abs=1e-3)


def test_odd_formats_give_what_their_8_bit_rgb_twin_gives(folder_run):
    """RGBA drops alpha, 16 bits scale by 1/257, grey repeats: the same pixels, so the same prediction."""
    out = folder_run["out"]
    good, gray_rgb = load(out, "good"), load(out, "gray_rgb")
    for stem, twin in (("rgba", good), ("sixteen", good), ("gray", gray_rgb)):
        assert load(out, stem)["joints_xyz_m"] == twin["joints_xyz_m"], stem


def test_video_gets_per_frame_json_and_an_annotated_video(folder_run):
    out = folder_run["out"]
    rec = load(out, "clip")
    assert rec["num_frames"] == 3 and [f["frame"] for f in rec["frames"]] == [0, 1, 2]
    assert all(np.asarray(f["joints_xyz_m"]).shape == (21, 3) for f in rec["frames"])
    cap = cv2.VideoCapture(str(out / rec["annotated_video"]))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 3 and frames[0].shape == (S, S, 3)
    assert (out / "clip_skeleton.png").is_file() and (out / "clip_3d.png").is_file()


def test_left_hand_run_mirrors_in_and_out_exactly(folder_run, ckpt, hands, tmp_path):
    """A mirrored image with hand=left gives the mirrored prediction: u -> W - 1 - u, x -> -x."""
    src = tmp_path / "left"
    src.mkdir()
    rgb_write(src / "good.png", hands["crop"][:, ::-1])
    W = hands["render"].shape[1]
    rgb_write(src / "boxed.png", hands["render"][:, ::-1])
    x, y, w, h = hands["box"]
    (tmp_path / "boxes.json").write_text(json.dumps({"good.png": None, "boxed.png": [W - x - w, y, w, h]}))
    res = run_script(f"ckpt={ckpt}", f"input={src}", f"out={tmp_path / 'out'}", "hand=left",
                     f"boxes={tmp_path / 'boxes.json'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "all 2 inputs done" in res.stdout
    for stem in ("good", "boxed"):
        right, left = load(folder_run["out"], stem), load(tmp_path / "out", stem)
        width = right["image_size_wh"][0]
        r2, l2 = np.asarray(right["joints_2d_px"]), np.asarray(left["joints_2d_px"])
        np.testing.assert_allclose(l2[:, 0], width - 1 - r2[:, 0], atol=2e-3)
        np.testing.assert_allclose(l2[:, 1], r2[:, 1], atol=2e-3)
        rx, lx = np.asarray(right["joints_xyz_m"]), np.asarray(left["joints_xyz_m"])
        np.testing.assert_allclose(lx, rx * [-1.0, 1.0, 1.0], atol=1e-6)
        assert left["hand"] == "left"
        # the crop reported is of the image as given, about the box as given
        K = np.asarray(left["K"])
        Kc, _ = crop_intrinsics(K, left["crop"]["center_px"], left["crop"]["side_px"], S)
        np.testing.assert_allclose(np.asarray(left["K_crop"]), Kc, rtol=1e-5, atol=1e-3)
        assert left["crop"]["center_px"][0] == pytest.approx(width - 1 - right["crop"]["center_px"][0], abs=2e-3)


# ----------------------------------------------------------------------------- in-process pieces
def test_uv_follows_the_models_pixel_convention(ckpt, hands):
    """An image of exactly the model's size without a box is its own crop: the 2D joints are the model's
    uv in pixels, u * S - 0.5 (docs/conventions.md), computed here from the model's own output."""
    model = model_from_checkpoint(ckpt)
    dm = DemoModel(model, torch.device("cpu"), 0.03)
    img = hands["crop"]
    res = predict_hand(dm, img, default_K(S, S, 2.5), None, hand="right", box_scale=1.3, where="t")
    np.testing.assert_array_equal(res["crop"], img)
    with torch.no_grad():
        uvd = model(normalize_image(img)[None])["joints"][0].double().numpy()
    np.testing.assert_allclose(res["joints_2d"], uvd[:, :2] * S - 0.5, atol=1e-4)
    np.testing.assert_allclose(crop_uv_to_image(uvd, res, S), res["joints_2d"], atol=1e-4)
    # the assumed hand size is the placed hand's middle MCP -> PIP
    assert np.linalg.norm(res["joints_xyz"][9] - res["joints_xyz"][10]) == pytest.approx(0.03, rel=1e-6)


def test_config_mistakes_fail_before_the_model_loads(tmp_path, hands):
    rgb_write(tmp_path / "a.png", hands["crop"])
    base = {"ckpt": str(tmp_path / "missing.pt"), "input": str(tmp_path / "a.png"), "out": str(tmp_path / "o"),
            "hand": "right", "box": None, "boxes": None, "box_scale": 1.3, "K": None, "focal_rel": 2.5,
            "hand_scale": 0.03, "min_side": 32, "video_codec": "mp4v", "labels": None, "device": "cpu",
            "use_ema": True, "model": {"coord_units": None, "attention_over": None}}

    def run(**kw):
        return demo.run_demo(OmegaConf.create({**base, **kw}))

    with pytest.raises(ConfigError, match=r"box=\[1, 2, 3\]: expected 4 numbers"):
        run(box=[1, 2, 3])
    with pytest.raises(ConfigError, match="non-positive width"):
        run(box="10,10,0,5")
    with pytest.raises(ConfigError, match="hand='both'"):
        run(hand="both")
    with pytest.raises(ConfigError, match=r"K=.*expected 4 numbers"):
        run(K=[500, 500])
    with pytest.raises(FileNotFoundError, match="input=.*nowhere"):
        run(input=str(tmp_path / "nowhere"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"out: cannot write to {blocker / 'sub'}"):
        run(out=str(blocker / "sub"))
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        run()  # everything else is fine: only now is the checkpoint read


def test_box_outside_and_partly_outside(hands):
    with pytest.raises(InputError, match=r"x.png: box .* lies outside the 64x64 image"):
        crop_square((-30, 0, 30, 10), S, S, 1.3, "x.png")  # touches the left edge from outside
    center, side = crop_square((-10, -10, 30, 20), S, S, 1.0, "x.png")
    crop, _, _ = make_crop(hands["crop"], default_K(S, S, 2.5), center, side, S)
    assert crop.shape == (S, S, 3) and (crop[:10] == 0).all()  # padded black where the box leaves the image


@pytest.mark.parametrize("side", [60.0, 500.0])  # cropped directly; shrunk first (more than 2x the input side)
def test_crop_pixels_sit_where_its_map_says(side):
    """A float image whose pixels hold their own (x, y): every crop pixel must hold the image point its
    map (inverse of image -> crop) names, with or without the anti-aliasing shrink."""
    H, W = 700, 900
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    image = np.stack([xs, ys, np.zeros_like(xs)], -1)
    K = default_K(W, H, 2.5)
    crop, K_crop, A = make_crop(image, K, (400.3, 350.7), side, S)
    rows, cols = np.mgrid[4:S - 4, 4:S - 4]  # away from the border, where area sums meet the image edge
    p = np.stack([cols, rows, np.ones_like(rows)], -1).astype(np.float64) @ np.linalg.inv(A).T
    np.testing.assert_allclose(crop[4:S - 4, 4:S - 4, :2], p[..., :2], atol=2e-2)
    np.testing.assert_allclose(K_crop, crop_intrinsics(K, (400.3, 350.7), side, S)[0], rtol=1e-9, atol=1e-9)


def test_mean_error_2d_known_answer():
    gt = np.zeros((2, 21, 2))
    pred = gt.copy()
    pred[0] += [3.0, 4.0]  # 5 px everywhere
    pred[1, :7] += [0.0, 21.0]  # 21 px on a third of the joints: mean 7 px
    mean, per = metrics.mean_error_2d(pred, gt)
    np.testing.assert_allclose(per, [5.0, 7.0])
    assert mean == pytest.approx(6.0)
    with pytest.raises(ValueError, match="arrays of one shape"):
        metrics.mean_error_2d(pred[:, :20], gt)


# ----------------------------------------------------------------------------- other checkpoints, real photos
def test_imported_released_weights_run(tmp_path, hands):
    """The released preset (256 px, pixel = u * 256, J on metric vertices, MANO-sized mesh) from random weights."""
    from test_released import random_released_state

    from cliphand3d.apps.released import import_released

    src = tmp_path / "released.pth.tar"
    torch.save({"state_dict": random_released_state()}, src)
    import_released(src, tmp_path / "released.pt")
    rgb_write(tmp_path / "in.png", hands["render"])
    res = run_script(f"ckpt={tmp_path / 'released.pt'}", f"input={tmp_path / 'in.png'}", f"out={tmp_path / 'out'}",
                     "model.coord_units=unit", "K=[500,500,111.5,111.5]", f"box={hands['box']}".replace(" ", ""))
    assert res.returncode == 0, res.stderr[-3000:]
    rec = load(tmp_path / "out", "in")
    xyz, K = np.asarray(rec["joints_xyz_m"]), np.asarray(rec["K"])
    assert K[0, 0] == 500 and "given" in rec["K_source"] and np.asarray(rec["verts_xyz_m"]).shape == (778, 3)
    # random weights put joints anywhere (even near z = 0): relative to the 1e-7 m rounding of the JSON
    np.testing.assert_allclose(project(xyz, K), np.asarray(rec["joints_2d_px"]), rtol=1e-3, atol=1e-2)
    assert np.isfinite(xyz).all()


def test_joints_only_checkpoint_runs(tmp_path, hands):
    """A preset without a mesh (RHD, model_template.joints_only): joints only, no vertex entries."""
    from cliphand3d.train.run import train

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"run_dir={tmp_path / 'run'}", *TINY,
                                                      "model_template.joints_only=true", "trainer.max_steps=1"])
    train(cfg)
    rgb_write(tmp_path / "a.png", hands["crop"])
    conf = OmegaConf.load(CONFIGS / "demo.yaml")
    conf.pop("defaults"), conf.pop("hydra")
    conf.update(ckpt=str(tmp_path / "run" / "checkpoints" / "last.pt"), input=str(tmp_path / "a.png"),
                out=str(tmp_path / "out"), device="cpu")
    assert demo.run_demo(conf)[:2] == (0, 1)
    rec = load(tmp_path / "out", "a")
    assert np.asarray(rec["joints_xyz_m"]).shape == (21, 3) and "verts_xyz_m" not in rec
    assert (tmp_path / "out" / "a_3d.png").is_file()


def test_real_freihand_photos_run_and_are_scored(ckpt, tmp_path):
    if not REAL.is_dir():
        pytest.skip(f"real samples not found at {REAL} (a clone without ../shared)")
    res = run_script(f"ckpt={ckpt}", f"input={REAL}", f"out={tmp_path}", f"labels={REAL / 'test_freihand.json'}")
    assert res.returncode == 0, res.stderr[-3000:]
    photos = sorted(REAL.glob("*.jpg"))
    assert len(photos) == 8
    for p in photos:
        assert (tmp_path / f"{p.stem}.json").is_file() and (tmp_path / f"{p.stem}_skeleton.png").is_file()
    report = json.loads((tmp_path / "labels_2d_error.json").read_text())
    assert report["num_images"] == 8
    assert 0 < report["mean_2d_error_px"] < 224 and 0 < report["mean_pose_baseline_px"] < 224
    assert "2D error on 8 labelled images" in res.stdout


def test_a_skipped_input_is_reported_on_its_own_line(tmp_path, monkeypatch, capsys):
    import logging
    import sys

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"\x89PNG not an image")
    monkeypatch.setattr(demo, "load_demo_model", lambda cfg: None)  # both fail before the model is used
    handler = logging.StreamHandler(sys.stderr)  # the console handler scripts log through
    logging.getLogger().addHandler(handler)
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("demo", overrides=["ckpt=x.pt", f"input={tmp_path}", f"out={tmp_path / 'out'}"])
        failed, total, _ = demo.run_demo(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert (failed, total) == (2, 2) and err.count("skipped ") == 2
    # each report starts a line of its own, not the progress bar's
    assert all(line.startswith("skipped ") for line in err.replace("\r", "\n").splitlines() if "skipped " in line)
