"""Multi-GPU semantics, on the CPU. The schedule is one learning-rate curve over training samples whatever the
world size (train/optim.py), and one process at the schedule batch computes what the step-defined schedule
computed, bit for bit. Validation sharded over 2 gloo ranks (evaluation/sharding.py, scoring.validate) gives
exactly the metrics and predictions of one process on an odd-sized split.

Run as a script under torchrun, this file is the 2-rank worker of the sharded-validation test."""
from __future__ import annotations

import math
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cliphand3d.errors import ConfigError
from cliphand3d.evaluation.sharding import merge_predictions, shard_positions
from cliphand3d.train.optim import (LR_SCALINGS, Schedule, lr_curve, lr_scale, optimizer_from_config,
                                    schedule_from_config, warmup_cosine)

REPO = Path(__file__).resolve().parents[1]


def schedule(world: int, batch: int, *, train_size: int = 50, unit: int | None = None, lr_scaling: str = "none",
             **trainer) -> Schedule:
    tcfg = OmegaConf.create({"epochs": 3, "max_steps": None, "schedule_batch": unit, **trainer})
    ocfg = OmegaConf.create({"lr": 1e-3, "warmup_steps": 0.25, "min_lr_ratio": 0.01, "lr_scaling": lr_scaling})
    return schedule_from_config(tcfg, ocfg, train_size=train_size, batch_size=batch, world_size=world)


def lrs_by_position(sch: Schedule, lr: float = 1e-3) -> dict[int, float]:
    """{samples seen before the step: the lr it runs at}, from a real LambdaLR as the run steps it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, out = sch.scheduler(opt), {}
    for step in range(sch.steps):
        out[step * sch.global_batch] = opt.param_groups[0]["lr"]
        opt.step()
        scheduler.step()
    return out


# --------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("length", [dict(max_steps=40), dict(max_steps=37), dict(epochs=3), dict(epochs=2, max_steps=None)])
def test_the_lr_at_every_sample_position_and_the_samples_do_not_depend_on_the_world_size(length):
    one = schedule(1, 4, **length)  # the schedule batch is trainer.batch_size of one process: 4
    lr_one = lrs_by_position(one)
    assert len(lr_one) == one.steps == one.total // 4
    for w, b in [(2, 4), (2, 2), (4, 2), (3, 4), (8, 4)]:
        sch = schedule(w, b, unit=4, **length)
        assert (sch.total, sch.warmup, sch.unit) == (one.total, one.warmup, one.unit)
        assert sch.steps == math.ceil(one.total / (w * b))
        assert 0 <= sch.steps * w * b - one.total < w * b  # the samples trained: the total, up to one global batch
        lr = lrs_by_position(sch)
        assert set(lr) <= set(lr_one)  # every step starts where one process starts one
        assert [lr[p] for p in lr] == [lr_one[p] for p in lr], (w, b)  # and runs at its lr, exactly
        if w * b == 4:  # the same global batch: the same run, step for step
            assert lr == lr_one
    # a global batch that is no multiple of the schedule batch (12 vs 8): the same curve, sampled elsewhere
    eight = schedule(1, 8, **length)
    curve = lambda x: 1e-3 * lr_curve(x, warmup=eight.warmup, total=eight.total, unit=8, min_lr_ratio=0.01)  # noqa: E731
    lr_eight, lr_twelve = lrs_by_position(eight), lrs_by_position(schedule(3, 4, unit=8, **length))
    assert all(lr_eight[p] == curve(p) for p in lr_eight)
    assert all(lr_twelve[p] == curve(p) for p in lr_twelve)
    assert {p for p in lr_twelve if p % 24 == 0} <= set(lr_eight)
    for p, v in lr_twelve.items():  # between one process's steps either side (the curve rises, then falls)
        below, above = curve(p // 8 * 8), curve(p // 8 * 8 + 8)
        assert min(below, above) <= v <= max(below, above)


def test_epochs_and_max_steps_count_batches_of_the_schedule_batch():
    # 50 samples, batches of 4: 12 per epoch, as one process's sampler deals them (drop_last)
    assert schedule(1, 4, epochs=3).total == 3 * 12 * 4 and schedule(1, 4, epochs=3).steps == 36
    assert schedule(2, 4, epochs=3).steps == 18 and schedule(8, 4, epochs=3).steps == 5  # ceil(144 / 32)
    assert schedule(8, 4, max_steps=40).steps == 5 and schedule(8, 4, max_steps=40).total == 160
    # a stated schedule batch: max_steps=40 batches of 32 are 1,280 samples, 40 steps of 8 x 4
    big = schedule(8, 4, unit=32, max_steps=40)
    assert (big.total, big.warmup, big.steps) == (1280, 320, 40)
    assert schedule(1, 4, unit=32, max_steps=40).steps == 320
    with pytest.raises(ConfigError, match="trainer.schedule_batch=0 must be"):
        schedule(1, 4, unit=0)
    with pytest.raises(ConfigError, match=r"trainer.schedule_batch=64 is larger than the training set \(50 samples\)"):
        schedule(1, 4, unit=64)


def _old_step_schedule(step: int, *, total_steps: int, warmup_steps: float, min_lr_ratio: float) -> float:
    """The schedule before it was defined in samples (one process), verbatim: the reference it must equal."""
    warmup = int(warmup_steps if warmup_steps >= 1 else warmup_steps * total_steps)
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0.05, 0.25, 0.0, 7, 1])
@pytest.mark.parametrize("length", [dict(max_steps=900), dict(max_steps=4), dict(epochs=8)])
def test_one_process_computes_the_step_schedule_bit_for_bit(warmup, length):
    tcfg = OmegaConf.create({"epochs": 8, "max_steps": None, "schedule_batch": None, **length})
    ocfg = OmegaConf.create({"lr": 1e-3, "warmup_steps": warmup, "min_lr_ratio": 0.01, "lr_scaling": "linear"})
    sch = schedule_from_config(tcfg, ocfg, train_size=1000, batch_size=32, world_size=1)
    total = length.get("max_steps") or 8 * (1000 // 32)
    assert sch.steps == total and sch.lr_scale == 1.0  # any rule scales by exactly 1 at the schedule batch
    got = [sch.multiplier(s) for s in range(total + 3)]
    want = [_old_step_schedule(s, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.01) for s in range(total + 3)]
    assert got == want  # floats compared exactly
    assert [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(120)] == [
        _old_step_schedule(s, total_steps=110, warmup_steps=10, min_lr_ratio=0.1) for s in range(120)]
    model = torch.nn.Linear(2, 2)
    opt = optimizer_from_config(model, OmegaConf.merge(ocfg, {"weight_decay": 0.0, "betas": [0.9, 0.999],
                                                              "backbone_lr_mult": 1.0}), lr_scale=sch.lr_scale)
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_lr_scaling_known_answers():
    assert LR_SCALINGS == ("none", "linear", "sqrt")
    assert lr_scale("none", 256, 32) == 1.0
    assert lr_scale("linear", 256, 32) == 8.0 and lr_scale("linear", 16, 32) == 0.5
    assert lr_scale("sqrt", 256, 32) == math.sqrt(8) and lr_scale("sqrt", 128, 32) == 2.0
    assert all(lr_scale(rule, 48, 48) == 1.0 for rule in LR_SCALINGS)
    with pytest.raises(ConfigError, match=r"optim.lr_scaling='cubic' is not one of \['none', 'linear', 'sqrt'\]"):
        lr_scale("cubic", 64, 32)
    # 1 -> 8 processes of 32, schedule batch 32: sqrt scales optim.lr by sqrt(8), backbone group included
    sch = schedule(8, 32, train_size=10_000, lr_scaling="sqrt")
    assert sch.lr_scale == math.sqrt(8) and sch.global_batch == 256
    net = torch.nn.Module()
    net.backbone, net.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ocfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "backbone_lr_mult": 0.1})
    lrs = sorted(g["lr"] for g in optimizer_from_config(net, ocfg, lr_scale=sch.lr_scale).param_groups)
    assert lrs == sorted([1e-3 * math.sqrt(8) * 0.1] * 2 + [1e-3 * math.sqrt(8)] * 2)


def test_resume_matches_the_new_keys_and_reads_old_checkpoints_without_them():
    from cliphand3d.build import compose_config
    from cliphand3d.checkpoint.state import config_to_container
    from cliphand3d.train.resume import RESUME_ABSENT_MEANS, RESUME_MAY_CHANGE, resume_mismatches

    cfg = config_to_container(compose_config("train", ["run_dir=/tmp/x"]))
    assert not set(RESUME_ABSENT_MEANS) & set(RESUME_MAY_CHANGE)
    old = {**cfg, "trainer": {k: v for k, v in cfg["trainer"].items() if k != "schedule_batch"},
           "optim": {k: v for k, v in cfg["optim"].items() if k != "lr_scaling"}}
    saved = {"config": old, "train_state": {"world_size": 1, "batch_size": 32}}
    assert resume_mismatches(saved, cfg, world_size=1, batch_size=32) == []  # absent: what those runs computed
    changed = config_to_container(compose_config("train", ["run_dir=/tmp/x", "trainer.schedule_batch=64",
                                                          "optim.lr_scaling=sqrt"]))
    assert resume_mismatches(saved, changed, world_size=1, batch_size=32) == [
        "optim.lr_scaling: saved 'none', now 'sqrt'", "trainer.schedule_batch: saved None, now 64"]
    assert resume_mismatches({**saved, "config": cfg}, cfg, world_size=2, batch_size=32) == [
        "world size (processes): saved 1, now 2"]


# --------------------------------------------------------------------------- sharded validation
def test_shards_are_whole_batches_that_cover_the_split_once():
    for n in (0, 1, 7, 11, 64, 65, 3908):
        for bs in (1, 4, 64):
            for world in (1, 2, 3, 8):
                shares = [shard_positions(n, bs, r, world) for r in range(world)]
                assert [i for s in shares for i in s] == list(range(n))
                assert all(s.start % bs == 0 and (len(s) % bs == 0 or s.stop == n) for s in shares)
                sizes = [-(-len(s) // bs) for s in shares]  # batches per rank
                assert max(sizes) - min(sizes) <= 1
    assert [shard_positions(11, 4, r, 2) for r in range(2)] == [range(0, 4), range(4, 11)]
    with pytest.raises(ValueError):
        shard_positions(10, 4, 2, 2)
    a = {"x": np.arange(3), "prompt_x": ["a", "b", "c"]}
    b = {"x": np.arange(3, 5), "prompt_x": ["d", "e"]}
    merged = merge_predictions([a, {}, b])
    assert merged["x"].tolist() == [0, 1, 2, 3, 4] and merged["prompt_x"] == list("abcde")
    assert merge_predictions([a]) is a and merge_predictions([{}, {}]) == {}


VAL = 11  # an odd split: 3 batches of 4, shared 1 : 2 (4 and 7 samples)
WORKER = [
    "data.num_train=16", f"data.num_val={VAL}", "data.num_verts=200", "data.img_size=64",
    "model_template.build.levels=[40,80,120]", "model_template.num_samples=16",
    "model.backbone=resnet18", "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16",
    "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
]


def _worker(out: Path) -> None:
    """One rank: validate the same model in one process (no process group yet), then on its share with the
    other rank, after rank 1's buffers were spoilt and broadcast back from rank 0; pickle what it got."""
    from cliphand3d import dist
    from cliphand3d.build import build_datasets, build_prompts, build_template, build_training_module, compose_config
    from cliphand3d.evaluation.scoring import validate
    from cliphand3d.runtime import make_loader, seed_everything

    rank, world, cpu = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device("cpu")
    cfg = compose_config("train", ["run_dir=/tmp/unused", *WORKER])
    seed_everything(0)
    sets = build_datasets(cfg, build_prompts(cfg), splits=("train", "val"))
    module, text_branch = build_training_module(cfg, build_template(cfg, sets["train"]))
    val, model = sets["val"], module.model
    protocol = getattr(val, "protocol", "freihand")
    one = validate(model, make_loader(val, batch_size=4, num_workers=0, device=cpu), cpu, protocol,
                   text_branch=text_branch)
    torch.distributed.init_process_group("gloo")
    if rank == 1:
        with torch.no_grad():
            for b in module.buffers():
                if b.is_floating_point():
                    b.add_(0.5)
    dist.broadcast_buffers(module)
    share = shard_positions(len(val), 4, rank, world)
    sharded = validate(model, make_loader(val, batch_size=4, num_workers=0, device=cpu, sampler=share), cpu,
                       protocol, text_branch=text_branch)
    with (out / f"rank{rank}.pkl").open("wb") as f:
        pickle.dump({"share": list(share), "one": one, "sharded": sharded}, f)
    torch.distributed.destroy_process_group()


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_validate_an_odd_split_exactly_as_one_process(tmp_path):
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", __file__,
           str(tmp_path)]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    # uneven shares, no padding, no duplicates
    assert [g["share"] for g in got] == [list(range(0, 4)), list(range(4, VAL))]
    one_res, one_preds = got[0]["one"]
    assert same_metrics(got[1]["one"][0], one_res)  # both ranks hold the same model
    assert {"pa_mpjpe_mm", "f5", "f15", "retrieval_x"} <= set(one_res)
    for g in got:  # every rank gets exactly one process's metrics
        assert same_metrics(g["sharded"][0], one_res)
    res0, preds0 = got[0]["sharded"]
    assert got[1]["sharded"][1] == {}  # the predictions stay on rank 0, in dataset order
    assert preds0.keys() == one_preds.keys() and len(preds0["pred_xyz"]) == VAL
    for k, v in one_preds.items():
        assert (v == preds0[k]) if isinstance(v, list) else np.array_equal(v, preds0[k]), k


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
