"""eval.py on FreiHAND-format data: the submission file is what the official scorer reads, and
metrics.json agrees with an independent computation from pred.json and the released ground truth."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial import cKDTree

from cliphand3d.data.transforms import model_input
from cliphand3d.data.writers import write_freihand
from cliphand3d.skeleton import JOINT_NAMES

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.img_size=64", "model.backbone=resnet18", "model.pretrained=null", "model.deconv_channels=16",
    "model.depth_bins=16", "model.joint_feature_hidden=16", "model.token_dim=32", "model.widths=[32,16,16,8,8]",
    "model.blocks_per_stage=1", "model.heads=2", "model_template.num_samples=32", "trainer.max_steps=3",
    "trainer.batch_size=4", "trainer.val_batch_size=8", "trainer.num_workers=0", "logger.tensorboard=false",
    "text=tiny", "text.pretrained=null",
]
# evaluation images: enough for 4 retrieval batches of 16 and one of 64 (eval.yaml retrieval_batch_sizes)
N_EVAL = 64
# The experiment's recipe as it was before issue #19, which the figures below (placement: "measured on 64
# images") were measured with. These tests are about evaluation and placement, not the recipe: the whole image
# for every split (the experiment now trains on mask boxes and tests on the centre crop, which these files'
# hands, drawn anywhere in the image, would be cut by), no colour augmentation, uvd losses without the mesh
# terms, symmetric input normalisation and weight decay 1e-4. Under today's recipe the 3-step model is another
# poor guess (its estimated root depth another wrong ratio): PA-MPJPE moved 5-8% between placements, not ~2%.
RECIPE_BEFORE_19 = [
    "data.train.crop=full", "data.val.crop=full", "data.test.crop=full", "data.augment.color_jitter=0",
    "data.augment.channel_noise=0", "loss.units=uvd", "loss.weights.edge=0", "loss.weights.normal=0",
    "model.input_norm=symmetric", "optim.weight_decay=1e-4",
]


def sh(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def official_align(gt, pred):
    """lmb-freiburg/freihand eval.py align_w_scale, per sample."""
    t1, t2 = gt.mean(0), pred.mean(0)
    a, b = gt - t1, pred - t2
    s1, s2 = np.linalg.norm(a) + 1e-8, np.linalg.norm(b) + 1e-8
    R, s = orthogonal_procrustes(a / s1, b / s2)
    return (b / s2) @ R.T * s * s1 + t1


def official_fscore(gt, pr, th):
    d_gt = cKDTree(pr).query(gt)[0]
    d_pr = cKDTree(gt).query(pr)[0]
    recall, precision = (d_pr < th).mean(), (d_gt < th).mean()
    return 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = write_freihand(tmp_path_factory.mktemp("fh"), num_train=6, num_eval=N_EVAL, seed=3, versions=2)
    run = tmp_path_factory.mktemp("run")
    sh(str(REPO / "scripts" / "train.py"), "+experiment=freihand", "trainer.device=cpu", f"data.root={root}",
       "data.versions=[0,1]", f"run_dir={run}", f"hydra.run.dir={run}", *TINY, *RECIPE_BEFORE_19)
    return root, run


def test_eval_writes_official_submission_and_consistent_metrics(trained, tmp_path):
    root, run = trained
    out = sh(str(REPO / "scripts" / "eval.py"), f"ckpt={run / 'checkpoints' / 'best.pt'}", f"out_dir={tmp_path}")
    assert "| mean-pose baseline |" in out and "pa_mpjpe_mm" in out
    pred = json.loads((tmp_path / "pred.json").read_text())
    # the official scorer's reader: two lists (xyz, verts), one entry per evaluation image, metres
    assert isinstance(pred, list) and len(pred) == 2
    xyz, verts = np.asarray(pred[0]), np.asarray(pred[1])
    gt_xyz = np.asarray(json.loads((root / "evaluation_xyz.json").read_text()))
    gt_verts = np.asarray(json.loads((root / "evaluation_verts.json").read_text()))
    assert xyz.shape == gt_xyz.shape == (N_EVAL, 21, 3) and verts.shape == gt_verts.shape
    # metres in the camera frame: the demo protocol places the prediction at the true root depth and
    # scale, so the wrist lands within the predicted root-relative depth error (well under 10 cm)
    assert np.abs(xyz[:, 0, 2] - gt_xyz[:, 0, 2]).max() < 0.1

    m = json.loads((tmp_path / "metrics.json").read_text())
    pa = np.mean([np.linalg.norm(official_align(g, p) - g, axis=1) for g, p in zip(gt_xyz, xyz)]) * 1000
    rr = np.mean(np.linalg.norm((xyz - xyz[:, :1]) - (gt_xyz - gt_xyz[:, :1]), axis=-1)) * 1000
    pv = np.mean([np.linalg.norm(official_align(g, p) - g, axis=1) for g, p in zip(gt_verts, verts)]) * 1000
    f5 = np.mean([official_fscore(g, official_align(g, p), 0.005) for g, p in zip(gt_verts, verts)])
    f15 = np.mean([official_fscore(g, official_align(g, p), 0.015) for g, p in zip(gt_verts, verts)])
    # AUC: per keypoint PCK over linspace(0, 50 mm, 100), trapezoid / range, mean over keypoints
    d = np.stack([np.linalg.norm(official_align(g, p) - g, axis=1) for g, p in zip(gt_xyz, xyz)])
    t = np.linspace(0, 0.05, 100)
    pck = np.stack([(d[:, k, None] <= t).mean(0) for k in range(21)])
    auc = np.mean([np.trapezoid(c, t) / 0.05 for c in pck])
    assert m["pa_mpjpe_mm"] == pytest.approx(pa, rel=1e-5)
    assert m["mpjpe_mm"] == pytest.approx(rr, rel=1e-5)
    assert m["pa_mpvpe_mm"] == pytest.approx(pv, rel=1e-5)
    assert m["f5"] == pytest.approx(f5, abs=1e-9) and m["f15"] == pytest.approx(f15, abs=1e-9)
    assert m["auc_pa_0_50"] == pytest.approx(auc, abs=1e-9)
    assert m["num_samples"] == N_EVAL and "baseline_mean_pose" in m
    assert m["split"] == "test"  # the official evaluation split by default
    # retrieval on real batches: a mean over whole batches of b samples is a multiple of 1 / N_EVAL
    # (b divides N_EVAL); a batch size beyond the set stays NaN
    for a in ("x", "y", "z"):
        for b in (16, 64):
            acc = m[f"retrieval_{a}_{b}"]
            assert 0.0 <= acc <= 1.0 and acc * N_EVAL == pytest.approx(round(acc * N_EVAL), abs=1e-9)
        assert np.isnan(m[f"retrieval_{a}_256"])
    assert "retrieval_x_16" in out and "retrieval_z_64" in out
    for name in ("pck.png", "per_sample.csv", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    # the pictures: best / median / worst rows of 4 (crop | crop) tiles, and one bar per joint whose values are
    # the mean Procrustes-aligned error of that joint, computed here from pred.json with the official alignment
    grid, chart = cv2.imread(str(tmp_path / "samples.png")), cv2.imread(str(tmp_path / "per_joint.png"))
    assert grid.shape[1] == 4 * (2 * 64 + 6) + 6 and 3 * 64 < grid.shape[0] < 3 * 2 * 64 and chart.shape[1] > 400
    assert list(m["per_joint_mm"]) == list(JOINT_NAMES)
    np.testing.assert_allclose(list(m["per_joint_mm"].values()), d.mean(0) * 1000, rtol=1e-5)
    assert np.mean(list(m["per_joint_mm"].values())) == pytest.approx(m["pa_mpjpe_mm"], rel=1e-9)
    rows = (tmp_path / "per_sample.csv").read_text().splitlines()
    assert rows[0] == "index,pa_mpjpe_mm,mpjpe_mm" and len(rows) == N_EVAL + 1


def test_eval_split_val_scores_the_held_out_training_hands(trained, tmp_path):
    _, run = trained
    sh(str(REPO / "scripts" / "eval.py"), f"ckpt={run / 'checkpoints' / 'best.pt'}", f"out_dir={tmp_path}",
       "split=val")
    m = json.loads((tmp_path / "metrics.json").read_text())
    # 6 training hands hold out round(0.03 * 6) -> at least 1, in both trained versions
    assert m["split"] == "val" and m["num_samples"] == 2 and m["pa_mpjpe_mm"] > 0
    # the submission file is for the official evaluation split only, never for held-out training hands
    assert not (tmp_path / "pred.json").exists()


def test_eval_refuses_a_checkpoint_that_does_not_fit(trained, tmp_path):
    import torch

    _, run = trained
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["config"]["model"]["depth_bins"] = 8  # the config now asks for a different model
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), f"ckpt={bad}", f"out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 1
    # one message naming the mismatching keys and shapes, not a stack trace
    assert res.stderr.lstrip().startswith("error:") and "Traceback" not in res.stderr
    assert "joint_regressor" in res.stderr and "shape" in res.stderr.lower()


def eval_error(*args) -> str:
    """eval.py stopped with exit 1 and one `error:` message, no traceback; returns it."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), *map(str, args)], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.lstrip().startswith("error:") and res.stderr.count("error:") == 1, res.stderr[-3000:]
    return res.stderr


def test_eval_refuses_a_checkpoint_from_an_older_config_listing_the_keys(trained, tmp_path):
    _, run = trained
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["config"]["model"]["attention_mode"] = "legacy"  # a key this code's model no longer takes
    ckpt["config"]["model"]["num_refine"] = 2
    torch.save(ckpt, tmp_path / "old.pt")
    msg = eval_error(f"ckpt={tmp_path / 'old.pt'}", f"out_dir={tmp_path / 'out'}")
    assert str(tmp_path / "old.pt") in msg
    assert "keys the current code does not take: model.attention_mode, model.num_refine" in msg
    ckpt["config"]["model"]["_target_"] = "cliphand3d.models.renamed.OldHand"  # a model class that is gone
    torch.save(ckpt, tmp_path / "gone.pt")
    msg = eval_error(f"ckpt={tmp_path / 'gone.pt'}", f"out_dir={tmp_path / 'out'}")
    assert "model._target_='cliphand3d.models.renamed.OldHand' cannot be imported" in msg


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
    """Another FreiHAND folder, told apart by its 16 evaluation hands (all 4 versions: data=freihand reads them)."""
    return write_freihand(tmp_path_factory.mktemp("fh_other"), num_train=6, num_eval=16, seed=5, versions=4)


@pytest.mark.parametrize("how", [["data.root={}"], ["root={}"], ["data=freihand", "data.root={}"]])
def test_eval_data_root_as_typed_for_train_py_works_beside_root(trained, other_root, tmp_path, how):
    _, run = trained
    sh(str(REPO / "scripts" / "eval.py"), f"ckpt={run / 'checkpoints' / 'best.pt'}", f"out_dir={tmp_path}",
       "write_pred_json=false", "baseline_samples=8", *[h.format(other_root) for h in how])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_samples"] == 16  # the other folder's evaluation split, not the training run's


def test_eval_root_and_data_root_naming_two_folders_is_refused():
    from omegaconf import OmegaConf

    from cliphand3d.errors import ConfigError
    from cliphand3d.evaluation.run import eval_config

    saved = OmegaConf.create({"data": {"root": "/old", "img_size": 64, "test": {"root": "/old"}}})
    run = eval_config(OmegaConf.create({"data": {"root": "/new"}, "root": None}), saved)
    assert run.data.root == run.data.test.root == "/new"
    run = eval_config(OmegaConf.create({"data": {"root": "/new"}, "root": "/new"}), saved)
    assert run.data.test.root == "/new"
    with pytest.raises(ConfigError, match="root=/a and data.root=/b name different folders"):
        eval_config(OmegaConf.create({"data": {"root": "/b"}, "root": "/a"}), saved)


def test_a_folder_given_for_generated_data_is_refused_not_ignored():
    from omegaconf import OmegaConf

    from cliphand3d.errors import ConfigError
    from cliphand3d.evaluation.run import eval_config

    saved = OmegaConf.create({"data": {"name": "synthetic", "format": "synthetic", "root": None, "img_size": 64,
                                       "test": {"length": 4}}})
    for given in ({"data": {"root": "/data/FreiHAND"}, "root": None}, {"data": {"root": None}, "root": "/data/FreiHAND"}):
        with pytest.raises(ConfigError, match=r"read no folder.*data=freihand root=/data/FreiHAND"):
            eval_config(OmegaConf.create(given), saved)
    assert eval_config(OmegaConf.create({"data": {"root": None}, "root": None}), saved).data.test.length == 4


# --------------------------------------------------------------------------- FreiHAND without released ground truth
class ExactModel(torch.nn.Module):
    """Returns the true uvd of whichever evaluation crop it is shown (looked up by its pixels): a model
    whose predictions are exact, so any error in what predict does around it shows."""

    def __init__(self, labelled):
        super().__init__()
        self.table = {}
        for i in range(len(labelled)):
            item = labelled[i]
            # keyed by the model's input: the crop as predict hands it over (normalised on the device)
            self.table[model_input(item["image"]).numpy().tobytes()] = (item["joints_uvd"], item["verts_uvd"])

    def forward(self, images, pose_features=False):
        rows = [self.table[im.numpy().tobytes()] for im in images]
        return {"joints": torch.stack([r[0] for r in rows]), "verts": torch.stack([r[1] for r in rows])}


def test_predict_without_ground_truth_places_exact_uvd_exactly(fixture_dir):
    """FreiHAND evaluation without evaluation_xyz/verts.json: items carry only image, K and scale. With an
    exact model, the root depth and bone estimated from uvd, K and evaluation_scale.json put joints and
    vertices where the released ground truth has them, in dataset order, as the demo protocol (true root
    depth and bone) does."""
    from torch.utils.data import DataLoader

    from cliphand3d.data.freihand import FreiHAND
    from cliphand3d.evaluation.predict import predict

    labelled = FreiHAND(fixture_dir("fh_gt", write_freihand, num_train=1, num_eval=6, seed=4, versions=1),
                        split="eval", img_size=64)
    bare_root = fixture_dir("fh_nogt", write_freihand, num_train=1, num_eval=6, seed=4, versions=1, eval_gt=False)
    bare = FreiHAND(bare_root, split="eval", img_size=64, require_gt=False)
    assert not bare.has_labels
    model, cpu = ExactModel(labelled), torch.device("cpu")
    with_gt = predict(model, DataLoader(labelled, batch_size=4), cpu)
    no_gt = predict(model, DataLoader(bare, batch_size=4), cpu)
    gt_xyz = labelled.xyz  # evaluation_xyz.json
    assert "gt_xyz" not in no_gt and list(no_gt["index"]) == list(range(6))
    # float32 uvd in, metres out: agreement to a few micrometres
    np.testing.assert_allclose(no_gt["pred_xyz"], gt_xyz, atol=5e-6)
    np.testing.assert_allclose(no_gt["pred_verts"], labelled.verts, atol=5e-6)
    np.testing.assert_allclose(no_gt["pred_xyz"], with_gt["pred_xyz"], atol=5e-6)
    np.testing.assert_allclose(no_gt["root_depth"], with_gt["root_depth"], rtol=1e-5)
    np.testing.assert_allclose(no_gt["bone"], with_gt["bone"], rtol=1e-5)


@pytest.fixture(scope="module")
def placements(trained, tmp_path_factory):
    """eval.py three ways on one checkpoint: labelled with the true root depth and bone (default), labelled
    with them estimated, and on a copy of the layout without the released ground truth."""
    root, run = trained
    ckpt = run / "checkpoints" / "best.pt"
    out = tmp_path_factory.mktemp("placements")
    bare = out / "bare"
    shutil.copytree(root, bare, ignore=shutil.ignore_patterns("evaluation_xyz.json", "evaluation_verts.json",
                                                              "evaluation_mano.json"))
    sh(str(REPO / "scripts" / "eval.py"), f"ckpt={ckpt}", f"out_dir={out / 'gt'}")
    sh(str(REPO / "scripts" / "eval.py"), f"ckpt={ckpt}", f"out_dir={out / 'est'}", "placement=estimated")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    nogt = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), f"ckpt={ckpt}", f"root={bare}",
                           f"out_dir={out / 'nogt'}"], capture_output=True, text=True, timeout=600, env=env)
    return root, out, nogt


def test_eval_without_ground_truth_writes_the_submission(placements):
    root, out, nogt = placements
    assert nogt.returncode == 0, nogt.stderr[-3000:]
    said = nogt.stdout + nogt.stderr
    # no metrics, and the message names what is missing and where to get it
    assert "no metrics can be computed" in said
    assert "evaluation_xyz.json" in said and "FreiHAND_pub_v2_eval.zip" in said
    pred = json.loads((out / "nogt" / "pred.json").read_text())
    assert isinstance(pred, list) and len(pred) == 2
    xyz, verts = np.asarray(pred[0]), np.asarray(pred[1])
    gt_xyz = np.asarray(json.loads((root / "evaluation_xyz.json").read_text()))
    gt_verts = np.asarray(json.loads((root / "evaluation_verts.json").read_text()))
    assert xyz.shape == gt_xyz.shape == (N_EVAL, 21, 3) and verts.shape == gt_verts.shape
    # the same file a labelled run writes when told to place predictions without labels: same images, K
    # and scale (evaluation_scale.json there, |xyz9 - xyz10| of the labels here), in dataset order
    est = json.loads((out / "est" / "pred.json").read_text())
    # (float32 scale from two sources: 1e-6 relative)
    np.testing.assert_allclose(xyz, est[0], rtol=1e-5)
    np.testing.assert_allclose(verts, est[1], rtol=1e-5)
    # whatever the model got wrong, the submission has the metric size the release gives: the middle
    # MCP -> PIP bone of every hand is evaluation_scale.json's length
    scale = np.asarray(json.loads((root / "evaluation_scale.json").read_text()))
    np.testing.assert_allclose(np.linalg.norm(xyz[:, 9] - xyz[:, 10], axis=-1), scale, rtol=1e-5)
    m = json.loads((out / "nogt" / "metrics.json").read_text())
    assert m["placement"] == "estimated" and m["num_samples"] == N_EVAL and "pa_mpjpe_mm" not in m
    assert not (out / "nogt" / "table.md").exists()


ALIGNED = ("pa_mpjpe_mm", "auc_pa_0_50", "pa_mpvpe_mm", "f5", "f15")
UNALIGNED = ("mpjpe_mm", "kp_error_mm", "mpvpe_mm", "verts_error_mm")


def test_a_right_root_depth_ratio_leaves_every_aligned_figure_unchanged():
    """Placing uvd with root depth c*z and bone c*b scales the hand about the camera centre by c: when the
    estimate gets Zn = z / b right, only the metric size can be off, and the Procrustes-aligned figures
    (which fit a scale) do not move, while the unaligned ones do."""
    from cliphand3d import geometry as G
    from cliphand3d import metrics
    from cliphand3d.data.synthetic import sample_hand

    hands = [sample_hand(9, i) for i in range(12)]
    gt, gv = np.stack([h.xyz for h in hands]), np.stack([h.verts for h in hands])
    K = np.stack([h.K for h in hands])
    uvd, root, bone = G.xyz_to_uvd(gt, K, 224)
    rng = np.random.default_rng(0)
    noisy = uvd + rng.normal(0, [0.01, 0.01, 0.15], size=uvd.shape)  # a model's errors
    noisy_v = G.points_to_uvd(gv, K, 224, root, bone) + rng.normal(0, [0.01, 0.01, 0.15], size=gv.shape)
    ref = metrics.freihand_metrics(G.uvd_to_xyz(noisy, K, 224, root, bone), gt,
                                   G.uvd_to_xyz(noisy_v, K, 224, root, bone), gv)
    for c in (0.8, 1.25):
        m = metrics.freihand_metrics(G.uvd_to_xyz(noisy, K, 224, c * root, c * bone), gt,
                                     G.uvd_to_xyz(noisy_v, K, 224, c * root, c * bone), gv)
        for k in ALIGNED:  # to 1e-6: the scorer's +1e-8 m on the Procrustes norms is not scale-free
            assert m[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-12), k
        for k in UNALIGNED:
            assert abs(m[k] - ref[k]) > 0.05 * ref[k], k


def test_estimated_placement_on_a_trained_model_changes_unaligned_figures_far_more(placements):
    """Measured on the tiny checkpoint (3 steps: its uvd is poor, and the root depth estimated from it is
    several times too far). Aligned figures move only through the perspective of that wrong root-depth
    ratio: a few percent; the unaligned ones carry the whole placement error (about 1.4x for MPJPE)."""
    _, out, _ = placements
    g = json.loads((out / "gt" / "metrics.json").read_text())
    e = json.loads((out / "est" / "metrics.json").read_text())
    assert (g["placement"], e["placement"]) == ("gt", "estimated")
    # mean aligned errors move by a few percent; the F-scores, counts at a 5 / 15 mm threshold, move more
    # (measured on 64 images: PA-MPJPE +1.7%, AUC-PA -2.8%, F@5 -21%, F@15 -8%)
    for k in ("pa_mpjpe_mm", "auc_pa_0_50", "pa_mpvpe_mm"):
        assert e[k] == pytest.approx(g[k], rel=0.05), k
    for k in ("f5", "f15"):
        assert e[k] == pytest.approx(g[k], rel=0.3), k
    for k in ("mpjpe_mm", "kp_error_mm", "mpvpe_mm", "verts_error_mm"):
        assert abs(e[k] - g[k]) > 0.25 * g[k], k
    # both rows of the table placed the same way: the baseline too, from its own mean pose
    assert e["baseline_mean_pose"]["pa_mpjpe_mm"] == pytest.approx(g["baseline_mean_pose"]["pa_mpjpe_mm"], rel=0.1)


def test_eval_root_override_reaches_every_split():
    """A checkpoint stores its config resolved: data.train.root / data.val.root are paths, not ${data.root}.
    eval.py's root=DIR must move the splits too, or it silently evaluates the old folder."""
    from omegaconf import OmegaConf

    from cliphand3d.evaluation.run import eval_config

    saved = OmegaConf.create({"data": {"root": "/old", "img_size": 64, "train": {"root": "/old", "split": "train"},
                                       "val": {"root": "/old", "split": "eval"}, "test": {"root": "/old"}}})
    run = eval_config(OmegaConf.create({"data": None, "root": "/new"}), saved)
    assert run.data.root == run.data.train.root == run.data.val.root == run.data.test.root == "/new"
    assert saved.data.val.root == "/old"  # the checkpoint's own config is left alone


# --------------------------------------------------------------------------- mean-pose baseline from labels
def _no_rgb(monkeypatch, *modules):
    """read_image raises for colour images in these modules (grayscale masks are labels and stay readable)."""
    def refuse(path, *, grayscale=False):
        if not grayscale:
            raise AssertionError(f"decoded an RGB image for a label statistic: {path}")
        return real(path, grayscale=True)

    from cliphand3d.data import base
    real = base.read_image
    for m in (base, *modules):
        monkeypatch.setattr(m, "read_image", refuse)


def _item_mean(ds, indices):
    """The old computation: decode, crop and augment each item, average its uvd labels."""
    items = [ds[int(i)] for i in indices]
    return {k: np.mean([it[k].double().numpy() for it in items], 0) for k in ("joints_uvd", "verts_uvd")
            if k in items[0]}


@pytest.mark.parametrize("crop", ["mask", "full", "joints"])
def test_mean_pose_baseline_from_labels_equals_the_image_based_one_freihand(fixture_dir, monkeypatch, crop):
    from cliphand3d.data import freihand
    from cliphand3d.data.transforms import CropAugment
    from cliphand3d.evaluation.baselines import training_mean_uvd

    root = fixture_dir("fh_base", write_freihand, num_train=8, num_eval=1, seed=5, versions=2)
    ds = freihand.FreiHAND(root, split="train", versions=(0, 1), img_size=64, crop=crop, val_fraction=0,
                           augment=CropAugment(color_jitter=0.2))  # every random draw the items make
    indices = [0, 2, 4, 6, 9, 11, 13, 15]  # 8 of 16, evenly spaced over both versions
    old = _item_mean(ds, indices)
    _no_rgb(monkeypatch, freihand)
    if crop != "mask":  # no mask either: the box comes from the labels or the image header
        monkeypatch.setattr(freihand.FreiHAND, "read_mask", lambda *a: pytest.fail("read a mask"))
    new = training_mean_uvd(ds, 8)
    assert set(new) == {"joints_uvd", "verts_uvd"}
    for k in new:  # items are float32
        np.testing.assert_allclose(new[k], old[k], atol=2e-6)
    with pytest.raises(AssertionError, match="decoded an RGB image"):
        ds[0]  # the guard is live


def test_mean_pose_baseline_from_labels_equals_the_image_based_one_rhd_and_synthetic(fixture_dir, monkeypatch):
    from cliphand3d.data import rhd
    from cliphand3d.data.synthetic import SyntheticHands
    from cliphand3d.data.transforms import CropAugment
    from cliphand3d.data.writers import write_rhd
    from cliphand3d.evaluation.baselines import training_mean_uvd

    ds = rhd.RHD(fixture_dir("rhd_base", write_rhd, num_train=6, num_eval=1, seed=2), split="train", img_size=64,
                 val_fraction=0, augment=CropAugment())
    assert {ds.load_raw(i).extra["side"] for i in range(6)} == {"left", "right"}  # both mirror paths
    old = _item_mean(ds, range(6))
    _no_rgb(monkeypatch, rhd)
    np.testing.assert_allclose(training_mean_uvd(ds, 100)["joints_uvd"], old["joints_uvd"], atol=2e-6)
    # synthetic hands have no files: the silhouette that frames them comes from drawing them, as items do
    syn = SyntheticHands(length=20, img_size=48, augment=CropAugment())
    old = _item_mean(syn, [0, 5, 10, 14, 19])
    new = training_mean_uvd(syn, 5)
    for k in new:
        np.testing.assert_allclose(new[k], old[k], atol=2e-6)


def test_eval_time_data_keys_reach_the_run_config():
    """`eval.py ckpt=... +data.test.crop=centre` (no data=NAME) scores the checkpoint's own data config with that
    key changed; it used to be dropped silently, scoring the framing the run was trained with."""
    from omegaconf import OmegaConf

    from cliphand3d.evaluation.run import eval_config

    saved = OmegaConf.create({"data": {"name": "freihand", "root": "/old", "img_size": 64,
                                       "test": {"root": "/old", "crop": "full", "split": "eval"}}})
    run = eval_config(OmegaConf.create({"data": {"root": None, "test": {"crop": "centre", "centre_fraction": 0.6}},
                                        "root": None}), saved)
    assert run.data.test.crop == "centre" and run.data.test.centre_fraction == 0.6
    assert run.data.test.root == "/old" and run.data.test.split == "eval" and saved.data.test.crop == "full"
