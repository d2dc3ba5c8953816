"""Shared test plumbing: offline model hubs and a session cache of on-disk fixture folders."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import huggingface_hub
# Under pytest-xdist every worker would otherwise start one compute thread per core, and so would the scripts
# it runs: 2 workers x 2 threads on 2 cores spin against each other. Each worker (and what it starts) takes its
# share of the cores instead; set before torch is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
    """make(name, write, **kwargs) -> Path: calls write(out, **kwargs) once per session per distinct
    (write, kwargs) and returns the folder. Treat it as read-only; copy it to change files."""
    cache: dict = {}

    def make(name: str, write, **kwargs):
        key = (write.__module__, write.__qualname__, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(name)
            write(out, **kwargs)
            cache[key] = out
        return cache[key]

    return make
