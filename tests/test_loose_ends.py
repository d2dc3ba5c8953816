"""Small things a run depends on: the AUC and the PCK legend on every numpy the project allows, loader workers
that do not outlive a killed parent, and the bad-gradient streak counted across epoch boundaries."""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cliphand3d import metrics, viz
from cliphand3d.errors import NonFiniteGradientError
from cliphand3d.losses import weighted_total
from cliphand3d.train.loop import TrainState, train_one_epoch
from cliphand3d.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- numpy 1.x
def test_the_auc_and_the_pck_legend_use_no_numpy_2_function(monkeypatch):
    """numpy 1.x (pyproject allows >= 1.24) has no np.trapezoid, numpy >= 2.4 no np.trapz: neither may be needed."""
    import matplotlib.pyplot as plt

    monkeypatch.delattr(np, "trapezoid", raising=False)
    monkeypatch.delattr(np, "trapz", raising=False)
    # PCK 0, .5, 1, 1 at 0, 10, 20, 30 mm: trapezoids 2.5 + 7.5 + 10 = 20 over a range of 30
    fig = viz.pck_figure({"ours": ([0.0, 10.0, 20.0, 30.0], [0.0, 0.5, 1.0, 1.0])})
    try:
        assert [line.get_label() for line in fig.axes[0].get_lines()] == ["ours (AUC 0.667)"]
    finally:
        plt.close(fig)
    # thresholds 0, 25, 50 mm, every keypoint 25 mm off (counted at t >= d): PCK 0, 1, 1, area 0.75
    assert metrics.auc(np.full((2, 3), 0.025), steps=3) == pytest.approx(0.75, abs=1e-12)


# Present in numpy 2 only (1.24 lacks them), or removed in numpy 2.x: calls to either break one end of
# pyproject's numpy range.
NUMPY_ONE_END_ONLY = {
    "trapezoid", "concat", "isdtype", "unique_all", "unique_counts", "unique_inverse", "unique_values",
    "permute_dims", "matrix_transpose", "vecdot", "astype", "bitwise_count", "cumulative_sum", "cumulative_prod",
    "pow", "acos", "asin", "atan", "atan2", "acosh", "asinh", "atanh", "bitwise_left_shift", "bitwise_right_shift",
    "bitwise_invert", "long", "ulong", "exceptions", "dtypes",  # numpy >= 2 (exceptions, dtypes: >= 1.25)
    "trapz", "in1d", "row_stack", "product", "cumproduct", "alltrue", "sometrue", "msort", "float_", "complex_",
    "Inf", "NaN", "PINF", "NINF", "infty", "Infinity", "string_", "unicode_", "round_", "find_common_type",
}


def test_no_module_uses_a_numpy_name_from_one_end_of_the_allowed_range():
    used = []
    for folder in ("cliphand3d", "scripts", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "np"
                        and node.attr in NUMPY_ONE_END_ONLY):
                    used.append(f"{path.relative_to(REPO)}:{node.lineno} np.{node.attr}")
    assert not used, used


# --------------------------------------------------------------------------- loader workers
PARENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from cliphand3d.runtime import make_loader

    marks = Path(sys.argv[1])

    class Busy(torch.utils.data.Dataset):
        # each worker's first item leaves a mark and then keeps it busy: torch's own check on its parent
        # (between items) never runs
        def __len__(self):
            return 8

        def __getitem__(self, i):
            (marks / str(os.getpid())).touch()
            time.sleep(600)
            return torch.tensor([i])

    loader = make_loader(Busy(), batch_size=1, num_workers=2, device=torch.device("cpu"))
    batches = iter(loader)
    while len(list(marks.iterdir())) < 2:
        time.sleep(0.01)
    print(" ".join(str(w.pid) for w in batches._workers), flush=True)
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie (waiting for whoever adopted it to reap it) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_die_with_a_killed_parent_even_busy_or_stopped(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(marks)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    workers = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(p) for p in workers)
        os.kill(workers[0], signal.SIGSTOP)  # as the benchmark stops a run's workers between its turns
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in workers if alive(p)] == []
    finally:
        parent.kill()
        for pid in workers:  # never leave them behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- non-finite gradients
class Toy(nn.Module):
    """What the loop needs of TrainingModule: module(batch) -> (outputs, terms), .model, .criterion.total."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2)
        self.criterion = nn.Module()
        self.criterion.total = lambda terms: weighted_total(terms, {"fit": 1.0})

    def forward(self, batch):
        out = self.model(batch["image"])
        return out, {"fit": (out - batch["target"]).abs().mean()}


def test_bad_gradients_in_a_row_are_counted_across_the_epoch_boundary():
    module = Toy()
    calls = {"n": 0}

    def poison(g):  # the last two batches of epoch 0 and the first of epoch 1
        calls["n"] += 1
        return g * float("nan") if calls["n"] in (3, 4, 5) else g

    module.model.weight.register_hook(poison)
    g = torch.Generator().manual_seed(1)
    epoch = [{"image": torch.randn(4, 3, generator=g), "target": torch.randn(4, 2, generator=g)} for _ in range(4)]
    opt = build_optimizer(module, lr=0.01, weight_decay=0.0)
    state = TrainState()
    kw = dict(device=torch.device("cpu"), total_steps=100, amp="off", max_nonfinite_steps=3)
    train_one_epoch(module, epoch, opt, None, state, **kw)
    assert state.step == 2 and calls["n"] == 4  # two good steps, then two batches skipped
    at_epoch_end = state.to_dict()  # what a checkpoint written at the epoch's end holds
    state.epoch, state.batch_in_epoch = 1, 0
    with pytest.raises(NonFiniteGradientError, match=r"3 batch\(es\) in a row"):
        train_one_epoch(module, epoch, opt, None, state, **kw)
    assert calls["n"] == 5 and state.step == 2
    # a resumed run goes on counting; a checkpoint written before the counter existed means 0
    assert TrainState.from_dict(at_epoch_end).bad_in_a_row == 2
    assert TrainState.from_dict({k: v for k, v in at_epoch_end.items() if k != "bad_in_a_row"}).bad_in_a_row == 0
