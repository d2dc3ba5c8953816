"""A loss term that weighs 0 leaves nothing for DDP to wait for: whatever only it trains is frozen.

DDP (without find_unused_parameters) fails on the second step when a trainable parameter got no
gradient. The invariant checked here, for each term set to 0 and for combinations: after one
forward/backward every trainable parameter has a gradient, and the frozen ones are exactly those
that get none when nothing is frozen (so freezing never takes away a parameter that learns).
"""
import pytest
import torch
from torch.utils.data import DataLoader

from cliphand3d.data.prompts import PromptGenerator
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import CropAugment, batch_to_device
from cliphand3d.losses import CLIPHand3DLoss
from cliphand3d.models.cliphand3d import CLIPHand3D
from cliphand3d.models.contrastive import PerAxisContrastiveLoss
from cliphand3d.models.template import build_template, joints_only_template
from cliphand3d.models.text_adapter import AxisAdapters
from cliphand3d.models.text_encoder import TextEncoder
from cliphand3d.models.training import TrainingModule

IMG = 64
TOWER = {"layers": 1, "width": 32, "heads": 2, "context_length": 77, "embed_dim": 32}
# configs/loss/default.yaml's terms
DEFAULT = {"joints_coarse": 1.0, "joints": 1.0, "verts": 1.0, "stages": 0.5, "heatmap": 0.2, "clip": 0.1}

SINGLE = [{k: 0.0} for k in DEFAULT] + [{f"clip_{a}": 0.0} for a in "xyz"]
COMBOS = [
    {"stages": 0.0, "clip_z": 0.0},                              # the DDP failure
    {"joints_coarse": 0.0, "heatmap": 0.0},                      # joint regressor trained by clip alone
    {"joints_coarse": 0.0, "heatmap": 0.0, "clip_z": 0.0},       # ... and no z head
    {"joints_coarse": 0.0, "heatmap": 0.0, "clip": 0.0},         # no joint regressor, no F4
    {"joints": 0.0, "verts": 0.0},                               # last stage untrained
    {"joints": 0.0, "verts": 0.0, "stages": 0.0},                # no mesh regressor at all
    {"clip": 0.0, "clip_y": 0.3},                                # one axis on
    {"clip_x": 0.0, "clip_y": 0.0, "stages": 0.0, "heatmap": 0.0},
]


@pytest.fixture(scope="module")
def data():
    ds = SyntheticHands(length=8, seed=3, img_size=IMG, num_verts=200, augment=CropAugment(),
                        prompts=PromptGenerator(num_joints=5))
    xyz, verts = ds.all_labels()
    batch = batch_to_device(next(iter(DataLoader(ds, batch_size=4))), torch.device("cpu"))  # as the loop feeds it
    return batch, build_template(verts, xyz, levels=(40, 80, 120)), joints_only_template(xyz)


def build(template, weights):
    torch.manual_seed(0)
    model = CLIPHand3D(template=template, img_size=IMG, backbone="resnet18", deconv_channels=16, depth_bins=16,
                       joint_feature_hidden=16, token_dim=32, widths=(32, 16, 16, 8, 8), blocks_per_stage=1,
                       heads=2, embed_dim=32)
    criterion = CLIPHand3DLoss(weights=weights, contrastive=PerAxisContrastiveLoss())
    adapters = AxisAdapters(embed_dim=32)
    for head in adapters.heads.values():
        # they start as the identity (last layer 0), which would zero their first layers' gradients
        torch.nn.init.normal_(head.mlp[-1].weight, std=0.02)
    text = criterion.uses_text
    return TrainingModule(model, criterion, TextEncoder(tower=TOWER, embed_dim=32) if text else None,
                          adapters if text else None)


def without_gradient(module, batch):
    """Trainable parameters whose gradient after one forward/backward is missing (what DDP cannot
    take) or exactly zero (e.g. another axis's slice of a stacked tensor: nothing to learn)."""
    module.zero_grad(set_to_none=True)
    _, terms = module(batch)
    module.criterion.total(terms).backward()
    return {n for n, p in module.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)}


@pytest.mark.parametrize("zeroed", SINGLE + COMBOS, ids=lambda z: ",".join(f"{k}={v}" for k, v in z.items()))
@pytest.mark.parametrize("meshes", [True, False], ids=["meshes", "joints_only"])
def test_every_trainable_parameter_gets_a_gradient_and_only_idle_ones_are_frozen(data, zeroed, meshes):
    batch, mesh_template, joints_template = data
    if not meshes:
        batch = {k: v for k, v in batch.items() if k != "verts_uvd"}  # data without meshes
    module = build(mesh_template if meshes else joints_template, {**DEFAULT, **zeroed})
    module.train()
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert without_gradient(module, batch) == set()  # what DDP needs
    # the frozen ones (text tower aside) are exactly the parameters no weighted term trains
    tower = {n for n in frozen if n.startswith("text_encoder.")}
    for n, p in module.named_parameters():
        if n in frozen - tower:
            p.requires_grad_(True)
    assert without_gradient(module, batch) == frozen - tower


def test_which_parameters_a_zero_weight_freezes(data):
    """Known answers for the issue's cases, read off the forward pass by hand."""
    _, template, _ = data
    frozen = lambda m: sorted({n.rsplit(".", 1)[0] for n, p in m.named_parameters()  # noqa: E731
                               if not p.requires_grad and not n.startswith("text_encoder.")})
    assert frozen(build(template, DEFAULT)) == []
    # three intermediate levels (21 -> 40 -> 80 -> 120 -> 200): their heads serve only `stages`
    assert frozen(build(template, {**DEFAULT, "stages": 0.0})) == [
        f"model.regressor.stages.{l}.head.{i}" for l in range(3) for i in (0, 1)]
    assert frozen(build(template, {**DEFAULT, "clip_z": 0.0})) == [
        "adapters.heads.z.mlp.0", "adapters.heads.z.mlp.1", "adapters.heads.z.mlp.3", "criterion.contrastive.logit_scale",
        "model.pose_heads.proj.z"]
    no_clip = build(template, {**DEFAULT, "clip": 0.0})
    assert no_clip.text_encoder is None and frozen(no_clip) == [f"model.pose_heads.proj.{a}" for a in "xyz"]


def test_a_parameter_missing_from_the_term_map_is_refused(data):
    _, template, _ = data
    model = build(template, DEFAULT).model
    model.extra_head = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"model\.extra_head\.weight.*parameter_terms"):
        TrainingModule(model, CLIPHand3DLoss(weights={"joints": 1.0}))


def test_a_misspelt_weight_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"loss.weights.stage is not a loss term; choose from .*'stages'"):
        CLIPHand3DLoss(weights={"joints": 1.0, "stage": 0.0})
    with pytest.raises(ValueError, match=r"loss.weights.clip_w is not a loss term"):
        CLIPHand3DLoss(weights={"joints": 1.0, "clip_w": 0.0}, contrastive=PerAxisContrastiveLoss(axes=("x", "y")))
    with pytest.raises(ValueError, match=r"loss.weights.clip_z is not a loss term"):  # not an axis of the prompts
        CLIPHand3DLoss(weights={"joints": 1.0, "clip_z": 0.0}, contrastive=PerAxisContrastiveLoss(axes=("x", "y")))
