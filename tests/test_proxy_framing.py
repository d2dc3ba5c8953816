"""The proxy framing study (configs/experiment/proxy_framing.yaml, benchmarks/proxy_framing.py; docs/RESULTS.md):
each arm is what its name says and nothing else, every test framing reaches eval.py's data config as intended,
and the table is the seeds' mean [min, max] per arm and framing. Configs and files only: nothing is trained."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cliphand3d.checkpoint.state import compare_configs
from cliphand3d.evaluation.run import eval_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SPEC = importlib.util.spec_from_file_location("proxy_framing", REPO / "benchmarks" / "proxy_framing.py")
proxy = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(proxy)

# What each arm changes relative to full_uvd (the old default: whole-image crops, uvd loss), resolved. The training
# crop's base scale follows the crop (data.crop_scale), in data.augment and the train split's copy of it.
CROP = {"data.train.crop", "data.val.crop", "data.augment.scale", "data.train.augment.scale"}
ARM_CHANGES = {"full_uvd": set(), "mask_uvd": CROP, "mask_metric": CROP | {"loss.units"}}


def compose_in(name, overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def arm_config(arm, seed=0):
    cfg = compose_in("train", ["+experiment=proxy_framing", f"arm={arm}", f"seed={seed}", "run_dir=/tmp/unused"])
    OmegaConf.resolve(cfg)
    return cfg


def test_the_sweep_covers_every_arm_with_two_seeds():
    cells = proxy.cells()
    assert sorted({a for a, _ in cells}) == sorted(ARM_CHANGES)  # a new arm needs its expectation here
    assert {s for _, s in cells} == {"0", "1"} and len(cells) == 6


@pytest.mark.parametrize("arm", sorted(ARM_CHANGES))
def test_each_arm_differs_from_the_old_default_in_its_keys_only(arm):
    cfg, base = arm_config(arm), arm_config("full_uvd")
    assert set(compare_configs(base, cfg, keys=None, ignore=("arm",))) == ARM_CHANGES[arm]
    assert cfg.data.train.crop == ("full" if arm == "full_uvd" else "mask")
    assert cfg.data.val.crop == ("full" if arm == "full_uvd" else "centre")  # val framed as the arm's test
    assert cfg.loss.units == ("metric" if arm == "mask_metric" else "uvd")
    assert cfg.data.augment.scale == (1.0 if arm == "full_uvd" else 1.3)
    # one budget for every arm, read off the config; the pose terms alone; the driver scores the test split
    assert cfg.trainer.max_steps == 240 and cfg.trainer.batch_size == 32 and cfg.data.img_size == 64
    assert cfg.loss.weights.clip == 0 and cfg.trainer.final_eval is None
    assert cfg.data.test.crop == "full" and cfg.data.train._target_.endswith("FreiHAND")


def test_the_seed_changes_only_the_seed():
    diff = compare_configs(arm_config("mask_metric", 0), arm_config("mask_metric", 1), keys=None)
    assert diff and all(k == "seed" or k.endswith(".seed") for k in diff), diff


@pytest.mark.parametrize("name,crop,framing,scale", [("full", "full", "single", 1.3), ("centre", "centre", "single", 1.3),
                                                     ("two_pass", "centre", "two_pass", 1.3),
                                                     ("two_pass_1.45", "centre", "two_pass", 1.45)])
def test_each_test_framing_reaches_eval_py_as_intended(name, crop, framing, scale):
    saved = arm_config("mask_metric")  # a checkpoint stores its config resolved
    cfg = compose_in("eval", ["ckpt=/tmp/unused.pt", "data=freihand", "root=/data/proxy", "data.versions=[0,1]",
                              "data.val_fraction=0.05", *proxy.FRAMINGS[name]])
    run = eval_config(cfg, saved)
    assert cfg.framing == framing and cfg.two_pass_scale == scale
    assert run.data.test.crop == crop and run.data.test.root == "/data/proxy"
    # as trained: the model's crop size, and the training hands the mean-pose baseline averages
    assert run.data.img_size == 64 and list(run.data.train.versions) == [0, 1] and run.data.train.val_fraction == 0.05


def write_metrics(root, arm, seed, framing, pa, mpjpe, auc):
    run = root / arm / f"seed{seed}"
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["+experiment=proxy_framing", f"arm={arm}", f"seed={seed}", "data.root=/d", "resume=auto"]))
    (run / f"eval_{framing}").mkdir()
    base = {"pa_mpjpe_mm": 35.0 + seed, "mpjpe_mm": 56.0 + len(framing), "auc_pa_0_50": 0.33}
    (run / f"eval_{framing}" / "metrics.json").write_text(json.dumps(
        {"split": "test", "pa_mpjpe_mm": pa, "mpjpe_mm": mpjpe, "auc_pa_0_50": auc, "baseline_mean_pose": base}))


def test_the_table_is_mean_min_max_over_seeds_per_arm_and_framing(tmp_path):
    write_metrics(tmp_path, "mask_uvd", 0, "centre", 20.0, 30.0, 0.60)
    write_metrics(tmp_path, "mask_uvd", 1, "centre", 21.0, 34.0, 0.58)
    write_metrics(tmp_path, "full_uvd", 0, "full", 25.0, 40.0, 0.50)
    write_metrics(tmp_path, "full_uvd", 1, "full", 27.0, 42.0, 0.46)
    write_metrics(tmp_path, "full_uvd", 0, "centre", 29.0, 50.0, 0.40)
    rows = proxy.table(tmp_path).splitlines()
    assert rows[2:5] == [  # arms in the experiment's order, framings in FRAMINGS' order
        "| `full_uvd` | full | 2 | 0 1 | 26.00 [25.00, 27.00] | 41.00 [40.00, 42.00] | 0.480 [0.460, 0.500] |",
        "| `full_uvd` | centre | 1 | 0 | 29.00 [29.00, 29.00] | 50.00 [50.00, 50.00] | 0.400 [0.400, 0.400] |",
        "| `mask_uvd` | centre | 2 | 0 1 | 20.50 [20.00, 21.00] | 32.00 [30.00, 34.00] | 0.590 [0.580, 0.600] |"]
    # the mean-pose baseline of each framing over every run scored so (its training mean is drawn from each
    # run's seeded crops; its MPJPE depends on how the crop places the mean pose)
    assert rows[5:] == [
        "| mean-pose baseline | full | 2 | | 35.50 [35.00, 36.00] | 60.00 [60.00, 60.00] | 0.330 [0.330, 0.330] |",
        "| mean-pose baseline | centre | 3 | | 35.33 [35.00, 36.00] | 62.00 [62.00, 62.00] | 0.330 [0.330, 0.330] |"]


def test_the_data_set_is_written_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(proxy, "run", lambda cmd, log: calls.append(cmd) or 0.0)
    root = tmp_path / "proxy"
    root.mkdir()
    proxy.write_data(root)
    assert len(calls) == 1 and f"out={root}" in calls[0] and "framing=freihand" in calls[0]
    proxy.write_data(root)  # the stamp matches: nothing is written again
    assert len(calls) == 1
    (root / proxy.STAMP).write_text(json.dumps({**proxy.DATA, "num_train": 10}))
    proxy.write_data(root)  # another set: written again
    assert len(calls) == 2
