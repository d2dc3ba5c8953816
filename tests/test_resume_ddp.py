"""A run killed with SIGKILL resumes to the very weights (model, EMA, optimiser, best.pt) of an
uninterrupted run, and refuses settings it could not continue exactly; 2-process DDP (gloo, CPU) with
zero-weighted loss terms trains every trainable weight, keeps identical replicas and gives the ranks
disjoint samples. All go through the real scripts/train.py."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cliphand3d.build import build_datasets, build_prompts, load_model, text_branch_from_checkpoint
from cliphand3d.checkpoint.io import load_checkpoint
from cliphand3d.data.sampler import ResumableSampler
from cliphand3d.evaluation.scoring import validate
from cliphand3d.runtime import make_loader
from cliphand3d.train.optim import lr_curve

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "scripts" / "train.py")
SMALL = [
    "data.num_train=40", "data.num_val=8", "data.num_verts=200", "data.img_size=64",
    "model_template.build.levels=[40,80,120]", "model_template.num_samples=40",
    "model.backbone=resnet18", "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16",
    "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
    "trainer.batch_size=4", "trainer.val_batch_size=8", "trainer.num_workers=0", "trainer.max_steps=14",
    "trainer.ckpt_every_steps=2", "logger.tensorboard=false",
]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def run(run_dir, *extra, check=True):
    cmd = [sys.executable, TRAIN, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *SMALL, *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, check=check, timeout=600)


# What runs use: an EMA, a loader worker, validation (and best.pt) inside the epoch, before and after the kill.
# best.pt by root-relative MPJPE, which falls at every validation of this 14-step run (99.8 -> 88.4 mm), so
# best.pt is rewritten after the resume; PA-MPJPE is flat at this size (its best step moved with the model).
USED = ["trainer.ema_decay=0.99", "trainer.num_workers=1", "trainer.val_every_steps=3", "trainer.monitor=mpjpe_mm"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, request):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run goes alongside (one thread each)
    with (tmp_path / "full.log").open("w") as full_log:
        uninterrupted = subprocess.Popen(
            [sys.executable, TRAIN, f"run_dir={full}", f"hydra.run.dir={full}", *SMALL, *USED],
            env=env(), stdout=full_log, stderr=subprocess.STDOUT)
    request.addfinalizer(lambda: uninterrupted.poll() is None and uninterrupted.kill())
    # 10 batches per epoch: kill after a checkpoint inside the first epoch (step 4, 6 or 8), after the
    # validation at step 3 and before those at 6 (or 9) and 12
    cmd = [sys.executable, TRAIN, f"run_dir={killed}", f"hydra.run.dir={killed}", *SMALL, *USED]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.is_file() and load_checkpoint(last)["train_state"]["step"] >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = load_checkpoint(last)["train_state"]
    assert 4 <= stopped_at["step"] < 10 and stopped_at["epoch"] == 0  # mid-epoch
    assert [h["step"] for h in stopped_at["history"]][:1] == [3] and (killed / "checkpoints" / "best.pt").is_file()

    # what cannot continue exactly is refused, naming the keys; what may change is not named
    res = run(killed, *USED, "resume=auto", "trainer.batch_size=2", "optim.lr=0.5", "trainer.num_workers=0",
              check=False)
    assert res.returncode == 1 and "trainer.batch_size: saved 4, now 2" in res.stderr
    assert "optim.lr: saved 0.001, now 0.5" in res.stderr and "trainer.num_workers: saved" not in res.stderr
    assert load_checkpoint(last)["train_state"]["step"] == stopped_at["step"]

    run(killed, *USED, "resume=auto")
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    a, b = load_checkpoint(full / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert b["train_state"]["step"] == 14 and a["train_state"]["samples_seen"] == b["train_state"]["samples_seen"] == 56
    for part in ("model", "train_heads", "optimizer"):
        assert_same(a[part], b[part], part)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 14
    assert_same(a["ema"]["module"], b["ema"]["module"], "ema")
    # validation before and after the kill, the same metrics, and the same best.pt
    assert a["train_state"]["history"] == b["train_state"]["history"]
    steps = [h["step"] for h in b["train_state"]["history"]]
    assert steps[0] < stopped_at["step"] < steps[-2]
    best_a, best_b = load_checkpoint(full / "checkpoints" / "best.pt"), load_checkpoint(killed / "checkpoints" / "best.pt")
    assert best_a["train_state"]["step"] == best_b["train_state"]["step"] == b["train_state"]["best_step"]
    assert best_b["train_state"]["step"] > stopped_at["step"]  # best.pt was (re)written after the resume
    assert_same(best_a["model"], best_b["model"], "best.pt")


def assert_same(a, b, what):
    """Nested state dicts equal exactly, tensors bitwise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def last_line_per_step(path):
    """samples/rank<r>.jsonl -> {step: indices}; a resumed run re-appends steps, the last line counts."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return {d["step"]: d["index"] for d in lines}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_gloo_ddp_with_zero_weighted_terms_trains_disjoint_shards(tmp_path):
    run_dir = tmp_path / "ddp"
    # stages=0 and clip_z=0 leave parameters that no term trains: DDP fails on step 2 unless they drop out
    with socket.socket() as sock:  # a free port: a fixed one collides with any other run of this test
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the schedule counts samples: max_steps=4 batches of schedule_batch=8 are 4 steps of 2 x 4 (with the default
    # schedule batch, trainer.batch_size=4, they would be 2); an odd val split (9 = 4 + 5) shared by the ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", TRAIN,
           f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *SMALL, "trainer.max_steps=4", "trainer.schedule_batch=8",
           "data.num_val=9", "trainer.val_batch_size=4",
           "loss.weights.stages=0", "+loss.weights.clip_z=0", "trainer.save_init=true", "trainer.record_samples=true"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["samples_seen"] == 4 * 4 * 2
    sums = summary["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]

    # training moved every trainable weight, and exactly the zero-weighted terms' own ones stayed put
    init, last = load_checkpoint(run_dir / "checkpoints" / "init.pt"), load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert init["train_state"]["step"] == 0 and last["train_state"]["step"] == 4
    unchanged = {f"{part}/{k}" for part in ("model", "train_heads") for k, v in init[part].items()
                 if torch.equal(v, last[part][k])}
    template = {f"model/{k}" for k in init["model"]
                if re.fullmatch(r"regressor\.(J|template_verts|template_joints|level_(idx|pos)_\d)", k)}
    idle = {f"model/{k}" for k in init["model"]
            if re.match(r"regressor\.stages\.[012]\.head\.|pose_heads\.proj\.z\.", k)}
    idle |= {f"train_heads/{k}" for k in init["train_heads"]
             if k.startswith("adapters.heads.z.") or k == "criterion.contrastive.logit_scale.z"}
    assert len(idle) == 3 * 4 + 2 + 6 + 1  # 3 stage heads (LayerNorm + Linear), pose head z, adapter z, scale z
    assert unchanged == template | idle

    # the ranks trained on disjoint shards, the ones the sampler deals out for this seed and epoch
    seen = [last_line_per_step(run_dir / "samples" / f"rank{r}.jsonl") for r in range(2)]
    for r, steps in enumerate(seen):
        assert sorted(steps) == [1, 2, 3, 4] and all(len(ix) == 4 for ix in steps.values())
        sampler = ResumableSampler(40, seed=0, rank=r, world_size=2, batch_size=4)
        assert [i for s in sorted(steps) for i in steps[s]] == list(sampler)[:16]
    flat = [set(i for ix in steps.values() for i in ix) for steps in seen]
    assert len(flat[0]) == len(flat[1]) == 16 and not flat[0] & flat[1]

    # the lr followed the curve over samples (4 steps of 8 samples), and validation, sharded over the ranks, gave
    # exactly the metrics one process computes from the final weights
    assert last["scheduler"]["last_epoch"] == 4
    assert last["scheduler"]["_last_lr"][0] == 1e-3 * lr_curve(32, warmup=0, total=32, unit=8, min_lr_ratio=0.01)
    assert summary["last"] == one_process_validation(run_dir / "checkpoints" / "last.pt")
    assert last["train_state"]["history"] == [{"step": 4, **summary["last"]}]


def one_process_validation(ckpt_path: Path) -> dict:
    """Validation metrics of a checkpoint's weights in this process, as a 1-process run computes them."""
    model, cfg, ckpt = load_model(ckpt_path)
    val, cpu = build_datasets(cfg, build_prompts(cfg), splits=("val",))["val"], torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1)
    try:
        res, _ = validate(model, make_loader(val, batch_size=int(cfg.trainer.val_batch_size), num_workers=0,
                                             device=cpu), cpu, getattr(val, "protocol", "freihand"),
                          text_branch=text_branch_from_checkpoint(cfg, ckpt, cpu))
    finally:
        torch.set_num_threads(threads)
    return res
