"""Checkpoints: atomicity, weights_only round trips, exact resume, RNG replay, clear errors; EMA."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import cliphand3d.checkpoint.io as ckpt
from cliphand3d.checkpoint.io import load_checkpoint, save_checkpoint
from cliphand3d.checkpoint.state import capture_rng_state, compare_configs, config_to_container, restore_rng_state
from cliphand3d.checkpoint.weights import check_state_dict_compat, load_model_weights
from cliphand3d.errors import CheckpointError
from cliphand3d.train.ema import ModelEMA
from cliphand3d.train.resume import find_resume_checkpoint


class TinyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.joint_regressor = nn.Sequential(nn.Flatten(), nn.Dropout(0.2),
                                             nn.Linear(4 * 16, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.joint_regressor(self.backbone(x)))


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ema = ModelEMA(model, decay=0.9)
    return model, opt, sched, scaler, ema


def train_steps(model, opt, sched, scaler, ema, n: int):
    model.train()
    for _ in range(n):
        # Data, dropout and a numpy/python draw all come from the global RNGs that resume restores.
        x = torch.randn(4, 3, 4, 4) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update(model)


def full_state(model, opt, sched, scaler, ema, step: int, cfg) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict(), "step": step, "epoch": 0, "rng": capture_rng_state(),
            "config": config_to_container(cfg)}


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


CFG = OmegaConf.create({"model": {"backbone": {"name": "resnet18"}, "width": 8,
                                  "out": "${model.width}"},
                        "data": {"root": "/data/freihand"}, "seed": 0})


# ----------------------------------------------------------------------------- atomic save

@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, exc):
    target = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(target, {"step": 1, "w": torch.arange(5.0)})

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exc

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint(target, {"step": 2, "w": torch.zeros(5)})
    monkeypatch.undo()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]
    back = load_checkpoint(target)
    assert back["step"] == 1 and torch.equal(back["w"], torch.arange(5.0))


def test_save_replaces_and_refuses_unsafe_values(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})
    save_checkpoint(target, {"step": 2})
    assert load_checkpoint(target)["step"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with pytest.raises(TypeError, match=r"state\['metrics'\]\['pa'\].*numpy"):
        save_checkpoint(target, {"step": 3, "metrics": {"pa": np.float64(6.5)}})
    assert load_checkpoint(target)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("entry", ["model", "train_heads", "ema"])
def test_save_refuses_non_finite_weights_and_keeps_the_last_good_file(tmp_path, entry):
    target = tmp_path / "last.pt"
    good = {"model": {"w": torch.ones(3), "n": torch.tensor(2)}, "train_heads": {"s": torch.tensor(2.6)},
            "ema": {"updates": 1, "module": {"w": torch.ones(3)}}, "optimizer": {}, "step": 1}
    save_checkpoint(target, good)
    bad = {"model": {"w": torch.tensor([1.0, float("nan"), 1.0]), "n": torch.tensor(2)},
           "train_heads": {"s": torch.tensor(float("inf"))},
           "ema": {"updates": 2, "module": {"w": torch.tensor([float("-inf"), 1.0, 1.0])}}}[entry]
    where = {"model": r"model\.w", "train_heads": r"train_heads\.s", "ema": r"ema\.module\.w"}[entry]
    with pytest.raises(CheckpointError, match=rf"refusing to write .*last\.pt.*non-finite.*{where}"):
        save_checkpoint(target, {**good, entry: bad, "step": 2})
    assert load_checkpoint(target)["step"] == 1  # the last good checkpoint stays
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------- round trip, resume

def test_realistic_state_round_trips_with_weights_only(tmp_path):
    parts = make_training()
    train_steps(*parts, n=3)
    state = full_state(*parts, step=3, cfg=CFG)
    assert state["config"]["model"]["out"] == 8  # interpolation resolved before storage
    assert state["scaler"]["scale"] > 0 and state["optimizer"]["state"]
    path = save_checkpoint(tmp_path / "last.pt", state)
    assert_same(state, load_checkpoint(path))
    assert_same(state, torch.load(path, weights_only=True))


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    parts = make_training()
    train_steps(*parts, n=3)
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", full_state(*parts, step=3, cfg=CFG))
    train_steps(*parts, n=3)
    reference = parts[0].state_dict(), parts[4].module.state_dict()

    # A killed run: new process state, different seeds; everything must come from the file.
    random.seed(123), np.random.seed(123)
    model, opt, sched, scaler, ema = make_training(seed=99)
    found = find_resume_checkpoint(tmp_path, "auto")
    assert found == tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(found)
    load_model_weights(model, state["model"], str(found))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    ema.load_state_dict(state["ema"])
    restore_rng_state(state["rng"])
    assert compare_configs(state["config"], CFG) == []
    train_steps(model, opt, sched, scaler, ema, n=3)
    assert_same(reference[0], model.state_dict())
    assert_same(reference[1], ema.module.state_dict())


# ----------------------------------------------------------------------------- RNG

def _draws(gen: torch.Generator):
    return (random.random(), random.gauss(0, 1), random.gauss(0, 1),
            np.random.rand(3).tolist(), np.random.randn(3).tolist(), torch.rand(4).tolist(),
            torch.randint(0, 1000, (2,), generator=gen).tolist())


def test_rng_restore_reproduces_draws(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # leave cached Gaussians in both states
    state = capture_rng_state(generators={"sampler": gen})
    first = _draws(gen)
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draws(gen)  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], generators={"sampler": gen})
    assert _draws(gen) == first
    with pytest.raises(KeyError, match="loader"):
        restore_rng_state(state, generators={"loader": gen})


# ----------------------------------------------------------------------------- errors

def test_incompatible_state_dict_names_keys_shapes_and_config_group(tmp_path):
    saved = TinyNet(width=8).state_dict()
    saved["backbone.extra.weight"] = torch.zeros(2)
    del saved["head.bias"]
    model = TinyNet(width=6)
    where = str(tmp_path / "best.pt")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(model, saved, where)
    msg = str(info.value)
    for text in (where, "head.bias", "backbone.extra.weight",
                 "joint_regressor.2.weight: [8, 64] vs [6, 64]",
                 "head.weight: [3, 8] vs [3, 6]", "missing from the checkpoint (1)",
                 "unexpected in the checkpoint (1)", "shape mismatch",
                 "backbone.* -> model.backbone",
                 "joint_regressor.* -> model.deconv_channels", "head.* -> model.head"):
        assert text in msg, (text, msg)
    # Nothing was loaded: the check runs before load_state_dict.
    assert model.head.weight.shape == (3, 6)
    ok = TinyNet(width=6)
    load_model_weights(nn.DataParallel(ok), model.state_dict(), where)
    assert torch.equal(ok.head.weight, model.head.weight)


def test_mismatch_listing_is_capped_and_ddp_prefix_explained():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    wrong = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        check_state_dict_compat(model, wrong, "run/last.pt")
    msg = str(info.value)
    assert "missing from the checkpoint (24)" in msg and "... and 14 more" in msg
    assert "DDP" in msg


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.pt is not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    save_checkpoint(tmp_path / "full.pt", {"w": torch.ones(1000)})
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"a": np.ones(2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt holds objects that weights_only"):
        load_checkpoint(tmp_path / "pickled.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a cliphand3d checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- resume, configs

def test_find_resume_checkpoint(tmp_path):
    run = tmp_path / "run"
    for off in (None, False, "none", "None", "null", ""):
        assert find_resume_checkpoint(run, off) is None
    assert find_resume_checkpoint(run, "auto") is None  # fresh start
    last = save_checkpoint(run / "checkpoints" / "last.pt", {"step": 1})
    assert find_resume_checkpoint(run, "auto") == last
    assert find_resume_checkpoint(run, True) == last
    assert find_resume_checkpoint(tmp_path / "elsewhere", str(last)) == last
    assert find_resume_checkpoint(tmp_path / "elsewhere", run) == last
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        find_resume_checkpoint(run, str(tmp_path / "missing.pt"))


def test_compare_configs_lists_differing_dotted_keys():
    saved = {"model": {"backbone": {"name": "resnet50"}, "levels": [21, 98], "width": 8},
             "data": {"root": "/a"}, "optim": {"lr": 1e-3}, "loss": {"w": 1.0}}
    current = OmegaConf.create({"model": {"backbone": {"name": "resnet18"}, "levels": [21, 98, 195],
                                          "width": 8, "new": 1},
                                "data": {"root": "/a"}, "optim": {"lr": 1e-4}, "loss": {"w": 1}})
    assert compare_configs(saved, current) == ["model.backbone.name", "model.levels", "model.new"]
    assert compare_configs(saved, current, keys=None) == [
        "model.backbone.name", "model.levels", "model.new", "optim.lr"]


def test_config_to_container_is_plain_and_resolved():
    out = config_to_container(OmegaConf.create({"a": {"b": 2, "c": "${a.b}", "p": [1, None]}}))
    assert out == {"a": {"b": 2, "c": 2, "p": [1, None]}} and type(out) is dict
    with pytest.raises(TypeError, match=r"cfg\.x"):
        config_to_container({"x": object()})


# ----------------------------------------------------------------------------- EMA

def _const_net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_known_answer(warmup):
    d = 0.9
    net = _const_net(0.0)
    ema = ModelEMA(net, decay=d, warmup=warmup)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
        net[1].running_mean.fill_(7.0)
    ema.update(net)
    ema.update(net)
    # shadow_2 = d1 * d2 * 0 + (1 - d1 * d2) * 1 for a constant parameter 1 after starting at 0.
    d1, d2 = (min(d, 1 / 10), min(d, 2 / 11)) if warmup else (d, d)
    expected = 1.0 - d1 * d2
    for p in ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, expected), atol=1e-7, rtol=0)
        assert not p.requires_grad
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 7.0))  # copied, not averaged
    assert ema.updates == 2 and ema.current_decay() == (min(d, 3 / 12) if warmup else d)


def test_ema_fp32_shadow_frozen_params_wrapper_and_state_round_trip():
    net = _const_net(0.0).half()
    net[0].bias.requires_grad_(False)
    ema = ModelEMA(nn.DataParallel(net), decay=0.5, warmup=False)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    ema.update(nn.DataParallel(net))
    assert torch.equal(ema.module[0].weight, torch.full((2, 3), 0.5))
    assert torch.equal(ema.module[0].bias, torch.ones(2))  # frozen: copied
    other = ModelEMA(_const_net(3.0), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert_same(ema.module.state_dict(), other.module.state_dict())
    with pytest.raises(CheckpointError, match="EMA state"):
        ModelEMA(nn.Linear(3, 5)).load_state_dict(ema.state_dict())
