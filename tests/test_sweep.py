"""A run ends with its test-split evaluation (trainer.final_eval) exactly as eval.py scores it."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cliphand3d.preflight import ConfigError, check_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Shrink a synthetic run to seconds on a CPU.
TINY = [
    "data.img_size=64", "model.backbone=resnet18", "model.pretrained=null", "model.deconv_channels=16",
    "model.depth_bins=16", "model.joint_feature_hidden=16", "model.token_dim=32",
    "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
    "model_template.num_samples=32", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.val_batch_size=8",
    "trainer.num_workers=0", "logger.tensorboard=false", "data.num_train=8", "data.num_val=8",
    "data.num_test=16", "data.num_verts=200", "model_template.build.levels=[40,80,120]",
]


def compose_train(overrides, hydra_config=False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def test_final_eval_must_name_a_split():
    cfg = compose_train(["trainer.final_eval=tset", "run_dir=/tmp/unused"])
    with pytest.raises(ConfigError, match=r"trainer.final_eval='tset' is not a data split; use trainer.final_eval=test"):
        check_config(cfg)


def test_final_eval_scores_best_pt_on_test_exactly_as_eval_py(tmp_path):
    from cliphand3d.build import compose_config
    from cliphand3d.evaluate import run_eval
    from cliphand3d.trainer import train

    run = tmp_path / "run"
    overrides = [f"run_dir={run}", *TINY, "trainer.val_every_steps=1"]
    train(compose_train(overrides))
    assert not (run / "eval_best").exists()  # opt-in
    # a finished run gains its evaluation on resume: final_eval trains nothing, so resuming may add it
    train(compose_train([*overrides, "resume=auto", "trainer.final_eval=test"]))
    got = json.loads((run / "eval_best" / "metrics.json").read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    assert got["split"] == "test" and got["num_samples"] == 16
    assert got["checkpoint"] == str(run / "checkpoints" / "best.pt") and got["step"] == summary["best_step"]
    ref = run_eval(compose_config("eval", [f"ckpt={run / 'checkpoints' / 'best.pt'}", f"out_dir={tmp_path / 'ref'}"]))
    keys = ["pa_mpjpe_mm", "mpjpe_mm", "auc_pa_0_50", "pa_mpvpe_mm", "retrieval_x_16", "retrieval_z_16"]
    assert [got[k] for k in keys] == [ref[k] for k in keys]
    assert 0 <= got["retrieval_x_16"] <= 1
