"""What every benchmark section times and reports with: clocks (sync, timed, interleave, median), the
rows of a section (Rows), FLOP counts, thread settings, and tasks run in a fresh Python process.

Each figure is the median over repeats after warm-up. Each ratio divides two figures of the same run,
measured in alternating rounds (A B C A B C ...), so that drift in the machine's state (other work,
clock changes, a warm cache) hits both sides alike.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import cv2
import torch
from torch.utils.flop_counter import FlopCounterMode

# the child process's entry: run.child_main, which knows every section's tasks (see run_child)
CHILD_ENTRY = "import sys; from cliphand3d.apps.benchmark.run import child_main; child_main(sys.argv[1], sys.argv[2])"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], list[float]]:
    """fn -> a callable that runs it once and returns [seconds] (CUDA work waited for)."""
    def run() -> list[float]:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return [time.perf_counter() - t0]
    return run


def interleave(fns: dict[str, Callable[[], list[float]]], *, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run every fn `warmup` times untimed, then `rounds` rounds of one call each, the order rotating
    each round, so no candidate always runs first or right after the same neighbour. Each call returns
    its own samples (seconds). Returns name -> all samples."""
    names = list(fns)
    for _ in range(int(warmup)):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(int(rounds)):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].extend(fns[name]())
    return samples


def median(xs) -> float:
    return float(statistics.median(xs))


class Rows:
    """The rows one section reports; ratios are computed from rows already added (never typed in)."""

    def __init__(self, section: str):
        self.section = section
        self.items: list[dict] = []

    def add(self, name: str, value: float | None, unit: str, note: str = "") -> dict:
        if any(r["name"] == name for r in self.items):
            raise ValueError(f"benchmark {self.section}: two rows named {name!r}")
        row = {"section": self.section, "name": name, "value": None if value is None else float(value),
               "unit": unit, "note": note}
        self.items.append(row)
        return row

    def get(self, name: str) -> dict:
        return next(r for r in self.items if r["name"] == name)

    def ratio(self, name: str, num: str, den: str, note: str = "") -> dict:
        """Row `name` = value of row `num` / value of row `den` (same unit)."""
        a, b = self.get(num), self.get(den)
        if a["unit"] != b["unit"]:
            raise ValueError(f"ratio {name!r}: {num!r} is in {a['unit']} but {den!r} in {b['unit']}")
        row = self.add(name, a["value"] / b["value"], "x", note)
        row["ratio_of"] = [num, den]
        return row

    def skip(self, name: str, reason: str) -> dict:
        return self.add(name, None, "", reason)


def per_s(n: float, seconds: float, what: str) -> str:
    return f"{n / seconds:.1f} {what}/s"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions `fn` runs (forward and any backward inside),
    as torch.utils.flop_counter counts them: 2 per multiply-add."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@contextmanager
def num_threads(n: int | None, opencv: bool = False):
    """torch (and with `opencv`, OpenCV) on `n` threads for the block; None leaves them as they are."""
    old, old_cv = torch.get_num_threads(), cv2.getNumThreads()
    if n:
        torch.set_num_threads(int(n))
        if opencv:
            cv2.setNumThreads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)
        cv2.setNumThreads(old_cv)


def run_child(task: str, spec: dict) -> dict:
    """run.CHILD_TASKS[task](spec) in a fresh Python process (its memory peak is its own); its result dict,
    or {"error": ...}. A plain interpreter, not multiprocessing: nothing of the caller's main module runs."""
    with tempfile.TemporaryDirectory(prefix="cliphand3d_bench_") as tmp:
        result_file = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-c", CHILD_ENTRY, task, str(result_file)], input=json.dumps(spec),
                              capture_output=True, text=True)
        if result_file.is_file():
            return json.loads(result_file.read_text())
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"the {task} process ended without a result (exit code {proc.returncode}): {last}"}


def serve_child(tasks: dict[str, Callable[[dict], dict]], task: str, result_file: str) -> None:
    """The body of run_child's process: the spec on stdin, tasks[task](spec)'s result (or the error) as
    JSON in result_file."""
    spec = json.loads(sys.stdin.read())
    try:
        torch.set_num_threads(int(spec["threads"]))
        result = tasks[task](spec)
    except Exception as e:  # noqa: BLE001 - reported in the parent's table
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    Path(result_file).write_text(json.dumps(result, default=float))
