"""The machine a benchmark runs on: CPU model and vector extensions, threads, versions, commit, memory."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ...build import CONFIGS

MB = 2.0 ** 20


def cpu_name() -> str:
    """`lscpu`'s model name (first "model name" of /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def vector_extensions() -> str:
    flags = cpu_flags()
    if not flags:
        return "unknown"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CONFIGS.parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """What a reader needs to compare this run with another: CPU, vector units, threads, versions."""
    flags = cpu_flags()
    env = {"cpu": cpu_name(), "vector": vector_extensions(), "cpu_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
           "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "device": str(device), "commit": git_commit()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def memory_mb(field: str = "VmRSS") -> float | None:
    """This process's resident (VmRSS) or peak resident (VmHWM) memory in MiB; None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if field == "VmHWM":
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (MB if sys.platform == "darwin" else 1024.0)
    return None
