"""The assembled CLIP-Hand3D: inference path, gradient flow, and a few real training steps."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cliphand3d.data.prompts import PromptGenerator
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import CropAugment, model_input
from cliphand3d.errors import ConfigError
from cliphand3d.losses import CLIPHand3DLoss, heatmap_ce, weighted_total
from cliphand3d.models.cliphand3d import CLIPHand3D
from cliphand3d.models.contrastive import PerAxisContrastiveLoss
from cliphand3d.models.template import build_template, joints_only_template
from cliphand3d.models.text_adapter import AxisAdapters
from cliphand3d.models.text_encoder import TextEncoder
from cliphand3d.models.training import TrainingModule

IMG = 64
TINY_TOWER = {"layers": 1, "width": 32, "heads": 2, "context_length": 77, "embed_dim": 32}


@pytest.fixture(scope="module")
def data():
    ds = SyntheticHands(length=16, seed=3, img_size=IMG, num_verts=200,
                        augment=CropAugment(), prompts=PromptGenerator(num_joints=5))
    xyz, verts = ds.all_labels()
    return ds, build_template(verts, xyz, levels=(40, 80, 120))


def small_model(template, **kw):
    args = dict(template=template, img_size=IMG, backbone="resnet18", deconv_channels=16, depth_bins=16,
                joint_feature_hidden=16, token_dim=32, widths=(32, 16, 16, 8, 8), blocks_per_stage=1, heads=2,
                embed_dim=32)
    args.update(kw)
    return CLIPHand3D(**args)


def make_module(template, clip_weight=0.5, **model_kw):
    torch.manual_seed(0)
    model = small_model(template, **model_kw)
    criterion = CLIPHand3DLoss(weights={"joints_coarse": 1.0, "joints": 1.0, "verts": 1.0, "stages": 0.5, "clip": clip_weight},
                               contrastive=PerAxisContrastiveLoss())
    encoder = TextEncoder(tower=TINY_TOWER, embed_dim=32)
    return TrainingModule(model, criterion, encoder, AxisAdapters(embed_dim=32))


def batch_of(ds, n=8):
    """A collated batch with its images as the model takes them (items carry uint8 crops)."""
    batch = next(iter(DataLoader(ds, batch_size=n)))
    batch["image"] = model_input(batch["image"])
    return batch


def test_inference_path_needs_no_text(data):
    ds, template = data
    model = small_model(template).eval()
    assert not any("text" in name for name, _ in model.named_modules())
    out = model(batch_of(ds, 2)["image"])
    assert out["joints"].shape == (2, 21, 3) and out["verts"].shape == (2, 200, 3)
    assert "pose_feats" not in out
    # joints are J @ V in the model's uvd space
    J = torch.as_tensor(template.J, dtype=torch.float32)
    assert torch.allclose(out["joints"], J @ out["verts"], atol=1e-5)


@pytest.mark.parametrize("model_kw", [{}, {"backbone_stages": 3, "num_deconv": 1}])
def test_gradients_reach_every_trainable_parameter_and_not_the_text_tower(data, model_kw):
    ds, template = data
    module = make_module(template, **model_kw)
    module.train()
    batch = batch_of(ds)
    # The adapters' last layers start at zero (identity adapters), which zeroes their first layers'
    # gradients on the very first step; one optimiser step later every path carries gradient.
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _, terms = module(batch)
        assert {"joints_coarse", "joints", "verts", "stages", "clip_x", "clip_y", "clip_z"} <= set(terms)
        module.criterion.total(terms).backward()
        opt.step()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    tower = module.text_encoder.tower
    assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    assert not any(k.startswith("text_encoder.") for k in module.state_dict())


def test_joints_only_mode_has_no_vertices(data):
    ds, _ = data
    xyz, _ = ds.all_labels()
    model = small_model(joints_only_template(xyz)).eval()
    out = model(batch_of(ds, 2)["image"])
    assert out["verts"] is None and out["joints"].shape == (2, 21, 3)


def test_loss_weights_are_summed_in_one_place():
    terms = {"joints": torch.tensor(2.0), "clip_x": torch.tensor(3.0), "clip_y": torch.tensor(5.0),
             "acc_x": torch.tensor(100.0)}
    assert weighted_total(terms, {"joints": 1.0, "clip": 0.5}).item() == pytest.approx(2 + 1.5 + 2.5)
    assert weighted_total(terms, {"joints": 1.0, "clip": 0.5, "clip_y": 0.0}).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="every loss weight is zero"):
        weighted_total(terms, {})
    with pytest.raises(ValueError, match="loss.kind"):
        CLIPHand3DLoss(weights={"joints": 1.0}, kind="l3")


def test_heatmap_term_is_cross_entropy_against_gaussians_at_the_truth():
    n, sigma = 16, 0.05
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = torch.tensor([[0.3, 0.71]], dtype=torch.float64)
    p = torch.softmax(-0.5 * ((centres - t[..., None]) / sigma) ** 2, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    # the minimum is at logits = log(target) (up to a constant), where it equals the target's entropy
    best = (p.log() + 7.0).requires_grad_()
    ce = heatmap_ce(best, t, sigma)
    assert ce.item() == pytest.approx(entropy.item(), rel=1e-9)
    ce.backward()
    assert best.grad.abs().max() < 1e-12
    assert heatmap_ce(p.log().roll(3, -1), t, sigma) > ce + 0.1
    assert heatmap_ce(torch.zeros(1, 1, 2), torch.tensor([[0.2]]), 10.0).item() == pytest.approx(math.log(2), rel=1e-3)
    # targets outside the map are pinned to its edge
    assert heatmap_ce(best.detach(), torch.tensor([[1.4, -0.2]]), sigma) == heatmap_ce(best.detach(), torch.tensor([[1.0, 0.0]]), sigma)

    # in the loss: x, y take u, v; z takes the depth mapped by depth_range onto [0, 1]; weight 0 = absent
    g = torch.Generator().manual_seed(0)
    uvd = torch.cat([torch.rand(2, 21, 2, generator=g), torch.randn(2, 21, 1, generator=g)], -1)
    logits = {"x": torch.randn(2, 21, 16, generator=g), "y": torch.randn(2, 21, 16, generator=g),
              "z": torch.randn(2, 21, 32, generator=g)}
    outputs = {"joints_coarse": uvd, "joints": uvd, "logits": logits}
    loss = CLIPHand3DLoss(weights={"joints": 1.0, "heatmap": 0.2}, depth_range=2.0, heatmap_sigma=sigma)
    want = (heatmap_ce(logits["x"], uvd[..., 0], sigma) + heatmap_ce(logits["y"], uvd[..., 1], sigma)
            + heatmap_ce(logits["z"], uvd[..., 2] / 4.0 + 0.5, sigma)) / 3
    assert loss(outputs, {"joints_uvd": uvd})["heatmap"].item() == pytest.approx(want.item(), rel=1e-6)
    assert "heatmap" not in CLIPHand3DLoss(weights={"joints": 1.0})(outputs, {"joints_uvd": uvd})
    with pytest.raises(ValueError, match="no 1D-heatmap logits"):
        loss({"joints_coarse": uvd, "joints": uvd}, {"joints_uvd": uvd})
    with pytest.raises(ValueError, match="loss.heatmap_sigma"):
        CLIPHand3DLoss(weights={"joints": 1.0}, heatmap_sigma=0.0)
    with pytest.raises(ValueError, match="loss.depth_range"):
        CLIPHand3DLoss(weights={"joints": 1.0}, depth_range=-1.0)


def test_model_trains_on_synthetic_hands(data):
    """A few AdamW steps on a fixed batch: every loss term falls (the whole graph learns)."""
    ds, template = data
    module = make_module(template)
    module.train()
    batch = batch_of(ds)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(25):
        _, terms = module(batch)
        loss = module.criterion.total(terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or {k: v.item() for k, v in terms.items()}
    last = {k: v.item() for k, v in terms.items()}
    assert np.isfinite(loss.item())
    for k in ("joints_coarse", "joints", "verts", "clip_x"):
        assert last[k] < first[k], (k, first[k], last[k])


@pytest.mark.parametrize("z_head", ["linear", "bn_relu_mix"])
def test_channels_last_is_the_same_function(data, z_head):
    """model.channels_last is a speed option: the same outputs and gradients as NCHW (checked in float64,
    where rounding cannot hide a difference: train-mode batch norm on 4 images amplifies float32 rounding
    to ~1e-3), the same state dict keys, and checkpoints of either layout load into the other."""
    ds, template = data
    batch = batch_of(ds, 4)
    results = []
    for cl in (False, True):
        torch.manual_seed(0)
        model = small_model(template, z_head=z_head, channels_last=cl).double().train()
        out = model(batch["image"].double())
        loss = out["joints"].abs().mean() + out["joints_coarse"].abs().mean() + out["verts"].abs().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, model.state_dict()))
    (o0, g0, s0), (o1, g1, s1) = results
    assert s0.keys() == s1.keys()
    assert any(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in s1.values())
    for k in ("joints", "joints_coarse", "verts"):
        torch.testing.assert_close(o1[k], o0[k], atol=1e-10, rtol=1e-9)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-10, rtol=1e-7, msg=n)
    small_model(template, z_head=z_head, channels_last=False).load_state_dict(s1)
    small_model(template, z_head=z_head, channels_last=True).load_state_dict(s0)


def test_blocks_per_stage_takes_one_count_per_stage(data):
    ds, template = data
    model = small_model(template, blocks_per_stage=[1, 2, 0, 0]).eval()
    assert [len(stage.blocks) for stage in model.regressor.stages] == [1, 2, 0, 0]
    out = model(batch_of(ds, 2)["image"])
    assert out["verts"].shape == (2, 200, 3) and torch.isfinite(out["verts"]).all()
    # A stage without blocks still passes gradient from the vertices back to the image
    out["verts"].sum().backward()
    assert model.backbone.parameters().__next__().grad.abs().sum() > 0
    # an int means that count at every stage
    assert [len(s.blocks) for s in small_model(template, blocks_per_stage=2).regressor.stages] == [2, 2, 2, 2]


@pytest.mark.parametrize("bad", [[1, 1, 0], [1, 1, 0, -1], [1, 1, 0.5, 0]])
def test_blocks_per_stage_of_the_wrong_length_names_the_key(data, bad):
    _, template = data
    with pytest.raises(ConfigError, match=r"model\.blocks_per_stage=.*one per template level"):
        small_model(template, blocks_per_stage=bad)
