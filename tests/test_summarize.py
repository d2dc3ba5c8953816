"""Run summariser on a constructed multirun tree."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cliphand3d.summarize import collect_runs, format_table, main

REPO = Path(__file__).resolve().parents[1]


def _job(root: Path, name: str, overrides, metrics, where: str = "") -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    out = job / where if where else job
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def multirun(tmp_path):
    root = tmp_path / "multirun" / "2026-11-24" / "10-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    _job(root, "10", ["model.backbone.name=resnet18", "optim.lr=0.001"],
         {"mpjpe_mm": 12.3456, "pa_mpjpe_mm": 7.1, "auc_pa_0_50": 0.85678, "f5": 0.7,
          "retrieval_y_256": 0.9, "retrieval_x_256": 0.88, "retrieval_x_16": 0.99, "zeta": 3,
          "alpha": 0.123456, "checkpoint": "/runs/10/checkpoints/best.pt",
          "baseline_mean_pose": {"pa_mpjpe_mm": 47.3}}, where="eval_best")
    _job(root, "2", ["model.backbone.name=resnet50", "prompt=figure3_k10"],
         {"pa_mpjpe_mm": 6.471, "f15": 0.98123, "pa_mpvpe_mm": 6.0})
    (root / "3").mkdir()
    (root / "3" / "metrics.json").write_text("{ truncated")  # a crashed job is skipped
    (root / "4" / "eval").mkdir(parents=True)  # no .hydra anywhere above: no overrides
    (root / "4" / "eval" / "metrics.json").write_text(json.dumps({"mpjpe_mm": 9.0}))
    return root


def test_collect_runs_pairs_metrics_with_nearest_overrides(multirun):
    rows = collect_runs(multirun)
    assert rows == [
        {"path": "2", "run_dir": "2",
         "overrides": ["model.backbone.name=resnet50", "prompt=figure3_k10"],
         "metrics": {"pa_mpjpe_mm": 6.471, "f15": 0.98123, "pa_mpvpe_mm": 6.0}},
        {"path": "4/eval", "run_dir": None, "overrides": [], "metrics": {"mpjpe_mm": 9.0}},
        {"path": "10/eval_best", "run_dir": "10",
         "overrides": ["model.backbone.name=resnet18", "optim.lr=0.001"],
         "metrics": {"mpjpe_mm": 12.3456, "pa_mpjpe_mm": 7.1, "auc_pa_0_50": 0.85678, "f5": 0.7,
                     "retrieval_y_256": 0.9, "retrieval_x_256": 0.88, "retrieval_x_16": 0.99,
                     "zeta": 3, "alpha": 0.123456, "checkpoint": "/runs/10/checkpoints/best.pt",
                     "baseline_mean_pose.pa_mpjpe_mm": 47.3}},
    ]


def test_markdown_table_orders_and_formats_columns(multirun):
    lines = format_table(collect_runs(multirun)).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["run", "overrides", "pa_mpjpe_mm", "mpjpe_mm", "auc_pa_0_50",
                        "pa_mpvpe_mm", "f5", "f15", "retrieval_x_16", "retrieval_x_256",
                        "retrieval_y_256", "alpha", "zeta"]
    assert cells[1][2].endswith(":") and set(cells[1][2]) == {"-", ":"}
    assert cells[2] == ["2", "model.backbone.name=resnet50 prompt=figure3_k10",
                        "6.47", "", "", "6.00", "", "0.981", "", "", "", "", ""]
    assert cells[3][:4] == ["4/eval", "", "", "9.00"]
    assert cells[4] == ["10/eval_best", "model.backbone.name=resnet18 optim.lr=0.001",
                        "7.10", "12.35", "0.857", "", "0.700", "", "0.990", "0.880", "0.900",
                        "0.1235", "3"]
    assert len({len(line) for line in lines}) == 1  # padded columns line up


def test_csv_round_trips_through_csv_module(multirun):
    rows = collect_runs(multirun)
    text = format_table(rows, fmt="csv", metrics=["pa_mpjpe_mm", "f5", "missing",
                                                  "baseline_mean_pose.pa_mpjpe_mm", "checkpoint"])
    back = list(csv.DictReader(io.StringIO(text)))
    assert [r["run"] for r in back] == ["2", "4/eval", "10/eval_best"]
    assert [r["baseline_mean_pose.pa_mpjpe_mm"] for r in back] == ["", "", "47.3"]
    assert back[2]["checkpoint"] == "/runs/10/checkpoints/best.pt"
    assert [r["overrides"] for r in back] == [" ".join(r["overrides"]) for r in rows]
    assert [r["pa_mpjpe_mm"] for r in back] == ["6.471", "", "7.1"]
    assert [r["f5"] for r in back] == ["", "", "0.7"] and all(r["missing"] == "" for r in back)
    with pytest.raises(ValueError, match="fmt"):
        format_table(rows, fmt="tex")


def test_main_prints_and_writes_files(multirun, tmp_path, capsys):
    out_csv, out_md = tmp_path / "o" / "t.csv", tmp_path / "o" / "t.md"
    assert main([str(multirun), "--csv", str(out_csv), "--md", str(out_md)]) == 0
    printed = capsys.readouterr().out
    assert printed == out_md.read_text() and printed.startswith("| run")
    assert len(list(csv.reader(out_csv.open(newline="")))) == 4


def test_empty_folder_is_a_clear_error_with_exit_code_1(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"),
                           str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no metrics.json under" in proc.stderr and proc.stdout == ""
    assert main([str(tmp_path / "absent")]) == 1
