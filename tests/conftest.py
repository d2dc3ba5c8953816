"""Shared test plumbing: offline model hubs and a session cache of on-disk fixture folders."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import huggingface_hub

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
