"""Projection, crops and their intrinsics, in-plane rotation, mirroring, uvd<->xyz, Procrustes, the area under
a curve.

Pure functions. Conventions (docs/conventions.md): OpenCV camera frame, pixel centres at integer
coordinates, normalised uvd with u = (u_pix + 0.5) / S.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from .skeleton import REF_BONE, ROOT, SCALE_BONE


# --------------------------------------------------------------------------- projection
def project(xyz, K):
    """(..., N, 3) camera points, (..., 3, 3) intrinsics -> (..., N, 2) pixels. numpy or torch."""
    uvw = xyz @ _t(K)
    return uvw[..., :2] / uvw[..., 2:3]


def backproject(uv, z, K):
    """Pixels (..., N, 2) and depths (..., N) -> camera points (..., N, 3). numpy or torch."""
    if isinstance(uv, torch.Tensor):
        ones = torch.ones_like(uv[..., :1])
        rays = torch.cat([uv, ones], -1) @ _t(torch.linalg.inv(K))
    else:
        rays = np.concatenate([uv, np.ones_like(uv[..., :1])], -1) @ _t(np.linalg.inv(K))
    return rays * z[..., None]


def _t(m):
    return m.transpose(-1, -2) if isinstance(m, torch.Tensor) else np.swapaxes(m, -1, -2)


# --------------------------------------------------------------------------- uvd <-> xyz
def xyz_to_uvd(xyz, K, img_size: int):
    """Camera joints (..., 21, 3) -> (uvd (..., 21, 3), root_depth (...), bone (...)). numpy or torch.

    u, v in [0, 1] across the S x S crop (pixel edges), d = (z - z_root) / bone.
    """
    root = xyz[..., ROOT, 2]
    diff = xyz[..., REF_BONE[0], :] - xyz[..., REF_BONE[1], :]
    bone = diff.norm(dim=-1) if isinstance(xyz, torch.Tensor) else np.linalg.norm(diff, axis=-1)
    return points_to_uvd(xyz, K, img_size, root, bone), root, bone


def points_to_uvd(xyz, K, img_size: int, root_depth, bone, out=None):
    """Any camera points (..., N, 3) (joints or vertices) -> normalised uvd, given the hand's root and bone.

    numpy only: `out`, an array of xyz's shape of any float dtype, receives the result (computed in float64,
    rounded once), and is returned: a loader worker writes 778 vertices per hand straight into its float32
    batch buffer this way."""
    if isinstance(xyz, torch.Tensor):
        uv = (project(xyz, K) + 0.5) / img_size
        return torch.cat([uv, ((xyz[..., 2] - root_depth[..., None]) / bone[..., None])[..., None]], -1)
    # the same operations on the same numbers as `project`'s, one coordinate at a time
    xyz = np.asarray(xyz)
    uvw = xyz @ np.swapaxes(K, -1, -2)
    out = np.empty(uvw.shape) if out is None else out
    for c in (0, 1):
        pixels = uvw[..., c] / uvw[..., 2]
        pixels += 0.5
        np.divide(pixels, img_size, out=out[..., c], casting="same_kind")
    np.divide(xyz[..., 2] - np.asarray(root_depth)[..., None], np.asarray(bone)[..., None], out=out[..., 2],
              casting="same_kind")
    return out


def uvd_to_xyz(uvd, K, img_size: int, root_depth, bone, pixel_offset: float = 0.5):
    """Inverse of `points_to_uvd`, given the crop intrinsics, root depth and bone (the demo protocol).

    pixel_offset: pixel = u * S - pixel_offset; 0.5 is the project's convention (u spans the pixel
    edges), 0 the released network's (pixel = u * 256, docs/released.md).
    """
    z = uvd[..., 2] * bone[..., None] + root_depth[..., None]
    return _uvd_rays(uvd, K, img_size, pixel_offset) * z[..., None]


def uv_to_pixels(uv, img_size: int, pixel_offset: float = 0.5):
    """Normalised crop uv -> crop pixels (pixel centres at integers): u * S - offset (0.5: u spans the pixel
    edges, ours; 0: the released network's convention)."""
    return uv[..., :2] * img_size - pixel_offset


def _uvd_rays(uvd, K, img_size: int, pixel_offset: float = 0.5):
    """Camera rays through the uvd pixels, scaled to unit depth: a point at depth z is z * ray."""
    uv = uv_to_pixels(uvd, img_size, pixel_offset)
    ones = torch.ones_like(uv[..., 0]) if isinstance(uv, torch.Tensor) else np.ones_like(uv[..., 0])
    return backproject(uv, ones, K)


def root_and_bone_from_uvd(uvd, K, img_size: int, scale, pixel_offset: float = 0.5):
    """Root depth and bone (metres) that place normalised uvd joints without ground truth.

    uvd (..., 21, 3), K (..., 3, 3) crop intrinsics, scale (...) the metric length of SCALE_BONE
    (FreiHAND's evaluation_scale.json). Returns (root_depth, bone, exact), numpy or torch as given.
    The 2.5D root recovery of Iqbal et al. (ECCV 2018): in units of bone, joint i lies at
    (Zn + d_i) * ray_i with Zn = root_depth / bone; requiring the reference bone (REF_BONE) to be one
    bone long gives a quadratic in Zn, of which the larger root is taken (the other is negative
    whenever the bone is not seen nearly end-on). The metric size then comes from `scale`:
    bone = scale / |X_9 - X_10| of that unit-bone reconstruction, root_depth = Zn * bone.
    exact is False where the discriminant is negative (no depth makes the reference bone one bone long,
    e.g. when |d_0 - d_9| > 1): there Zn is the depth at which it comes closest (the parabola's vertex).
    """
    as_numpy = not isinstance(uvd, torch.Tensor)
    uvd_t = torch.as_tensor(np.asarray(uvd) if as_numpy else uvd).double()
    K_t = torch.as_tensor(np.asarray(K) if as_numpy else K).to(uvd_t)
    scale_t = torch.as_tensor(np.asarray(scale) if as_numpy else scale).to(uvd_t)
    rays, d = _uvd_rays(uvd_t, K_t, img_size, pixel_offset), uvd_t[..., 2]
    i, j = REF_BONE
    a = rays[..., i, :] - rays[..., j, :]
    b = d[..., i, None] * rays[..., i, :] - d[..., j, None] * rays[..., j, :]
    # |Zn a + b|^2 = 1  <=>  qa Zn^2 + 2 qb Zn + qc = 0
    qa = (a * a).sum(-1).clamp_min(1e-12)  # 0 only if both joints share a pixel: then Zn -> infinity
    qb, qc = (a * b).sum(-1), (b * b).sum(-1) - 1.0
    disc = qb * qb - qa * qc
    zn = (-qb + disc.clamp_min(0.0).sqrt()) / qa
    unit = (zn[..., None] + d)[..., None] * rays  # the hand with a one-bone reference bone
    bone = scale_t / (unit[..., SCALE_BONE[0], :] - unit[..., SCALE_BONE[1], :]).norm(dim=-1)
    root, bone, exact = zn * bone, bone, disc >= 0
    if as_numpy:
        return root.numpy(), bone.numpy(), exact.numpy()
    return root.to(uvd.dtype), bone.to(uvd.dtype), exact


# --------------------------------------------------------------------------- crops and rotation
def square_box(points_2d: np.ndarray, scale: float = 1.3) -> tuple[float, float, float]:
    """Square box (cx, cy, size) around 2D points (N, 2): centre of their bounds, side = scale * max extent."""
    pts = np.asarray(points_2d, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        raise ValueError("square_box: no points to put a box around (empty mask or no joints)")
    lo, hi = pts.min(0), pts.max(0)
    c = (lo + hi) / 2
    size = float(max(hi - lo).max() * scale)
    return float(c[0]), float(c[1]), max(size, 1.0)


def crop_affine(center, size, out_size: int, rot_rad=0.0) -> np.ndarray:
    """3x3 pixel-to-pixel map taking the square box (center, size) to an out_size crop, rotated by rot_rad.

    The box's edges map to the crop's edges (pixel centres at integers on both sides). Positive
    rot_rad turns image content by +rot_rad in the (x right, y down) frame, i.e. clockwise on screen.
    Batched: center (..., 2), size and rot_rad (...) give (..., 3, 3), each map as alone.
    """
    if _is_number(size) and _is_number(rot_rad) and len(center) == 2 and all(_is_number(x) for x in center):
        return _one_crop_affine(float(center[0]), float(center[1]), float(size), out_size, float(rot_rad))
    center = np.asarray(center, dtype=np.float64)
    scale = out_size / np.asarray(size, dtype=np.float64)
    c, si = _cos_sin(rot_rad)
    # edge coords e = p + 0.5; e' = s R (e - c_edge) + out / 2; p' = e' - 0.5; so p' = s R (p - c) + out / 2 - 0.5
    r00, r01, r10, r11 = c * scale, -si * scale, si * scale, c * scale
    cx, cy = center[..., 0], center[..., 1]
    A = np.zeros(np.broadcast_shapes(cx.shape, r00.shape) + (3, 3))
    A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1], A[..., 2, 2] = r00, r01, r10, r11, 1.0
    A[..., 0, 2] = out_size / 2 - 0.5 - (r00 * cx + r01 * cy)
    A[..., 1, 2] = out_size / 2 - 0.5 - (r10 * cx + r11 * cy)
    return A


def _one_crop_affine(cx: float, cy: float, size: float, out_size: int, rot_rad: float) -> np.ndarray:
    """`crop_affine` of one crop in plain floats: the same operations on the same numbers as the batched
    arrays' (IEEE arithmetic either way), without numpy's per-call cost on nine numbers (a loader worker
    makes one map per item, right after decoding its picture)."""
    scale = out_size / size
    c, si = math.cos(rot_rad), math.sin(rot_rad)
    r00, r01, r10, r11 = c * scale, -si * scale, si * scale, c * scale
    return np.array([[r00, r01, out_size / 2 - 0.5 - (r00 * cx + r01 * cy)],
                     [r10, r11, out_size / 2 - 0.5 - (r10 * cx + r11 * cy)],
                     [0.0, 0.0, 1.0]])


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def rotation_z(rot_rad) -> np.ndarray:
    """Rotation about the camera's optical axis matching `crop_affine`'s image rotation; (..., 3, 3) for
    angles (...)."""
    c, s = _cos_sin(rot_rad)
    R = np.zeros(c.shape + (3, 3))
    R[..., 0, 0], R[..., 0, 1], R[..., 1, 0], R[..., 1, 1], R[..., 2, 2] = c, -s, s, c, 1.0
    return R


def _cos_sin(rot_rad) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of angles (...) from libm, angle by angle: numpy's vectorised ones may differ in the last
    bit between CPUs (AVX2 / AVX-512 code paths), and a crop must be the same on every machine."""
    rot = np.asarray(rot_rad, dtype=np.float64)
    flat = rot.ravel().tolist()
    return (np.array([math.cos(r) for r in flat]).reshape(rot.shape),
            np.array([math.sin(r) for r in flat]).reshape(rot.shape))


def warp_crop(image: np.ndarray, A: np.ndarray, out_size: int, border_value=0,
              interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    """The out_size x out_size crop of `image` that the 3x3 pixel map `A` (`crop_affine`) makes."""
    return cv2.warpAffine(image, A[:2], (out_size, out_size), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)


def crop_and_rotate(image: np.ndarray, K: np.ndarray, center, size: float, out_size: int,
                    rot_rad: float = 0.0, border_value=0, interpolation=cv2.INTER_LINEAR):
    """Crop a square box, resize it to out_size and rotate it in-plane about its centre.

    Returns (crop, K_new, R): the 3D labels follow with xyz_new = xyz @ R.T, and then
    project(xyz_new, K_new) lands where project(xyz, K) did in the new image. Exact for any K:
    K_new = A K R^T (upper triangular when fx == fy and there is no skew).
    """
    A = crop_affine(center, size, out_size, rot_rad)
    R = rotation_z(rot_rad)
    return warp_crop(image, A, out_size, border_value, interpolation), A @ K @ R.T, R


def crop_intrinsics(K: np.ndarray, center, size, out_size: int, rot_rad=0.0):
    """(K_new, R) of the crop `crop_and_rotate` makes, without an image: labels follow with xyz @ R.T.
    Batched as `crop_affine` (K (..., 3, 3)), each as alone."""
    R = rotation_z(rot_rad)
    return crop_affine(center, size, out_size, rot_rad) @ K @ np.swapaxes(R, -1, -2), R


def mirror_lr(image: np.ndarray | None, xyz: np.ndarray, K: np.ndarray, width: int):
    """Left <-> right hand: flip the image horizontally and negate x, with intrinsics adjusted.

    Returns (image_flipped or None, xyz_mirrored, K_new); project(xyz', K') is the flipped pixel
    u' = width - 1 - u. Works on any (..., 3) point array (joints, vertices).
    """
    F = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    S = np.diag([-1.0, 1.0, 1.0])
    flipped = None if image is None else _flip_columns(image)
    return flipped, np.asarray(xyz) @ S, F @ K @ S


_CV_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64))


def _flip_columns(image: np.ndarray) -> np.ndarray:
    """image[:, ::-1] as a new contiguous array. OpenCV's flip is ~40x faster than copying numpy's reversed
    view (a 320 x 320 RHD image: 0.4 ms vs 0.01 ms), which mattered on every left hand RHD loads."""
    image = np.asarray(image)
    if image.dtype in _CV_DTYPES and image.ndim in (2, 3):
        return cv2.flip(image, 1)
    return np.ascontiguousarray(image[:, ::-1])


# --------------------------------------------------------------------------- Procrustes
def procrustes_align(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Align pred to gt per sample, as the official FreiHAND scorer does.

    (..., N, 3) both. Centre, divide by the Frobenius norm, R, s = scipy.linalg.orthogonal_procrustes
    (gt_n, pred_n) (reflections allowed), aligned = pred_n @ R.T * s * |gt| + mean_gt. Batched SVD.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"procrustes_align: shapes differ, pred {pred.shape} vs gt {gt.shape}")
    mu_p, mu_g = pred.mean(-2, keepdims=True), gt.mean(-2, keepdims=True)
    p0, g0 = pred - mu_p, gt - mu_g
    # +1e-8 as in the official scorer, so a zero prediction aligns the same way
    n_p = np.linalg.norm(p0, axis=(-2, -1), keepdims=True) + 1e-8
    n_g = np.linalg.norm(g0, axis=(-2, -1), keepdims=True) + 1e-8
    p0, g0 = p0 / n_p, g0 / n_g
    # orthogonal_procrustes(A=g0, B=p0): R = U V^T of svd(A^T B), scale = sum of singular values
    u, w, vt = np.linalg.svd(np.swapaxes(g0, -1, -2) @ p0)
    R = u @ vt
    s = w.sum(-1)[..., None, None]
    return p0 @ np.swapaxes(R, -1, -2) * s * n_g + mu_g


def rigid_rotations(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Proper rotations R (M, 3, 3) minimising |x_m R^T - ref| about the origin (Kabsch).

    x (M, N, 3), ref (N, 3). No scale and no reflection: a reflection would turn a right hand into a
    left one. `procrustes_align` is the official scorer's variant (scale, reflections allowed).
    """
    u, _, vt = np.linalg.svd(np.swapaxes(ref, -1, -2)[None] @ x)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, 2] *= d[..., None]
    return u @ vt


# --------------------------------------------------------------------------- area under a curve
def trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The trapezoid rule along the last axis: the area under y(x), for every AUC (metrics.py) and the PCK
    legend (viz.py). numpy names its own np.trapz before 2.0 and np.trapezoid from 2.0 on (np.trapz is gone in
    2.4): pyproject allows both ends, and the rule is one line."""
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * np.diff(x)).sum(-1)
