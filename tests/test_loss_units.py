"""loss.units: `uvd` compares normalised uvd as it is, `metric` lifts prediction and target to the camera
(geometry.uvd_to_xyz with the batch's crop K, image size, true root depth and bone) and measures in bones.

Known answers: a prediction equal to the target costs 0; equal millimetre errors along x, y and z cost the
same under metric (not under uvd); a one-bone offset costs |u|_1 / 3 (l1) and 1 (l2); the same 3D error seen
through two different crops costs the same.
"""
import pytest
import torch

from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.errors import ConfigError
from cliphand3d.geometry import crop_intrinsics, points_to_uvd
from cliphand3d.losses import CLIPHand3DLoss, bone_frame

S = 64
W = {"joints_coarse": 1.0, "joints": 1.0, "verts": 1.0, "stages": 0.5}


@pytest.fixture(scope="module")
def hands():
    """Three unaugmented synthetic hands: camera-frame labels, crop intrinsics, root depth and bone (float64)."""
    ds = SyntheticHands(length=3, seed=5, img_size=S, num_verts=160)
    items = [ds[i] for i in range(3)]
    return {k: torch.stack([it[k] for it in items]).double()
            for k in ("joints_xyz", "verts_xyz", "K", "root_depth", "bone")}


def uvd(h, xyz, K=None, size=S):
    return points_to_uvd(xyz, h["K"] if K is None else K, size, h["root_depth"], h["bone"]).float()


def batch_for(h, K=None, size=S):
    K = h["K"] if K is None else K
    return {"image": torch.zeros(len(K), 3, size, size), "K": K.float(), "root_depth": h["root_depth"].float(),
            "bone": h["bone"].float(), "joints_uvd": uvd(h, h["joints_xyz"], K, size),
            "verts_uvd": uvd(h, h["verts_xyz"], K, size)}


def outputs_for(h, shift, K=None, size=S, stage_idx=(0, 7, 30)):
    """Every output predicted as the truth moved by `shift` (B, 1, 3) metres."""
    joints, verts = uvd(h, h["joints_xyz"] + shift, K, size), uvd(h, h["verts_xyz"] + shift, K, size)
    idx = torch.tensor(stage_idx)
    return {"joints_coarse": joints, "joints": joints, "verts": verts, "stages": [verts[:, idx]], "stage_index": [idx]}


def metric(kind="l1", **kw):
    return CLIPHand3DLoss(weights=W, kind=kind, units="metric", **kw)


def test_uvd_is_the_constructor_default_and_metric_is_refused_misspelt():
    assert CLIPHand3DLoss(weights=W).units == "uvd"
    with pytest.raises(ConfigError, match=r"loss.units='meters' is not one of uvd, metric"):
        CLIPHand3DLoss(weights=W, units="meters")


def test_a_perfect_prediction_costs_nothing(hands):
    terms = metric()(outputs_for(hands, torch.zeros(1, 1, 3).double()), batch_for(hands))
    assert set(terms) == {"joints_coarse", "joints", "verts", "stages"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=2e-6), name


def test_the_bone_frame_is_the_camera_minus_the_root_depth_in_bones(hands):
    got = bone_frame(uvd(hands, hands["joints_xyz"]), batch_for(hands)).double()
    want = (hands["joints_xyz"] - torch.nn.functional.pad(hands["root_depth"][:, None, None], (2, 0))) \
        / hands["bone"][:, None, None]
    assert torch.allclose(got, want, atol=2e-5)


def test_equal_millimetre_errors_cost_the_same_along_every_axis_under_metric_only(hands):
    batch = batch_for(hands)
    per_axis = {}
    for units in ("metric", "uvd"):
        loss = CLIPHand3DLoss(weights=W, units=units)
        per_axis[units] = [float(loss(outputs_for(hands, 1e-3 * torch.eye(3).double()[a].view(1, 1, 3)), batch)["joints"])
                           for a in range(3)]
    # l1 averages over the 3 coordinates: 1 mm along one axis is (1 mm / bone) / 3 per joint
    want = float((1e-3 / hands["bone"] / 3).mean())
    assert per_axis["metric"] == pytest.approx([want] * 3, rel=1e-3)
    # uvd: a millimetre sideways is worth 1 mm * fx / (z S) crop units, in depth 1 mm / bone: not the same
    x, y, z = per_axis["uvd"]
    assert x == pytest.approx(y, rel=0.2) and not 0.8 < x / z < 1.25
    crop_unit_in_bones = S * hands["root_depth"] / (hands["K"][:, 0, 0] * hands["bone"])
    assert z / x == pytest.approx(float(crop_unit_in_bones.mean()), rel=0.15)


@pytest.mark.parametrize("kind, want", [("l1", 5 / 9), ("l2", 1.0)])
def test_a_one_bone_offset_costs_the_known_value(hands, kind, want):
    direction = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64) / 3  # unit length: |u|_1 / 3 = 5/9
    shift = hands["bone"][:, None, None] * direction
    terms = metric(kind)(outputs_for(hands, shift), batch_for(hands))
    for name in ("joints_coarse", "joints", "verts", "stages"):
        assert float(terms[name]) == pytest.approx(want, rel=1e-4), name


def test_the_metric_term_does_not_depend_on_the_crop(hands):
    """The same 3D error through the dataset's crop and through a zoomed, shifted 128-pixel crop of it."""
    K2, _ = crop_intrinsics(hands["K"].numpy(), (30.0, 36.0), 40.0, 128)
    K2 = torch.as_tensor(K2)
    shift = torch.tensor([2e-3, -1e-3, 3e-3], dtype=torch.float64).view(1, 1, 3)
    got = {}
    for units in ("metric", "uvd"):
        loss = CLIPHand3DLoss(weights=W, units=units)
        got[units] = [loss(outputs_for(hands, shift, K, size), batch_for(hands, K, size))
                      for K, size in ((None, S), (K2, 128))]
    for name in ("joints", "verts", "stages"):
        assert float(got["metric"][0][name]) == pytest.approx(float(got["metric"][1][name]), rel=1e-4), name
        assert float(got["uvd"][0][name]) != pytest.approx(float(got["uvd"][1][name]), rel=0.1), name


def test_metric_is_differentiable_and_full_precision_under_autocast(hands):
    batch = batch_for(hands)
    out = outputs_for(hands, 1e-3 * torch.ones(1, 1, 3).double())
    plain = float(metric()(out, batch)["joints"])
    # bf16 would round the rays (8 mantissa bits: ~2 mm at half a metre), swamping the 1 mm error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = float(metric()(out, batch)["joints"])
    assert cast == pytest.approx(plain, rel=1e-5)
    pred = out["joints"].clone().requires_grad_(True)
    metric()({**out, "joints": pred}, batch)["joints"].backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad.abs().sum((0, 1)) > 0).all()
