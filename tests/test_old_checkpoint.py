"""Checkpoints written before the package was restructured still load, evaluate and resume.

tests/fixtures/pre_restructure_run.tar.xz holds a training checkpoint written by the code of commit d5a57a2
(a 6-step run stopped after its step-4 checkpoint; tests/fixtures/make_pre_restructure_run.py says how it
was made) and what that code computed from it: eval.py's metrics and the metrics of `resume=auto` at step 6
(reference.json). The `_target_` paths stored in its config must still import, and today's code must compute
the same figures. On the machine that wrote the fixture they agree exactly; another CPU may round differently,
hence the small tolerances.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from hydra.utils import get_object

from cliphand3d.build import compose_config, load_model
from cliphand3d.checkpoint.io import load_checkpoint
from cliphand3d.evaluation.run import run_eval
from cliphand3d.train.run import train

FIXTURE = Path(__file__).parent / "fixtures" / "pre_restructure_run.tar.xz"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre_restructure")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(out, filter="data")
    return out


def reference(old_run: Path) -> dict:
    return json.loads((old_run / "reference.json").read_text())


def close_to(got: dict, want: dict) -> None:
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, value in want.items():
        # a retrieval accuracy over 16 samples moves in steps of 1/16: allow two flips where another CPU rounds
        # differently
        tol = dict(abs=0.13) if key.startswith("retrieval") else dict(rel=1e-3, abs=2e-3)
        assert got[key] == pytest.approx(value, nan_ok=True, **tol), key


def targets(node, out: list) -> list:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                out.append(v)
            else:
                targets(v, out)
    elif isinstance(node, list):
        for v in node:
            targets(v, out)
    return out


def test_every_target_path_it_stores_still_imports(old_run):
    ckpt = load_checkpoint(old_run / "checkpoints" / "last.pt")
    assert ckpt["train_state"]["step"] == 4
    paths = set(targets(ckpt["config"], []))
    assert {"cliphand3d.models.cliphand3d.CLIPHand3D", "cliphand3d.losses.CLIPHand3DLoss",
            "cliphand3d.data.synthetic.SyntheticHands", "cliphand3d.data.transforms.CropAugment"} <= paths
    for path in paths:
        assert callable(get_object(path)), path


def test_it_loads_and_evaluates_as_before(old_run, tmp_path):
    ckpt_path = old_run / "checkpoints" / "last.pt"
    model, cfg, _ = load_model(ckpt_path)  # EMA weights, as eval.py reads them
    assert not model.training and cfg.model.widths == [16, 16, 8, 8, 8]
    cfg = compose_config("eval")
    cfg.ckpt, cfg.out_dir, cfg.num_workers = str(ckpt_path), str(tmp_path / "eval"), 0
    res = run_eval(cfg)
    close_to(res, reference(old_run)["eval"])
    assert res["retrieval_x_16"] >= 0  # the text branch was rebuilt from config and the stored adapters


def test_it_resumes_where_it_stopped(old_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(old_run / "checkpoints", run / "checkpoints")
    overrides = json.loads((old_run / "overrides.json").read_text())
    last = train(compose_config("train", [f"run_dir={run}", *overrides, "resume=auto"]))
    summary = json.loads((run / "train_summary.json").read_text())
    want = reference(old_run)["resume"]
    assert summary["steps"] == want["steps"] == 6
    # the validations before the stop came with the checkpoint; the run added step 6's
    assert [h["step"] for h in load_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["history"]] == [2, 4, 6]
    close_to(last, want["last"])
