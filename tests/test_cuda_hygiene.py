"""What a GPU run relies on, checked on the CPU: the real-data experiments never fall back to the CPU
silently, cuDNN's autotuner and TF32 are options (on for training, off for exact evaluation), and the
outputs leave the network in float32 under autocast."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from cliphand3d.build import CONFIGS, build_model
from cliphand3d.errors import ConfigError
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.models.template import build_template
from cliphand3d.runtime import configure_cuda, pick_device
from cliphand3d.train.run import train


def composed(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_cuda_is_refused_with_cudas_own_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040). Please update.\nmore")

    monkeypatch.setattr(torch.cuda, "init", too_old)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError) as err:
        pick_device("cuda", 0)
    msg = str(err.value)
    assert msg.startswith("trainer.device=cuda but CUDA is unusable here: The NVIDIA driver on your system is too old "
                          "(found version 11040). Please update (CUDA_VISIBLE_DEVICES='3').")
    assert "trainer.device=cpu" in msg and "--gpus all" in msg
    with pytest.raises(ConfigError, match=r"(?s)^device=cuda .* set device=cpu"):
        pick_device("cuda", 0, key="device")
    assert pick_device("auto", 0) == torch.device("cpu")  # auto still means "CUDA when usable"


@pytest.mark.parametrize("experiment", ["freihand", "rhd"])
def test_real_data_experiments_refuse_the_cpu_before_reading_any_data(experiment, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = composed("train", [f"+experiment={experiment}", f"run_dir={tmp_path}", "data.root=/nowhere"])
    assert cfg.trainer.device == "cuda"
    with pytest.raises(ConfigError, match=r"trainer.device=cuda but CUDA is unusable here"):
        train(cfg)  # not the missing data folder: the device is decided first
    assert composed("train", [f"+experiment={experiment}", "run_dir=/x", "trainer.device=cpu"]).trainer.device == "cpu"
    assert composed("train", ["run_dir=/x"]).trainer.device == "auto"  # the synthetic default runs anywhere


def test_autotuner_and_tf32_are_options_on_for_training_off_for_evaluation():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_cuda(benchmark=True, tf32=True)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_cuda(benchmark=False, tf32=False)
        assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32
                    or torch.backends.cudnn.allow_tf32)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    trainer = composed("train", ["run_dir=/x"]).trainer
    assert trainer.cudnn_benchmark is True and trainer.tf32 is True
    ev = composed("eval", ["ckpt=x.pt"])
    assert ev.cudnn_benchmark is False and ev.tf32 is False


def test_outputs_leave_the_network_in_float32_under_bf16_autocast():
    cfg = composed("train", ["run_dir=/x", "model.pretrained=null"])
    xyz, verts = SyntheticHands(length=32, num_verts=200).all_labels()
    template = build_template(verts, xyz, levels=(40, 80, 120))
    torch.manual_seed(0)
    model = build_model(cfg, template).eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out["joints"].dtype == out["verts"].dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in out["stages"])
    assert torch.equal(out["joints"], model.regressor.J @ out["verts"])  # J in float32, on float32 vertices
    # the trunk ran in bfloat16 (its rounding shows), the heads did not
    diff = (out["verts"] - ref["verts"]).abs().max().item()
    assert 0 < diff < 0.05
