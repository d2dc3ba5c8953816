"""eval.py's pictures of the errors: which samples the best / median / worst grid shows, what its tiles are,
and the per-joint bar chart's values (the protocol's per-joint means, averaging to its headline error)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from cliphand3d import metrics, viz
from cliphand3d.data.transforms import denormalize_image, normalize_image
from cliphand3d.evaluation import figures, report
from cliphand3d.geometry import project
from cliphand3d.skeleton import JOINT_NAMES

S = 48


def test_best_median_worst_known_answers():
    # sorted: 1 (pos 1), 3 (pos 3), 5 (pos 0), 7 (pos 4), 9 (pos 2)
    assert figures.pick_best_median_worst([5, 1, 9, 3, 7], 1) == {"best": [1], "median": [0], "worst": [2]}
    # sorted: 0.5 (5), 1 (1), 3 (3), 5 (0), 7 (4), 9 (2): the middle two are 3 and 5
    assert figures.pick_best_median_worst([5, 1, 9, 3, 7, 0.5], 2) == {"best": [5, 1], "median": [3, 0],
                                                                         "worst": [2, 4]}
    # a sample without any visible joint (NaN) is never shown; k larger than the set shows all in each row
    assert figures.pick_best_median_worst([np.nan, 2.0, 1.0], 5) == {"best": [2, 1], "median": [2, 1],
                                                                       "worst": [1, 2]}


def official_align(gt, pred):
    t1, t2 = gt.mean(0), pred.mean(0)
    a, b = gt - t1, pred - t2
    s1, s2 = np.linalg.norm(a), np.linalg.norm(b)
    R, s = orthogonal_procrustes(a / s1, b / s2)
    return (b / s2) @ R.T * s * s1 + t1


def hands(n, seed=0):
    rng = np.random.default_rng(seed)
    gt = np.array([0.0, 0.0, 0.6]) + rng.uniform(-0.06, 0.06, (n, 21, 3))
    pred = gt + rng.normal(scale=0.01, size=gt.shape) * rng.uniform(0.2, 2.0, (n, 1, 1))
    return pred, gt


def test_protocol_joint_errors_freihand_are_procrustes_distances_and_average_to_pa_mpjpe():
    pred, gt = hands(7)
    e = metrics.protocol_joint_errors("freihand", pred, gt)
    expected = np.stack([np.linalg.norm(official_align(g, p) - g, axis=1) for g, p in zip(gt, pred)]) * 1000
    np.testing.assert_allclose(e, expected, rtol=1e-5)  # as test_eval: geometry.procrustes_align vs scipy
    # the bar chart's bars average to the headline figure; the rows are the per-sample errors eval writes
    assert e.mean(0).mean() == pytest.approx(metrics.evaluate("freihand", pred, gt)["pa_mpjpe_mm"], rel=1e-9)
    np.testing.assert_allclose(e.mean(1), metrics.per_sample_errors(pred, gt)["pa_mpjpe_mm"], rtol=1e-9)


def test_protocol_joint_errors_rhd_known_answer_and_visibility():
    _, gt = hands(3, seed=1)
    pred = gt.copy()
    pred[:, 5, 0] += 0.010  # index MCP 10 mm off; root (0) and the scale bone (9 -> 10) untouched
    vis = np.ones((3, 21), bool)
    vis[1, 5] = False
    e = metrics.protocol_joint_errors("rhd", pred, gt, vis)
    expected = np.zeros((3, 21))
    expected[:, 5] = 10.0
    expected[1, 5] = np.nan  # not visible: no error
    np.testing.assert_allclose(e, expected, atol=1e-9)
    assert np.nanmean(np.nanmean(e, 0)) == pytest.approx(metrics.evaluate("rhd", pred, gt, visible=vis)["epe_mean_mm"])


class Crops:
    """Flat-coloured crops, one colour per item, each with its own intrinsics and hand."""
    protocol = "freihand"

    def __init__(self, n):
        rng = np.random.default_rng(2)
        self.items = []
        for i in range(n):
            K = np.array([[90.0 + 10 * i, 0, S / 2], [0, 90.0 + 10 * i, S / 2], [0, 0, 1]])
            xyz = np.array([0.0, 0.0, 0.6]) + rng.uniform(-0.05, 0.05, (21, 3))
            image = normalize_image(np.full((S, S, 3), (20 * i, 255 - 20 * i, 100), np.uint8))
            self.items.append({"image": image, "K": torch.tensor(K, dtype=torch.float32),
                               "joints_xyz": torch.tensor(xyz, dtype=torch.float32)})
        self.reads = []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.items[i]


def preds_with_errors(data, noise):
    """Predictions in loader order (reversed), sample n off by noise[n] (metres) per coordinate."""
    order = list(range(len(data)))[::-1]
    gt = np.stack([data.items[i]["joints_xyz"].numpy().astype(np.float64) for i in order])
    rng = np.random.default_rng(3)
    pred = gt + rng.normal(size=gt.shape) * np.asarray(noise)[:, None, None]
    return {"index": np.array(order), "pred_xyz": pred, "gt_xyz": gt}


def test_error_pictures_show_the_right_samples_and_the_per_joint_means(tmp_path, monkeypatch):
    data = Crops(9)
    noise = np.array([0.004, 0.001, 0.009, 0.002, 0.008, 0.003, 0.007, 0.005, 0.006])
    preds = preds_with_errors(data, noise)
    drawn = {}
    real_figure = viz.per_joint_figure

    def spy(names, errors_mm, title=""):
        drawn.update(names=list(names), values=np.asarray(errors_mm))
        return real_figure(names, errors_mm, title)

    monkeypatch.setattr(viz, "per_joint_figure", spy)
    per_joint = report.write_pictures(tmp_path, "freihand", preds, {}, data, k=2)

    errors = metrics.protocol_joint_errors("freihand", preds["pred_xyz"], preds["gt_xyz"])
    # bars: one per joint, named by skeleton.py, the mean over samples of the protocol's joint errors
    assert drawn["names"] == list(JOINT_NAMES) and list(per_joint) == list(JOINT_NAMES)
    np.testing.assert_allclose(drawn["values"], errors.mean(0), rtol=1e-12)
    np.testing.assert_allclose(list(per_joint.values()), errors.mean(0), rtol=1e-12)
    # only the 6 shown items were read back from the dataset (memory does not grow with the set)
    per_sample = errors.mean(1)
    chosen = figures.pick_best_median_worst(per_sample, 2)
    assert sorted(data.reads) == sorted(int(preds["index"][p]) for g in chosen.values() for p in g)
    assert chosen["best"][0] == int(np.argmin(per_sample)) and chosen["worst"][0] == int(np.argmax(per_sample))

    grid = cv2.imread(str(tmp_path / "samples.png"))
    chart = cv2.imread(str(tmp_path / "per_joint.png"))
    # 3 rows (best, median, worst) x 2 tiles of (crop | crop), each tile 2S wide; the chart is a real figure
    assert grid.shape[1] == 2 * (2 * S + 6) + 6 and 3 * S < grid.shape[0] < 3 * 2 * S
    assert chart.shape[0] > 200 and chart.shape[1] > 400


def test_sample_grid_tiles_are_each_prediction_on_its_own_crop():
    data = Crops(4)
    preds = preds_with_errors(data, [0.003, 0.001, 0.004, 0.002])
    per_sample = metrics.protocol_joint_errors("freihand", preds["pred_xyz"], preds["gt_xyz"]).mean(1)
    tiles, captions = figures.error_sample_grid(data, preds, per_sample, 1)
    order = np.argsort(per_sample)
    for tile, pos, group, cap in zip(tiles, [order[0], order[1], order[-1]], ("best", "median", "worst"), captions):
        item = data.items[int(preds["index"][pos])]
        K = item["K"].numpy().astype(np.float64)
        want = viz.draw_pred_vs_gt(denormalize_image(item["image"]), project(preds["pred_xyz"][pos], K),
                                   project(preds["gt_xyz"][pos], K))
        np.testing.assert_array_equal(tile, want)
        assert cap == [f"{group} 1: item {int(preds['index'][pos])}, {per_sample[pos]:.1f} mm"]
