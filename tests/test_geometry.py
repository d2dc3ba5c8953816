import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from cliphand3d import geometry as G
from cliphand3d import skeleton as S


def random_hand(rng, n=21):
    """Points ~10 cm across, 0.4-0.6 m in front of a camera."""
    return rng.normal(scale=0.04, size=(n, 3)) + np.array([0.01, -0.02, rng.uniform(0.4, 0.6)])


K0 = np.array([[480.0, 0.0, 112.0], [0.0, 470.0, 108.0], [0.0, 0.0, 1.0]])


def test_project_backproject_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    xyz = random_hand(rng)
    uv = G.project(xyz, K0)
    assert np.allclose(G.backproject(uv, xyz[:, 2], K0), xyz, atol=1e-12)
    uv_t = G.project(torch.tensor(xyz), torch.tensor(K0))
    assert torch.allclose(uv_t, torch.tensor(uv))
    # known answer: a point on the optical axis lands on the principal point
    assert np.allclose(G.project(np.array([[0.0, 0.0, 2.0]]), K0), [[112.0, 108.0]])


def test_uvd_round_trip_and_known_values():
    rng = np.random.default_rng(1)
    xyz = random_hand(rng)
    uvd, root, bone = G.xyz_to_uvd(xyz, K0, 224)
    assert root == pytest.approx(xyz[0, 2])
    assert bone == pytest.approx(np.linalg.norm(xyz[0] - xyz[9]))
    assert uvd[0, 2] == 0.0
    assert np.allclose(uvd[:, 2] * bone + root, xyz[:, 2])
    # pixel centre 0 maps to half a pixel inside the crop's left edge
    assert np.allclose(uvd[:, :2], (G.project(xyz, K0) + 0.5) / 224)
    back = G.uvd_to_xyz(uvd, K0, 224, np.asarray(root), np.asarray(bone))
    assert np.allclose(back, xyz, atol=1e-12)
    # batched torch path gives the same answer
    xb = torch.tensor(np.stack([xyz, xyz * 1.1]))
    Kb = torch.tensor(np.stack([K0, K0]))
    uvd_t, root_t, bone_t = G.xyz_to_uvd(xb, Kb, 224)
    assert torch.allclose(G.uvd_to_xyz(uvd_t, Kb, 224, root_t, bone_t), xb, atol=1e-10)


def test_square_box_and_crop_map_box_edges_to_crop_edges():
    cx, cy, size = G.square_box(np.array([[10.0, 20.0], [50.0, 30.0]]), scale=1.5)
    assert (cx, cy, size) == (30.0, 25.0, 60.0)
    A = G.crop_affine((cx, cy), size, 120)
    # the box spans cx +- size/2 in pixel coordinates; its edges go to the crop's edges (-0.5, out - 0.5)
    left_top = A @ np.array([cx - size / 2, cy - size / 2, 1.0])
    right_bottom = A @ np.array([cx + size / 2, cy + size / 2, 1.0])
    assert np.allclose(left_top[:2], [-0.5, -0.5])
    assert np.allclose(right_bottom[:2], [119.5, 119.5])


@pytest.mark.parametrize("rot_deg", [0.0, 37.0, -90.0])
def test_crop_and_rotate_keeps_image_and_labels_together(rot_deg):
    """A bright dot drawn at a projected 3D point is found at the projection with the new K."""
    rng = np.random.default_rng(2)
    xyz = random_hand(rng, n=3)
    K = np.array([[500.0, 0, 100.0], [0, 500.0, 110.0], [0, 0, 1]])
    img = np.zeros((224, 224, 3), np.uint8)
    uv = G.project(xyz, K)
    ui, vi = np.round(uv[0]).astype(int)
    img[vi - 1:vi + 2, ui - 1:ui + 2] = 255  # a 3x3 dot centred on the rounded pixel
    center = uv[0] + np.array([7.0, -5.0])  # keep the dot inside the crop at any rotation
    crop, K2, R = G.crop_and_rotate(img, K, center, 100.0, 200, math.radians(rot_deg))
    xyz2 = xyz @ R.T
    # the rotation is rigid about the optical axis: depths and distances are kept
    assert np.allclose(xyz2[:, 2], xyz[:, 2])
    assert np.allclose(np.linalg.norm(xyz2 - xyz2[0], axis=1), np.linalg.norm(xyz - xyz[0], axis=1))
    uv2 = G.project(xyz2, K2)
    # the map is the affine of the crop applied to the old pixels, exactly
    A = G.crop_affine(center, 100.0, 200, math.radians(rot_deg))
    assert np.allclose(uv2, (np.c_[uv, np.ones(3)] @ A.T)[:, :2], atol=1e-9)
    # and the drawn dot's centroid lands where the labels say (scale 2: the rounding offset doubles)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    expected = (np.array([ui, vi, 1.0]) @ A.T)[:2]
    assert np.allclose([xs.mean(), ys.mean()], expected, atol=0.6)
    # K stays a pinhole (upper triangular) for square pixels
    if K[0, 0] == K[1, 1]:
        assert abs(K2[1, 0]) < 1e-9 and abs(K2[0, 1]) < 1e-9


def test_mirror_lr_round_trip_and_pixels():
    rng = np.random.default_rng(3)
    xyz = random_hand(rng)
    img = rng.integers(0, 255, size=(32, 40, 3), dtype=np.uint8)
    flipped, xyz_m, K_m = G.mirror_lr(img, xyz, K0, width=40)
    assert np.array_equal(flipped[:, ::-1], img)
    assert np.allclose(xyz_m[:, 0], -xyz[:, 0]) and np.allclose(xyz_m[:, 1:], xyz[:, 1:])
    uv, uv_m = G.project(xyz, K0), G.project(xyz_m, K_m)
    assert np.allclose(uv_m[:, 0], 40 - 1 - uv[:, 0]) and np.allclose(uv_m[:, 1], uv[:, 1])
    back_img, back_xyz, back_K = G.mirror_lr(flipped, xyz_m, K_m, width=40)
    assert np.array_equal(back_img, img) and np.allclose(back_xyz, xyz) and np.allclose(back_K, K0)
    # every image type flips to exactly image[:, ::-1], through OpenCV or numpy
    for im in (img[..., 0], img.astype(np.float32), img.astype(bool), rng.random((6, 5, 7))):
        out = G.mirror_lr(im, xyz, K0, width=im.shape[1])[0]
        assert out.dtype == im.dtype and out.flags.c_contiguous and np.array_equal(out, im[:, ::-1])


def _scorer_reference(gt, pred):
    """The official FreiHAND align_w_scale, written out per sample with scipy."""
    t1, t2 = gt.mean(0), pred.mean(0)
    a, b = gt - t1, pred - t2
    s1, s2 = np.linalg.norm(a) + 1e-8, np.linalg.norm(b) + 1e-8
    a, b = a / s1, b / s2
    R, s = orthogonal_procrustes(a, b)
    return b @ R.T * s * s1 + t1


def test_procrustes_matches_official_semantics_and_undoes_similarity():
    rng = np.random.default_rng(4)
    gt = rng.normal(size=(6, 21, 3))
    pred = rng.normal(size=(6, 21, 3))
    ours = G.procrustes_align(pred, gt)
    ref = np.stack([_scorer_reference(g, p) for g, p in zip(gt, pred)])
    assert np.allclose(ours, ref, atol=1e-12)
    # a similarity transform (with a reflection, which the scorer allows) is undone exactly
    Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    moved = 0.3 * gt[0] @ Q.T + np.array([1.0, -2.0, 0.5])
    assert np.allclose(G.procrustes_align(moved, gt[0]), gt[0], atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        G.procrustes_align(pred[:, :20], gt)


def test_skeleton_tables():
    assert len(S.JOINT_NAMES) == 21 and S.JOINT_NAMES[0] == "wrist"
    assert S.JOINT_NAMES[4] == "thumb fingertip" and S.JOINT_NAMES[20] == "little fingertip"
    assert S.FINGER_CHAINS["middle"] == (9, 10, 11, 12)
    assert len(S.BONES) == 20 and all(S.PARENTS[c] == p for p, c in S.BONES)
    # every MCP hangs off the wrist, every other joint off its predecessor
    assert [S.PARENTS[i] for i in (1, 5, 9, 13, 17)] == [0] * 5 and S.PARENTS[12] == 11
    # RHD stores tip -> base: RHD index 1 (thumb tip) is MPII 4
    assert S.RHD_TO_MPII[4] == 1 and S.RHD_TO_MPII[1] == 4 and S.RHD_TO_MPII[0] == 0
    x = np.arange(21 * 3).reshape(21, 3)
    assert np.array_equal(S.mpii_to_rhd(S.rhd_to_mpii(x)), x)
    assert np.array_equal(S.rhd_to_mpii(x)[4], x[1])


def test_rigid_rotations_recover_a_proper_rotation_and_never_reflect():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(21, 3))
    Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    Q *= np.sign(np.linalg.det(Q))  # a proper rotation
    x = ref @ Q.T  # x = ref rotated by Q, so R = Q^T brings it back
    R = G.rigid_rotations(x[None], ref)[0]
    assert np.allclose(x @ R.T, ref, atol=1e-10) and np.isclose(np.linalg.det(R), 1.0)
    mirrored = ref * np.array([-1.0, 1.0, 1.0])  # no rotation maps a mirror image onto the original
    R = G.rigid_rotations(mirrored[None], ref)[0]
    assert np.isclose(np.linalg.det(R), 1.0) and not np.allclose(mirrored @ R.T, ref, atol=1e-3)


# --------------------------------------------------------------------------- root depth and bone without labels
def test_root_and_bone_from_uvd_known_answer_worked_by_hand():
    # wrist on the optical axis at 0.5 m, middle MCP 0.1 m to its right at the same depth, middle PIP at
    # (0.1, 0.04, 0.47): bone 0.1 m, scale |xyz9 - xyz10| = sqrt(0.04^2 + 0.03^2) = 0.05 m.
    # In bone units the rays are r0 = (0, 0, 1), r9 = (0.2, 0, 1) and d0 = d9 = 0, so |Zn (r0 - r9)| = 1
    # gives Zn = 1 / 0.2 = 5; X9 = (1, 0, 5), X10 = (5 - 0.3) r10 = (1, 0.4, 4.7), |X9 - X10| = 0.5,
    # so bone = 0.05 / 0.5 = 0.1 and root depth = 5 * 0.1 = 0.5.
    K = np.array([[500.0, 0.0, 63.5], [0.0, 500.0, 63.5], [0.0, 0.0, 1.0]])
    xyz = random_hand(np.random.default_rng(5))
    xyz[0], xyz[9], xyz[10] = [0.0, 0.0, 0.5], [0.1, 0.0, 0.5], [0.1, 0.04, 0.47]
    uvd, _, _ = G.xyz_to_uvd(xyz, K, 128)
    root, bone, exact = G.root_and_bone_from_uvd(uvd, K, 128, np.float64(0.05))
    assert root == pytest.approx(0.5, abs=1e-12) and bone == pytest.approx(0.1, abs=1e-12) and exact


@pytest.mark.parametrize("view", ["uniform", "upright"])
def test_root_and_bone_from_uvd_recovers_the_truth_under_any_crop(view):
    from cliphand3d.data.synthetic import sample_hand

    rng = np.random.default_rng(11)
    xyz_all, K_all = [], []
    for i in range(64):
        h = sample_hand(3, i, view=view)
        # a random crop box and in-plane rotation, as the training and evaluation crops make them
        A = G.crop_affine((112 + rng.normal(0, 15), 112 + rng.normal(0, 15)), rng.uniform(80, 220), 96,
                          rng.uniform(-1.5, 1.5))
        R = G.rotation_z(rng.uniform(-1.5, 1.5))
        xyz_all.append(h.xyz @ R.T)
        K_all.append(A @ h.K @ R.T)
    xyz, K = np.stack(xyz_all), np.stack(K_all)
    uvd, root, bone = G.xyz_to_uvd(xyz, K, 96)
    scale = np.linalg.norm(xyz[:, 9] - xyz[:, 10], axis=-1)
    r, b, exact = G.root_and_bone_from_uvd(uvd, K, 96, scale)
    assert exact.all()
    np.testing.assert_allclose(r, root, rtol=1e-9)
    np.testing.assert_allclose(b, bone, rtol=1e-9)
    np.testing.assert_allclose(G.uvd_to_xyz(uvd, K, 96, r, b), xyz, atol=1e-10)
    # float32 tensors in, float32 out (what predict passes): the same answer to float32 precision
    rt, bt, _ = G.root_and_bone_from_uvd(torch.tensor(uvd, dtype=torch.float32), torch.tensor(K, dtype=torch.float32),
                                         96, torch.tensor(scale, dtype=torch.float32))
    assert rt.dtype == torch.float32
    np.testing.assert_allclose(rt.numpy(), root, rtol=1e-5)
    np.testing.assert_allclose(bt.numpy(), bone, rtol=1e-5)


def test_root_and_bone_from_uvd_keeps_its_constraints_for_any_prediction():
    """For a wrong uvd there is no truth to recover, but the placement must still do what it says: the
    reference bone is one bone long and the scale bone is `scale` metres; where no depth makes the
    reference bone one bone long (negative discriminant) it is as short as any depth can make it."""
    rng = np.random.default_rng(2)
    xyz = np.stack([random_hand(rng) for _ in range(200)])
    uvd, _, _ = G.xyz_to_uvd(xyz, K0, 224)
    uvd = uvd + rng.normal(0, [0.03, 0.03, 0.3], size=uvd.shape)
    uvd[:5, 9, 2] = uvd[:5, 0, 2] + 1.5  # the predicted depth step alone is longer than the bone
    scale = rng.uniform(0.02, 0.04, size=len(uvd))
    root, bone, exact = G.root_and_bone_from_uvd(uvd, K0, 224, scale)
    placed = G.uvd_to_xyz(uvd, K0, 224, root, bone)
    ref = np.linalg.norm(placed[:, 0] - placed[:, 9], axis=-1)
    assert not exact[:5].any() and exact.sum() > 150
    np.testing.assert_allclose(ref[exact], bone[exact], rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(placed[:, 9] - placed[:, 10], axis=-1), scale, rtol=1e-9)
    # brute force over root depths (bone units): none gives a shorter reference bone than the one chosen
    off = ~exact
    zn = np.linspace(0.1, 40, 40001)[:, None, None]
    rays = G.backproject(uvd[off, :, :2] * 224 - 0.5, np.ones(uvd[off].shape[:2]), K0)
    d = uvd[off, :, 2, None]
    scan = np.linalg.norm((zn + d[:, 0]) * rays[:, 0] - (zn + d[:, 9]) * rays[:, 9], axis=-1).min(0)
    assert np.all(ref[off] / bone[off] <= scan + 1e-12) and np.all(ref[off] / bone[off] > 1.0)


def test_crop_maps_batched_are_each_map_as_alone():
    """crop_affine / rotation_z / crop_intrinsics over a batch (a loader worker's) give every crop's map bit for
    bit as one call for it alone; the 2D box edges still land on the crop's edges."""
    rng = np.random.default_rng(4)
    centres, sides, rots = rng.uniform(0, 300, (9, 2)), rng.uniform(20, 300, 9), rng.uniform(-1.6, 1.6, 9)
    rots[3] = 0.0
    K = rng.uniform(100, 500, (9, 3, 3))
    A, R = G.crop_affine(centres, sides, 64, rots), G.rotation_z(rots)
    Kc, Rc = G.crop_intrinsics(K, centres, sides, 64, rots)
    assert A.shape == R.shape == Kc.shape == (9, 3, 3) and np.array_equal(R, Rc)
    for i in range(9):
        assert np.array_equal(A[i], G.crop_affine(centres[i], sides[i], 64, rots[i]))
        assert np.array_equal(R[i], G.rotation_z(rots[i]))
        assert np.array_equal(Kc[i], G.crop_intrinsics(K[i], centres[i], sides[i], 64, rots[i])[0])
    # one crop is made in plain floats: the same numbers as the batched arrays, for any angle and any inputs
    many = np.random.default_rng(8)
    c2, s2, r2 = many.uniform(-50, 400, (500, 2)), many.uniform(1, 500, 500), many.uniform(-7, 7, 500)
    r2[::5] = 0.0
    batched = G.crop_affine(c2, s2, 256, r2)
    for i in range(500):
        assert np.array_equal(batched[i], G.crop_affine(tuple(c2[i].tolist()), float(s2[i]), 256, float(r2[i])))
    assert np.array_equal(G.crop_affine((10, 20), 100, 64), G.crop_affine(np.array([[10.0, 20.0]]), [100.0], 64)[0])
    edge = G.crop_affine(centres[3], sides[3], 64) @ np.array([*(centres[3] - sides[3] / 2), 1.0])
    np.testing.assert_allclose(edge[:2], [-0.5, -0.5], atol=1e-9)


def test_points_to_uvd_is_the_projection_formula_bit_for_bit():
    """The numpy path works a coordinate at a time for speed; it is the formula (project + 0.5) / S,
    (z - root) / bone on the same numbers, exactly, for one hand and a stack; written into a float32 `out` it is
    that result rounded once; and the torch path agrees."""
    rng = np.random.default_rng(5)
    for lead in [(), (4,)]:
        xyz = rng.normal(0, 0.05, lead + (778, 3)) + np.array([0.0, 0.0, 0.6])
        K = rng.uniform(50, 500, lead + (3, 3))
        root, bone = rng.uniform(0.5, 0.7, lead), rng.uniform(0.02, 0.04, lead)
        got = G.points_to_uvd(xyz, K, 64, np.asarray(root), np.asarray(bone))
        uv = (G.project(xyz, K) + 0.5) / 64
        d = (xyz[..., 2] - np.asarray(root)[..., None]) / np.asarray(bone)[..., None]
        assert got.shape == xyz.shape and np.array_equal(got, np.concatenate([uv, d[..., None]], -1))
        out = np.full(xyz.shape, np.nan, np.float32)
        assert G.points_to_uvd(xyz, K, 64, np.asarray(root), np.asarray(bone), out=out) is out
        assert np.array_equal(out, got.astype(np.float32))
        torch_uvd = G.points_to_uvd(torch.from_numpy(xyz), torch.from_numpy(K), 64, torch.as_tensor(root),
                                    torch.as_tensor(bone))
        np.testing.assert_allclose(torch_uvd.numpy(), got, rtol=1e-12, atol=1e-12)
