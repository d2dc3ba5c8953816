"""Every experiment config composes, and runs a few training steps on tiny settings; eval.py reads
what train.py wrote."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.errors import ConfigError
from cliphand3d.train.logger import RunLogger
from cliphand3d.train.run import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))

# Shrink anything to a few seconds on a CPU; offline stand-ins for pretrained weights.
TINY = [
    "data.img_size=64", "model.backbone=resnet18", "model.pretrained=null", "model.deconv_channels=16",
    "model.depth_bins=16", "model.joint_feature_hidden=16", "model.token_dim=32",
    "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
    "model_template.num_samples=32", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.val_batch_size=8",
    "trainer.num_workers=0", "trainer.ckpt_every_steps=1", "trainer.ema_decay=0.9", "logger.tensorboard=false",
]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="module")
def freihand_root(tmp_path_factory):
    return write_freihand(tmp_path_factory.mktemp("fh"), num_train=4, num_eval=8, seed=1, versions=2)


@pytest.fixture(scope="module")
def rhd_root(tmp_path_factory):
    return write_rhd(tmp_path_factory.mktemp("rhd"), num_train=8, num_eval=8, seed=1)


def test_every_experiment_composes_and_resolves():
    assert {"synthetic", "freihand", "rhd", "no_clip"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        cfg = compose_train([f"+experiment={name}", "run_dir=/tmp/unused"])
        OmegaConf.resolve(cfg)  # every interpolation resolves
        assert cfg.name and cfg.data.train._target_ and cfg.model._target_
    # the heatmap targets map depth onto the z heatmap exactly as the model's depth_range does
    cfg = compose_train(["model.depth_range=2.5", "run_dir=/tmp/unused"])
    assert cfg.loss.depth_range == cfg.model.depth_range == 2.5


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains_a_few_steps(name, tmp_path, freihand_root, rhd_root):
    extra = []
    if name in ("freihand", "proxy_framing"):  # proxy_framing: FreiHAND-format synthetic hands
        extra = [f"data.root={freihand_root}", "data.versions=[0,1]"]
    elif name == "rhd":
        extra = [f"data.root={rhd_root}"]
    else:
        extra = ["data.num_train=8", "data.num_val=8", "data.num_test=8", "data.num_verts=200",
                 "model_template.build.levels=[40,80,120]"]  # num_test: experiment=ablation scores test
    # the real-data experiments ask for a GPU; trainer.device=cpu is how a user insists on the CPU
    cfg = compose_train([f"+experiment={name}", f"run_dir={tmp_path}", "text.pretrained=null", *TINY, *extra,
                         "trainer.device=cpu"])
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()
    assert metrics["pa_mpjpe_mm"] > 0
    if cfg.loss.weights.clip > 0:
        assert "retrieval_x" in metrics
    else:
        assert "retrieval_x" not in metrics


def test_a_run_folder_is_never_overwritten(tmp_path):
    overrides = [f"run_dir={tmp_path}", *TINY, "data.num_train=8", "data.num_val=8", "data.num_verts=200",
                 "model_template.build.levels=[40,80,120]"]
    train(compose_train(overrides))
    with pytest.raises(ConfigError, match="resume=auto"):
        train(compose_train(overrides))
    # resume=auto on a finished run trains no further and keeps the checkpoint
    train(compose_train(overrides + ["resume=auto"]))
    # a different model cannot resume this run
    with pytest.raises(ConfigError, match="model.depth_bins: saved 16, now 8"):
        train(compose_train(overrides + ["resume=auto", "model.depth_bins=8"]))


def test_non_finite_loss_stops_with_step_and_terms_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from cliphand3d.checkpoint.io import load_checkpoint
    from cliphand3d.losses import CLIPHand3DLoss

    calls = {"n": 0}
    forward = CLIPHand3DLoss.forward

    def poisoned(self, outputs, batch, text_feats=None):
        terms = forward(self, outputs, batch, text_feats)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th training step (0-based step 3) meets a NaN in one term
            terms["verts"] = terms["verts"] * float("nan")
        return terms

    monkeypatch.setattr(CLIPHand3DLoss, "forward", poisoned)
    closed = []  # the logger is closed as failed (W&B shows the run failed, not finished)
    close = RunLogger.close
    monkeypatch.setattr(RunLogger, "close", lambda self, failed=False: closed.append(failed) or close(self, failed))
    overrides = [f"run_dir={tmp_path}", *TINY, "data.num_train=32", "data.num_val=8", "data.num_verts=200",
                 "model_template.build.levels=[40,80,120]", "trainer.max_steps=6"]
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3 \(terms: \['verts'\]\)"):
        train(compose_train(overrides))
    assert closed == [True]
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["train_state"]["step"] == 3  # the last good step; nothing after the NaN was saved
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_non_finite_gradients_are_skipped_then_stop_the_run_and_last_pt_stays_the_last_good(tmp_path, monkeypatch):
    import cliphand3d.build as build_mod
    import cliphand3d.train.run as trainer_mod
    from cliphand3d.checkpoint.io import load_checkpoint

    build_model, save = build_mod.build_model, trainer_mod.save_checkpoint
    backward = {"n": 0}

    def poisoned_model(cfg, template):
        model = build_model(cfg, template)

        def hook(g):  # from the 4th backward pass (0-based step 3) on, a finite loss with NaN gradients here
            backward["n"] += 1
            return g * float("nan") if backward["n"] >= 4 else g

        model.regressor.stages[0].head[1].weight.register_hook(hook)
        return model

    written = {}

    def spy(path, state):
        out = save(path, state)  # the real save: it refuses non-finite weights itself
        if path.name == "last.pt":
            written[state["train_state"]["step"]] = {k: v.clone() for k, v in state["model"].items()}
        return out

    monkeypatch.setattr(build_mod, "build_model", poisoned_model)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", spy)
    overrides = [f"run_dir={tmp_path}", *TINY, "data.num_train=32", "data.num_val=8", "data.num_verts=200",
                 "model_template.build.levels=[40,80,120]", "trainer.max_steps=8"]
    # trainer.max_nonfinite_steps=3 (the default): batches 4, 5 and 6 are skipped, the 3rd stops the run
    with pytest.raises(SystemExit, match=r"non-finite gradients at step 3 in "
                                         r"\['model\.regressor\.stages\.0\.head\.1\.weight'\], 3 batch"):
        train(compose_train(overrides))
    assert backward["n"] == 6
    on_disk = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert on_disk["train_state"]["step"] == 3 and max(written) == 3
    assert all(torch.isfinite(v).all() for v in on_disk["model"].values() if v.is_floating_point())
    assert all(torch.equal(on_disk["model"][k], written[3][k]) for k in written[3])


@pytest.mark.parametrize("monitor", ["auc_pa_0_50", "pa_mpjpe_mm"])
def test_best_pt_follows_the_monitor_direction(monitor, tmp_path):
    """best.pt keeps the highest AUC / F-score / retrieval and the lowest error."""
    import json

    from cliphand3d.checkpoint.io import load_checkpoint
    from cliphand3d.metrics import higher_is_better

    cfg = compose_train([*TINY, "data.num_train=8", "data.num_val=8", "data.num_verts=200",
                         "model_template.build.levels=[40,80,120]", "trainer.max_steps=4",
                         "trainer.val_every_steps=1", "optim.lr=1e-2", f"trainer.monitor={monitor}",
                         f"run_dir={tmp_path}"])
    train(cfg)
    history = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train_state"]["history"]
    values = {h["step"]: h[monitor] for h in history}
    assert len(set(values.values())) > 1  # the choice is not decided by a tie
    pick = max if higher_is_better(monitor) else min
    want = pick(values, key=lambda s: (values[s], -s) if pick is max else (values[s], s))
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best_step"] == want and summary["best"] == values[want]
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["train_state"]["step"] == want
    assert higher_is_better("auc_pa_0_50") and higher_is_better("f5") and higher_is_better("retrieval_x")
    assert not higher_is_better("pa_mpjpe_mm") and not higher_is_better("epe_median_mm")


# The settings of the default at commit d44908f, before issue #10's speed work: experiment/synthetic_v0
# must keep reproducing them, or benchmark row "v0 / tiny" stops measuring the speed-up it names.
DEFAULT_AT_D44908F = {
    "data.img_size": 96, "data.render_size": 224, "data.num_train": 32560, "data.view": "upright",
    "model.backbone": "resnet18", "model.backbone_stages": 4, "model.num_deconv": 2, "model.widths": [128, 64, 32, 32, 16], "model.token_dim": 128,
    "model.deconv_channels": 128, "model.depth_bins": 32, "model.joint_feature_hidden": 64,
    "model.blocks_per_stage": 1, "model.heads": 2, "model.channels_last": False, "optim.fused": False,
    "trainer.max_steps": 900, "trainer.batch_size": 32, "trainer.num_workers": 1,
}


def test_synthetic_v0_keeps_the_default_as_it_was_before_the_speed_work():
    cfg = compose_train(["+experiment=synthetic_v0", "run_dir=/tmp/unused"])
    got = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v
           for k in DEFAULT_AT_D44908F}
    assert got == DEFAULT_AT_D44908F
