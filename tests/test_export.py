"""ONNX export (cliphand3d/export.py, scripts/export.py): the file computes what PyTorch computes at batch
sizes other than the trace's, the released preset's batch-mixing attention included; the missing extra,
bad options and a graph that does not match are refused clearly."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cliphand3d.apps import export
from cliphand3d.build import build_model, model_from_checkpoint
from cliphand3d.checkpoint.io import save_checkpoint
from cliphand3d.checkpoint.state import config_to_container, template_state
from cliphand3d.errors import ConfigError
from cliphand3d.models.template import MeshTemplate, farthest_point_sampling

REPO = Path(__file__).resolve().parents[1]
S = 64
NUM_VERTS = 60
TRACE_BATCH = 2
TINY = [
    f"data.img_size={S}", "model.backbone=resnet18", "model.pretrained=null", "model.deconv_channels=16",
    "model.depth_bins=16", "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1",
    "model.heads=2", "text=tiny", "text.pretrained=null",
]
NEEDS = "ONNX export needs the optional extra: pip install -e '.[onnx]'"


def needs_extra():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=NEEDS)


def random_template(seed: int = 0) -> MeshTemplate:
    rng = np.random.default_rng(seed)
    verts = rng.normal(size=(NUM_VERTS, 3))
    order = farthest_point_sampling(verts, 30)
    J = rng.uniform(size=(21, NUM_VERTS))
    J /= J.sum(1, keepdims=True)
    return MeshTemplate(verts=verts, joints=J @ verts, J=J,
                        levels=[np.sort(order[:s]) for s in (10, 20, 30)] + [np.arange(NUM_VERTS)])


def write_checkpoint(path: Path, *overrides: str, attention_gain: float = 1.0) -> Path:
    """A cliphand3d checkpoint of a tiny randomly initialised model, as load_model reads trained ones."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["run_dir=/tmp/unused", *TINY, *overrides])
    torch.manual_seed(0)
    template = random_template()
    model = build_model(cfg, template)
    state = model.state_dict()
    for k in state:  # sharper attention: batch-mates (attention_over=batch) then move the outputs visibly
        if k.endswith("attn.in_proj_weight"):
            state[k] = state[k] * attention_gain
    save_checkpoint(path, {"model": state, "template": template_state(template), "config": config_to_container(cfg)})
    return path


def images(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, S, S, generator=g) * 2 - 1


def run_script(*args: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), *args], capture_output=True,
                          text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """scripts/export.py on a tiny checkpoint of the default preset (model=small), parity check on."""
    needs_extra()
    d = tmp_path_factory.mktemp("export")
    ckpt = write_checkpoint(d / "tiny.pt")
    res = run_script(f"ckpt={ckpt}", "format=onnx", f"out={d / 'out' / 'tiny.onnx'}", f"batch_size={TRACE_BATCH}")
    return {"ckpt": ckpt, "onnx": d / "out" / "tiny.onnx", "res": res}


@pytest.mark.slow
def test_script_writes_the_file_and_reports_parity(exported):
    res = exported["res"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert exported["onnx"].is_file()
    m = re.search(r"max \|onnx - torch\| on a sample batch: (\S+)", res.stdout)
    assert m and float(m.group(1)) <= export.PARITY_TOL, res.stdout
    assert f"(batch, 3, {S}, {S})" in res.stdout and "joints, verts" in res.stdout


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_torch_at_other_batch_sizes(exported, batch):
    model = model_from_checkpoint(exported["ckpt"])
    runner = export.OnnxModel(exported["onnx"], threads=1)
    assert runner.input_shape == ("batch", 3, S, S)  # a named dynamic axis, the crop size fixed
    x = images(batch, seed=batch)
    out = runner(x)
    assert sorted(out) == ["joints", "verts"]
    assert out["joints"].shape == (batch, 21, 3) and out["verts"].shape == (batch, NUM_VERTS, 3)
    with torch.no_grad():
        ref = model(x)
    for k in ("joints", "verts"):
        assert np.abs(out[k] - ref[k].numpy()).max() <= 1e-4
    assert export.check_parity(model, exported["onnx"], x) <= 1e-4
    # numpy input gives the same answer as a tensor
    np.testing.assert_array_equal(runner(x.numpy())["verts"], out["verts"])
    # the outputs vary with the image (a constant graph would also "match" a constant model)
    assert np.abs(out["joints"] - out["joints"].mean(0)).max() > 1e-3 or batch == 1


def test_metadata_and_wrong_input_shape(exported):
    runner = export.OnnxModel(exported["onnx"])
    assert runner.metadata["cliphand3d.img_size"] == str(S)
    assert runner.metadata["cliphand3d.mixes_batch"] == "false"
    with pytest.raises(ValueError, match=rf"\(B, 3, {S}, {S}\)"):
        runner(np.zeros((2, 3, S + 8, S + 8), np.float32))


def test_without_spin_waiting_the_answers_are_the_same(exported):
    """The benchmark's setting (threads that sleep between runs) changes scheduling, not results."""
    x = np.random.default_rng(0).normal(size=(2, 3, S, S)).astype(np.float32)
    def spinning(runner):
        try:
            return runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning on
            return "default"

    quiet, default = (export.OnnxModel(exported["onnx"], threads=1, spin_wait=w) for w in (False, True))
    assert spinning(quiet) == "0" and spinning(default) == "default"
    a, b = quiet(x), default(x)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_graph_that_does_not_match_fails_and_is_removed(exported, tmp_path):
    """scripts/export.py's failure path: check_export against a model whose weights differ."""
    path = tmp_path / "copy.onnx"
    shutil.copy(exported["onnx"], path)
    model = model_from_checkpoint(exported["ckpt"])
    assert export.check_export(model, path, batch=3) <= 1e-4
    with torch.no_grad():
        model.regressor.J.add_(0.01)  # every joint moves: the file no longer computes this model
    with pytest.raises(export.ParityError, match=r"max \|onnx - torch\| = .* exceeds 0.0001"):
        export.check_export(model, path, batch=3)
    assert not path.exists()


@pytest.mark.slow
def test_released_preset_keeps_its_batch_mixing_with_a_dynamic_batch(tmp_path):
    """model=released (tiny sizes): attention across the batch. The graph computes the same function at
    other batch sizes, so it reproduces the dependence on batch-mates that the PyTorch model has."""
    needs_extra()
    ckpt = write_checkpoint(tmp_path / "released.pt", "model=released", attention_gain=4.0)
    model = model_from_checkpoint(ckpt)
    assert model.mixes_batch
    path = export.export_onnx(model, tmp_path / "released.onnx", img_size=model.img_size, batch_size=TRACE_BATCH)
    runner = export.OnnxModel(path)
    assert runner.metadata["cliphand3d.mixes_batch"] == "true"
    x = images(4, seed=7)
    full, alone = runner(x), runner(x[:1])
    with torch.no_grad():
        ref_full, ref_alone = model(x), model(x[:1])
    for k in ("joints", "verts"):
        assert np.abs(full[k] - ref_full[k].numpy()).max() <= 1e-4
        assert np.abs(alone[k] - ref_alone[k].numpy()).max() <= 1e-4
    # sample 0 alone differs from sample 0 among three batch-mates, in the file as in PyTorch
    moved = np.abs(alone["verts"][0] - full["verts"][0]).max()
    assert moved > 1e-3 and moved == pytest.approx(float((ref_alone["verts"][0] - ref_full["verts"][0]).abs().max()),
                                                  rel=0.05)


@pytest.mark.parametrize("missing, call", [
    ("onnxruntime", lambda p: export.OnnxModel(p)),
    ("onnxscript", lambda p: export.export_onnx(torch.nn.Identity(), p, img_size=S)),
])
def test_missing_extra_names_the_install_command(monkeypatch, tmp_path, missing, call):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    with pytest.raises(export.MissingExtraError, match=re.escape('pip install -e ".[onnx]"')) as e:
        call(tmp_path / "x.onnx")
    assert missing in str(e.value)


@pytest.mark.parametrize("kw, key", [({"opset": 17}, "opset=17"), ({"batch_size": 1}, "batch_size=1")])
def test_bad_options_are_refused_before_exporting(tmp_path, kw, key):
    needs_extra()
    with pytest.raises(ConfigError, match=key):
        export.export_onnx(torch.nn.Identity(), tmp_path / "x.onnx", img_size=S, **kw)
    assert not (tmp_path / "x.onnx").exists()


def test_the_input_normalisation_a_model_was_trained_with_travels_into_the_file(tmp_path):
    """model.input_norm=imagenet is in the checkpoint's model config: the loaded model applies it, and the ONNX
    file computes it too, so its input stays (x/255 - 0.5)/0.5 whatever the backbone was trained on."""
    needs_extra()
    model = model_from_checkpoint(write_checkpoint(tmp_path / "in.pt", "model.input_norm=imagenet"))
    plain = model_from_checkpoint(write_checkpoint(tmp_path / "sym.pt"))
    assert model.backbone.input_norm == "imagenet" and plain.backbone.input_norm == "symmetric"
    x = images(2, seed=3)
    with torch.no_grad():
        assert not torch.allclose(model(x)["joints"], plain(x)["joints"], atol=1e-4)
    export.export_onnx(model, tmp_path / "in.onnx", img_size=S)
    assert export.check_parity(model, tmp_path / "in.onnx", x) <= 1e-4
