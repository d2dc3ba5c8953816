"""A neighbour graph on a template's mean mesh, for the mesh regularisers (`edge`, `normal` in losses.py).

The data-derived template (template.py) has vertices but no faces: MANO's faces cannot ship with the
project. The graph is read off the mean shape instead: every vertex is joined to its k nearest
vertices (symmetrised: an edge wherever either end lists the other), and a triangle is every triple
of pairwise-joined vertices. The result is not a manifold surface (a clique of four gives four
triangles), which the regularisers do not need: they compare each edge and triangle of the prediction
with the same edge and triangle of the ground truth.

Pure numpy and deterministic: distances are elementwise (no BLAS reduction order), ties go to the
lower index, edges and triangles come out sorted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..skeleton import BONES

# Rows of the (N, N) distance and (E, N) common-neighbour tables built at a time (memory stays ~50 MB).
_CHUNK = 1024


@dataclass(frozen=True, eq=False)
class MeshGraph:
    """edges (E, 2) with i < j, triangles (F, 3) oriented outward where `inside` was given; int64 indices
    into num_verts vertices."""

    edges: np.ndarray
    triangles: np.ndarray
    num_verts: int


def knn_edges(verts: np.ndarray, k: int) -> np.ndarray:
    """(E, 2) int64 edges joining each vertex to its k nearest others, symmetrised, i < j, sorted, unique."""
    verts = np.asarray(verts, dtype=np.float64)
    n = len(verts)
    if not 1 <= k < n:
        raise ValueError(f"knn_edges: k must be in [1, {n - 1}] for {n} vertices, got {k}")
    nearest = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, n))
        d2 = ((verts[rows, None, :] - verts[None, :, :]) ** 2).sum(-1)
        d2[np.arange(len(rows)), rows] = np.inf  # no self loops
        nearest[rows] = np.argsort(d2, axis=1, kind="stable")[:, :k]
    pairs = np.stack([np.repeat(np.arange(n), k), nearest.ravel()], 1)
    return np.unique(np.sort(pairs, axis=1), axis=0)


def clique_triangles(edges: np.ndarray, n: int) -> np.ndarray:
    """(F, 3) int64 triangles i < j < m of pairwise-joined vertices, each once, sorted."""
    adj = np.zeros((n, n), dtype=bool)
    adj[edges[:, 0], edges[:, 1]] = adj[edges[:, 1], edges[:, 0]] = True
    found = []
    for s in range(0, len(edges), _CHUNK):
        e = edges[s:s + _CHUNK]
        # a third vertex joined to both ends and above j: each triangle is found from its lowest edge only
        common = adj[e[:, 0]] & adj[e[:, 1]] & (np.arange(n)[None, :] > e[:, 1:2])
        which, m = np.nonzero(common)
        found.append(np.concatenate([e[which], m[:, None]], 1))
    tris = np.concatenate(found) if found else np.empty((0, 3), dtype=np.int64)
    return tris.astype(np.int64).reshape(-1, 3)


def orient_outward(verts: np.ndarray, triangles: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """`triangles` with two corners swapped where needed so that each normal (v1 - v0) x (v2 - v0) points
    away from the nearest of the `inside` points (P, 3), e.g. points along the hand's bones."""
    verts, inside = np.asarray(verts, dtype=np.float64), np.asarray(inside, dtype=np.float64)
    tris = np.array(triangles, dtype=np.int64, copy=True).reshape(-1, 3)
    a, b, c = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    centre = (a + b + c) / 3.0
    nearest = np.argmin(((centre[:, None, :] - inside[None, :, :]) ** 2).sum(-1), axis=1)
    inward = (np.cross(b - a, c - a) * (centre - inside[nearest])).sum(-1) < 0
    tris[inward] = tris[inward][:, [0, 2, 1]]
    return tris


def skeleton_points(joints: np.ndarray, per_bone: int = 8) -> np.ndarray:
    """(20 * per_bone, 3) points spaced along the 20 bones of (21, 3) joints: inside the hand's surface."""
    joints = np.asarray(joints, dtype=np.float64)
    t = np.linspace(0.0, 1.0, per_bone)[:, None]
    return np.concatenate([joints[p] + t * (joints[c] - joints[p]) for p, c in BONES])


def build_mesh_graph(verts: np.ndarray, k: int, inside: np.ndarray | None = None) -> MeshGraph:
    """The k-nearest-neighbour graph of (N, 3) vertices and its triangles (oriented when `inside` is given)."""
    verts = np.asarray(verts, dtype=np.float64)
    edges = knn_edges(verts, k)
    tris = clique_triangles(edges, len(verts))
    if inside is not None:
        tris = orient_outward(verts, tris, inside)
    return MeshGraph(edges=edges, triangles=tris, num_verts=len(verts))
