"""The training loop body (engine.train_one_epoch) on a toy module: the temperature comes back from
its bounds, non-finite gradients never reach the weights, and a step reads the device at most once."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

from cliphand3d.errors import NonFiniteLossError
from cliphand3d.losses import weighted_total
from cliphand3d.models.contrastive import PerAxisContrastiveLoss
from cliphand3d.train.ema import ModelEMA
from cliphand3d.train.loop import TrainState, train_one_epoch
from cliphand3d.train.optim import build_optimizer

AXES = ("x", "y", "z")


class ToyCriterion(nn.Module):
    def __init__(self, contrastive: nn.Module | None = None):
        super().__init__()
        self.contrastive = contrastive

    def total(self, terms):
        return weighted_total(terms, {"fit": 1.0, "clip": 1.0})


class Toy(nn.Module):
    """What the engine needs of TrainingModule: module(batch) -> (outputs, terms), .model, .criterion.
    Every forward records the weights it ran with."""

    def __init__(self, contrastive: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.criterion = ToyCriterion(contrastive)
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, batch):
        self.seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        out = self.model(batch["image"])
        terms = {"fit": (out - batch["target"]).abs().mean()}
        if self.criterion.contrastive is not None:
            terms.update(self.criterion.contrastive(batch["pose"], batch["text"]))
        return out, terms


def batches(n: int, *, pose=None, text=None):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        b = {"image": torch.randn(6, 4, generator=g), "target": torch.randn(6, 2, generator=g)}
        if pose is not None:
            b.update(pose=pose, text=text)
        out.append(b)
    return out


def run(module, loader, total_steps=100, **kw):
    opt = build_optimizer(module, lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainState()
    train_one_epoch(module, loader, opt, sched, state, device=torch.device("cpu"), total_steps=total_steps,
                    amp="off", grad_clip=1.0, **kw)
    return state, opt, sched


def orthonormal(n: int, d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(0)))
    return q.t().contiguous()


@pytest.mark.parametrize("side", ["above", "below"])
def test_temperature_pushed_past_its_bound_comes_back(side):
    # Mismatched pairs: the loss grows with the scale, so its gradient pushes the scale down; matched
    # pairs push it up. Start beyond the bound on the side the gradient pushes away from.
    e = orthonormal(6, 8)
    pose = {a: e for a in AXES}
    text = {a: (e.roll(1, dims=0) if side == "above" else e) for a in AXES}
    start = math.log(100.0) + 1.0 if side == "above" else math.log(1.0) - 1.0
    clip = PerAxisContrastiveLoss(axes=AXES, init_logit_scale=math.log(10.0), gather=False)
    with torch.no_grad():
        for a in AXES:
            clip.logit_scale[a].fill_(start)
    module = Toy(clip)
    run(module, batches(5, pose=pose, text=text))
    for a in AXES:
        s = clip.logit_scale[a]
        assert 0.0 <= s.item() <= math.log(100.0) + 1e-6
        if side == "above":
            assert s.item() < math.log(100.0) - 1e-3  # left the bound, not just clamped onto it
        else:
            assert s.item() > 1e-3
        assert s.grad is not None and s.grad.abs().item() > 0  # the forward keeps the scale's gradient


def poison_backward(param: nn.Parameter, bad: set[int]):
    """NaN gradient for `param` on the backward passes numbered in `bad` (0-based)."""
    calls = {"n": 0}

    def hook(g):
        n, calls["n"] = calls["n"], calls["n"] + 1
        return g * float("nan") if n in bad else g

    param.register_hook(hook)


def finite(weights: dict) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values())


def test_one_non_finite_gradient_skips_that_step_only():
    module = Toy()
    poison_backward(module.model[0].weight, bad={2})
    ema = ModelEMA(module.model, decay=0.9)
    state, opt, sched = run(module, batches(5), ema=ema)
    seen = module.seen  # weights at each forward; the 3rd batch had the NaN gradient
    assert not torch.equal(seen[1]["0.weight"], seen[2]["0.weight"])  # normal steps move the weights
    assert all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])  # the bad batch changed nothing
    assert finite(module.model.state_dict()) and finite(ema.module.state_dict())
    assert state.step == 4 and state.batch_in_epoch == 5  # 5 batches consumed, 4 optimiser steps
    assert sched.last_epoch == 4 and ema.updates == 4
    assert all(s["step"].item() == 4 for s in opt.state.values())


def test_persistent_non_finite_gradients_stop_with_step_and_parameter():
    module = Toy()
    poison_backward(module.model[0].weight, bad=set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient.* at step 1 .*model\.0\.weight") as err:
        run(module, batches(8))  # default: stop at the 3rd bad batch in a row
    assert "model.0.bias" not in str(err.value)
    assert len(module.seen) == 4  # one good batch, then three bad ones
    assert all(torch.equal(module.seen[i][k], module.seen[1][k]) for i in (2, 3) for k in module.seen[1])
    assert finite(module.model.state_dict())


def test_a_step_reads_the_device_once_and_the_loss_every_log_every_steps(monkeypatch):
    # Each of these makes the host wait for the device (on CUDA); count the calls made by the training loop
    # (train/loop.py and the guards it calls, train/guards.py).
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.endswith((f"train{os.sep}loop.py", f"train{os.sep}guards.py")):
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Bar:
        def __init__(self):
            self.updates, self.postfix_at = 0, []

        def update(self, n=1):
            self.updates += n

        def set_postfix(self, **k):
            self.postfix_at.append(self.updates)

    logged = []
    bar = Bar()
    run(Toy(), batches(7), log=lambda tag, v, step: logged.append((tag, step, v)), log_every=3, progress=bar)
    assert calls == ["tolist"] * 7, calls  # one read per step, the logged values riding along
    assert bar.updates == 7 and bar.postfix_at == [1, 3, 6]
    loss_steps = [s for tag, s, _ in logged if tag == "train/loss"]
    assert loss_steps == [1, 3, 6]
    assert all(isinstance(v, float) and math.isfinite(v) for _, _, v in logged)


def test_fused_adamw_takes_the_same_steps():
    """optim.fused is a speed option: after several steps the weights equal the per-tensor AdamW's."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        start = [p.detach().clone() for p in module.parameters()]
        opt = build_optimizer(module, lr=0.05, weight_decay=0.01, fused=fused)
        assert bool(opt.defaults.get("fused")) is fused
        for b in batches(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(module(b["image"]), b["target"]).backward()
            opt.step()
        results.append([p.detach().clone() for p in module.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(results[0], start)) > 1e-2  # the steps did something
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def _synthetic_preds(n: int = 3):
    """A small synthetic val set and predictions whose labels come, as predict's do, from the float32 items."""
    import numpy as np

    from cliphand3d.data.synthetic import SyntheticHands

    ds = SyntheticHands(length=n, split="val", img_size=32, num_verts=778, view="upright")
    items = [ds[i] for i in range(n)]
    preds = {"index": np.arange(n),
             "gt_xyz": np.stack([it["joints_xyz"].numpy() for it in items]),
             "gt_verts": np.stack([it["verts_xyz"].numpy() for it in items])}
    preds["pred_xyz"], preds["pred_verts"] = preds["gt_xyz"] + 0.01, preds["gt_verts"] + 0.01
    return ds, preds


def test_exact_labels_are_the_float64_annotations_the_items_rounded():
    import numpy as np

    from cliphand3d.evaluation.predict import exact_labels

    ds, preds = _synthetic_preds()
    out = exact_labels(ds, preds)
    truth = [ds.hand(i) for i in range(3)]
    assert out["gt_xyz"].dtype == np.float64
    assert np.array_equal(out["gt_xyz"], np.stack([h.xyz for h in truth]))  # unrounded: the generator's own
    assert np.array_equal(out["gt_verts"], np.stack([h.verts for h in truth]))
    assert 0 < np.abs(out["gt_xyz"] - preds["gt_xyz"]).max() < 1e-6  # what float32 had changed
    preds["gt_xyz"] = preds["gt_xyz"] + 1e-3  # items that no longer match their labels are a bug, not silently fixed
    with pytest.raises(RuntimeError, match="gt_xyz from label_targets differs"):
        exact_labels(ds, preds)


def test_train_time_validation_scores_against_the_same_float64_labels_as_eval(monkeypatch):
    import numpy as np

    from cliphand3d.evaluation import scoring

    ds, preds = _synthetic_preds()
    monkeypatch.setattr(scoring, "predict", lambda *a, **k: dict(preds))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    res, seen = scoring.validate(None, loader, torch.device("cpu"), "freihand")
    assert np.array_equal(seen["gt_xyz"], np.stack([ds.hand(i).xyz for i in range(3)]))
    assert res["pa_mpjpe_mm"] < 1e-3  # a shifted copy of the labels aligns onto them (to float32 rounding)
