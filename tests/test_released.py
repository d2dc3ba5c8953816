"""The authors' released checkpoint: import, equivalence with the released forward pass, refusals.

Without the real weights, a released state dict is made from docs/released_state_dict.txt (every key
and shape of CLIP_Hand_3D_PE_0604_44.pth.tar) with random, non-degenerate values. `released_forward`
below is an independent implementation of the released network and evaluation, written from
RELEASED.md / docs/released.md with plain torch ops (it shares no code with cliphand3d.models).
"""
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cliphand3d.apps.released import import_released, read_released
from cliphand3d.build import model_from_checkpoint
from cliphand3d.checkpoint.io import load_checkpoint
from cliphand3d.data.transforms import batch_to_device, model_input
from cliphand3d.errors import ReleasedCheckpointError
from cliphand3d.evaluation.run import eval_batch_size

REPO = Path(__file__).resolve().parents[1]
LISTING = REPO / "docs" / "released_state_dict.txt"
STAGES = ("MR_21_98_", "MR_98_195", "MR_195_389", "MR_389_778")
# joint names in the two orders, written out here so the test does not borrow skeleton.MANO_TO_MPII
MANO_NAMES = ["wrist", "index1", "index2", "index3", "middle1", "middle2", "middle3", "little1", "little2",
              "little3", "ring1", "ring2", "ring3", "thumb1", "thumb2", "thumb3", "index4", "middle4", "little4",
              "ring4", "thumb4"]
MPII_NAMES = ["wrist"] + [f"{f}{k}" for f in ("thumb", "index", "middle", "ring", "little") for k in (1, 2, 3, 4)]
MANO_TO_MPII = [MANO_NAMES.index(n) for n in MPII_NAMES]


def listing():
    rows = []
    for line in LISTING.read_text().splitlines():
        m = re.match(r"^(\S+)\t\(([\d, ]*)\)\t(\w+)\t(\w+)$", line)
        if m:
            shape = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
            rows.append((m.group(1), shape, m.group(3)))
    return rows


def random_released_state(seed: int = 0) -> dict:
    """Every tensor of the listing, random but well-scaled; BN statistics away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, dtype in listing():
        leaf = key.rsplit(".", 1)[-1]
        if dtype == "int64":
            out[key] = torch.randint(1, 1000, shape, generator=g)
        elif leaf == "running_var":
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif leaf == "running_mean":
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif key.startswith("logit_scale"):
            out[key] = torch.tensor(math.log(100.0)) + torch.randn((), generator=g) * 0.1
        elif key == "J_Reg":
            w = torch.rand(shape, generator=g)
            out[key] = w / w.sum(1, keepdim=True)
        elif key.startswith("Vertx_"):
            out[key] = torch.randn(shape, generator=g) * 0.3
        elif len(shape) == 1 and (".bn" in key or re.search(r"\.(downsample|deconv|conv_z_1|conv0|conv1)\.\d\.weight$",
                                                             key) or "ln_" in key):
            out[key] = torch.rand(shape, generator=g) + 0.5  # norm scales
        elif len(shape) == 1:
            out[key] = torch.randn(shape, generator=g) * 0.1  # biases
        else:
            fan_in = shape[0] if key.startswith("PoseNet.deconv") else int(np.prod(shape[1:]))
            out[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)
    return out


# ----------------------------------------------------------------------------- the released network
def bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        training=False, eps=1e-5)


def resnet50(sd, x):
    p = "Encoder."
    f0 = F.max_pool2d(F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"], stride=2, padding=3), sd, p + "bn1")),
                      3, stride=2, padding=1)
    feats, h = [], f0
    for layer, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for b in range(blocks):
            q = f"{p}layer{layer}.{b}."
            stride = 2 if b == 0 and layer > 1 else 1
            out = F.relu(bn(F.conv2d(h, sd[q + "conv1.weight"]), sd, q + "bn1"))
            out = F.relu(bn(F.conv2d(out, sd[q + "conv2.weight"], stride=stride, padding=1), sd, q + "bn2"))
            out = bn(F.conv2d(out, sd[q + "conv3.weight"]), sd, q + "bn3")
            if q + "downsample.0.weight" in sd:
                h = bn(F.conv2d(h, sd[q + "downsample.0.weight"], stride=stride), sd, q + "downsample.1")
            h = F.relu(out + h)
        feats.append(h)
    return f0, feats  # F0, [F1, F2, F3, F4]


def soft_argmax(logits, units):
    n = logits.shape[-1]
    c = (F.softmax(logits, 2) * torch.arange(n, dtype=logits.dtype)).sum(2)
    return c / n if units == "unit" else c


def posenet(sd, f4, units):
    p = "PoseNet."
    h = F.relu(bn(F.conv_transpose2d(f4, sd[p + "deconv.0.weight"], stride=2, padding=1), sd, p + "deconv.1"))
    h = F.relu(bn(F.conv_transpose2d(h, sd[p + "deconv.3.weight"], stride=2, padding=1), sd, p + "deconv.4"))
    hx = F.conv1d(h.mean(2), sd[p + "conv_x.0.weight"], sd[p + "conv_x.0.bias"])
    hy = F.conv1d(h.mean(3), sd[p + "conv_y.0.weight"], sd[p + "conv_y.0.bias"])
    z = F.conv1d(f4.mean((2, 3))[:, :, None], sd[p + "conv_z_1.0.weight"], sd[p + "conv_z_1.0.bias"])
    z = F.relu(bn(z, sd, p + "conv_z_1.1")).view(-1, 21, 64)
    hz = F.conv1d(z, sd[p + "conv_z_2.0.weight"], sd[p + "conv_z_2.0.bias"])
    return torch.stack([soft_argmax(hx, units), soft_argmax(hy, units), soft_argmax(hz, units)], -1)


def heat_volume(coord):
    """(B, 21, 3) -> (B, 21*64, 64, 64): Gaussians (sigma 2.5) centred at coord * 64 on the grid 0..63."""
    g = torch.arange(64, dtype=coord.dtype)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    c = coord * 64
    d2 = ((xx - c[..., 0, None, None, None]) ** 2 + (yy - c[..., 1, None, None, None]) ** 2
          + (zz - c[..., 2, None, None, None]) ** 2)
    return torch.exp(-d2 / (2 * 2.5 ** 2)).flatten(1, 2)


def attention_block(x, sd, p, heads=8):
    """CLIP residual block on x read as (sequence, batch, width), as nn.MultiheadAttention(batch_first=False)
    reads the (B, N, C) tensor the released code passes: the sequence is the batch."""
    L, N, C = x.shape
    d = C // heads
    h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(L, N, heads, d).permute(1, 2, 0, 3) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    a = a.permute(2, 0, 1, 3).reshape(L, N, C)
    x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def linear(x, sd, p):
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def released_forward(sd, images, K, root, bone, units):
    """pred_verts (uvd), verts xyz, joints xyz in MANO order (J_Reg @ metric vertices)."""
    f0, (f1, f2, f3, f4) = resnet50(sd, images)
    coord = posenet(sd, f4, units)
    h = torch.cat([f0, heat_volume(coord)], 1)
    h = F.relu(bn(F.conv2d(h, sd["Pose2Feat_.conv0.0.weight"], sd["Pose2Feat_.conv0.0.bias"], padding=1),
                  sd, "Pose2Feat_.conv0.1"))
    h = F.relu(bn(F.conv2d(h, sd["Pose2Feat_.conv1.0.weight"], sd["Pose2Feat_.conv1.0.bias"], padding=1),
                  sd, "Pose2Feat_.conv1.1"))
    x = linear(h.reshape(h.shape[0], 21, -1), sd, "Feat_down_.0")
    grid = coord[:, :, None, :2] / 0.5 - 1.0
    for stage, fmap, n in zip(STAGES, (f4, f3, f2, f1), (98, 195, 389, 778)):
        x = linear(x.transpose(1, 2), sd, stage + ".UP_Layer.fc").transpose(1, 2)
        x = torch.cat([linear(x, sd, stage + ".Dim_Down"), sd[f"Vertx_{n}"].expand(x.shape[0], -1, -1)], -1)
        cue = F.grid_sample(fmap, grid, align_corners=False).squeeze(-1).permute(0, 2, 1)
        cue = linear(linear(cue, sd, stage + ".Dim_Project").transpose(1, 2), sd, stage + ".Num_Project")
        for b in range(2):
            x = attention_block(x, sd, f"{stage}.Attn_Layer.resblocks.{b}.")
        x = x + cue.transpose(1, 2)
    verts = linear(x, sd, "Out_Layer")
    z = verts[..., 2] * bone[:, None] + root[:, None]
    uv = verts[..., :2] * 256
    xy = (uv - K[:, None, :2, 2]) / torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)[:, None] * z[..., None]
    verts_xyz = torch.cat([xy, z[..., None]], -1)
    return {"verts_uvd": verts, "verts_xyz": verts_xyz, "joints_xyz": sd["J_Reg"] @ verts_xyz, "coord": coord}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("released")
    sd = random_released_state()
    src = d / "CLIP_Hand_3D_PE_0604_44.pth.tar"
    # as training scripts of that era saved it: a numpy scalar beside the weights
    torch.save({"epoch": 44, "best_acc": np.float64(0.871), "state_dict": sd}, src)
    out = d / "released.pt"
    info = import_released(src, out)
    return {"sd": sd, "src": src, "out": out, "info": info, "dir": d}


def inputs(batch=3):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(batch, 3, 256, 256, generator=g)
    K = torch.tensor([[685.7, 0.0, 128.0], [0.0, 685.7, 128.0], [0.0, 0.0, 1.0]]).repeat(batch, 1, 1)
    K[:, 0, 2] += torch.arange(batch) * 3.0  # per-sample intrinsics
    root = torch.tensor([0.62, 0.7, 0.81][:batch])
    bone = torch.tensor([0.085, 0.09, 0.095][:batch])
    return images, K, root, bone


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- tests
def test_listing_is_the_whole_released_state_dict():
    rows = listing()
    assert len(rows) == 613 and len({k for k, _, _ in rows}) == 613


def test_import_maps_every_key_and_lists_what_it_drops(imported):
    info, sd = imported["info"], imported["sd"]
    dropped = [k for k in sd if k.startswith("Seg_Decoder.") or k in ("logit_scale_xz", "logit_scale_yz", "logit_scale_xy")]
    assert sorted(info["dropped"]) == sorted(dropped) and len(dropped) == 3 + 35
    assert info["mapped"] + len(info["dropped"]) == len(sd) == 613
    # only the intermediate stages' output heads (training-time deep supervision) are new
    assert sorted(info["initialised_here"]) == sorted(
        f"model.regressor.stages.{l}.head.{w}" for l in range(3) for w in ("weight", "bias"))
    assert info["file_entries"] == {"epoch": 44, "best_acc": pytest.approx(0.871)}
    ck = load_checkpoint(imported["out"])
    assert ck["config"]["model"]["attention_over"] == "batch"
    # training heads: pose-aware projections in the model, text encoders and used logit scales beside it
    assert torch.equal(ck["model"]["pose_heads.proj.z.weight"], sd["latent_z_layer.weight"])
    assert torch.equal(ck["train_heads"]["adapters.heads.y.resblocks.1.mlp.c_fc.weight"],
                       sd["text_tb_encoder.resblocks.1.mlp.c_fc.weight"])
    for a, s in (("x", "lr"), ("y", "td"), ("z", "nf")):
        assert torch.equal(ck["train_heads"][f"criterion.contrastive.logit_scale.{a}"], sd[f"logit_scale_{s}"])
    assert torch.equal(ck["model"]["regressor.J"], sd["J_Reg"][MANO_TO_MPII])
    # the network keeps the released template positions; our template entry is in the project's frame
    assert torch.equal(ck["model"]["regressor.level_pos_1"], sd["Vertx_195"])
    tj = ck["template"]["joints"]
    assert tj[0].abs().max() < 1e-9 and abs(float(tj[9].norm()) - 1.0) < 1e-9


@pytest.mark.parametrize("units", ["bins", "unit"])
def test_imported_model_computes_the_released_function(imported, units):
    sd = imported["sd"]
    model = model_from_checkpoint(imported["out"], overrides=[f"model.coord_units={units}"])
    images, K, root, bone = inputs()
    with torch.no_grad():
        ref = released_forward(sd, images, K, root, bone, units)
        out = model(images)
        ours = model.predict_xyz(images, K, root, bone)
    assert rel(out["verts"], ref["verts_uvd"]) < 1e-5
    assert rel(ours["verts_xyz"], ref["verts_xyz"]) < 1e-5
    assert ours["joints_xyz"].shape == (3, 21, 3)
    assert rel(ours["joints_xyz"], ref["joints_xyz"][:, MANO_TO_MPII]) < 1e-5
    c = ref["coord"]
    if units == "unit":
        # the heat volume and the grid-sampled cues are really exercised: every coarse joint lies
        # inside the crop, so the sampling grid is in [-1, 1] and every Gaussian peaks inside the volume
        assert ((c >= 0) & (c <= 1)).all()
        assert heat_volume(c).amax(dim=(2, 3)).view(3, 21, 64).amax(-1).min() > 0.5
    else:
        assert c[..., :2].max() > 1  # bin units: the released code's coordinates leave the crop


def test_outputs_depend_on_batch_mates_only_with_the_compat_switch(imported):
    images, K, root, bone = inputs()
    for over, depends in (((), True), (("model.attention_over=nodes",), False)):
        model = model_from_checkpoint(imported["out"], overrides=["model.coord_units=unit", *over])
        with torch.no_grad():
            full = model(images)["verts"][:1]
            alone = model(images[:1])["verts"]
        assert (rel(alone, full) > 1e-4) == depends
        # eval.py's batch_size=auto: the released batches of 32 exactly when outputs depend on them
        assert eval_batch_size(OmegaConf.create({"batch_size": "auto"}), model) == (32 if depends else 64)


def test_refuses_another_architecture(tmp_path):
    sd = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "regressor.J": torch.zeros(21, 778)}
    torch.save({"state_dict": sd}, tmp_path / "other.pth.tar")
    with pytest.raises(ReleasedCheckpointError, match="not the released CLIP-Hand3D checkpoint"):
        read_released(tmp_path / "other.pth.tar")


def test_refuses_missing_extra_and_misshapen_keys(imported, tmp_path):
    sd = dict(imported["sd"])
    del sd["MR_98_195.Num_Project.bias"]
    sd["MR_98_195.Extra.weight"] = torch.zeros(3)
    sd["Out_Layer.weight"] = torch.zeros(3, 64)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth.tar")
    with pytest.raises(ReleasedCheckpointError) as e:
        import_released(tmp_path / "bad.pth.tar", tmp_path / "bad.pt")
    msg = str(e.value)
    assert "missing (1): MR_98_195.Num_Project.bias" in msg
    assert "unexpected (1): MR_98_195.Extra.weight" in msg
    assert "Out_Layer.weight (3, 64) vs (3, 32)" in msg
    assert not (tmp_path / "bad.pt").exists()


def test_refuses_a_truncated_file(imported, tmp_path):
    data = imported["src"].read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleasedCheckpointError, match="not a readable torch file"):
        read_released(tmp_path / "cut.pth.tar")


class Payload:
    def __reduce__(self):  # would run code on a full unpickle
        return (print, ("unpickled!",))


def test_refuses_a_pickle_holding_an_object(tmp_path, capsys):
    torch.save({"state_dict": {"J_Reg": torch.zeros(21, 778)}, "hook": Payload()}, tmp_path / "obj.pth.tar")
    with pytest.raises(ReleasedCheckpointError, match="refusing to unpickle"):
        read_released(tmp_path / "obj.pth.tar")
    assert "unpickled!" not in capsys.readouterr().out
    with open(tmp_path / "plain.pkl", "wb") as f:  # a bare pickle (not torch's zip format) too
        pickle.dump({"state_dict": {}, "hook": Payload()}, f)
    with pytest.raises(ReleasedCheckpointError):
        read_released(tmp_path / "plain.pkl")


def test_eval_runs_the_imported_checkpoint_end_to_end(imported, tmp_path):
    """scripts/eval.py on a FreiHAND-layout folder from make_synthetic.py: metrics.json and pred.json, and
    pred.json is the model's own predict_xyz (J on metric vertices, pixel = u * 256) on the same crops."""
    import json
    import os
    import subprocess
    import sys

    from cliphand3d.build import build_datasets, checkpoint_config

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    root = tmp_path / "fh"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic.py"), "format=freihand", f"out={root}",
                    "num_train=2", "num_eval=5", "seed=1"], check=True, env=env, timeout=300,
                   capture_output=True)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), f"ckpt={imported['out']}", "data=freihand",
                          f"data.root={root}", f"out_dir={tmp_path / 'eval'}", "model.coord_units=unit",
                          "num_workers=0", "baseline_samples=2"],
                         env=env, timeout=600, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 5 and np.isfinite(metrics["pa_mpjpe_mm"]) and np.isfinite(metrics["f15"])
    xyz, verts = (np.asarray(a) for a in json.loads((tmp_path / "eval" / "pred.json").read_text()))
    assert xyz.shape == (5, 21, 3) and verts.shape == (5, 778, 3)

    model = model_from_checkpoint(imported["out"], overrides=["model.coord_units=unit"])
    cfg = checkpoint_config(load_checkpoint(imported["out"]), "imported", [f"data.test.root={root}"])
    data = build_datasets(cfg, None, splits=("test",))["test"]  # eval.py's default split
    items = [data[i] for i in range(len(data))]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "K", "root_depth", "bone")}
    batch["image"] = model_input(batch["image"])  # items carry uint8 crops; eval.py normalises on the device
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as eval.py ran (OMP_NUM_THREADS=1): the same kernels' blocking, the same rounding
    try:
        with torch.no_grad():  # one batch of 5 (< 32), as eval.py's default batch for this preset
            ours = model.predict_xyz(batch["image"], batch["K"], batch["root_depth"], batch["bone"])
    finally:
        torch.set_num_threads(threads)
    assert rel(torch.as_tensor(xyz, dtype=torch.float32), ours["joints_xyz"]) < 1e-5
    assert rel(torch.as_tensor(verts, dtype=torch.float32), ours["verts_xyz"]) < 1e-5
    assert OmegaConf.select(cfg, "model.attention_over") == "batch"


def test_option_values_are_checked_by_name():
    from cliphand3d.models.joint_regressor import JointRegressor, soft_argmax_1d

    logits = torch.full((1, 1, 8), -1e4)
    logits[..., 3] = 0.0
    assert soft_argmax_1d(logits, "bins", 0.0).item() == pytest.approx(3.0)      # released: bin index
    assert soft_argmax_1d(logits, "unit", 0.0).item() == pytest.approx(3 / 8)    # divided by the bin count
    assert soft_argmax_1d(logits).item() == pytest.approx(3.5 / 8)               # ours: bin centre
    with pytest.raises(ValueError, match="model.coord_units='pixels' is unknown"):
        JointRegressor(in_channels=8, coord_units="pixels")


def test_fine_tuning_starts_from_the_imported_weights(imported, tmp_path):
    """train.py +experiment=freihand init_from=...: the released architecture and weights (model and
    training heads) are adopted; a command-line model.* override (the attention fixed) still wins."""
    import os
    import subprocess
    import sys

    from cliphand3d.data.writers import write_freihand

    root = write_freihand(tmp_path / "fh", num_train=3, num_eval=2, seed=2, versions=1)  # 1 hand held out for val
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "+experiment=freihand", f"init_from={imported['out']}",
         "model.attention_over=nodes", f"data.root={root}", "data.versions=[0]", f"run_dir={run}",
         f"hydra.run.dir={run}", "text.pretrained=null", "optim.lr=0.0", "trainer.max_steps=1",
         "trainer.batch_size=2", "trainer.val_batch_size=2", "trainer.num_workers=0", "logger.tensorboard=false",
         "trainer.device=cpu"],
        env=env, timeout=900, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    last, src = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(imported["out"])
    assert last["config"]["model"]["z_head"] == "bn_relu_mix"          # the released architecture ...
    assert last["config"]["model"]["attention_over"] == "nodes"        # ... with the attention fixed
    # lr = 0: every parameter is still the imported one (BN statistics move in train mode, weights do not)
    for k in ("backbone.conv1.weight", "joint_features.proj.weight", "regressor.stages.3.head.weight",
              "pose_heads.proj.x.weight"):
        assert torch.equal(last["model"][k], src["model"][k]), k
    for k in ("adapters.heads.z.resblocks.0.attn.in_proj_weight", "criterion.contrastive.logit_scale.y"):
        assert torch.equal(last["train_heads"][k], src["train_heads"][k]), k


def test_our_presets_keep_the_constructor_defaults():
    """Every named option in model/cliphand3d.yaml (and so model/small.yaml) is the constructor's default,
    i.e. this project's design; only model/released.yaml departs from them."""
    import inspect

    from omegaconf import OmegaConf as OC

    from cliphand3d.models.cliphand3d import CLIPHand3D

    defaults = {k: p.default for k, p in inspect.signature(CLIPHand3D).parameters.items()
                if p.default is not inspect.Parameter.empty}
    preset = OC.load(REPO / "configs" / "model" / "cliphand3d.yaml")
    # design choices only: speed options (channels_last: the same function) are the presets' to pick
    options = [k for k in list(defaults)[list(defaults).index("z_head"):] if k != "channels_last"]
    assert options and all(preset[k] == defaults[k] for k in options), [k for k in options if preset[k] != defaults[k]]
    released = OC.load(REPO / "configs" / "model" / "released.yaml")
    assert released.attention_over == "batch" and all(k in released for k in ("coord_units", "cue_maps", "block"))


def test_import_script_reports_bad_input_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "cut.pth.tar").write_bytes(b"PK\x03\x04 not really a zip")
    script = str(REPO / "scripts" / "import_checkpoint.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, script, f"src={tmp_path / 'cut.pth.tar'}", f"out={tmp_path / 'x.pt'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1 and "not a readable torch file" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, script, "src=only.pth.tar"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode != 0 and "usage: python scripts/import_checkpoint.py src=" in res.stderr


RELEASED_OPTIONS = dict(z_head="bn_relu_mix", coord_units="unit", bin_offset=0.0, heat_grid="integer",
                        joint_feature_conv_bias=True, joint_tokens="flatten", joint_feature_hidden=21,
                        cue_maps="per_stage", cue_padding="zeros", cue_placement="after", block="clip",
                        stage_head="linear", attention_over="batch", joints_from="xyz", uv_pixel_offset=0.0)


@pytest.mark.parametrize("zeroed", [{}, {"stages": 0.0}, {"clip_z": 0.0}, {"joints_coarse": 0.0, "heatmap": 0.0},
                                    {"joints_coarse": 0.0, "heatmap": 0.0, "clip": 0.0}, {"joints": 0.0, "verts": 0.0}],
                         ids=lambda z: ",".join(f"{k}={v}" for k, v in z.items()) or "default")
def test_released_options_keep_the_zero_weight_invariant(zeroed):
    """test_zero_weights' invariant for a small network with every released option on: after one
    forward/backward each trainable parameter has a gradient, and the frozen ones are exactly those
    without one when nothing is frozen (parameter_terms knows the released z head and F4 cues)."""
    from test_zero_weights import DEFAULT, IMG, TOWER, without_gradient
    from torch.utils.data import DataLoader

    from cliphand3d.data.prompts import PromptGenerator
    from cliphand3d.data.synthetic import SyntheticHands
    from cliphand3d.data.transforms import CropAugment
    from cliphand3d.losses import CLIPHand3DLoss
    from cliphand3d.models.cliphand3d import CLIPHand3D
    from cliphand3d.models.contrastive import PerAxisContrastiveLoss
    from cliphand3d.models.template import build_template
    from cliphand3d.models.text_adapter import AxisAdapters
    from cliphand3d.models.text_encoder import TextEncoder
    from cliphand3d.models.training import TrainingModule

    ds = SyntheticHands(length=4, seed=3, img_size=IMG, num_verts=200, augment=CropAugment(),
                        prompts=PromptGenerator(num_joints=5))
    xyz, verts = ds.all_labels()
    batch = batch_to_device(next(iter(DataLoader(ds, batch_size=4))), torch.device("cpu"))  # as the loop feeds it
    torch.manual_seed(0)
    model = CLIPHand3D(template=build_template(verts, xyz, levels=(40, 80, 120)), img_size=IMG, backbone="resnet18",
                       deconv_channels=16, depth_bins=16, token_dim=32, widths=(32, 16, 16, 8, 8),
                       blocks_per_stage=1, heads=2, embed_dim=32, **RELEASED_OPTIONS)
    criterion = CLIPHand3DLoss(weights={**DEFAULT, **zeroed}, contrastive=PerAxisContrastiveLoss())
    text = criterion.uses_text
    adapters = AxisAdapters(embed_dim=32, kind="batch_attention", hidden=128, heads=2, block="clip")
    module = TrainingModule(model, criterion, TextEncoder(tower=TOWER, embed_dim=32) if text else None,
                            adapters if text else None).train()
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert without_gradient(module, batch) == set()
    tower = {n for n in frozen if n.startswith("text_encoder.")}
    for n, p in module.named_parameters():
        if n in frozen - tower:
            p.requires_grad_(True)
    assert without_gradient(module, batch) == frozen - tower
