"""Section `joint_features`: training-step time and peak memory with factorized vs naive joint features,
each in a fresh process (step_memory_task)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from ...build import compose_config
from .harness import Rows, median, run_child, timed
from .machine import MB, memory_mb
from .runs import bare_step, build_run, first_batch, train_overrides


def bench_joint_features(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Training-step time and peak memory with factorized vs naive joint features, each variant in a
    fresh process (its peak memory is its own), the processes alternating."""
    s = cfg.joint_features
    rows, raw = Rows("joint_features"), {}
    base = train_overrides(cfg, s.overrides)
    specs = {impl: {"overrides": [*base, f"model.joint_feature_impl={impl}"], "device": str(device),
                    "threads": torch.get_num_threads(), "warmup": int(s.warmup), "steps": int(s.steps)}
             for impl in ("factorized", "naive")}
    runs = {impl: [] for impl in specs}
    for _ in range(int(s.rounds)):
        for impl, spec in specs.items():
            runs[impl].append(run_child("step_memory", spec))
    tcfg = compose_config("train", base)
    ok = 0
    for impl, results in runs.items():
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            rows.skip(f"{impl} step", f"failed: {errors[0]}")
            continue
        ok += 1
        step = median([t for r in results for t in r["times"]])
        rows.add(f"{impl} step", step, "s/step", f"batch {tcfg.trainer.batch_size} @ {tcfg.data.img_size} px, "
                 f"{tcfg.model.backbone}")
        rows.add(f"{impl} peak memory", median([r["peak_mb"] for r in results]), "MB", results[0]["memory_note"])
    if ok == len(runs):
        rows.ratio("factorized / naive time", "factorized step", "naive step")
        rows.ratio("factorized / naive peak memory", "factorized peak memory", "naive peak memory")
    raw.update(runs)
    return rows.items, raw


def _memory_now(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB
    return memory_mb("VmRSS") or 0.0


def _memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return memory_mb("VmHWM") or 0.0


def _memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "max_memory_allocated over the steps minus the allocation before them"
    return "peak RSS (VmHWM) over the steps minus RSS before them, fresh process"


def step_memory_task(spec: dict) -> dict:
    """In a fresh process: the seconds of training steps on one fixed batch and the peak memory above
    what the built run holds before its first step (activations, gradients, optimiser state)."""
    device = torch.device(spec["device"])
    tcfg = compose_config("train", spec["overrides"])
    train_set, module, optimizer = build_run(tcfg)
    module.to(device)
    if module.text_encoder is not None:
        module.text_encoder.cache_size = 0  # every step encodes its prompts, as a fresh batch would
    batch = first_batch(train_set, int(tcfg.trainer.batch_size), device)
    module.train()
    base = _memory_now(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["warmup"] + spec["steps"]):
        times.extend(timed(lambda: bare_step(module, optimizer, batch), device)())
    return {"times": times[spec["warmup"]:], "peak_mb": _memory_peak(device) - base, "base_mb": base,
            "memory_note": _memory_note(device)}
