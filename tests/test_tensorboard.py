"""TensorBoard as a person sees it: a tiny training run with the logger on, its event file read back
(scalars, skeleton images, PCK figure: tags, steps, sizes), and the figures' content checked against
known inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cliphand3d import metrics, viz
from cliphand3d.data.transforms import denormalize_image, normalize_image
from cliphand3d.geometry import project
from cliphand3d.train.logger import RunLogger

REPO = Path(__file__).resolve().parents[1]
IMG, NUM_VAL = 64, 6
TINY = [
    "data.num_train=16", f"data.num_val={NUM_VAL}", "data.num_verts=200", f"data.img_size={IMG}",
    "model_template.build.levels=[40,80,120]", "model_template.num_samples=16",
    "model.backbone=resnet18", "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16",
    "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
    "trainer.batch_size=4", "trainer.val_batch_size=8", "trainer.num_workers=0", "trainer.max_steps=4",
    "trainer.ckpt_every_steps=2",
    # one epoch of 4 steps: validation at step 2 (val_every_steps) and at the end (step 4)
    "trainer.val_every_steps=2", "logger.tensorboard=true", "logger.log_every=2",
]


def read_events(tb_dir: Path) -> EventAccumulator:
    files = list(tb_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one event file in {tb_dir}, found {files}"
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def decode(event) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(event.encoded_image_string, np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)


def test_training_run_writes_scalars_skeletons_and_pck_to_tensorboard(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"run_dir={tmp_path}", f"hydra.run.dir={tmp_path}",
           *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ea = read_events(tmp_path / "tb")
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}

    # training scalars every log_every = 2 steps (and at step 1), each loss term beside the total
    steps = sorted(scalars["train/loss"])
    assert {2, 4} <= set(steps) and max(steps) == 4
    weights = yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["weights"]
    terms = ("joints_coarse", "joints", "verts", "stages", "heatmap", "clip_x", "clip_y", "clip_z")
    for name in terms + ("lr",):
        assert sorted(scalars[f"train/{name}"]) == steps, name
    # the logged total is the weighted sum of the logged terms (clip_<axis> weighs loss.weights.clip)
    for s in steps:
        total = sum(scalars[f"train/{k}"][s] * weights.get(k, weights["clip"]) for k in terms)
        assert scalars["train/loss"][s] == pytest.approx(total, rel=1e-5)

    # validation scalars at both validations; the last equal what the run reports in its summary
    last = json.loads((tmp_path / "train_summary.json").read_text())["last"]
    assert {"pa_mpjpe_mm", "auc_pa_0_50", "f5", "retrieval_x"} <= set(last)
    for k, v in last.items():
        assert sorted(scalars[f"val/{k}"]) == [2, 4], k
        assert scalars[f"val/{k}"][4] == pytest.approx(v, rel=1e-6), k

    # one strip of NUM_VAL tiles (crop | crop) per validation, and the PCK figure (4.5 x 3.5 in, 100 dpi)
    for tag, (w, h) in {"val/skeletons": (NUM_VAL * 2 * IMG, IMG), "val/pck": (450, 350)}.items():
        events = ea.Images(tag)
        assert [e.step for e in events] == [2, 4], tag
        for e in events:
            assert (e.width, e.height) == (w, h), tag
            assert decode(e).shape == (h, w, 3), tag
    # the best / median / worst grid eval.py writes: 3 rows of 3 (crop | crop) tiles, captions under each
    events = ea.Images("val/samples")
    assert [e.step for e in events] == [2, 4]
    for e in events:
        assert e.width == 3 * (2 * IMG + 6) + 6 and 3 * IMG < e.height < 3 * 2 * IMG


# --------------------------------------------------------------------------- figure content
class Crops:
    """Three validation items: flat-coloured crops, each with its own intrinsics and hand."""

    def __init__(self, protocol: str):
        rng = np.random.default_rng(0)
        self.protocol = protocol
        self.items = []
        for i, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
            K = np.array([[150.0 + 40 * i, 0, 32], [0, 150.0 + 40 * i, 32], [0, 0, 1]])
            xyz = np.array([0.0, 0.0, 0.6]) + rng.uniform(-0.06, 0.06, (21, 3))
            image = normalize_image(np.full((IMG, IMG, 3), colour, np.uint8))
            self.items.append({"image": image, "K": torch.tensor(K, dtype=torch.float32),
                               "joints_xyz": torch.tensor(xyz, dtype=torch.float32)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def figure_preds(data: Crops) -> dict:
    order = [2, 0, 1]  # predictions arrive in loader order, not dataset order
    gt = np.stack([data[i]["joints_xyz"].numpy().astype(np.float64) for i in order])
    pred = gt.copy()
    pred[:, 1:] += np.array([0.02, -0.01, 0.0])  # every joint but the root 22 mm off
    return {"index": np.array(order), "pred_xyz": pred, "gt_xyz": gt, "visible": np.ones((3, 21), bool)}


def test_validation_figures_show_each_prediction_on_its_own_crop(tmp_path):
    data = Crops("freihand")
    preds = figure_preds(data)
    logger = RunLogger(tmp_path, tensorboard=True, num_images=2)
    logger.validation_figures(data, preds, step=7)
    logger.close()
    ea = read_events(tmp_path / "tb")
    (event,) = ea.Images("val/skeletons")
    strip = decode(event)
    assert event.step == 7 and strip.shape == (IMG, 2 * 2 * IMG, 3)
    for n, i in enumerate(preds["index"][:2]):
        item = data[int(i)]
        img, K = denormalize_image(item["image"]), item["K"].numpy().astype(np.float64)
        pred_uv, gt_uv = project(preds["pred_xyz"][n], K), project(preds["gt_xyz"][n], K)
        left, right = strip[:, 2 * n * IMG:(2 * n + 1) * IMG], strip[:, (2 * n + 1) * IMG:(2 * n + 2) * IMG]
        # the crop's own colour shows through: the item is the prediction's, not the n-th in the set
        assert (left[0, 0] == img[0, 0]).all() and (right[0, 0] == img[0, 0]).all()
        # left: the prediction over the true skeleton; right: the prediction alone (viz.draw_pred_vs_gt)
        np.testing.assert_array_equal(right, viz.draw_skeleton(img, pred_uv))
        np.testing.assert_array_equal(left, viz.draw_pred_vs_gt(img, pred_uv, gt_uv)[:, :IMG])
        assert (left != right).any()  # the true skeleton is drawn under the prediction on the left


@pytest.mark.parametrize("protocol", ["freihand", "rhd"])
def test_validation_pck_figure_is_the_protocols_curve(tmp_path, monkeypatch, protocol):
    data = Crops(protocol)
    preds = figure_preds(data)
    preds["visible"][0, 4:9] = False
    drawn = {}
    original = viz.pck_figure

    def spy(curves, title="PCK"):
        drawn.update(curves=curves, title=title)
        return original(curves, title=title)

    monkeypatch.setattr(viz, "pck_figure", spy)
    logger = RunLogger(tmp_path, tensorboard=True, num_images=1)
    logger.validation_figures(data, preds, step=3)
    logger.close()
    assert [e.step for e in read_events(tmp_path / "tb").Images("val/pck")] == [3]
    # the curve whose area validation reports: Procrustes-aligned on FreiHAND's 100 thresholds
    # (auc_pa_0_50); on RHD hand3d-normalised visible joints on its 20 thresholds (auc_0_50)
    t, curve = drawn["curves"]["model"]
    vis = preds["visible"] if protocol == "rhd" else None
    reported = metrics.evaluate(protocol, preds["pred_xyz"], preds["gt_xyz"], visible=vis)
    key, steps = ("auc_0_50", 20) if protocol == "rhd" else ("auc_pa_0_50", 100)
    assert len(t) == steps and t[0] == 0.0 and t[-1] == pytest.approx(50.0)
    area = ((curve[1:] + curve[:-1]) / 2 * np.diff(t)).sum() / (t[-1] - t[0])
    assert area == pytest.approx(reported[key], abs=1e-12)


def test_validation_samples_grid_ranks_by_the_protocols_error(tmp_path, monkeypatch):
    from cliphand3d.evaluation import figures

    data = Crops("freihand")
    preds = figure_preds(data)
    preds["pred_xyz"] = preds["gt_xyz"] + np.random.default_rng(1).normal(size=preds["gt_xyz"].shape) * \
        np.array([0.002, 0.009, 0.005])[:, None, None]  # loader position 0 best, 1 worst, 2 median
    drawn = {}
    original = viz.grid_image

    def spy(images, captions, **kw):
        drawn.update(images=images, captions=captions, canvas=original(images, captions, **kw))
        return drawn["canvas"]

    monkeypatch.setattr(viz, "grid_image", spy)
    logger = RunLogger(tmp_path, tensorboard=True, samples_per_group=1)
    logger.validation_figures(data, preds, step=5)
    logger.close()
    (event,) = read_events(tmp_path / "tb").Images("val/samples")
    assert event.step == 5
    np.testing.assert_array_equal(decode(event), drawn["canvas"])  # PNG: the grid, pixel for pixel
    errors = metrics.protocol_joint_errors("freihand", preds["pred_xyz"], preds["gt_xyz"]).mean(1)
    assert [c[0].split(":")[0] for c in drawn["captions"]] == ["best 1", "median 1", "worst 1"]
    for tile, pos in zip(drawn["images"], (0, 2, 1)):
        item = data[int(preds["index"][pos])]
        img, K = denormalize_image(item["image"]), item["K"].numpy().astype(np.float64)
        want = viz.draw_pred_vs_gt(img, project(preds["pred_xyz"][pos], K), project(preds["gt_xyz"][pos], K))
        np.testing.assert_array_equal(tile, want)
    assert errors[0] < errors[2] < errors[1]
    assert figures.pick_best_median_worst(errors, 1) == {"best": [0], "median": [2], "worst": [1]}
