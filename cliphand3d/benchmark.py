"""`python scripts/benchmark.py`: what inference, training and data cost on this machine, in one run.

Each figure is the median over repeats after warm-up. Each ratio divides two figures of the same run,
measured in alternating rounds (A B C A B C ...), so that drift in the machine's state (other work,
clock changes, a warm cache) hits both sides alike. Sections (configs/benchmark.yaml `sections`) are
one function each: inference, params, train_step, loader, joint_features, options, eval_stream;
docs/benchmark.md says what each measures and how to read it.

Results are rows {section, name, value, unit, note}. A ratio row also names the two rows it divides
(`ratio_of`), so every ratio can be recomputed from the figures beside it; `target` / `met` say how a
row compares with the targets of issue #10 (benchmark.yaml `targets`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import engine
from .build import (build_criterion, build_datasets, build_model, build_prompts, build_template, build_text,
                    template_labels)
from .data.sampler import ResumableSampler
from .models.training import TrainingModule
from .preflight import ConfigError
from .released import CONFIGS
from .trainer import build_optimizer, make_loader, pick_device, seed_everything

log = logging.getLogger(__name__)

SECTIONS = ("inference", "params", "train_step", "loader", "joint_features", "options", "eval_stream")
ONNX_EXTRA = "skipped: pip install -e .[onnx]"
MB = 2.0 ** 20


# =========================================================================== the machine
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


# =========================================================================== timing
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


# =========================================================================== rows
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


# =========================================================================== configs and runs
def compose_train(overrides) -> DictConfig:
    """configs/train.yaml with `overrides`, inside the benchmark's Hydra app or outside any."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [str(o) for o in overrides]
    if GlobalHydra.instance().is_initialized():  # scripts/benchmark.py: the same config folder
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def train_overrides(cfg: DictConfig, *extra) -> list[str]:
    """Every composed train config gets the benchmark's `train_overrides`, then the section's."""
    items = [*cfg.train_overrides]
    for e in extra:
        items.extend(e or [])
    return ["logger.tensorboard=false", f"run_dir={Path(cfg.out_dir) / 'train'}", *items]


def build_run(cfg: DictConfig):
    """(train set, TrainingModule, optimiser) as the trainer builds them for one process."""
    seed_everything(int(cfg.seed))
    prompts = build_prompts(cfg)
    train_set = build_datasets(cfg, prompts, splits=("train",))["train"]
    template = build_template(cfg, train_set)
    model = build_model(cfg, template)
    encoder, adapters = build_text(cfg)
    criterion = build_criterion(cfg)
    module = TrainingModule(model, criterion, encoder, adapters)
    o = cfg.optim
    optimizer = build_optimizer(module, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                backbone_lr_mult=o.backbone_lr_mult, fused=o.get("fused", False))
    return train_set, module, optimizer


def eval_model(cfg: DictConfig, device: torch.device):
    """The inference network of a composed config (random weights), eval mode, on `device`."""
    seed_everything(int(cfg.seed))
    train_set = build_datasets(cfg, None, splits=("train",))["train"]
    return build_model(cfg, build_template(cfg, train_set)).to(device).eval()


def first_batch(dataset, batch_size: int, device: torch.device) -> dict:
    loader = make_loader(dataset, batch_size=batch_size, num_workers=0, device=device)
    return engine.to_device(next(iter(loader)), device)


# Job-control signals pause a run's loader workers between its turns (None where the platform has none).
STOP, CONTINUE = getattr(signal, "SIGSTOP", None), getattr(signal, "SIGCONT", None)


class StepRunner:
    """A training run as scripts/train.py builds it (its data loader and workers included), stepped a
    few steps at a time through engine.train_one_epoch, so runs can take turns."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.train_set, self.module, self.optimizer = build_run(cfg)
        self.module.to(device)
        t = cfg.trainer
        self.batch_size = int(t.batch_size)
        sampler = ResumableSampler(len(self.train_set), shuffle=True, seed=int(cfg.seed), rank=0, world_size=1,
                                   batch_size=self.batch_size, drop_last=True)
        sampler.set_epoch(0, 0)
        loader = make_loader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                             num_workers=int(t.num_workers), device=device, worker_nice=int(t.get("worker_nice", 0)))
        self.batches = iter(loader)
        self._signal_workers(STOP)  # until its first turn

    @property
    def encoder(self):
        return self.module.text_encoder

    def __call__(self, steps: int) -> list[float]:
        """Seconds of each of the next `steps` steps (data wait, forward, backward, optimiser, checks).
        The loader's workers run only inside this call: between turns they are stopped, so runs taking
        turns never render for one another's steps."""
        t = self.cfg.trainer
        self._signal_workers(CONTINUE)
        try:
            stamps = [time.perf_counter()]
            engine.train_one_epoch(self.module, islice(self.batches, int(steps)), self.optimizer, None,
                                   engine.TrainState(), device=self.device, total_steps=int(steps), amp=t.amp,
                                   grad_clip=t.grad_clip, on_step=lambda st: stamps.append(time.perf_counter()))
        finally:
            self._signal_workers(STOP)
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self.batches, "_workers", None) or [] if w.is_alive()]

    def _signal_workers(self, sig) -> None:
        if sig is None:  # no job-control signals on this platform: the workers run throughout
            return
        for pid in self.worker_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._signal_workers(CONTINUE)  # a stopped worker could not take the loader's shutdown message
        self.batches = None  # ends the loader's worker processes

    def __enter__(self) -> "StepRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an error or Ctrl-C: never leave stopped workers behind



def time_steps(cfg: DictConfig, steps: int, warmup: int, device: torch.device | None = None) -> list[float]:
    """Seconds of `steps` consecutive training steps after `warmup` (benchmarks/bench_train_step.py)."""
    with StepRunner(cfg, device or torch.device("cpu")) as runner:
        runner(warmup)
        return runner(steps)


def bare_step(module: TrainingModule, optimizer, batch: dict, cast=None) -> None:
    """One optimiser step on a batch already on the device: forward, loss, backward, update."""
    with cast or nullcontext():
        _, terms = module(batch)
        loss = module.criterion.total(terms)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions `fn` runs (forward and any backward inside),
    as torch.utils.flop_counter counts them: 2 per multiply-add."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@contextmanager
def num_threads(n: int | None, opencv: bool = False):
    """torch (and with `opencv`, OpenCV) on `n` threads for the block; None leaves them as they are."""
    import cv2

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


# =========================================================================== 1. inference
def bench_inference(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Images/s of `model(images)` (eval, no text) beside `model.backbone(images)` on the same input,
    per preset and batch size, and onnxruntime beside both where it is installed."""
    s = cfg.inference
    rows, raw = Rows("inference"), {}
    for preset, overrides in s.presets.items():
        tcfg = compose_train(train_overrides(cfg, overrides))
        model, size = eval_model(tcfg, device), int(tcfg.data.img_size)
        label = f"{preset}@{size}"
        ort = onnx_runner(model, label, size, device, Path(cfg.out_dir), preset in s.onnx_presets, rows)
        for b in s.batch_sizes:
            raw[f"{label} b{b}"] = inference_pair(model, size, int(b), device, ort, rows, label,
                                                  rounds=int(s.rounds), warmup=int(s.warmup))
        del model, ort
    return rows.items, raw


def onnx_runner(model, label: str, size: int, device: torch.device, out: Path, wanted: bool, rows: Rows):
    """onnxruntime session of `model` via cliphand3d.export, or None with a row saying why."""
    if not wanted:
        return None
    name = f"{label} onnxruntime"
    if device.type != "cpu":
        rows.skip(name, "skipped: onnxruntime is compared with eager PyTorch on CPU")
        return None
    try:
        from .export import OnnxModel, export_onnx

        (out / "onnx").mkdir(parents=True, exist_ok=True)
        path = export_onnx(model, out / "onnx" / f"{label.replace('@', '_')}.onnx", img_size=size)
        return OnnxModel(path, threads=torch.get_num_threads(), spin_wait=False)  # fair to the eager runs after it
    except ImportError:
        rows.skip(name, ONNX_EXTRA)
    except Exception as e:  # noqa: BLE001 - an export failure is a result to report, not a crash
        rows.skip(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return None


def inference_pair(model, size: int, batch: int, device: torch.device, ort, rows: Rows, label: str, *,
                   rounds: int, warmup: int) -> dict:
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    fns = {"model": timed(lambda: model(images), device), "backbone": timed(lambda: model.backbone(images), device)}
    if ort is not None:
        arr = images.cpu().numpy()
        fns["onnxruntime"] = timed(lambda: ort(arr), device)
    with torch.inference_mode():
        samples = interleave(fns, rounds=rounds, warmup=warmup)
    key = f"{label} b{batch}"
    for name, xs in samples.items():
        rows.add(f"{key} {name}", 1e3 * median(xs), "ms/batch", per_s(batch, median(xs), "img"))
    rows.ratio(f"{key} model / backbone", f"{key} model", f"{key} backbone", "time of the inference path over "
               "the bare backbone forward")
    if ort is not None:
        rows.ratio(f"{key} onnxruntime / eager", f"{key} onnxruntime", f"{key} model", "below 1: onnxruntime faster")
    return samples


# =========================================================================== 2. params and FLOPs
def bench_params(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Parameters and FLOPs of the inference path and of a training step (forward and backward of the
    model, the frozen text tower, adapters and loss), per preset."""
    s = cfg.params
    rows, raw = Rows("params"), {}
    for preset, overrides in s.presets.items():
        tcfg = compose_train(train_overrides(cfg, overrides))
        train_set, module, _ = build_run(tcfg)
        module.to(device)
        batch = first_batch(train_set, int(s.batch_size), device)
        raw[preset] = params_and_flops(module, batch, rows, f"{preset}@{int(tcfg.data.img_size)}")
    return rows.items, raw


def params_and_flops(module: TrainingModule, batch: dict, rows: Rows, label: str) -> dict:
    model, n = module.model, batch["image"].shape[0]
    inference = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pose_heads."))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    tower = sum(p.numel() for p in module.text_encoder.tower.parameters()) if module.text_encoder else 0
    model.eval()
    with torch.no_grad():
        f_inf = count_flops(lambda: model(batch["image"])) / n
        f_bb = count_flops(lambda: model.backbone(batch["image"])) / n
    module.train()

    def train_pass():
        _, terms = module(batch)
        module.criterion.total(terms).backward()

    f_train = count_flops(train_pass) / n
    module.zero_grad(set_to_none=True)
    rows.add(f"{label} inference params", inference / 1e6, "M", "model without the pose-feature heads")
    rows.add(f"{label} trainable params", trainable / 1e6, "M", "model, text adapters and logit scales")
    rows.add(f"{label} frozen text tower params", tower / 1e6, "M", "not in checkpoints, not trained")
    rows.add(f"{label} inference GFLOP/img", f_inf / 1e9, "GFLOP", "model(images), text branch cut")
    rows.add(f"{label} backbone GFLOP/img", f_bb / 1e9, "GFLOP", "model.backbone(images)")
    rows.add(f"{label} training GFLOP/sample", f_train / 1e9, "GFLOP",
             f"forward + backward, text tower included, batch of {n}")
    return {"inference_params": inference, "trainable_params": trainable, "tower_params": tower,
            "inference_flops": f_inf, "backbone_flops": f_bb, "training_flops": f_train, "batch": n}


# =========================================================================== 3. training step
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
        runners = {name: running.enter_context(StepRunner(compose_train(train_overrides(cfg, ov)), device))
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
    gen = instantiate(tcfg.prompt, num_joints=None if k >= 21 else k)
    rng = np.random.default_rng(seed)
    sentences = [gen(x, rng) for x in xyz]
    picks = [rng.integers(0, len(sentences), batch) for _ in range(count)]
    return [{a: [sentences[i][a] for i in p] for a in gen.axes} for p in picks]


def text_savings(cfg: DictConfig, device: torch.device, rows: Rows) -> dict:
    """Encode time per training batch of prompts with the text encoder's exact savings switched on one
    after another, and with prompts over fewer joints; rounds alternate between the settings."""
    s = cfg.train_step.text_savings
    tcfg = compose_train(train_overrides(cfg, s.overrides))
    enc = instantiate(tcfg.text.encoder).to(device)
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


# =========================================================================== 4. data loader
def bench_loader(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Crops/s of one loader worker per data format beside the bare decode of the same image files and
    beside what one training step consumes."""
    s = cfg.loader
    rows, raw = Rows("loader"), {}
    consume = consumption(cfg, device, shared)
    rows.add("default step consumes", 1e3 * consume["step_s"] / consume["batch"], "ms/crop",
             f"{per_s(consume['batch'], consume['step_s'], 'crops')} (batch / step time, {consume['source']})")
    with tempfile.TemporaryDirectory(prefix="cliphand3d_bench_") as tmp:
        for fmt, overrides in s.formats.items():
            dataset, files = loader_dataset(cfg, fmt, overrides, Path(tmp))
            raw[fmt] = loader_pair(dataset, files, int(s.crops), int(s.rounds), int(s.warmup))
            worker = median(raw[fmt]["item"]) / raw[fmt]["n"]
            rows.add(f"{fmt} worker", 1e3 * worker, "ms/crop", per_s(1, worker, "crops"))
            rows.ratio(f"{fmt} worker / step consumption", "default step consumes", f"{fmt} worker",
                       "crops/s one worker delivers over crops/s a step takes")
            if files:
                decode = median(raw[fmt]["decode"]) / raw[fmt]["n"]
                rows.add(f"{fmt} bare decode", 1e3 * decode, "ms/crop", f"cv2.imread of the {Path(files[0]).suffix} files")
                rows.ratio(f"{fmt} per-crop cost / decode", f"{fmt} worker", f"{fmt} bare decode",
                           "the decode is the floor")
    return rows.items, raw


def consumption(cfg: DictConfig, device: torch.device, shared: dict) -> dict:
    """The default training step's time: train_step's, or measured here when that section is off."""
    if "default_step_s" in shared:
        return {"step_s": shared["default_step_s"], "batch": shared["default_batch"], "source": "train_step"}
    s = cfg.loader
    with StepRunner(compose_train(train_overrides(cfg)), device) as runner:
        times = runner(int(s.step_warmup) + int(s.steps))[int(s.step_warmup):]
    return {"step_s": median(times), "batch": runner.batch_size, "source": f"{len(times)} steps measured here"}


def write_fixture(fmt: str, out: Path, hands: int) -> Path:
    """A small tree in `fmt`'s exact on-disk layout (scripts/make_synthetic.py's writers)."""
    from .data import writers

    if fmt == "freihand":
        return writers.write_freihand(out / fmt, num_train=hands, num_eval=0, seed=0, versions=1, view="upright")
    return writers.write_rhd(out / fmt, num_train=hands, num_eval=0, seed=0)


def loader_dataset(cfg: DictConfig, fmt: str, overrides, tmp: Path):
    """(training dataset of format `fmt`, its image files or [] when rendered). Crops are the default
    run's size unless loader.img_size says otherwise, so they match the step that consumes them."""
    s = cfg.loader
    size = s.img_size or compose_train(train_overrides(cfg)).data.img_size
    over = [f"data={fmt}", f"data.img_size={int(size)}"]
    if fmt != "synthetic":
        over.append(f"data.root={write_fixture(fmt, tmp, int(s.fixture_hands))}")
    tcfg = compose_train(train_overrides(cfg, over, overrides))
    ds = build_datasets(tcfg, build_prompts(tcfg), splits=("train",))["train"]
    path = {"freihand": "image_path", "rhd": "color_path"}.get(fmt)
    files = [str(getattr(ds, path)(i)) for i in range(len(ds))] if path else []
    return ds, files


def loader_pair(dataset, files: list[str], items: int, rounds: int, warmup: int) -> dict:
    """Seconds per round of `items` dataset items (one process, one torch and one OpenCV thread, as in a
    DataLoader worker: trainer.single_threaded_worker) and of cv2.imread of the same files; rounds alternate."""
    import cv2

    idx = [i % len(dataset) for i in range(items)]

    def load():
        for i in idx:
            dataset[i]

    fns = {"item": load}
    if files:
        fns["decode"] = lambda: [cv2.imread(files[i], cv2.IMREAD_COLOR) for i in idx]
    with num_threads(1, opencv=True):
        samples = interleave({k: timed(f, torch.device("cpu")) for k, f in fns.items()}, rounds=rounds,
                             warmup=warmup)
    return {**samples, "n": items}


# =========================================================================== 5. joint features
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
    tcfg = compose_train(base)
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


def run_child(task: str, spec: dict) -> dict:
    """CHILD_TASKS[task](spec) in a fresh Python process (its memory peak is its own); its result dict,
    or {"error": ...}. A plain interpreter, not multiprocessing: nothing of the caller's main module runs."""
    with tempfile.TemporaryDirectory(prefix="cliphand3d_bench_") as tmp:
        result_file = Path(tmp) / "result.json"
        code = "import sys; from cliphand3d.benchmark import child_main; child_main(sys.argv[1], sys.argv[2])"
        proc = subprocess.run([sys.executable, "-c", code, task, str(result_file)], input=json.dumps(spec),
                              capture_output=True, text=True)
        if result_file.is_file():
            return json.loads(result_file.read_text())
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"the {task} process ended without a result (exit code {proc.returncode}): {last}"}


def child_main(task: str, result_file: str) -> None:
    """Entry of run_child's process: the spec on stdin, the result (or the error) as JSON in result_file."""
    spec = json.loads(sys.stdin.read())
    try:
        torch.set_num_threads(int(spec["threads"]))
        result = CHILD_TASKS[task](spec)
    except Exception as e:  # noqa: BLE001 - reported in the parent's table
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    Path(result_file).write_text(json.dumps(result, default=float))


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
    tcfg = compose_train(spec["overrides"])
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


# =========================================================================== 6. options
def bench_options(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Compute time of the default training step (fixed batches, no loader, text cache off so each
    step encodes) beside one change each: config variants (channels_last, the optimiser, ...),
    torch.compile, autocast and each thread count, taking turns."""
    s = cfg.options
    rows, raw = Rows("options"), {}
    fns, notes = {}, {}
    default = compose_train(train_overrides(cfg, s.overrides))
    for name, opts in option_variants(s, device).items():
        try:
            tcfg = compose_train(train_overrides(cfg, s.overrides, opts.get("overrides")))
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


# =========================================================================== 7. evaluation stream
def bench_eval_stream(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Evaluation of a FreiHAND-size set streamed in batches (engine.predict, as eval.py): per-batch
    time, the whole set's time (extrapolated from a few batches unless `full`), and memory per batch."""
    s = cfg.eval_stream
    rows = Rows("eval_stream")
    spec = {"overrides": train_overrides(cfg, s.overrides, [f"data.num_test={int(s.size)}"]), "device": str(device),
            "threads": torch.get_num_threads(), "batch_size": int(s.batch_size), "num_workers": int(s.num_workers),
            "batches": int(s.size) if s.full else int(s.batches) * int(s.batch_size)}
    res = run_child("eval_stream", spec)
    if "error" in res:
        rows.skip("per batch", f"failed: {res['error']}")
        return rows.items, res
    b, size = int(s.batch_size), int(s.size)
    per_batch = median(res["intervals"])
    total_batches = math.ceil(size / b)
    rows.add("per batch", per_batch, "s/batch", f"{per_s(b, per_batch, 'img')}; {res['label']}")
    # interval k: batch k's forward and the wait for batch k + 1; first_s: the wait for batch 0
    measured = len(res["intervals"]) >= total_batches
    total = res["first_s"] + (sum(res["intervals"]) if measured else per_batch * total_batches)
    rows.add(f"{size} crops", total, "s", "measured, every batch" if measured else
             f"EXTRAPOLATED from {len(res['intervals'])} batches: first batch's wait {res['first_s']:.1f} s + "
             f"{total_batches} x the median batch")
    rows.add("memory growth per batch", res["growth_mb"], "MB/batch", "RSS slope over the timed batches")
    rows.add("predictions kept per batch", res["kept_mb"], "MB/batch", "the arrays predict returns (bounded "
             "memory: growth no more than this)")
    rows.add("peak memory", res["peak_mb"], "MB", "peak RSS of the evaluating process" if device.type == "cpu"
             else "max_memory_allocated")
    return rows.items, res


def eval_stream_task(spec: dict) -> dict:
    """In a fresh process: engine.predict over the first `batches` crops of the test split, recording
    the time and RSS at every batch boundary."""
    from torch.utils.data import Subset

    device = torch.device(spec["device"])
    tcfg = compose_train(spec["overrides"])
    model = eval_model(tcfg, device)
    test = build_datasets(tcfg, None, splits=("test",))["test"]
    subset = Subset(test, range(min(int(spec["batches"]), len(test))))
    loader = make_loader(subset, batch_size=spec["batch_size"], num_workers=spec["num_workers"], device=device)
    stamps, rss = [], []

    def probe():  # stamps: start, each batch's arrival, the end; RSS at each but the start
        stamps.append(time.perf_counter())
        for batch in loader:
            stamps.append(time.perf_counter())
            rss.append(memory_mb("VmRSS") or 0.0)
            yield batch
        stamps.append(time.perf_counter())
        rss.append(memory_mb("VmRSS") or 0.0)

    preds = engine.predict(model, probe(), device)
    intervals = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    timed_rss = rss[1:]
    growth = (timed_rss[-1] - timed_rss[0]) / max(len(timed_rss) - 1, 1)
    kept = sum(v.nbytes for v in preds.values() if isinstance(v, np.ndarray)) / MB / max(len(intervals), 1)
    peak = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else memory_mb("VmHWM")
    return {"first_s": stamps[1] - stamps[0], "intervals": intervals, "rss_mb": rss, "growth_mb": growth,
            "kept_mb": kept, "peak_mb": peak,
            "label": f"batch {spec['batch_size']} @ {tcfg.data.img_size} px, {tcfg.model.backbone}"}


CHILD_TASKS = {"step_memory": step_memory_task, "eval_stream": eval_stream_task}
SECTION_FUNCS = {"inference": bench_inference, "params": bench_params, "train_step": bench_train_step,
                 "loader": bench_loader, "joint_features": bench_joint_features, "options": bench_options,
                 "eval_stream": bench_eval_stream}


# =========================================================================== the run
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
    device = pick_device(str(cfg.device), 0)
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
