"""Mesh template, coarse node levels and joint regressor J derived from a dataset's labels (DESIGN 1.8).

MANO files cannot ship with the project, so the regressor's template and J come from the training
labels: every sample is normalised (root-relative at joint 0, divided by the wrist -> middle-MCP bone)
and rigidly aligned on its joints, the aligned meshes are averaged, coarse levels are picked by
farthest point sampling and J is fitted by constrained ridge least squares.

Canonical frame of every template: origin at the wrist, +y from the wrist towards the middle MCP,
+x across the palm from the little MCP towards the index MCP, +z = x cross y. Units are bones.
Pure numpy; `load_or_build_template` adds a fingerprinted .npz cache.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..geometry import rigid_rotations
from ..serialization import write_atomic
from ..skeleton import NUM_JOINTS, REF_BONE, ROOT, bone_length
from .mesh_graph import MeshGraph, build_mesh_graph, skeleton_points

# Bump when the build changes its output for the same inputs, so old caches are rebuilt.
_CACHE_VERSION = "1"
_DICT_KEYS = ("verts", "joints", "J", "levels_flat", "level_sizes")
# MPII indices spanning the palm, used to define the canonical frame.
_INDEX_MCP, _MIDDLE_MCP, _LITTLE_MCP = 5, 9, 17


@dataclass(eq=False)
class MeshTemplate:
    """verts (N,3), joints (21,3) in normalised canonical units; levels coarse -> fine
    (index arrays into the N vertices, the last is all N); J (21,N) with joints ~= J @ verts."""

    verts: np.ndarray
    joints: np.ndarray
    levels: list[np.ndarray]
    J: np.ndarray

    def __post_init__(self) -> None:
        self.verts = np.asarray(self.verts, dtype=np.float64)
        self.joints = np.asarray(self.joints, dtype=np.float64)
        self.J = np.asarray(self.J, dtype=np.float64)
        self.levels = [np.asarray(lv, dtype=np.int64) for lv in self.levels]
        n = self.verts.shape[0] if self.verts.ndim == 2 else -1
        if self.verts.ndim != 2 or self.verts.shape[1] != 3:
            raise ValueError(f"MeshTemplate.verts: expected (N, 3), got {self.verts.shape}")
        if self.joints.shape != (NUM_JOINTS, 3):
            raise ValueError(f"MeshTemplate.joints: expected ({NUM_JOINTS}, 3), got {self.joints.shape}")
        if self.J.shape != (NUM_JOINTS, n):
            raise ValueError(f"MeshTemplate.J: expected ({NUM_JOINTS}, {n}) to match verts, got {self.J.shape}")
        if not self.levels:
            raise ValueError("MeshTemplate.levels: at least one level (all N vertices) is required")
        for i, lv in enumerate(self.levels):
            if lv.ndim != 1 or len(lv) == 0 or lv.min() < 0 or lv.max() >= n:
                raise ValueError(f"MeshTemplate.levels[{i}]: expected a non-empty 1-D index array into "
                                 f"{n} vertices, got shape {lv.shape}")
        if not np.array_equal(self.levels[-1], np.arange(n)):
            raise ValueError("MeshTemplate.levels[-1] must be all vertices in order (np.arange(N)), "
                             "so the finest stage outputs the dataset's vertex order")

    @property
    def num_verts(self) -> int:
        return int(self.verts.shape[0])

    @property
    def level_sizes(self) -> list[int]:
        return [len(lv) for lv in self.levels]

    def mesh_graph(self, k: int = 5) -> MeshGraph:
        """The k-nearest-neighbour graph of the mean mesh and its triangles, oriented away from the bones
        (mesh_graph.py). Derived from `verts` whenever asked and never stored, so template caches and
        checkpoints stay as they were."""
        return build_mesh_graph(self.verts, k, inside=skeleton_points(self.joints))

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays only (loadable with allow_pickle=False); levels are flattened."""
        return {
            "verts": self.verts.copy(),
            "joints": self.joints.copy(),
            "J": self.J.copy(),
            "levels_flat": np.concatenate(self.levels).astype(np.int64),
            "level_sizes": np.array(self.level_sizes, dtype=np.int64),
        }

    @classmethod
    def from_dict(cls, d) -> "MeshTemplate":
        missing = [k for k in _DICT_KEYS if k not in d]
        if missing:
            raise ValueError(f"MeshTemplate.from_dict: missing key(s) {missing}; expected {list(_DICT_KEYS)} "
                             "as written by MeshTemplate.to_dict()")
        sizes = np.asarray(d["level_sizes"], dtype=np.int64)
        flat = np.asarray(d["levels_flat"], dtype=np.int64)
        if sizes.sum() != len(flat):
            raise ValueError(f"MeshTemplate.from_dict: level_sizes sum to {sizes.sum()} but levels_flat has "
                             f"{len(flat)} entries")
        levels = np.split(flat, np.cumsum(sizes)[:-1])
        return cls(verts=d["verts"], joints=d["joints"], levels=levels, J=d["J"])


# --------------------------------------------------------------------------- alignment
def _check_labels(verts, joints) -> tuple[np.ndarray | None, np.ndarray]:
    joints = np.asarray(joints)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints: expected (M, {NUM_JOINTS}, 3) camera-frame metres in MPII order, "
                         f"got {joints.shape}")
    if len(joints) == 0:
        raise ValueError("joints: no samples (M = 0); pass the training labels")
    if not np.isfinite(joints).all():
        raise ValueError("joints: contains NaN or inf; drop or fix those samples")
    bones = bone_length(joints.astype(np.float64))
    bad = np.flatnonzero(bones < 1e-9)
    if len(bad):
        raise ValueError(f"joints: zero wrist->middle-MCP bone in sample(s) {bad[:5].tolist()}; "
                         "these cannot be normalised, drop them")
    if verts is None:
        return None, joints
    verts = np.asarray(verts)
    if verts.ndim != 3 or verts.shape[2] != 3 or verts.shape[0] != joints.shape[0]:
        raise ValueError(f"verts: expected (M, N, 3) with M = {joints.shape[0]} as in joints, got {verts.shape}")
    if not np.isfinite(verts).all():
        raise ValueError("verts: contains NaN or inf; drop or fix those samples")
    return verts, joints


def _normalise(points: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """(M, P, 3) points -> root-relative at joint 0 and in bone units of their own sample."""
    joints = joints.astype(np.float64)
    root = joints[:, ROOT:ROOT + 1]
    bone = bone_length(joints)[:, None, None]
    return (points.astype(np.float64) - root) / bone


def palm_frames(joints_n: np.ndarray) -> np.ndarray:
    """(..., 21, 3) -> (..., 3, 3) rotations whose rows are the canonical axes (module docstring)."""
    y = joints_n[..., _MIDDLE_MCP, :] - joints_n[..., REF_BONE[0], :]
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    x = joints_n[..., _INDEX_MCP, :] - joints_n[..., _LITTLE_MCP, :]
    x = x - (x * y).sum(-1, keepdims=True) * y
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    z = np.cross(x, y)
    return np.stack([x, y, z], axis=-2)


def _align(joints_n: np.ndarray, iters: int) -> np.ndarray:
    """Generalised Procrustes without scale on root-relative joints -> per-sample rotations (M,3,3).

    Starts from each sample's own palm frame, alternates 'mean of aligned' and 'rotate onto the mean',
    then turns the result into the canonical palm frame of the mean, so the template does not depend
    on any sample's camera orientation.
    """
    rots = palm_frames(joints_n)
    for _ in range(iters):
        ref = (joints_n @ np.swapaxes(rots, -1, -2)).mean(0)
        new = rigid_rotations(joints_n, ref)
        done = np.abs(new - rots).max() < 1e-12
        rots = new
        if done:
            break
    ref = (joints_n @ np.swapaxes(rots, -1, -2)).mean(0)
    return palm_frames(ref) @ rots


# --------------------------------------------------------------------------- sampling and J
def farthest_point_sampling(points: np.ndarray, n: int, start: int | None = None) -> np.ndarray:
    """Indices of n points (in the order picked) spreading over `points` (P, D).

    Deterministic: the default start is the point farthest from the centroid (lowest index on ties),
    and ties later on also go to the lowest index.
    """
    points = np.asarray(points, dtype=np.float64)
    if not 1 <= n <= len(points):
        raise ValueError(f"farthest_point_sampling: n must be in [1, {len(points)}], got {n}")
    if start is None:
        start = int(np.argmax(((points - points.mean(0)) ** 2).sum(-1)))
    order = np.empty(n, dtype=np.int64)
    order[0] = start
    dist = ((points - points[start]) ** 2).sum(-1)
    for i in range(1, n):
        order[i] = int(np.argmax(dist))
        dist = np.minimum(dist, ((points - points[order[i]]) ** 2).sum(-1))
    return order


def _chunks(m: int, size: int):
    for s in range(0, m, size):
        yield slice(s, min(s + size, m))


def build_template(verts, joints, *, levels=(98, 195, 389), ridge: float = 1e-3, k_nearest: int = 32,
                   align_iters: int = 10, chunk: int = 2048) -> MeshTemplate:
    """Template, FPS levels and J from a dataset's labels.

    verts (M, N, 3), joints (M, 21, 3): camera-frame metres, MPII order, right hands.
    levels: sizes of the coarse levels, strictly increasing and < N; all N is appended as the last.
    Levels are nested: one farthest-point ordering of the template, each level a prefix of it (sorted
    by vertex index), so every coarse node is also a node of every finer level.
    ridge: relative ridge weight for J (times the mean diagonal of each joint's Gram matrix).
    k_nearest: J row j may use only the k template vertices nearest to template joint j.
    chunk: samples processed at a time, so full FreiHAND (32,560 x 778) stays within a few hundred MB.
    """
    verts, joints = _check_labels(verts, joints)
    m, n = verts.shape[:2]
    sizes = [int(s) for s in levels]
    if any(b <= a for a, b in zip(sizes, sizes[1:])) or (sizes and (sizes[0] < 1 or sizes[-1] >= n)):
        raise ConfigError(f"levels={tuple(sizes)}: coarse level sizes must be strictly increasing, >= 1 and "
                         f"< N = {n} (the full level of all N vertices is appended automatically)")
    if k_nearest < 1:
        raise ConfigError(f"k_nearest={k_nearest}: must be >= 1")
    if ridge < 0:
        raise ConfigError(f"ridge={ridge}: must be >= 0")

    joints_n = _normalise(joints, joints)
    rots = _align(joints_n, align_iters)
    rots_t = np.swapaxes(rots, -1, -2)
    joints_mean = (joints_n @ rots_t).mean(0)

    verts_sum = np.zeros((n, 3))
    for sl in _chunks(m, chunk):
        verts_sum += (_normalise(verts[sl], joints[sl]) @ rots_t[sl]).sum(0)
    verts_mean = verts_sum / m

    order = farthest_point_sampling(verts_mean, sizes[-1]) if sizes else np.empty(0, np.int64)
    level_idx = [np.sort(order[:s]) for s in sizes] + [np.arange(n)]

    J = _fit_regressor(verts, joints, verts_mean, joints_mean, ridge=ridge, k=min(k_nearest, n), chunk=chunk)
    return MeshTemplate(verts=verts_mean, joints=joints_mean, levels=level_idx, J=J)


def _fit_regressor(verts, joints, t_verts, t_joints, *, ridge: float, k: int, chunk: int) -> np.ndarray:
    """J (21, N): row j = weights w on joint j's k nearest template vertices, minimising
    sum_m |V_m[S_j]^T w - x_mj|^2 + lam |w|^2 subject to sum(w) = 1.

    Why sum(w) = 1: then J (V A + 1 t^T) = (J V) A + t for any 3x3 A and shift t, so J commutes with
    translations, rotations and per-axis scalings. It is fitted in root-relative bone units but applied
    to the model's uvd output (a different origin and per-axis scale, near-affine for a hand-sized
    crop), and it cannot place a joint off the vertex cloud. Why local rows: joints are local
    features of the surface; a dense fit over all N vertices overfits pose correlations of the
    training set. The fit is per sample in its own (unrotated) normalised frame: the objective is
    rotation-invariant because the same w acts on all three coordinates.
    """
    nearest = np.argsort(((t_verts[None] - t_joints[:, None]) ** 2).sum(-1), axis=1, kind="stable")[:, :k]
    gram = np.zeros((NUM_JOINTS, k, k))
    rhs = np.zeros((NUM_JOINTS, k))
    for sl in _chunks(len(verts), chunk):
        v = _normalise(verts[sl], joints[sl])[:, nearest]          # (c, 21, k, 3)
        x = _normalise(joints[sl], joints[sl])                      # (c, 21, 3)
        gram += np.einsum("mjkd,mjld->jkl", v, v)
        rhs += np.einsum("mjkd,mjd->jk", v, x)
    J = np.zeros((NUM_JOINTS, len(t_verts)))
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, k] = kkt[k, :k] = 1.0
    for j in range(NUM_JOINTS):
        lam = ridge * np.trace(gram[j]) / k
        kkt[:k, :k] = gram[j] + lam * np.eye(k)
        sol = np.linalg.lstsq(kkt, np.append(rhs[j], 1.0), rcond=None)[0]
        J[j, nearest[j]] = sol[:k]
    return J


def joints_only_template(joints, *, num_levels: int = 4, align_iters: int = 10) -> MeshTemplate:
    """Template for datasets without meshes (RHD): the 'vertices' are the 21 mean normalised joints,
    every level is all 21 of them and J is the identity."""
    if num_levels < 1:
        raise ValueError(f"num_levels={num_levels}: must be >= 1")
    _, joints = _check_labels(None, joints)
    joints_n = _normalise(joints, joints)
    rots = _align(joints_n, align_iters)
    mean = (joints_n @ np.swapaxes(rots, -1, -2)).mean(0)
    return MeshTemplate(verts=mean, joints=mean.copy(), levels=[np.arange(NUM_JOINTS)] * num_levels,
                        J=np.eye(NUM_JOINTS))


# --------------------------------------------------------------------------- cache
def _fingerprint(builder, arrays: dict, kw: dict) -> str:
    try:
        bound = inspect.signature(builder).bind(*[None] * len(arrays), **kw)
    except TypeError as e:
        raise TypeError(f"load_or_build_template: bad keyword for {builder.__name__}: {e}") from None
    bound.apply_defaults()
    # Defaults are hashed too, so a changed default also invalidates old caches.
    params = {k: v for k, v in bound.arguments.items() if k not in arrays}
    h = hashlib.sha256()
    h.update(json.dumps({"version": _CACHE_VERSION, "builder": builder.__name__, "kw": params},
                        sort_keys=True, default=str).encode())
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def load_or_build_template(cache_path: str | os.PathLike, verts, joints, **kw) -> MeshTemplate:
    """Load the template cached at cache_path (.npz) or build and cache it.

    verts=None selects the joints-only template (kw go to joints_only_template, else build_template).
    The cache is keyed by a hash of the label arrays and of all build parameters (defaults included);
    any difference rebuilds it. An unreadable cache is rebuilt; an unwritable location only warns.
    """
    path = Path(cache_path).expanduser()
    builder = joints_only_template if verts is None else build_template
    arrays = {"joints": np.asarray(joints)} if verts is None else {"verts": np.asarray(verts),
                                                                    "joints": np.asarray(joints)}
    fp = _fingerprint(builder, arrays, kw)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["fingerprint"]) == fp:
                    return MeshTemplate.from_dict({k: f[k] for k in _DICT_KEYS})
        except (OSError, ValueError, KeyError, EOFError) as e:
            warnings.warn(f"template cache {path} is unreadable ({e}); rebuilding it")
    template = builder(*arrays.values(), **kw)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole (temp file, then rename), so concurrent readers never see a half-written file
        write_atomic(path, lambda f: np.savez(f, fingerprint=np.array(fp), **template.to_dict()))
    except OSError as e:
        warnings.warn(f"could not write the template cache {path} ({e}); it will be rebuilt next time. "
                      "Point the cache path at a writable folder to keep it.")
    return template
