"""benchmarks/bench_crop_passes.py: the per-pixel passes of one crop beside its picture's decode (the figures in
docs/performance.md come from it)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_rows_are_the_passes_and_their_sum_over_the_decode(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_crop_passes.py"), "--images", str(tmp_path),
                          "--size", "32", "--repeats", "3"], capture_output=True, text=True, check=True).stdout
    rows = dict(re.findall(r"^\| (decode|warp|colour|CHW layout) \| ([0-9.]+) \|$", out, re.M))
    assert set(rows) == {"decode", "warp", "colour", "CHW layout"} and "32 px crops" in out
    total, ratio = re.search(r"^\| warp \+ colour \+ layout \| ([0-9.]+) \(([0-9.]+)x the decode\) \|$", out, re.M).groups()
    passes = float(rows["warp"]) + float(rows["colour"]) + float(rows["CHW layout"])
    assert abs(float(total) - passes) <= 0.2 and abs(float(ratio) - float(total) / float(rows["decode"])) <= 0.01


def test_a_folder_without_pictures_names_the_option(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_crop_passes.py"), "--images", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "--images DIR" in run.stderr
