"""Datasets, prompts and the crop pipeline.

Exports resolve lazily (PEP 562): importing `cliphand3d.data` loads nothing heavy, and a sibling
module that is missing or broken only fails when its own name is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SyntheticHands": "synthetic",
    "FreiHAND": "freihand",
    "RHD": "rhd",
    "PromptGenerator": "prompts",
    "CropAugment": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
