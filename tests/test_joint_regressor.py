import numpy as np
import pytest
import torch

from cliphand3d.models.backbone import ResNetBackbone
from cliphand3d.models.joint_regressor import (
    JointRegressor,
    PoseFeatureHeads,
    depth_to_unit,
    soft_argmax_1d,
    unit_to_depth,
)


@pytest.mark.parametrize("bins", [1, 7, 32, 64])
def test_soft_argmax_one_hot_gives_bin_centre(bins):
    logits = torch.zeros(bins, bins)
    logits[torch.arange(bins), torch.arange(bins)] = 60.0  # row i: a large logit in bin i
    expected = (torch.arange(bins) + 0.5) / bins
    assert torch.allclose(soft_argmax_1d(logits), expected, atol=1e-6)


def test_soft_argmax_uniform_and_batched_shape():
    assert torch.allclose(soft_argmax_1d(torch.zeros(3, 21, 16)), torch.full((3, 21), 0.5))
    # Two equal peaks average to their midpoint.
    logits = torch.full((10,), -50.0)
    logits[[2, 7]] = 0.0
    assert soft_argmax_1d(logits).item() == pytest.approx((2.5 + 7.5) / 2 / 10, abs=1e-6)


def test_depth_conversions_round_trip_and_known_values():
    r = 1.5
    d = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert torch.allclose(unit_to_depth(depth_to_unit(d, r), r), d)
    z = np.linspace(0, 1, 11)
    assert np.allclose(depth_to_unit(unit_to_depth(z, r), r), z)
    assert depth_to_unit(-r, r) == 0.0 and depth_to_unit(0.0, r) == 0.5 and depth_to_unit(r, r) == 1.0


@pytest.mark.parametrize("size, stages, num_deconv", [(128, 4, 2), (256, 4, 2), (128, 3, 1), (64, 3, 1)])
def test_regressor_and_heads_shapes_on_real_pyramid(size, stages, num_deconv):
    torch.manual_seed(0)
    net = ResNetBackbone(name="resnet18", stages=stages)
    # either backbone, with its deconvolutions, lands on stride-8 heatmaps
    reg = JointRegressor(in_channels=net.channels[4], deconv_channels=32, depth_bins=64, num_deconv=num_deconv,
                         in_stride=net.strides[4])
    f4 = net(torch.randn(2, 3, size, size))[4]
    out = reg(f4)
    n = size // 8
    assert out["uvz"].shape == (2, 21, 3)
    assert out["logits"]["x"].shape == (2, 21, n)
    assert out["logits"]["y"].shape == (2, 21, n)
    assert out["logits"]["z"].shape == (2, 21, 64)
    assert reg.bins(size) == {"x": n, "y": n, "z": 64}
    assert ((out["uvz"] > 0) & (out["uvz"] < 1)).all()
    for i, a in enumerate("xyz"):
        assert torch.allclose(out["uvz"][..., i], soft_argmax_1d(out["logits"][a]))

    heads = PoseFeatureHeads(bins=reg.bins(size), embed_dim=48)
    feats = heads(out["logits"])
    assert set(feats) == {"x", "y", "z"}
    for a in "xyz":
        assert feats[a].shape == (2, 48)
        assert torch.allclose(feats[a].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_x_follows_width_and_y_follows_height():
    reg = JointRegressor(in_channels=16, deconv_channels=8, num_deconv=2, depth_bins=10)
    out = reg(torch.randn(2, 16, 3, 5))  # H=3, W=5 at stride 32
    assert out["logits"]["x"].shape == (2, 21, 20)
    assert out["logits"]["y"].shape == (2, 21, 12)
    assert out["logits"]["z"].shape == (2, 21, 10)


def test_gradients_reach_every_parameter():
    reg = JointRegressor(in_channels=16, deconv_channels=8, depth_bins=8)
    heads = PoseFeatureHeads(bins={"x": 16, "y": 16, "z": 8}, embed_dim=8)
    out = reg(torch.randn(3, 16, 4, 4))
    loss = out["uvz"].sum() + sum(f.sum() for f in heads(out["logits"]).values())
    loss.backward()
    for name, p in list(reg.named_parameters()) + list(heads.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_inputs_give_clear_errors():
    reg = JointRegressor(in_channels=16, deconv_channels=8)
    with pytest.raises(ValueError, match="in_channels"):
        reg(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match="no entry for axes"):
        PoseFeatureHeads(bins={"x": 16, "y": 16}, embed_dim=8)
    heads = PoseFeatureHeads(bins={"x": 32, "y": 32, "z": 64}, embed_dim=8)
    logits = reg(torch.randn(1, 16, 4, 4))["logits"]  # 16 bins, heads expect 32
    with pytest.raises(ValueError, match="bins\\['x'\\]"):
        heads(logits)
