"""Section `options`: compute time of the default training step beside one change each (config
variants, torch.compile, autocast, thread counts), taking turns."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from ...build import compose_config
from .harness import Rows, interleave, median, num_threads, timed
from .runs import bare_step, build_run, first_batch, train_overrides


def bench_options(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Compute time of the default training step (fixed batches, no loader, text cache off so each
    step encodes) beside one change each: config variants (channels_last, the optimiser, ...),
    torch.compile, autocast and each thread count, taking turns."""
    s = cfg.options
    rows, raw = Rows("options"), {}
    fns, notes = {}, {}
    default = compose_config("train", train_overrides(cfg, s.overrides))
    for name, opts in option_variants(s, device).items():
        try:
            tcfg = compose_config("train", train_overrides(cfg, s.overrides, opts.get("overrides")))
            if opts.get("overrides") and tcfg == default:
                rows.skip(name, "the default already: " + " ".join(opts["overrides"]))
                continue
            fns[name], notes[name] = option_step(tcfg, device, opts, int(s.steps))
            if opts.get("compile"):  # compiling happens in the first step: time it on its own
                raw[f"{name} first step s"] = fns[name]()[0]
        except Exception as e:  # noqa: BLE001 - an option that does not work here is a result
            rows.skip(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            fns.pop(name, None)
    samples = interleave(fns, rounds=int(s.rounds), warmup=int(s.warmup))
    for name, xs in samples.items():
        first = raw.get(f"{name} first step s")
        rows.add(name, median(xs), "s/step", notes[name] + (f"; first step (compiling) {first:.0f} s" if first else ""))
    for name in samples:
        if name != "default":
            rows.ratio(f"{name} / default", name, "default")
    raw["steps"] = samples
    return rows.items, raw


def option_variants(s: DictConfig, device: torch.device) -> dict[str, dict]:
    """name -> what it changes: the default, the config variants, compile, autocast dtypes, threads."""
    v: dict[str, dict] = {"default": {}}
    for name, overrides in (s.variants or {}).items():
        v[str(name)] = {"overrides": list(overrides)}
    if s.compile is True or (s.compile == "auto" and device.type == "cuda"):
        v["torch.compile"] = {"compile": True}
    for dtype in s.amp_dtypes or []:
        v[f"autocast {dtype}"] = {"amp": str(dtype)}
    cores = os.cpu_count() or 1
    counts = sorted({*(2 ** i for i in range(cores.bit_length()) if 2 ** i <= cores), cores}) \
        if s.threads == "auto" else list(s.threads or [])
    for n in counts:
        if n != torch.get_num_threads():
            v[f"threads {n}"] = {"threads": int(n)}
    return v


def option_step(tcfg: DictConfig, device: torch.device, opts: dict, steps: int):
    """(callable running `steps` training steps with `opts` -> seconds per step, note)."""
    train_set, module, optimizer = build_run(tcfg)
    module.to(device)
    if module.text_encoder is not None:
        module.text_encoder.cache_size = 0
    batch = first_batch(train_set, int(tcfg.trainer.batch_size), device)
    if opts.get("compile"):
        module.model = torch.compile(module.model)
    cast = None
    if opts.get("amp"):
        if device.type == "cuda" and opts["amp"] == "float16":
            raise ValueError("float16 autocast needs a gradient scaler; compare bfloat16 here")
        cast = torch.autocast(device.type, dtype=getattr(torch, opts["amp"]))
    threads = opts.get("threads")

    def run() -> list[float]:
        with num_threads(threads):
            return [t for _ in range(steps)
                    for t in timed(lambda: bare_step(module, optimizer, batch, cast), device)()]
    note = (f"{threads or torch.get_num_threads()} threads, batch {tcfg.trainer.batch_size} @ {tcfg.data.img_size} "
            f"px, channels_last={tcfg.model.get('channels_last', False)}, fused AdamW={tcfg.optim.get('fused', False)}")
    return run, note
