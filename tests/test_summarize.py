"""Run summariser on a constructed multirun tree."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cliphand3d.apps.summarize import collect_runs, format_table, main

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


@pytest.fixture()
def ablation(tmp_path):
    """4 runs of 2 variants x 2 seeds (+ a diverged third seed), metrics in eval_best/ as final_eval writes."""
    root = tmp_path / "ablation"
    root.mkdir()
    figures = {("pose_only", 0): (20.0, 0.50, None), ("pose_only", 1): (22.0, 0.46, None),
               ("clip_demo", 0): (18.0, 0.60, 0.25), ("clip_demo", 1): (19.0, 0.58, 0.35)}
    for (variant, seed), (pa, auc, ret) in figures.items():
        m = {"pa_mpjpe_mm": pa, "auc_pa_0_50": auc, "split": "test", "num_samples": 1000}
        if ret is not None:
            m["retrieval_x_64"] = ret
        _job(root, f"{variant}/seed{seed}", ["+experiment=ablation", f"variant={variant}", f"seed={seed}"], m,
             where="eval_best")
    return root


def test_group_runs_one_row_per_variant_with_mean_min_max_and_n(ablation):
    from cliphand3d.apps.summarize import format_groups, group_runs

    groups = group_runs(collect_runs(ablation), over="seed")
    assert [(g["label"], g["n"], g["values"]) for g in groups] == [
        ("variant=clip_demo", 2, ["0", "1"]), ("variant=pose_only", 2, ["0", "1"])]  # the shared override dropped
    back = list(csv.DictReader(io.StringIO(format_groups(groups, "seed", "csv",
                                                         ["pa_mpjpe_mm", "retrieval_x_64"]))))
    assert [(r["variant"], r["n"], r["seed"]) for r in back] == [("variant=clip_demo", "2", "0 1"),
                                                                 ("variant=pose_only", "2", "0 1")]
    assert [float(back[0][f"pa_mpjpe_mm_{s}"]) for s in ("mean", "min", "max")] == [18.5, 18.0, 19.0]
    assert [float(back[1][f"pa_mpjpe_mm_{s}"]) for s in ("mean", "min", "max")] == [21.0, 20.0, 22.0]
    assert float(back[0]["retrieval_x_64_mean"]) == pytest.approx(0.30) and back[1]["retrieval_x_64_mean"] == ""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in format_groups(groups).splitlines()]
    assert cells[0] == ["variant", "n", "seed", "pa_mpjpe_mm", "auc_pa_0_50", "retrieval_x_64"]  # default columns
    assert cells[2] == ["variant=clip_demo", "2", "0 1", "18.50 [18.00, 19.00]", "0.590 [0.580, 0.600]",
                        "0.300 [0.250, 0.350]"]
    assert cells[3][3:] == ["21.00 [20.00, 22.00]", "0.480 [0.460, 0.500]", ""]


def test_group_runs_keeps_a_diverged_seed_visible_and_separates_evaluations(ablation):
    from cliphand3d.apps.summarize import format_groups, group_runs

    _job(ablation, "pose_only/seed2", ["+experiment=ablation", "variant=pose_only", "seed=2"],
         {"pa_mpjpe_mm": float("nan"), "auc_pa_0_50": 0.1, "split": "test"}, where="eval_best")
    # the same run scored again elsewhere (eval.py split=val out_dir=...): not averaged with the test rows
    (ablation / "clip_demo" / "seed0" / "eval_val").mkdir()
    (ablation / "clip_demo" / "seed0" / "eval_val" / "metrics.json").write_text(
        json.dumps({"pa_mpjpe_mm": 1.0, "split": "val"}))
    groups = group_runs(collect_runs(ablation), over="seed")
    labels = {g["label"]: g for g in groups}
    assert set(labels) == {"variant=clip_demo (eval_best, test)", "variant=clip_demo (eval_val, val)",
                           "variant=pose_only (eval_best, test)"}
    assert labels["variant=pose_only (eval_best, test)"]["n"] == 3
    back = {r["variant"]: r for r in csv.DictReader(io.StringIO(format_groups(groups, "seed", "csv")))}
    assert back["variant=pose_only (eval_best, test)"]["pa_mpjpe_mm_mean"] == "nan"  # not the mean of the other two
    assert float(back["variant=pose_only (eval_best, test)"]["auc_pa_0_50_mean"]) == pytest.approx((0.50 + 0.46 + 0.1) / 3)
    assert float(back["variant=clip_demo (eval_best, test)"]["pa_mpjpe_mm_mean"]) == 18.5


def test_main_over_seed_writes_the_grouped_tables(ablation, tmp_path, capsys):
    out_md, out_csv = tmp_path / "g.md", tmp_path / "g.csv"
    assert main([str(ablation), "--over", "seed", "--md", str(out_md), "--csv", str(out_csv),
                 "--metrics", "pa_mpjpe_mm"]) == 0
    printed = capsys.readouterr().out
    assert printed == out_md.read_text() and printed.startswith("| variant") and "21.00 [20.00, 22.00]" in printed
    assert next(csv.reader(out_csv.open(newline=""))) == ["variant", "n", "seed", "pa_mpjpe_mm_mean",
                                                          "pa_mpjpe_mm_min", "pa_mpjpe_mm_max"]
