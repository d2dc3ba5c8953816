"""Coarse-to-fine regressor (DESIGN 1.8): shapes in both modes, J @ verts, gradients, cue sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cliphand3d.models.regressor import CoarseToFineRegressor, sample_at_joints
from cliphand3d.models.template import MeshTemplate, farthest_point_sampling, joints_only_template

CUES = (6, 5, 4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny: extra intra-op threads only fight other processes for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

WIDTHS = (16, 16, 12, 8, 8)


def tiny_template(n: int = 40, seed: int = 0) -> MeshTemplate:
    rng = np.random.default_rng(seed)
    verts = rng.normal(size=(n, 3))
    order = farthest_point_sampling(verts, 20)
    J = rng.uniform(size=(21, n)) * (rng.uniform(size=(21, n)) < 0.2)
    J[np.arange(21), np.arange(21)] += 1.0
    J /= J.sum(1, keepdims=True)
    return MeshTemplate(verts=verts, joints=J @ verts, J=J,
                        levels=[np.sort(order[:s]) for s in (5, 10, 20)] + [np.arange(n)])


def inputs(b: int = 2, token_dim: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, 21, token_dim, generator=g)
    feats = [torch.randn(b, c, s, s, generator=g) for c, s in zip(CUES, (4, 8, 16))]
    uv = torch.rand(b, 21, 2, generator=g)
    return tokens, feats, uv


def model(template, **kw):
    torch.manual_seed(0)
    kw = {"token_dim": 24, "widths": WIDTHS, "cue_channels": CUES, "heads": 4, **kw}
    return CoarseToFineRegressor(template=template, **kw)


def test_mesh_mode_shapes_and_joints_are_J_verts():
    t = tiny_template()
    net = model(t.to_dict())  # a dict works as well as a MeshTemplate
    out = net(*inputs())
    assert out["verts"].shape == (2, 40, 3) and out["joints"].shape == (2, 21, 3)
    assert [s.shape for s in out["stages"]] == [(2, n, 3) for n in (5, 10, 20, 40)]
    assert out["verts"] is out["stages"][-1]
    assert torch.equal(out["joints"], net.J @ out["verts"])
    assert torch.allclose(net.J.double(), torch.as_tensor(t.J))
    gt = torch.randn(2, 40, 3)
    targets = net.stage_targets(gt)
    assert [x.shape[1] for x in targets] == [5, 10, 20, 40]
    assert torch.equal(targets[0], gt[:, torch.as_tensor(t.levels[0])])


def test_joints_only_mode():
    rng = np.random.default_rng(0)
    t = joints_only_template(rng.normal(size=(8, 21, 3)) * 0.02 + np.arange(21)[:, None] * 0.01)
    net = model(t)
    out = net(*inputs(b=3))
    assert out["verts"].shape == (3, 21, 3)
    assert [s.shape for s in out["stages"]] == [(3, 21, 3)] * 4
    assert torch.equal(out["joints"], out["verts"])  # J is the identity
    assert net.joints_only and net.num_verts == 21
    assert not model(tiny_template()).joints_only
    # each node starts from its own joint (nearest-node init), not a mix of all 21
    assert torch.equal(net.stages[0].upsample.weight, torch.eye(21))


def test_gradients_reach_every_parameter():
    net = model(tiny_template())
    tokens, feats, uv = inputs()
    tokens.requires_grad_(True)
    for f in feats:
        f.requires_grad_(True)
    out = net(tokens, feats, uv)
    loss = sum(s.square().mean() for s in out["stages"]) + out["joints"].abs().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert all(f.grad.abs().sum() > 0 for f in feats) and tokens.grad.abs().sum() > 0
    assert uv.grad is None  # detach_uv=True by default

    net = model(tiny_template(), detach_uv=False)
    uv = uv.clone().requires_grad_(True)
    net(tokens.detach(), [f.detach() for f in feats], uv)["verts"].sum().backward()
    assert uv.grad.abs().sum() > 0


def test_sample_at_joints_known_answer():
    h, w = 5, 7
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    feat = torch.stack([xs, ys])[None]  # channel 0 = column, channel 1 = row
    cols, rows = torch.tensor([0, 3, 6, 2]), torch.tensor([0, 4, 2, 1])
    # pixel centre i of a W-wide map is at u = (i + 0.5) / W (docs/conventions.md)
    uv = torch.stack([(cols + 0.5) / w, (rows + 0.5) / h], -1)[None].float()
    got = sample_at_joints(feat, uv)[0]
    assert torch.allclose(got, torch.stack([cols, rows], -1).float(), atol=1e-5)
    mid = sample_at_joints(feat, torch.tensor([[[2.0 / w, 1.5 / h]]]))[0, 0]  # between pixel centres
    assert torch.allclose(mid, torch.tensor([1.5, 1.0]), atol=1e-5)


def test_cues_matter_and_samples_are_independent():
    net = model(tiny_template()).eval()
    tokens, feats, uv = inputs(b=2)
    with torch.no_grad():
        base = net(tokens, feats, uv)["verts"]
        alone = net(tokens[:1], [f[:1] for f in feats], uv[:1])["verts"]
        moved = net(tokens, feats, uv.flip(1))["verts"]
        other = net(tokens, [f * 2 for f in feats], uv)["verts"]
    assert torch.allclose(alone, base[:1], atol=1e-5)  # no attention across the batch
    assert not torch.allclose(moved, base, atol=1e-3)
    assert not torch.allclose(other, base, atol=1e-3)


def test_fits_a_fixed_target():
    net = model(tiny_template())
    tokens, feats, uv = inputs(b=4)
    target = torch.rand(4, 40, 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = net(tokens, feats, uv)
        loss = (out["verts"] - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_state_dict_carries_template_and_bad_config_errors():
    net = model(tiny_template(seed=0))
    other = model(tiny_template(seed=1))
    other.load_state_dict(net.state_dict())
    assert torch.equal(other.J, net.J) and torch.equal(other.level_idx_0, net.level_idx_0)
    with pytest.raises(ValueError, match="widths"):
        model(tiny_template(), widths=(16, 16, 8))
    with pytest.raises(ValueError, match="heads"):
        model(tiny_template(), widths=(16, 16, 12, 8, 6))
    net = model(tiny_template())
    tokens, feats, uv = inputs()
    with pytest.raises(ValueError, match="cue_channels"):
        net(tokens, feats[:2], uv)
    with pytest.raises(ValueError, match="joints_uv"):
        net(tokens, feats, uv[:, :20])


def test_joints_only_is_decided_once_not_every_forward(monkeypatch):
    rng = np.random.default_rng(0)
    t = joints_only_template(rng.normal(size=(8, 21, 3)) * 0.02 + np.arange(21)[:, None] * 0.01)
    net, mesh_net = model(t), model(tiny_template())

    def no_equal(*a, **k):
        raise AssertionError("torch.equal after construction: a host sync on every forward")

    monkeypatch.setattr(torch, "equal", no_equal)
    assert net.joints_only is True and mesh_net.joints_only is False
    net(*inputs(b=2))
    monkeypatch.undo()
    # Loading other weights re-decides: a 21-node template whose J is not the identity is a mesh
    other = dict(t.to_dict(), J=np.roll(np.eye(21), 1, axis=1))
    net.load_state_dict(model(MeshTemplate.from_dict(other)).state_dict())
    assert net.joints_only is False


@pytest.mark.parametrize("block", ["torch", "clip"])
def test_inference_attends_through_sdpa_with_the_same_answer_and_restores_the_switch(block):
    """PyTorch's no-grad fast path materialises the N x N attention (bmm + softmax); inference runs the
    SDPA kernels training uses instead, to the same values, and leaves the global switch as it found it."""
    from torch.profiler import ProfilerActivity, profile

    net = model(tiny_template().to_dict(), block=block).eval()
    x = inputs(b=3)
    with torch.no_grad():
        first = net(*x)["verts"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = net(*x)["verts"]
    ops = {e.name for e in prof.events()}
    assert "aten::_native_multi_head_attention" not in ops
    assert any("scaled_dot_product" in name for name in ops)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    net.train()  # dropout is 0: the training path gives the same numbers through SDPA too
    with torch.no_grad():
        reference = net(*x)["verts"]
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert torch.equal(first, out)
