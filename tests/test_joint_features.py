import math

import pytest
import torch
import torch.nn.functional as F

from cliphand3d.models.joint_features import JointFeatures, gaussian_1d, heat_volume, separable_volume_conv

J, D, H, W, C = 21, 16, 16, 16, 8


def _border_uvz(batch: int) -> torch.Tensor:
    """Joints on, near and just outside every face of the unit cube."""
    g = torch.Generator().manual_seed(3)
    uvz = torch.rand(batch, J, 3, generator=g)
    edge = torch.tensor([0.0, 1.0, 0.01, 0.99, -0.03, 1.04, 0.5 / 16, 1 - 0.5 / 16])
    uvz[:, : len(edge), 0] = edge
    uvz[:, 4 : 4 + len(edge), 1] = edge
    uvz[:, 10 : 10 + len(edge), 2] = edge
    return uvz


def test_heat_volume_known_values():
    sigma = 2.0
    uvz = torch.tensor([[[(3 + 0.5) / W, (5 + 0.5) / H, (7 + 0.5) / D]]])  # voxel (z7, y5, x3)
    vol = heat_volume(uvz, D, H, W, sigma)
    assert vol.shape == (1, 1, D, H, W)
    assert vol[0, 0, 7, 5, 3].item() == pytest.approx(1.0)
    assert vol.max().item() == pytest.approx(1.0)
    assert vol[0, 0, 7, 5, 4].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)))
    assert vol[0, 0, 9, 3, 3].item() == pytest.approx(math.exp(-8 / (2 * sigma**2)))
    # The crop edges 0 and 1 are mirror images of each other.
    g = gaussian_1d(torch.tensor([0.0, 1.0]), 4, 1.0)
    assert torch.allclose(g[0], g[1].flip(0))


@pytest.mark.parametrize("uvz_fn", [lambda b: torch.rand(b, J, 3), _border_uvz])
def test_separable_conv_equals_conv_on_materialised_volume(uvz_fn):
    torch.manual_seed(0)
    uvz = uvz_fn(2).double()
    weight = torch.randn(5, J * D, 3, 3, dtype=torch.float64)
    vol = heat_volume(uvz, D, H, W, 2.5).flatten(1, 2)
    ref = F.conv2d(vol, weight, padding=1)
    gx, gy, gz = (gaussian_1d(uvz[..., i], n, 2.5) for i, n in enumerate((W, H, D)))
    got = separable_volume_conv(weight, gx, gy, gz)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)


def _run(model, uvz, f0, impl):
    model.zero_grad()
    f0 = f0.clone().requires_grad_(True)
    out = model(uvz, f0, impl=impl)
    # A fixed random projection as loss so every output element matters.
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * proj).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), f0.grad, grads


@pytest.mark.parametrize("border", [False, True])
def test_factorized_equals_naive_with_gradients(border):
    torch.manual_seed(1)
    model = JointFeatures(in_channels=C, num_joints=J, depth_bins=D, hidden=32, out_dim=24)
    uvz = _border_uvz(2) if border else torch.rand(2, J, 3)
    f0 = torch.randn(2, C, H, W)
    out_n, gf_n, gp_n = _run(model, uvz, f0, "naive")
    out_f, gf_f, gp_f = _run(model, uvz, f0, "factorized")
    assert out_f.shape == (2, J, 24)
    assert torch.allclose(out_f, out_n, atol=1e-4, rtol=1e-4)
    assert torch.allclose(gf_f, gf_n, atol=1e-4, rtol=1e-4)
    assert set(gp_f) == {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight",
                         "bn2.bias", "proj.weight", "proj.bias"}
    for name in gp_n:
        assert gp_n[name].abs().max() > 0, name  # the comparison is not vacuous
        assert torch.allclose(gp_f[name], gp_n[name], atol=1e-4, rtol=1e-4), name


def test_same_parameters_across_impls_and_eval_mode():
    torch.manual_seed(2)
    naive = JointFeatures(in_channels=C, depth_bins=D, hidden=16, out_dim=8, impl="naive")
    fact = JointFeatures(in_channels=C, depth_bins=D, hidden=16, out_dim=8, impl="factorized")
    assert naive.state_dict().keys() == fact.state_dict().keys()
    naive(torch.rand(3, J, 3), torch.randn(3, C, H, W))  # move BN running stats off defaults
    fact.load_state_dict(naive.state_dict())
    naive.eval(), fact.eval()
    uvz, f0 = torch.rand(2, J, 3), torch.randn(2, C, H, W)
    with torch.no_grad():
        assert torch.allclose(naive(uvz, f0), fact(uvz, f0), atol=1e-4, rtol=1e-4)


def test_volume_carries_no_gradient_to_joints():
    model = JointFeatures(in_channels=C, depth_bins=D, hidden=16, out_dim=8)
    uvz = torch.rand(2, J, 3, requires_grad=True)
    model(uvz, torch.randn(2, C, H, W)).sum().backward()
    assert uvz.grad is None


def test_pooling_reads_the_joint_location():
    model = JointFeatures(in_channels=C, num_joints=2, depth_bins=D, hidden=2, out_dim=2)
    n = 64
    ramp_x = ((torch.arange(n) + 0.5) / n).expand(n, n)
    feat = torch.stack([ramp_x, ramp_x.T])[None]  # channel 0 = x, channel 1 = y of each cell
    # Interior joints on cell centres: a symmetric weighted mean of a ramp is the centre value.
    uvz = torch.tensor([[[20.5 / n, 40.5 / n, 0.5], [31.5 / n, 10.5 / n, 0.2]]])
    pooled = model._pool(feat, uvz)
    assert torch.allclose(pooled, uvz[..., :2], atol=1e-6)
    # A constant map pools to the constant, also for joints outside the crop.
    far = torch.tensor([[[-3.0, 0.5, 0.5], [0.5, 7.0, 0.5]]])
    assert torch.allclose(model._pool(torch.full((1, 2, n, n), 2.5), far), torch.full((1, 2, 2), 2.5))


def test_bad_inputs_give_clear_errors():
    model = JointFeatures(in_channels=C, depth_bins=D, hidden=8, out_dim=8)
    with pytest.raises(ValueError, match="uvz must be"):
        model(torch.rand(2, 20, 3), torch.randn(2, C, H, W))
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.rand(2, J, 3), torch.randn(2, C + 1, H, W))
    with pytest.raises(ValueError, match="batch sizes"):
        model(torch.rand(3, J, 3), torch.randn(2, C, H, W))
    with pytest.raises(ValueError, match="factorized"):
        JointFeatures(in_channels=C, impl="fast")


def _reads_depth_gaussian_off_centre(uvz: torch.Tensor, n: int, sigma: float) -> JointFeatures:
    """A JointFeatures whose token j, channel j, is joint j's depth Gaussian read one sigma off its
    centre (where it is steepest, so a shifted centre shows at first order), times the 2D pooling
    of its own x/y Gaussians (about constant for interior joints). Every other layer passes through."""
    m = JointFeatures(in_channels=1, num_joints=J, depth_bins=n, sigma=sigma, hidden=J, out_dim=J).eval()
    d = (uvz[0, :, 2] * n - 0.5 + sigma).round().long()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.bn1.weight.fill_(1.0), m.bn2.weight.fill_(1.0)  # eval BN with fresh statistics: identity
        for j in range(J):
            m.conv1.weight[j, 1 + j * n + d[j], 1, 1] = 1.0  # channel 0 is F0, then joint j, bin d
            m.conv2.weight[j, j, 1, 1] = 1.0
        m.proj.weight.copy_(torch.eye(J))
    return m


@pytest.mark.parametrize("impl", ["factorized", "naive"])
def test_bf16_autocast_keeps_gaussian_centres_exact(impl):
    # bf16 has 8 significant bits: on a 64-cell grid a centre built in bf16 lands on a 0.25-0.5 cell
    # grid, which moves the value read one sigma off the centre by ~0.02 here. bf16 arithmetic on
    # the rest stays within a few of its ulps (~0.001 at 0.2).
    n, sigma = 64, 1.5
    uvz = 0.2 + 0.6 * torch.rand(1, J, 3, generator=torch.Generator().manual_seed(0))
    model = _reads_depth_gaussian_off_centre(uvz, n, sigma)
    f0 = torch.zeros(1, 1, n, n)
    with torch.no_grad():
        ref = model(uvz, f0, impl=impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(uvz, f0.bfloat16(), impl=impl)
    assert out.dtype == torch.bfloat16
    assert ref.diagonal(dim1=1, dim2=2).min() > 0.15  # the read-out is not vacuous
    assert (out.float() - ref).abs().max() < 0.006
