"""trainer.accumulate: N micro-batches of batch_size / N per optimiser step.

Equivalence is asserted where it holds: the pose terms are means over the batch, so on a model without
batch-dependent layers (BatchNorm trains on each micro-batch's statistics) and without the contrastive term
(its negatives are the micro-batch's) the accumulated gradient is the full batch's, to float rounding. Then the
loop mechanics: one optimiser, schedule and EMA step per N micro-batches, the grad scaler unscaled and updated
once per step, DDP synchronising only the last micro-batch, and a run resumed from a checkpoint continuing to the
uninterrupted run's weights.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cliphand3d.build import compose_config
from cliphand3d.checkpoint.io import load_checkpoint
from cliphand3d.checkpoint.state import config_to_container
from cliphand3d.errors import ConfigError
from cliphand3d.losses import weighted_total
from cliphand3d.preflight import check_config
from cliphand3d.train.ema import ModelEMA
from cliphand3d.train.loop import TrainState, train_one_epoch
from cliphand3d.train.optim import build_optimizer
from cliphand3d.train.resume import RESUME_MAY_CHANGE, resume_mismatches

CPU = torch.device("cpu")


class Toy(nn.Module):
    """What the loop needs of TrainingModule (module(batch) -> (outputs, terms), .model, .criterion.total): a
    per-sample mean like every pose term, no batch-dependent layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.criterion = nn.Module()
        self.criterion.total = lambda terms: weighted_total(terms, {"fit": 1.0, "size": 1.0})
        self.forwards = 0

    def forward(self, batch):
        self.forwards += 1
        out = self.model(batch["image"])
        return out, {"fit": (out - batch["target"]).pow(2).sum(-1).mean(), "size": out.abs().mean()}


def full_batches(steps: int, size: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(size, 4, generator=g), "target": torch.randn(size, 2, generator=g)}
            for _ in range(steps)]


def split(batches: list[dict], n: int) -> list[dict]:
    """Each batch as n consecutive micro-batches (what the loader yields at batch_size / n)."""
    return [{k: v.chunk(n)[i] for k, v in b.items()} for b in batches for i in range(n)]


def train(loader, accumulate: int, *, scaler=None, ema_decay=None, module=None, state=None):
    module = module or Toy()
    opt = build_optimizer(module, lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ema = ModelEMA(module.model, decay=ema_decay) if ema_decay else None
    state = state or TrainState()
    train_one_epoch(module, loader, opt, sched, state, device=CPU, total_steps=100, amp="off", scaler=scaler,
                    grad_clip=0.5, ema=ema, accumulate=accumulate)
    return module, opt, sched, ema, state


def close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=tol) for k in a)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_n_micro_batches_step_as_one_full_batch(n, scaled):
    data = full_batches(3, 8)
    scaler = (lambda: torch.amp.GradScaler("cpu")) if scaled else (lambda: None)
    whole = train(data, 1, scaler=scaler(), ema_decay=0.9)
    parts = train(split(data, n), n, scaler=scaler(), ema_decay=0.9)
    # the gradient clip (0.5) bites at every step: it sees the accumulated gradient, not a micro-batch's
    assert close(whole[0].state_dict(), parts[0].state_dict())
    assert close(whole[3].module.state_dict(), parts[3].module.state_dict())
    assert parts[0].forwards == 3 * n and whole[0].forwards == 3
    _, opt, sched, ema, state = parts
    assert state.step == 3 and state.batch_in_epoch == 3  # positions count whole batches
    assert sched.last_epoch == 3 and ema.updates == 3
    assert all(s["step"].item() == 3 for s in opt.state.values())


def test_a_non_finite_micro_batch_skips_its_whole_step():
    module = Toy()
    calls = {"n": 0}

    def poison(g):  # the 2nd micro-batch of the 2nd step
        calls["n"] += 1
        return g * float("nan") if calls["n"] == 4 else g

    module.model[0].weight.register_hook(poison)
    data = full_batches(3, 8)
    _, _, sched, _, state = train(split(data, 2), 2, module=module)
    assert state.step == 2 and state.batch_in_epoch == 3 and sched.last_epoch == 2
    # the same weights as the two good whole batches alone: the bad one changed nothing
    assert close(module.state_dict(), train([data[0], data[2]], 1)[0].state_dict())

    # under the grad scaler, the step is skipped by the scaler and the scale backs off once, not per micro-batch
    module, calls["n"] = Toy(), 0
    module.model[0].weight.register_hook(poison)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    train(split(data, 2), 2, module=module, scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 9


# --------------------------------------------------------------------------- DDP
def _ddp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    module = nn.parallel.DistributedDataParallel(Toy())
    syncs = []

    def counting(state, bucket):
        syncs.append(1)
        return allreduce_hook(state, bucket)

    module.register_comm_hook(None, counting)
    data = full_batches(3, 16)  # each rank trains on its half of every global batch, in 2 micro-batches
    mine = [{k: v.chunk(2)[rank] for k, v in b.items()} for b in data]
    train(split(mine, 2), 2, module=module)
    torch.save({"weights": module.module.state_dict(), "syncs": len(syncs)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_accumulates_locally_and_synchronises_once_per_step(tmp_path):
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one_process = train(full_batches(3, 16), 1)[0].state_dict()
    for r in ranks:
        assert r["syncs"] == 3  # one all-reduce per optimiser step (one bucket), none for the first micro-batches
        assert close(r["weights"], one_process)


# --------------------------------------------------------------------------- the run
SMALL = [
    "data.num_train=12", "data.num_val=4", "data.num_verts=200", "data.img_size=64",
    "model_template.build.levels=[40,80,120]", "model_template.num_samples=12",
    "model.backbone=resnet18", "model.deconv_channels=16", "model.depth_bins=16", "model.joint_feature_hidden=16",
    "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2",
    "trainer.batch_size=4", "trainer.accumulate=2", "trainer.val_batch_size=4", "trainer.num_workers=0",
    "trainer.max_steps=4", "trainer.ckpt_every_steps=2", "trainer.record_samples=true", "logger.tensorboard=false",
]


def test_batch_size_not_divisible_by_accumulate_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"trainer\.accumulate=3 must be a whole number >= 1 that divides "
                                          r"trainer\.batch_size=32 .*trainer\.accumulate=2 or 4.*trainer\.batch_size="
                                          r"30 or 33"):
        check_config(compose_config("train", ["run_dir=/tmp/unused", "trainer.accumulate=3"]))
    for bad in ("0", "true", "1.5"):
        with pytest.raises(ConfigError, match=rf"trainer\.accumulate={bad.capitalize()}"):
            check_config(compose_config("train", ["run_dir=/tmp/unused", f"trainer.accumulate={bad}"]))


def test_resume_keeps_accumulate_and_reads_checkpoints_written_before_it_existed():
    """Another N changes what a step computes (BatchNorm statistics, the contrastive negatives): refused. A
    checkpoint from before the key existed trained one pass per step: absent means 1."""
    cfg = config_to_container(compose_config("train", ["run_dir=/tmp/unused"]))
    assert cfg["trainer"]["accumulate"] == 1 and "trainer.accumulate" not in RESUME_MAY_CHANGE
    old = {**cfg, "trainer": {k: v for k, v in cfg["trainer"].items() if k != "accumulate"}}
    saved = {"config": old, "train_state": {"world_size": 1, "batch_size": 32}}
    assert resume_mismatches(saved, cfg, world_size=1, batch_size=32) == []
    two = config_to_container(compose_config("train", ["run_dir=/tmp/unused", "trainer.accumulate=2"]))
    assert resume_mismatches(saved, two, world_size=1, batch_size=32) == ["trainer.accumulate: saved 1, now 2"]
    assert resume_mismatches({**saved, "config": two}, cfg, world_size=1, batch_size=32) == [
        "trainer.accumulate: saved 2, now 1"]


class Killed(Exception):
    pass


def test_a_run_killed_mid_accumulation_resumes_to_the_uninterrupted_runs_weights(tmp_path, monkeypatch):
    """Checkpoints are written only after whole optimiser steps (on_step, the epoch's end), so a run killed
    between the micro-batches of a step resumes from the step before it, whose position counts whole batches:
    nothing of the half-accumulated step survives, and the resumed run redoes it whole."""
    from cliphand3d.train import loop
    from cliphand3d.train import run as run_module

    full, killed = tmp_path / "full", tmp_path / "killed"
    run_module.train(compose_config("train", [f"run_dir={full}", *SMALL]))
    passes = {"n": 0}
    forward_backward = loop._forward_backward

    def die_mid_step_3(*args, **kw):  # step 3's 2nd micro-batch, its 1st one's gradients accumulated
        passes["n"] += 1
        if passes["n"] == 6:
            raise Killed
        return forward_backward(*args, **kw)

    monkeypatch.setattr(loop, "_forward_backward", die_mid_step_3)
    with pytest.raises(Killed):
        run_module.train(compose_config("train", [f"run_dir={killed}", *SMALL]))
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["train_state"]["step"] == 2  # ckpt_every_steps=2
    monkeypatch.setattr(loop, "_forward_backward", forward_backward)
    run_module.train(compose_config("train", [f"run_dir={killed}", "resume=auto", *SMALL]))

    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (full, killed))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    assert a["train_state"]["samples_seen"] == b["train_state"]["samples_seen"] == 16  # 4 steps of 4
    for part in ("model", "train_heads"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(x, y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
               for x, y in zip(s.values(), t.values()))
    # every step trained on one batch of 4 (2 micro-batches of 2); the resumed run took steps 3 and 4, across
    # the epoch's end
    steps = [json.loads(line) for line in (killed / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert [(s["step"], s["epoch"]) for s in steps] == [(1, 0), (2, 0), (3, 0), (4, 1)]
    assert all(len(s["index"]) == 4 for s in steps)
    uninterrupted = [json.loads(line) for line in (full / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert uninterrupted == steps


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-n", "0", "-q"]))
