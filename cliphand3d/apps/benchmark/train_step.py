"""Section `train_step`: step time of training variants taking turns, text-cache hit rates, and the
text encoder's exact savings one after another."""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch
from omegaconf import DictConfig

from ...build import build_datasets, build_prompts, build_text_encoder, compose_config, template_labels
from ...errors import ConfigError
from .harness import Rows, interleave, median, timed
from .runs import StepRunner, train_overrides


def bench_train_step(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Step time per sample of each variant (the default config; the contrastive term off; a ViT-B-32-
    shaped tower), taking turns, with each run's text-cache hit rate; then the text encoder's savings."""
    s = cfg.train_step
    for key in ("default", "baseline", "previous"):
        if s.get(key) is not None and s[key] not in s.variants:
            raise ConfigError(f"benchmark: train_step.{key}={s[key]!r} is not one of train_step.variants "
                              f"{list(s.variants)}; name one of them (or null)")
    rows, raw = Rows("train_step"), {"variants": {}}
    with ExitStack() as running:  # every runner's workers end here, on an error too
        runners = {name: running.enter_context(StepRunner(compose_config("train", train_overrides(cfg, ov)), device))
                   for name, ov in s.variants.items()}
        fns = {name: (lambda r=r: r(int(s.steps))) for name, r in runners.items()}
        for r in runners.values():
            r(int(s.warmup))
            if r.encoder is not None:
                r.encoder.reset_stats()
        samples = interleave(fns, rounds=int(s.rounds), warmup=0)
        for name, runner in runners.items():
            step = median(samples[name])
            rows.add(f"{name} step per sample", 1e3 * step / runner.batch_size, "ms/sample",
                     f"{step:.3f} s/step, batch {runner.batch_size}")
            raw["variants"][name] = {"step_s": samples[name], "batch_size": runner.batch_size}
            if name == s.default:
                shared["default_step_s"], shared["default_batch"] = step, runner.batch_size
        for name, runner in runners.items():
            if s.baseline is not None and name != s.baseline:
                rows.ratio(f"{name} / {s.baseline}", f"{name} step per sample", f"{s.baseline} step per sample")
            if s.get("previous") is not None and name == s.previous:  # the speed-up of today's default over it
                rows.ratio(f"{name} / {s.default}", f"{name} step per sample", f"{s.default} step per sample")
            enc = runner.encoder
            if enc is not None and enc.cache_size:
                raw["variants"][name].update(hits=enc.hits, misses=enc.misses)
                rows.add(f"{name} text cache hit rate", enc.hit_rate, "", f"{enc.hits} hits, {enc.misses} misses "
                         "over the timed steps")
    if s.text_savings.enabled:
        raw["text_savings"] = text_savings(cfg, device, rows)
    return rows.items, raw


# (dedup, cache, truncate_to_eot): each setting adds one exact saving to the one before it; only the
# last uses the cache, so the cache's history is that setting's alone.
TEXT_SETTINGS = {"plain": (False, False, False), "+eot": (False, False, True), "+dedup": (True, False, True),
                 "+cache": (True, True, True)}


def prompt_batches(tcfg: DictConfig, k: int, batch: int, count: int, pool: int, seed: int) -> list[dict]:
    """`count` batches of {axis: prompts}, the training generator's sentences about the training hands'
    joints (k joints; 21 = all), drawn with replacement from `pool` hands as epochs revisit a dataset."""
    train_set = build_datasets(tcfg, None, splits=("train",))["train"]
    xyz, _ = template_labels(train_set, pool)
    gen = build_prompts(tcfg, num_joints=None if k >= 21 else k)
    rng = np.random.default_rng(seed)
    sentences = [gen(x, rng) for x in xyz]
    picks = [rng.integers(0, len(sentences), batch) for _ in range(count)]
    return [{a: [sentences[i][a] for i in p] for a in gen.axes} for p in picks]


def text_savings(cfg: DictConfig, device: torch.device, rows: Rows) -> dict:
    """Encode time per training batch of prompts with the text encoder's exact savings switched on one
    after another, and with prompts over fewer joints; rounds alternate between the settings."""
    s = cfg.train_step.text_savings
    tcfg = compose_config("train", train_overrides(cfg, s.overrides))
    enc = build_text_encoder(tcfg).to(device)
    batch = int(s.batch_size or tcfg.trainer.batch_size)
    raw = {}
    tower = f"text {enc.tower.transformer.layers}x{enc.tower.transformer.width}"
    for k in s.num_joints:
        batches = prompt_batches(tcfg, int(k), batch, int(s.warmup) + int(s.rounds), int(s.pool), int(tcfg.seed))
        raw[f"k{k}"] = encode_settings(enc, batches, int(s.warmup), int(s.rounds), int(s.cache_size), device)
        label = f"{tower} k={k}"
        n = sum(len(v) for v in batches[0].values())
        for name, xs in raw[f"k{k}"]["times"].items():
            rows.add(f"{label} {name}", 1e3 * median(xs), "ms/batch", f"{n} prompts per batch")
        for prev, name in zip(TEXT_SETTINGS, list(TEXT_SETTINGS)[1:]):
            rows.ratio(f"{label} saving of {name[1:]}", f"{label} {prev}", f"{label} {name}", "time before / after")
        rows.ratio(f"{label} saving of all", f"{label} plain", f"{label} +cache", "time before / after")
        stats = raw[f"k{k}"]
        rows.add(f"{label} cache hit rate", stats["hits"] / max(stats["hits"] + stats["misses"], 1), "",
                 f"{stats['hits']} hits, {stats['misses']} misses; {s.pool} hands revisited")
    first = f"{tower} k={s.num_joints[0]} +cache"
    for k in list(s.num_joints)[1:]:
        rows.ratio(f"{tower} saving of k={k} vs k={s.num_joints[0]}", first, f"{tower} k={k} +cache",
                   "all savings on, time before / after")
    return raw


def encode_settings(enc, batches: list[dict], warmup: int, rounds: int, cache_size: int,
                    device: torch.device) -> dict:
    enc.clear_cache()
    enc.reset_stats()

    def setting(name: str):
        pos = iter(range(len(batches)))
        dedup, cache, trunc = TEXT_SETTINGS[name]

        def run() -> list[float]:
            enc.dedup, enc.truncate_to_eot, enc.cache_size = dedup, trunc, cache_size if cache else 0
            return timed(lambda: enc.encode_axes(batches[next(pos)]), device)()
        return run

    times = interleave({n: setting(n) for n in TEXT_SETTINGS}, rounds=rounds, warmup=warmup)
    return {"times": times, "hits": enc.hits, "misses": enc.misses}
