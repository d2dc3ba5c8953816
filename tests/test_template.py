"""Data-derived template, FPS levels, J fit and the template cache (DESIGN 1.8)."""
from __future__ import annotations

import numpy as np
import pytest

from cliphand3d import skeleton
from cliphand3d.models import template as tm
from cliphand3d.models.template import (
    MeshTemplate,
    build_template,
    farthest_point_sampling,
    joints_only_template,
    load_or_build_template,
)

# Procedural stand-in for the synthetic hands: a posed skeleton in metres and a "mesh" of
# 4-point rings around every bone (at both ends and the middle), so each joint is the centre of
# rings that sit on it and a sparse J with rows summing to 1 exists.
_MCP = np.array([[0.030, 0.025, 0], [0.025, 0.085, 0], [0.0, 0.090, 0], [-0.020, 0.085, 0], [-0.038, 0.075, 0]])
_SEG = np.array([[0.035, 0.030, 0.025], [0.045, 0.028, 0.022], [0.048, 0.030, 0.023],
                 [0.045, 0.028, 0.022], [0.036, 0.022, 0.020]])
_Z = np.array([0.0, 0.0, 1.0])


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _random_rotations(rng, m):
    q, r = np.linalg.qr(rng.normal(size=(m, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    return q


def hand_labels(m: int, seed: int = 0, noise: float = 0.0005, pose: bool = True):
    """(verts (m, 240, 3), joints (m, 21, 3)) in metres, random pose, rotation, size and position."""
    rng = np.random.default_rng(seed)
    joints = np.zeros((m, 21, 3))
    lateral = np.zeros((m, 21, 3))  # per child joint: axis across its bone
    for f in range(5):
        base = _unit(np.array([0.7, 0.7, 0.0]) if f == 0 else _MCP[f])
        spread = rng.uniform(-0.2, 0.2, m) if pose else np.zeros(m)
        d0 = np.cos(spread)[:, None] * base + np.sin(spread)[:, None] * np.cross(_Z, base)
        side = _unit(np.cross(d0, _Z))
        mcp = 1 + 4 * f
        joints[:, mcp] = _MCP[f] + (rng.normal(0, 0.002, (m, 3)) if pose else 0)
        lateral[:, mcp] = _unit(np.cross(joints[:, mcp], _Z))
        flex = np.zeros(m)
        for s in range(3):
            flex = flex + (rng.uniform(0.0, 1.2, m) if pose else 0.3)
            d = np.cos(flex)[:, None] * d0 - np.sin(flex)[:, None] * _Z
            joints[:, mcp + s + 1] = joints[:, mcp + s] + _SEG[f, s] * d
            lateral[:, mcp + s + 1] = side
    rings = []
    for p, c in skeleton.BONES:
        a, b = joints[:, p], joints[:, c]
        e1 = lateral[:, c]
        e2 = _unit(np.cross(_unit(b - a), e1))
        for t in (0.0, 0.5, 1.0):
            centre = a + t * (b - a)
            for e, s in ((e1, 1), (e1, -1), (e2, 1), (e2, -1)):
                rings.append(centre + s * 0.008 * e)
    verts = np.stack(rings, 1) + rng.normal(0, noise, (m, len(rings), 3))
    return rigid_scale(verts, joints, rng)


def rigid_scale(verts, joints, rng):
    """Apply a random rotation, size in [0.85, 1.15] and camera-frame shift to each sample."""
    m = len(joints)
    rot = _random_rotations(rng, m)
    scale = rng.uniform(0.85, 1.15, (m, 1, 1))
    shift = rng.normal(0, 0.05, (m, 1, 3)) + np.array([0, 0, 0.5])
    tf = lambda x: scale * x @ np.swapaxes(rot, 1, 2) + shift
    return tf(verts), tf(joints)


def normalised(points, joints):
    root, bone = joints[:, :1], skeleton.bone_length(joints)[:, None, None]
    return (points - root) / bone


@pytest.fixture(scope="module")
def data():
    return hand_labels(300, seed=1)


@pytest.fixture(scope="module")
def tmpl(data):
    return build_template(*data, levels=(20, 60, 120), k_nearest=16)


def test_fps_known_answer_and_levels(data, tmpl):
    line = np.arange(11, dtype=float)[:, None] * np.array([[1.0, 0, 0]])
    # start: farthest from the centroid, lowest index on the tie (0 vs 10); then the far end, the middle
    assert farthest_point_sampling(line, 4).tolist() == [0, 10, 5, 2]
    assert tmpl.level_sizes == [20, 60, 120, 240]
    assert np.array_equal(tmpl.levels[-1], np.arange(240))
    for coarse, fine in zip(tmpl.levels, tmpl.levels[1:]):
        assert len(np.unique(coarse)) == len(coarse)
        assert np.isin(coarse, fine).all()  # nested levels (the documented choice)
    again = build_template(*data, levels=(20, 60, 120), k_nearest=16)
    for a, b in zip(tmpl.levels, again.levels):
        assert np.array_equal(a, b)
    # FPS spreads: its 20 points cover the template better than the first 20 vertices do
    def coverage(idx):
        d = np.linalg.norm(tmpl.verts[:, None] - tmpl.verts[idx][None], axis=-1)
        return d.min(1).max()
    assert coverage(tmpl.levels[0]) < 0.5 * coverage(np.arange(20))


def test_J_reproduces_template_joints(data, tmpl):
    # the must-show test: J @ template == template joints (< 1e-2 bone, about 1 mm)
    assert np.abs(tmpl.J @ tmpl.verts - tmpl.joints).max() < 1e-2
    assert np.allclose(tmpl.J.sum(1), 1.0, atol=1e-9)
    assert ((np.abs(tmpl.J) > 0).sum(1) <= 16).all()  # local rows
    # and generalises to unseen hands in any frame (rows sum to 1: translation-equivariant)
    verts, joints = hand_labels(50, seed=7)
    pred = np.einsum("jn,mnc->mjc", tmpl.J, verts)
    err = np.linalg.norm(pred - joints, axis=-1) / skeleton.bone_length(joints)[:, None]
    assert err.mean() < 1e-2 and err.max() < 5e-2


def test_template_is_normalised_and_canonical(data, tmpl):
    j = tmpl.joints
    assert np.allclose(j[0], 0, atol=1e-12)
    assert abs(np.linalg.norm(j[9]) - 1) < 0.02  # bone units
    assert np.allclose(j[9][[0, 2]], 0, atol=1e-9) and j[9][1] > 0  # +y: wrist -> middle MCP
    assert j[5][0] > j[17][0] and abs(j[5][2] - j[17][2]) < 1e-9  # +x towards the index side
    assert tmpl.verts.shape == (240, 3) and np.isfinite(tmpl.verts).all()


def test_alignment_removes_rotation_translation_scale(data, tmpl):
    verts, joints = rigid_scale(*data, np.random.default_rng(5))
    other = build_template(verts, joints, levels=(20, 60, 120), k_nearest=16)
    assert np.allclose(other.verts, tmpl.verts, atol=1e-8)
    assert np.allclose(other.joints, tmpl.joints, atol=1e-8)
    assert np.allclose(other.J, tmpl.J, atol=1e-6)
    # one pose seen from many directions: the template is that pose, with no blur
    v1, j1 = hand_labels(40, seed=3, noise=0.0, pose=False)
    single = build_template(v1, j1, levels=(10,))
    per_sample = normalised(v1, j1)
    d_template = np.linalg.norm(single.verts[:, None] - single.verts[None], axis=-1)
    d_sample = np.linalg.norm(per_sample[0][:, None] - per_sample[0][None], axis=-1)
    assert np.allclose(d_template, d_sample, atol=1e-9)  # rigid copy of every sample


def test_joints_only_template(data):
    _, joints = data
    t = joints_only_template(joints, num_levels=3)
    assert np.array_equal(t.J, np.eye(21))
    assert t.level_sizes == [21, 21, 21]
    assert np.allclose(t.verts, t.joints)
    assert np.allclose(t.J @ t.verts, t.joints)
    full = build_template(*data, levels=(20,), k_nearest=16)
    assert np.allclose(t.joints, full.joints, atol=1e-9)  # same alignment as the mesh path


def test_dict_round_trip_and_errors(tmpl):
    d = tmpl.to_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in d.values())
    back = MeshTemplate.from_dict(d)
    for a, b in zip(back.levels, tmpl.levels):
        assert np.array_equal(a, b)
    assert np.array_equal(back.J, tmpl.J) and np.array_equal(back.verts, tmpl.verts)
    with pytest.raises(ValueError, match="level_sizes"):
        MeshTemplate.from_dict({k: v for k, v in d.items() if k != "level_sizes"})


def test_bad_input_errors(data):
    verts, joints = data
    with pytest.raises(ValueError, match="joints"):
        build_template(verts, joints[:, :20])
    with pytest.raises(ValueError, match="verts"):
        build_template(verts[:10], joints)
    with pytest.raises(ValueError, match="levels"):
        build_template(verts, joints, levels=(60, 20))
    with pytest.raises(ValueError, match="levels"):
        build_template(verts, joints, levels=(240,))
    with pytest.raises(TypeError, match="bad keyword.*levls"):
        load_or_build_template("/nonexistent/t.npz", verts, joints, levls=(20,))
    bad = joints.copy()
    bad[3, 9] = bad[3, 0]
    with pytest.raises(ValueError, match=r"sample\(s\) \[3\]"):
        build_template(verts, bad)


def test_cache_reused_and_rebuilt(tmp_path, monkeypatch, data):
    verts, joints = data[0][:60], data[1][:60]
    calls = []
    real = tm.build_template

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tm, "build_template", counting)
    path = tmp_path / "sub" / "template.npz"
    first = load_or_build_template(path, verts, joints, levels=(20,))
    assert path.is_file() and len(calls) == 1
    second = load_or_build_template(path, verts, joints, levels=(20,))
    assert len(calls) == 1  # reused
    assert np.array_equal(first.J, second.J) and np.array_equal(first.levels[0], second.levels[0])
    changed = verts.copy()
    changed[0, 0, 0] += 1e-4
    load_or_build_template(path, changed, joints, levels=(20,))
    assert len(calls) == 2  # data changed
    load_or_build_template(path, changed, joints, levels=(30,))
    assert len(calls) == 3  # parameters changed
    load_or_build_template(path, changed, joints, levels=(30,))
    assert len(calls) == 3
    path.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable"):
        load_or_build_template(path, changed, joints, levels=(30,))
    assert len(calls) == 4
    j_only = load_or_build_template(path, None, joints, num_levels=2)
    assert j_only.level_sizes == [21, 21] and len(calls) == 4
