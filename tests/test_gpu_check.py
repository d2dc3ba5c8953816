"""benchmarks/cuda_check.py, the prepared GPU check, in its tiny CPU mode: a GPU node's run (a FreiHAND-format
layout, +experiment=freihand training whose loss must fall, eval.py, the demo) goes through on a CPU, and the
report says what it measured. Its torchrun, ONNX and timing steps run scripts that tests/test_resume_ddp.py,
test_multi_gpu.py, test_export.py and test_benchmark.py cover on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_end_to_end_in_its_tiny_cpu_mode(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--tiny", "--device", "cpu",
                          "--skip", "torchrun,export,inference", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "cuda_check.json").read_text())
    assert report["failed"] is None
    rows = {name: (result, details) for name, result, details in report["rows"]}
    # (torchrun, the ONNX export and inference timing are left to their own tests on the CPU)
    assert {"train off", "eval.py (test split)", "demo.py (one image)", "host syncs per step"} <= set(rows)
    loss = rows["train off"][1].split("loss ")[1].split(" over")[0]
    first, last = (float(x) for x in loss.split(" -> "))
    assert last < first  # what the check asserts, as reported
    assert rows["eval.py (test split)"][0].startswith("PA-MPJPE ")
    assert (tmp_path / "cuda_check.md").read_text() in res.stdout


def test_the_gpu_check_refuses_cuda_where_there_is_none(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and "--device cpu --tiny" in res.stderr
