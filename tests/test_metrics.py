"""Known-answer tests for cliphand3d.metrics (hand-worked values, invariants, a scipy reference)."""
import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.transform import Rotation

from cliphand3d import metrics as M


def random_hands(n: int, seed: int = 0) -> np.ndarray:
    """(n, 21, 3) plausible right hands in metres, ~0.5 m in front of the camera, MPII order."""
    rng = np.random.default_rng(seed)
    hands = np.zeros((n, 21, 3))
    for i in range(n):
        wrist = rng.normal([0.0, 0.0, 0.5], [0.05, 0.05, 0.05])
        hands[i, 0] = wrist
        for f in range(5):
            direction = np.array([np.cos(0.3 * (f - 2)), np.sin(0.3 * (f - 2)), 0.2]) + rng.normal(0, 0.1, 3)
            p = wrist
            for k, length in enumerate((0.07, 0.035, 0.025, 0.02)):
                direction = direction + rng.normal(0, 0.2, 3)
                p = p + length * direction / np.linalg.norm(direction)
                hands[i, 1 + 4 * f + k] = p
    return hands


# The official scorer adds 1e-8 to both Frobenius norms, which shrinks an exact fit by ~1e-7 of the
# hand's size: a few nanometres. "Zero" aligned errors are therefore checked to 1e-4 mm.
PA_TOL_MM = 1e-4


def auc_of_exact_fit(steps: int) -> tuple[float, float]:
    """Bounds for a fit exact up to rounding: residuals of ~1e-12 m fail only the t = 0 threshold
    (PCK counts d <= t), which costs half of the first trapezoid, 0.5 / (steps - 1) of the area."""
    return 1 - 0.5 / (steps - 1) - 1e-12, 1.0


def reference_aligned(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Straightforward per-sample FreiHAND alignment written directly on scipy's solver."""
    mu_g, mu_p = gt.mean(0), pred.mean(0)
    g0, p0 = gt - mu_g, pred - mu_p
    ng, np_ = np.linalg.norm(g0) + 1e-8, np.linalg.norm(p0) + 1e-8
    R, s = orthogonal_procrustes(g0 / ng, p0 / np_)
    return (p0 / np_) @ R.T * s * ng + mu_g


# --------------------------------------------------------------------------- FreiHAND joints
def test_similarity_transform_including_reflection_has_zero_aligned_error():
    gt = random_hands(6)
    R = Rotation.from_euler("xyz", [30, -50, 110], degrees=True).as_matrix()
    mirror = np.diag([1.0, -1.0, 1.0])  # the official scorer does not exclude reflections
    pred = 1.7 * gt @ (R @ mirror).T + np.array([0.3, -0.2, 0.4])
    out = M.freihand_metrics(pred, gt)
    assert out["pa_mpjpe_mm"] < PA_TOL_MM
    lo, hi = auc_of_exact_fit(100)
    assert lo <= out["auc_pa_0_50"] <= hi
    assert out["kp_error_mm"] > 100  # unaligned it is far off


def test_constant_offset_known_answers():
    gt = random_hands(5)
    pred = gt + np.array([0.006, 0.0, -0.008])  # |offset| = 10 mm
    out = M.freihand_metrics(pred, gt)
    assert out["kp_error_mm"] == pytest.approx(10.0)
    assert out["mpjpe_mm"] == pytest.approx(0.0, abs=1e-9)  # root-relative removes any constant offset
    assert out["pa_mpjpe_mm"] < PA_TOL_MM
    # thresholds i * h, h = 0.05 / 99; PCK is 0 up to i = 19 (19.8 h = 10 mm) and 1 from i = 20:
    # area = h / 2 + 79 h, divided by 99 h
    assert out["auc_0_50"] == pytest.approx(79.5 / 99)
    lo, hi = auc_of_exact_fit(100)
    assert lo <= out["auc_pa_0_50"] <= hi


def test_aligned_error_matches_scipy_reference_per_sample():
    gt = random_hands(8, seed=1)
    rng = np.random.default_rng(2)
    pred = random_hands(8, seed=3) + rng.normal(0, 0.004, gt.shape)
    ref = np.stack([np.linalg.norm(reference_aligned(p, g) - g, axis=-1) for p, g in zip(pred, gt)])
    out = M.freihand_metrics(pred, gt)
    assert out["pa_mpjpe_mm"] == pytest.approx(ref.mean() * 1000, rel=1e-10)
    per = M.per_sample_errors(pred, gt)
    np.testing.assert_allclose(per["pa_mpjpe_mm"], ref.mean(1) * 1000, rtol=1e-10)
    rr = np.linalg.norm((pred - pred[:, :1]) - (gt - gt[:, :1]), axis=-1).mean(1) * 1000
    np.testing.assert_allclose(per["mpjpe_mm"], rr, rtol=1e-12)
    assert per["pa_mpjpe_mm"].mean() == pytest.approx(out["pa_mpjpe_mm"])
    # torch input (as in train-time validation) gives the same figures
    t_out = M.freihand_metrics(torch.from_numpy(pred).float(), torch.from_numpy(gt).float())
    assert t_out["pa_mpjpe_mm"] == pytest.approx(out["pa_mpjpe_mm"], rel=1e-4)


def test_zero_predictor_aligns_to_the_centroid():
    gt = random_hands(10, seed=4)
    out = M.freihand_metrics(np.zeros_like(gt), gt)
    # all-zero prediction: the scale fit is 0, so every joint lands on the gt centroid
    expected = np.linalg.norm(gt - gt.mean(1, keepdims=True), axis=-1).mean() * 1000
    assert out["pa_mpjpe_mm"] == pytest.approx(expected)
    assert out["pa_mpjpe_mm"] > 30
    assert out["auc_pa_0_50"] < 0.5


# --------------------------------------------------------------------------- PCK / AUC / EPE reductions
DISTS = np.array([[0.0, 0.25], [0.5, 0.75], [1.0, 1.5], [0.25, 1.25]])  # 4 samples x 2 keypoints


def test_pck_curve_and_auc_known_answers():
    # thresholds 0, .25, .5, .75, 1 (binary-exact). kp0: 1/4 (d=0 counts: d <= t), 2/4, 3/4, 3/4, 1;
    # kp1: 0, 1/4, 1/4, 2/4, 2/4
    thr_mm, curve = M.pck_curve(DISTS, lo=0.0, hi=1.0, steps=5)
    np.testing.assert_allclose(thr_mm, [0, 250, 500, 750, 1000])
    np.testing.assert_allclose(curve, [1 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8])
    # trapezoids with h = .25 over a range of 1: kp0 2.625 h, kp1 1.25 h
    assert M.auc(DISTS, lo=0.0, hi=1.0, steps=5) == pytest.approx((2.625 + 1.25) / 2 * 0.25)
    assert M.mean_error(DISTS) == pytest.approx((0.4375 + 0.9375) / 2)
    assert M.median_error(DISTS) == pytest.approx((0.375 + 1.0) / 2)  # mean of per-keypoint medians


def test_visibility_mask_in_reductions():
    vis = np.array([[1, 0], [1, 0], [0, 0], [1, 0]], dtype=bool)  # kp1 never visible: skipped
    _, curve = M.pck_curve(DISTS, visible=vis, lo=0.0, hi=1.0, steps=5)
    np.testing.assert_allclose(curve, [1 / 3, 2 / 3, 1, 1, 1])  # kp0 from samples 0, 1, 3 only
    assert M.mean_error(DISTS, vis) == pytest.approx(0.25)
    assert M.median_error(DISTS, vis) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no keypoint is visible"):
        M.mean_error(DISTS, np.zeros_like(vis))
    with pytest.raises(ValueError, match="visible"):
        M.mean_error(DISTS, vis[:3])


# --------------------------------------------------------------------------- F-score and vertices
def test_fscore_known_cases():
    rng = np.random.default_rng(5)
    gt = rng.uniform(0, 0.1, (3, 50, 3)) + np.array([0, 0, 0.5])
    np.testing.assert_array_equal(M.fscores(gt, gt), 1.0)
    # offset 10 mm: beyond 5 mm, within 15 mm (nearest distances are at most the offset)
    off = M.fscores(gt + np.array([0.0, 0.006, 0.008]), gt)
    assert (off[:, 0] < 1).all() and (off[:, 1] == 1).all()
    np.testing.assert_array_equal(M.fscores(gt + 0.2, gt), 0.0)
    grid = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.1, 0.1, 0.0]])
    half = np.array([grid[0], grid[1], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    # precision 2/4, recall 2/4 -> F 0.5
    np.testing.assert_allclose(M.fscores(half[None], grid[None]), 0.5)
    # fewer predicted points than gt: precision 1, recall 1/2 -> F = 2 * 1 * .5 / 1.5
    np.testing.assert_allclose(M.fscores(grid[None, :2], grid[None]), 2 / 3)
    # the official scorer counts d < t: a point exactly t away (binary-exact .25) is a miss
    unit = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(M.fscores(unit[None] + [0.25, 0, 0], unit[None], thresholds=(0.25, 0.5)),
                                  [[0.0, 1.0]])


def test_freihand_vertex_metrics():
    gt = random_hands(3, seed=7)
    # a 4x4x4 grid 50 mm apart: after a 20 mm shift every nearest neighbour is exactly 20 mm away
    grid = np.stack(np.meshgrid(*[np.arange(4) * 0.05] * 3, indexing="ij"), -1).reshape(-1, 3)
    gt_v = gt[:, :1] + grid
    shift = np.array([0.0, 0.0, 0.02])  # 20 mm, beyond both F thresholds
    out = M.freihand_metrics(gt + shift, gt, gt_v + shift, gt_v)
    assert out["pa_mpvpe_mm"] < PA_TOL_MM
    assert out["mpvpe_mm"] == pytest.approx(0.0, abs=1e-9)  # vertices relative to their joint 0
    assert out["verts_error_mm"] == pytest.approx(20.0)
    assert out["f5"] == pytest.approx(1.0) and out["f15"] == pytest.approx(1.0)
    assert out["f5_unaligned"] == 0.0 and out["f15_unaligned"] == 0.0
    # vertex error taken per vertex, then averaged: a 5 mm offset of one vertex in 64
    moved = gt_v.copy()
    moved[:, 0, 0] += 0.005
    assert M.freihand_metrics(gt, gt, moved, gt_v)["verts_error_mm"] == pytest.approx(5.0 / 64)
    with pytest.raises(ValueError, match="gt_verts is missing"):
        M.freihand_metrics(gt, gt, gt_v, None)


# --------------------------------------------------------------------------- RHD
# hand3d's grid (eval_full.get_measures(0, 0.05, 20)): t_i = i * h, h = 50/19 mm, i = 0..19. A keypoint
# whose error is e in every sample has PCK 0 below i* = ceil(e * 19 / 50) and 1 from i* on, so its
# trapezoid area is h/2 + (19 - i*) h over a range of 19 h: (19.5 - i*) / 19 (and 1 when e = 0).
# "AUC 20-50" is calc_auc over t[8:] = 21.05 ... 50 mm (12 points, 11 intervals), normalised by 11 h.
def shift_joints(hands: np.ndarray, sample: int, joints, error_m: float) -> None:
    """Move joints of one sample by error_m metres along (0.6, 0, 0.8), a unit vector: error exactly error_m."""
    hands[sample, joints] += error_m * np.array([0.6, 0.0, 0.8])


def test_rhd_reference_bone_is_hand3d_keypoint_scale():
    from cliphand3d import skeleton as S

    a, b = S.RHD_EVAL_BONE
    # hand3d's keypoint_scale is |kp12 - kp11| in RHD's per-hand order (tip -> base per finger)
    rhd_ids = S.rhd_to_mpii(np.arange(21)[:, None])[:, 0]  # RHD keypoint id at each MPII position
    assert (rhd_ids[a], rhd_ids[b]) == (12, 11)
    assert (S.JOINT_NAMES[a], S.JOINT_NAMES[b]) == ("middle MCP", "middle PIP")
    assert S.REF_BONE == (0, 9)  # the model-space (uvd) bone stays wrist -> middle MCP (DESIGN 1.10)
    gt = random_hands(3, seed=11)
    pred = gt.copy()
    pred[:, 10] = gt[:, 9] + 2.0 * (gt[:, 10] - gt[:, 9])  # prediction's MCP -> PIP bone twice too long
    p_s, g_rr = M.hand3d_normalise(pred, gt)
    np.testing.assert_allclose(np.linalg.norm(p_s[:, 10] - p_s[:, 9], axis=-1),
                               np.linalg.norm(gt[:, 10] - gt[:, 9], axis=-1), rtol=1e-12)
    np.testing.assert_allclose(p_s, 0.5 * (pred - pred[:, :1]), rtol=1e-12)  # rescaled by exactly 1/2
    np.testing.assert_allclose(g_rr, gt - gt[:, :1], rtol=1e-12)


def test_rhd_rescaling_undoes_a_wrong_size_with_the_hand3d_bone():
    gt = random_hands(2, seed=8)
    # sample 0 is 0.8x, sample 1 1.25x the true size about the root, and moved away from it
    scale = np.array([0.8, 1.25])[:, None, None]
    pred = scale * (gt - gt[:, :1]) + np.array([0.1, 0.2, 0.3])
    assert M.rhd_metrics(pred, gt)["epe_mean_mm"] == pytest.approx(0.0, abs=1e-9)
    # Now move the whole middle finger (joints 9-12) rigidly by d: the MCP -> PIP bone keeps its 0.8x /
    # 1.25x length, the wrist -> MCP bone does not. hand3d's rescale (1/0.8, 1/1.25) is still exact on
    # every other joint and leaves the finger d / scale = 10.5 mm off: d = 8.4 mm at 0.8x, 13.125 at 1.25x.
    shift_joints(pred, 0, [9, 10, 11, 12], 0.0084)
    shift_joints(pred, 1, [9, 10, 11, 12], 0.013125)
    out = M.rhd_metrics(pred, gt)
    # 4 keypoints at 10.5 mm in both samples, 17 at 0: (4 * 10.5) / 21 = 2 mm, mean and median alike
    assert out["epe_mean_mm"] == pytest.approx(2.0)
    assert out["epe_median_mm"] == pytest.approx(2.0)
    # with the finger hidden every visible keypoint is exact (a wrist -> middle-MCP rescale is not)
    vis = np.ones((2, 21), dtype=bool)
    vis[:, 9:13] = False
    out = M.rhd_metrics(pred, gt, visible=vis)
    assert out["epe_mean_mm"] == pytest.approx(0.0, abs=1e-9)
    assert out["epe_median_mm"] == pytest.approx(0.0, abs=1e-9)
    assert out["auc_20_50"] == 1.0
    lo, hi = auc_of_exact_fit(20)
    assert lo <= out["auc_0_50"] <= hi
    # mpjpe_mm is root-relative but not rescaled: the error is (scale - 1) |gt - gt_root| itself
    err = np.abs(scale[:, 0] - 1) * np.linalg.norm(gt - gt[:, :1], axis=-1)  # (2, 21)
    assert out["mpjpe_mm"] == pytest.approx(err[:, vis[0]].mean(0).mean() * 1000)


def test_rhd_errors_spread_over_the_thresholds():
    gt = random_hands(1, seed=12)
    pred = gt.copy()  # joints 0, 9, 10 untouched: root and bone identical, the rescale is exactly 1
    # uneven steps: with errors 10 mm apart the rounding of each grid cancels out and a 20-point
    # grid over 20-50 mm would give the same 20-50 figure as hand3d's t[8:]
    errors_mm = {2: 5, 4: 15, 8: 24, 12: 33, 16: 42, 20: 55}
    for j, e in errors_mm.items():
        shift_joints(pred, 0, [j], e / 1000)
    out = M.rhd_metrics(pred, gt)
    # one sample: mean = median = the error per keypoint, averaged over 21 keypoints
    assert out["epe_mean_mm"] == pytest.approx(174 / 21)
    assert out["epe_median_mm"] == pytest.approx(174 / 21)
    # i* = ceil(e * 19 / 50): 5 -> 2, 15 -> 6, 24 -> 10, 33 -> 13, 42 -> 16, 55 -> never (PCK 0).
    # Areas (19.5 - i*) / 19: 17.5, 13.5, 9.5, 6.5, 3.5 and 0, sum 50.5 / 19; the 15 exact keypoints
    # (d = 0 <= t_0) give 1 each: (15 + 50.5 / 19) / 21
    assert out["auc_0_50"] == pytest.approx((15 + 50.5 / 19) / 21)
    # on t[8:] (11 intervals): 5 and 15 mm (i* <= 8) give 1; 24 mm: 0 on [t8, t9], half of [t9, t10],
    # then 9 full intervals -> 9.5 / 11; 33: 0.5 + 6 -> 6.5 / 11; 42: 0.5 + 3 -> 3.5 / 11; 55: 0.
    # (15 + 2 + 19.5 / 11) / 21
    assert out["auc_20_50"] == pytest.approx((17 + 19.5 / 11) / 21)


def test_rhd_visibility_per_keypoint_then_mean_over_keypoints():
    gt = random_hands(3, seed=13)
    pred = gt.copy()
    for n, e in enumerate((12, 18, 60)):  # thumb tip, visible everywhere: mean 30 mm, median 18 mm
        shift_joints(pred, n, [4], e / 1000)
    for n, e in enumerate((40, 40, 5)):  # index tip, hidden in sample 2: mean = median = 40 mm
        shift_joints(pred, n, [8], e / 1000)
    shift_joints(pred, slice(None), [20], 0.1)  # little tip, never visible: not a keypoint of the mean
    vis = np.ones((3, 21), dtype=bool)
    vis[2, 8] = False
    vis[:, 20] = False
    out = M.rhd_metrics(pred, gt, visible=vis)
    # per keypoint, then the mean over the 20 keypoints seen (a pooled mean would be 170 / 59 mm)
    assert out["epe_mean_mm"] == pytest.approx((30 + 40) / 20)
    assert out["epe_median_mm"] == pytest.approx((18 + 40) / 20)
    # 0-50 mm, i* = ceil(e * 19 / 50): thumb tip 12 -> 5, 18 -> 7, 60 -> never: (14.5 + 12.5 + 0) / 3 / 19
    # = 9 / 19; index tip 40 -> 16 in both visible samples: 3.5 / 19; 18 exact keypoints: 1
    assert out["auc_0_50"] == pytest.approx((18 + 9 / 19 + 3.5 / 19) / 20)
    # t[8:]: 12 and 18 mm lie below t8 (PCK 1), 60 never: thumb tip 2/3; index tip 0.5 + 3 -> 3.5 / 11
    assert out["auc_20_50"] == pytest.approx((18 + 2 / 3 + 3.5 / 11) / 20)


def test_rhd_visibility_known_answer():
    gt = random_hands(2, seed=9)
    pred = gt.copy()
    pred[0, 8, 0] += 0.015  # index tip: joints 0, 9, 10 untouched, so the rescale is exactly 1
    pred[1, 8, 0] += 0.04
    out = M.rhd_metrics(pred, gt)
    assert out["epe_mean_mm"] == pytest.approx(27.5 / 21)
    assert out["epe_median_mm"] == pytest.approx(27.5 / 21)
    vis = np.ones((2, 21), dtype=bool)
    vis[1, 8] = False  # hides the 40 mm error
    vis[:, 3] = False  # a joint never visible leaves the keypoint mean: 20 keypoints remain
    out = M.rhd_metrics(pred, gt, visible=vis)
    assert out["epe_mean_mm"] == pytest.approx(15.0 / 20)
    assert out["epe_median_mm"] == pytest.approx(15.0 / 20)
    assert out["mpjpe_mm"] == pytest.approx(15.0 / 20)
    # 20 thresholds over 20-50 mm; the only visible error, 15 mm, passes every one of them
    assert out["auc_20_50"] == pytest.approx(1.0)
    per = M.per_sample_errors(pred, gt, visible=vis)
    np.testing.assert_allclose(per["mpjpe_mm"], [15.0 / 20, 0.0])


def test_evaluate_dispatch_and_errors():
    gt = random_hands(3, seed=10)
    pred = gt + 0.003
    assert M.evaluate("synthetic", pred, gt) == M.freihand_metrics(pred, gt)
    assert set(M.evaluate("rhd", pred, gt)) >= {"pa_mpjpe_mm", "mpjpe_mm", "epe_mean_mm", "auc_20_50"}
    with pytest.raises(ValueError, match="unknown protocol 'stb'"):
        M.evaluate("stb", pred, gt)
    with pytest.raises(ValueError, match=r"pred_xyz and gt_xyz .*\(2, 21, 3\) vs \(3, 21, 3\)"):
        M.evaluate("freihand", pred[:2], gt)
    with pytest.raises(ValueError, match="pred_xyz: expected 21 points"):
        M.evaluate("freihand", pred[:, :20], gt[:, :20])
    with pytest.raises(ValueError, match="only used by the 'rhd'"):
        M.evaluate("freihand", pred, gt, visible=np.ones((3, 21), bool))
    with pytest.raises(ValueError, match="pred_verts has 2 samples but pred_xyz has 3"):
        M.evaluate("freihand", pred, gt, np.zeros((2, 5, 3)), np.zeros((2, 5, 3)))
    bad = pred.copy()
    bad[1, 4, 2] = np.nan
    with pytest.raises(ValueError, match="pred_xyz: contains NaN/inf .*sample 1"):
        M.evaluate("rhd", bad, gt)


def test_protocol_pck_curve_errors():
    gt = random_hands(2, seed=14)
    with pytest.raises(ValueError, match="unknown protocol 'stb'"):
        M.protocol_pck_curve("stb", gt, gt)
    with pytest.raises(ValueError, match="only used by the 'rhd'"):
        M.protocol_pck_curve("freihand", gt, gt, np.ones((2, 21), bool))
    t, curve = M.protocol_pck_curve("rhd", gt, gt)  # hand3d's grid in mm, an exact fit
    np.testing.assert_allclose(t, np.arange(20) * 50 / 19)
    assert (curve[1:] == 1.0).all()


# --------------------------------------------------------------------------- retrieval
def test_retrieval_top1_and_identical_prompts():
    eye = torch.eye(8)
    assert M.retrieval_top1(eye, eye) == 1.0
    shifted = eye.roll(1, dims=0)  # query i's best text is i + 1: all wrong
    assert M.retrieval_top1(eye, shifted) == 0.0
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    # query i retrieves i + 1 (mod 8): right exactly when i, i + 1 share a prompt (i even)
    assert M.retrieval_top1(eye, shifted, prompts) == 0.5
    same = torch.ones(8, 4)  # identical sentences give identical text features
    assert M.retrieval_top1(torch.randn(8, 4), same, ["x"] * 8) == 1.0
    assert M.retrieval_top1(torch.randn(8, 4), same) == 1 / 8  # ties go to the first text
    with pytest.raises(ValueError, match="prompts: 3 strings for a batch of 8"):
        M.retrieval_top1(eye, eye, ["a"] * 3)


def test_retrieval_by_batch_drops_tail_and_averages():
    n = 40
    pose = torch.eye(64)[:n]
    text = pose.clone()
    text[16:32] = pose[16:32].roll(1, dims=0)  # second chunk of 16 all wrong
    text[32:] = pose[32:].roll(1, dims=0)  # ragged tail, wrong, must be dropped
    out = M.retrieval_by_batch(pose, text, batch_sizes=(16, 8, 64))
    assert out[16] == 0.5
    assert out[8] == pytest.approx(2 / 5)  # chunks 0, 1 right; 2, 3, 4 wrong
    assert np.isnan(out[64])


def test_retrieval_by_batch_known_answers_at_16_and_64():
    n = 64
    pose = torch.eye(n)  # pose i = e_i: unique, so matched texts are always retrieved
    out = M.retrieval_by_batch(pose, pose.clone())
    assert out[16] == 1.0 and out[64] == 1.0 and np.isnan(out[256])
    # texts 16..19 rolled by one: query 16 now best matches text 17 (= e_16), and so on round the four;
    # 4 misses in the second chunk of 16 and in the single chunk of 64: 60 / 64 either way
    text = pose.clone()
    text[16:20] = pose[16:20].roll(1, dims=0)
    out = M.retrieval_by_batch(pose, text)
    assert out[16] == 60 / 64 and out[64] == 60 / 64
    # Four repeats of 16 directions: query i is e_(i mod 16); text i the same plus 0.1 (c + 1) e_63 in
    # chunk c = i // 16. Within a chunk of 16 each direction occurs once: all right. Within 64 every
    # query retrieves the chunk-0 text of its direction (largest cosine, 1 / sqrt(1.01)): only chunk 0
    # is right, 1/4 ...
    k, c = torch.arange(n) % 16, torch.arange(n) // 16
    pose = torch.eye(n)[k]
    text = pose + 0.1 * (c + 1).float()[:, None] * torch.eye(n)[63]
    out = M.retrieval_by_batch(pose, text)
    assert out[16] == 1.0 and out[64] == 0.25
    # ... unless the retrieved text's prompt is the query's own sentence (DESIGN 1.6): all right
    prompts = [f"direction {int(j)}" for j in k]
    assert M.retrieval_by_batch(pose, text, prompts)[64] == 1.0
    # a prompt shared only by chunks 0 and 1: chunks 0, 1 right, 2, 3 wrong at 64
    prompts = [f"direction {int(j)}" if i < 32 else f"other {i}" for i, j in enumerate(k)]
    assert M.retrieval_by_batch(pose, text, prompts) == pytest.approx({16: 1.0, 64: 0.5, 256: float("nan")},
                                                                      nan_ok=True)
