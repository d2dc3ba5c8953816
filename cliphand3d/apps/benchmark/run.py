"""`python scripts/benchmark.py`: what inference, training and data cost on this machine, in one run.

Sections (configs/benchmark.yaml `sections`) are one module each, each with its `bench_<section>`
function: inference, params, train_step, loader, joint_features, options, eval_stream;
docs/benchmark.md says what each measures and how to read it. This module runs the chosen sections in
turn, marks the targets and writes the results.

Results are rows {section, name, value, unit, note}. A ratio row also names the two rows it divides
(`ratio_of`), so every ratio can be recomputed from the figures beside it; `target` / `met` say how a
row compares with the targets in configs/benchmark.yaml (`targets`).
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ...errors import ConfigError
from ...runtime import pick_device
from .eval_stream import bench_eval_stream, eval_stream_task
from .harness import serve_child
from .inference import bench_inference
from .joint_features import bench_joint_features, step_memory_task
from .loader import bench_loader
from .machine import environment
from .options import bench_options
from .params import bench_params
from .train_step import bench_train_step

log = logging.getLogger(__name__)

SECTIONS = ("inference", "params", "train_step", "loader", "joint_features", "options", "eval_stream")
CHILD_TASKS = {"step_memory": step_memory_task, "eval_stream": eval_stream_task}
SECTION_FUNCS = {"inference": bench_inference, "params": bench_params, "train_step": bench_train_step,
                 "loader": bench_loader, "joint_features": bench_joint_features, "options": bench_options,
                 "eval_stream": bench_eval_stream}


def check_sections(sections) -> list[str]:
    names = [str(s) for s in sections]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"benchmark: sections={unknown} unknown; choose from {list(SECTIONS)}, e.g. "
                          "sections=[inference,params]")
    return names


def apply_targets(rows: list[dict], targets) -> None:
    """Mark the rows named in `targets` ("section/name": "<= 1.25") with the target and whether it is met."""
    for key, rule in (targets or {}).items():
        m = re.fullmatch(r"\s*(<=|>=)\s*([0-9.eE+-]+)\s*", str(rule))
        if m is None:
            raise ConfigError(f"benchmark: targets[{key!r}]={rule!r}: write '<= number' or '>= number'")
        for r in rows:
            if f"{r['section']}/{r['name']}" == key and r["value"] is not None:
                bound = float(m.group(2))
                r["target"] = f"{m.group(1)} {m.group(2)}"
                r["met"] = r["value"] <= bound if m.group(1) == "<=" else r["value"] >= bound


def run_benchmark(cfg: DictConfig) -> dict:
    """Every section of `cfg.sections` in turn; writes benchmark.json and benchmark.md into cfg.out_dir
    and returns the results."""
    sections = check_sections(cfg.sections)
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = pick_device(str(cfg.device), 0, key="device")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"env": environment(device), "sections": sections, "rows": [], "raw": {}, "section_wall_s": {},
               "config": OmegaConf.to_container(cfg, resolve=True)}
    shared: dict = {}
    for name in sections:
        log.info("benchmark: %s", name)
        ts = time.perf_counter()
        rows, raw = SECTION_FUNCS[name](cfg, device, shared)
        results["rows"].extend(rows)
        results["raw"][name] = raw
        results["section_wall_s"][name] = time.perf_counter() - ts
    apply_targets(results["rows"], cfg.get("targets"))
    results["wall_s"] = time.perf_counter() - t0
    write_results(results, out)
    return results


def fmt_value(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.3e}"


def markdown(results: dict) -> str:
    """The results as one Markdown table, one row per measurement, under a line naming the machine."""
    e = results["env"]
    head = (f"CPU {e['cpu']} ({e['vector']}), {e['cores']} cores, {e['threads']} torch threads, torch {e['torch']}, "
            f"device {e['device']}{', ' + e['gpu'] if e.get('gpu') else ''}, commit {e.get('commit') or '?'}; "
            f"wall {results['wall_s']:.0f} s; medians over repeats after warm-up")
    lines = [head, "", "| section | measurement | value | unit | target | note |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        target = r.get("target", "")
        if target:
            target += " met" if r["met"] else " MISSED"
        lines.append(f"| {r['section']} | {r['name']} | {fmt_value(r['value'])} | {r['unit']} | {target} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> None:
    (out / "benchmark.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "benchmark.md").write_text(markdown(results))


def child_main(task: str, result_file: str) -> None:
    """Entry of harness.run_child's process: the spec on stdin, CHILD_TASKS[task]'s result (or the error)
    as JSON in result_file."""
    serve_child(CHILD_TASKS, task, result_file)
