"""scripts/train.py's work: build everything from the config, train, validate, checkpoint, resume.

The loop bodies live in `engine`; this module owns the run: devices and DDP, the optimiser and its
schedule, periodic and best checkpoints, `resume=auto`, TensorBoard.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from . import dist, metrics
from .build import (adopt_init_config, build_criterion, build_datasets, build_model, build_prompts, build_template,
                    build_text, checkpoint_config, load_init_weights)
from .checkpoint import (capture_rng_state, compare_configs, config_to_container, config_value,
                         find_resume_checkpoint, load_checkpoint, load_model_weights, restore_rng_state,
                         save_checkpoint)
from .data.sampler import ResumableSampler
from .ema import ModelEMA
from .engine import NonFiniteLossError, TrainState, autocast_for, exact_labels, predict, train_one_epoch, unwrap
from .errors import ConfigError
from .models.template import MeshTemplate
from .models.training import TrainingModule
from .data.base import SkipCounter
from .preflight import check_config, check_free_space, check_writable, state_bytes
from .run_logger import RunLogger

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- optimiser and schedule
def build_optimizer(module: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    backbone_lr_mult: float = 1.0, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; no decay on norms, biases and logit scales (decaying them only fights the model).

    fused: one kernel per parameter instead of ~10 (the same update to float rounding); on CPU the
    default per-tensor loop costs ~3x as much (benchmarks: scripts/benchmark.py).
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or "logit_scale" in name
        is_backbone = ".backbone." in f".{name}"
        groups.setdefault((no_decay, is_backbone), []).append(p)
    param_groups = [{"params": ps, "weight_decay": 0.0 if nd else weight_decay,
                     "lr": lr * (backbone_lr_mult if bb else 1.0)} for (nd, bb), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=bool(fused) or None)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / max(warmup_steps, 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- devices
def _cli_overrides() -> list[str]:
    """The command line's overrides (they still win over an init_from checkpoint's architecture)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # train() called without Hydra's runtime (tests, notebooks)
        return []


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoint state
def template_state(template: MeshTemplate) -> dict:
    return {k: torch.as_tensor(v) for k, v in template.to_dict().items()}


def template_from_state(state: dict) -> MeshTemplate:
    return MeshTemplate.from_dict({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()})


def lower_worker_priority(nice: int, worker_id: int) -> None:
    os.nice(nice)


def make_loader(dataset, *, batch_size: int, num_workers: int, sampler=None, shuffle=False, drop_last=False,
                device: torch.device, worker_nice: int = 0):
    """worker_nice > 0 runs the workers at that lower priority: on a machine with as many training threads
    as cores they then fill the cores' idle moments instead of preempting a training thread, which stalls
    its partner at the next synchronisation (see trainer/cpu.yaml)."""
    if worker_nice < 0:
        raise ConfigError(f"trainer.worker_nice={worker_nice} must be >= 0 (0: the workers' priority is not changed)")
    init = functools.partial(lower_worker_priority, int(worker_nice)) if num_workers > 0 and worker_nice > 0 else None
    # Its own generator: creating a loader iterator would otherwise draw from the global torch RNG, and a
    # resumed run (which creates one mid-epoch) would drift from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                      num_workers=num_workers, drop_last=drop_last, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(0), worker_init_fn=init)


def validate(model, loader, device, protocol: str, text_branch=None) -> tuple[dict, dict]:
    """Predictions over the val loader -> the same metrics eval.py reports."""
    preds = predict(model, loader, device, text_branch=text_branch)
    preds.update(exact_labels(loader.dataset, preds))
    res = metrics.evaluate(protocol, preds["pred_xyz"], preds["gt_xyz"], preds.get("pred_verts"),
                           preds.get("gt_verts"), preds.get("visible"))
    for a in ("x", "y", "z"):
        if f"pose_feat_{a}" in preds:
            res[f"retrieval_{a}"] = metrics.retrieval_top1(preds[f"pose_feat_{a}"], preds[f"text_feat_{a}"],
                                                           preds[f"prompt_{a}"])
    return res, preds


class TextBranch:
    """prompts {axis: [str]} -> adapted text features; used for retrieval during validation."""

    def __init__(self, encoder, adapters):
        self.encoder, self.adapters = encoder, adapters

    def __call__(self, prompts: dict) -> dict:
        was = self.adapters.training
        self.adapters.eval()
        try:
            return self.adapters(self.encoder.encode_axes(prompts))
        finally:
            self.adapters.train(was)


def improves(monitor: str, value: float, state: TrainState) -> bool:
    """Does this validation beat the best so far? AUCs, F-scores and retrieval rise, errors fall; the
    first finite value always counts (best_metric starts at inf)."""
    if state.best_step < 0:
        return math.isfinite(value)
    return value > state.best_metric if metrics.higher_is_better(monitor) else value < state.best_metric


def rank_weight_checksums(module: torch.nn.Module) -> list[float]:
    """One float64 checksum of the trainable weights per rank, gathered on every rank: DDP replicas
    must agree exactly, and a mismatch is logged (it means ranks trained different models)."""
    with torch.no_grad():
        total = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(
            q for q in module.parameters() if q.requires_grad))
        t = torch.as_tensor(total, dtype=torch.float64).reshape(1)
        if not dist.is_dist():
            return [float(t.item())]
        t = t.to(next(module.parameters()).device)
        parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        torch.distributed.all_gather(parts, t)
    sums = [float(p.item()) for p in parts]
    if len(set(sums)) > 1:
        log.error("DDP replicas disagree: weight checksums per rank %s", sums)
    return sums


class SampleRecorder:
    """trainer.record_samples (debugging data order): one JSON line per optimiser step,
    {"step", "epoch", "index": the dataset indices this rank trained on}, appended to `path`. A resumed
    run appends again from its checkpoint on, so the last line of a step is the one that counts."""

    def __init__(self, path: Path):
        self.path, self.pending = path, None
        path.parent.mkdir(parents=True, exist_ok=True)

    def wrap(self, loader):
        for batch in loader:
            self.pending = batch["meta"]["index"].tolist()
            yield batch

    def commit(self, state: TrainState) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.step, "epoch": state.epoch, "index": self.pending}) + "\n")


def check_gradients(module: torch.nn.Module) -> bool:
    """After a backward pass: False if no parameter has a gradient yet (nothing to judge), True if every
    trainable one has; else stop naming those without one. DDP would fail at the next step with a
    hint to find_unused_parameters, which would hide the defect and cost every step."""
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    trainable = sum(p.requires_grad for p in module.parameters())
    if len(missing) == trainable:
        return False
    if missing:
        raise RuntimeError(f"trainable parameters got no gradient: {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                           "TrainingModule.parameter_terms / CLIPHand3D.parameter_terms must name the loss terms "
                           "that train them, so that they are frozen when those terms weigh 0")
    return True


def check_checkpoint_space(ckpt_dir: Path, module: torch.nn.Module, ema, save_init: bool = False) -> None:
    """A checkpoint holds the weights, AdamW's two moments per trainable weight and the EMA copy. A run keeps
    last.pt and best.pt (and init.pt with trainer.save_init) side by side, and an atomic save writes a temp
    file beside the one it replaces: at the peak, every file plus one temp copy. Files already there (a
    resumed run) are replaced in place and take no new space. Checked before the first step, not at the
    first save."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    size = state_bytes(module) + 2 * trainable + (state_bytes(ema.module) if ema is not None else 0)
    names = ["last.pt", "best.pt"] + (["init.pt"] if save_init else [])
    new = [n for n in names if not (Path(ckpt_dir) / n).is_file()]
    parts = ", ".join(new + ["the temp file of a save"])
    check_free_space(ckpt_dir, (len(new) + 1) * size, "run_dir",
                     f"the checkpoints at their peak ({parts}: {len(new) + 1} x {size / 2 ** 20:.1f} MB)")


# --------------------------------------------------------------------------- resume
# Config keys a resume may change: they decide where a run lives and how it is watched, validated and
# checkpointed, never the weights it computes (an item is a function of (seed, epoch, index) whichever
# worker loads it; validation and checkpoints draw from no training RNG). Everything else must match,
# keys added later included: optim.*, seed, and trainer.batch_size (the position counts batches),
# epochs / max_steps (the warm-up + cosine schedule spans the total, so a new total changes the learning
# rate from the resume on), amp, grad_clip, ema_decay, monitor (best_metric holds its values).
RESUME_MAY_CHANGE = (
    "name", "run_dir", "resume",                      # where the run lives, how it was started
    "logger",                                         # TensorBoard, log frequency
    "trainer.device", "trainer.dist_backend",         # another machine (float results may differ slightly)
    "trainer.num_workers", "trainer.worker_nice", "trainer.val_batch_size", "trainer.val_every_steps", "trainer.val_every_epochs",
    "trainer.ckpt_every_steps", "trainer.save_init", "trainer.record_samples",
    "trainer.max_nonfinite_steps",                    # only decides when a failing run stops
    "trainer.final_eval",                             # scores best.pt after training, trains nothing
    "data.skip_bad", "data.train.skip_bad",           # only decides whether an unreadable file stops the run
)


def resume_mismatches(saved: dict, cfg: dict, *, world_size: int, batch_size: int) -> list[str]:
    """What keeps `saved` (a checkpoint) from continuing exactly as this run (config `cfg`, a plain
    dict), one 'key: saved X, now Y' line each; empty when it can."""
    saved_cfg = saved.get("config") or {}
    keys = compare_configs(saved_cfg, cfg, keys=None, ignore=RESUME_MAY_CHANGE)
    lines = [f"{k}: saved {config_value(saved_cfg, k)!r}, now {config_value(cfg, k)!r}" for k in keys]
    ts = saved.get("train_state") or {}
    missing = [k for k in ("world_size", "batch_size") if k not in ts]
    if missing:
        lines.append(f"train_state has no {' / '.join(missing)}: the checkpoint predates recording them, so its "
                     "data position (counted in batches) cannot be checked; finish that run with the cliphand3d "
                     "version that wrote it")
    else:
        if ts["world_size"] != world_size:
            lines.append(f"world size (processes): saved {ts['world_size']}, now {world_size}")
        if ts["batch_size"] != batch_size and "trainer.batch_size" not in keys:
            lines.append(f"batch size per process: saved {ts['batch_size']}, now {batch_size}")
    return lines


def check_resumable(saved: dict, cfg: DictConfig, path: Path, *, world_size: int, batch_size: int) -> None:
    lines = resume_mismatches(saved, config_to_container(cfg), world_size=world_size, batch_size=batch_size)
    if lines:
        raise ConfigError(
            f"cannot resume from {path} exactly; it differs from this run at:\n" + "".join(f"  {x}\n" for x in lines)
            + f"  fix: resume with the saved values (the run's config.yaml beside {path.parent.name}/ holds them) "
            "on the same number of processes, or start a new run with name=<new name>. May differ: "
            + ", ".join(RESUME_MAY_CHANGE))


# --------------------------------------------------------------------------- the run
def train(cfg: DictConfig) -> dict:
    """Train as configured; returns the last validation metrics (and writes them to the run dir). With
    trainer.final_eval=<split>, best.pt is then scored on that split as eval.py does (<run_dir>/eval_best/)."""
    check_config(cfg)  # before any data, model or process group is built
    check_writable(Path(cfg.run_dir) / "checkpoints", "run_dir")
    rank, world, local_rank = dist.init_distributed(cfg.trainer.get("dist_backend"))
    try:
        last = _train(cfg, rank, world, local_rank)
    finally:
        dist.cleanup()
    split = cfg.trainer.get("final_eval")
    if split and rank == 0:  # after the process group is gone: the other ranks need not wait for it
        from .evaluate import evaluate_run  # evaluate imports this module

        evaluate_run(cfg.run_dir, str(split), device=str(cfg.trainer.device),
                     num_workers=int(cfg.trainer.num_workers))
    return last


def _train(cfg: DictConfig, rank: int, world: int, local_rank: int) -> dict:
    return Run(cfg, rank, world, local_rank).run()


class Run:
    """One training run. `__init__` sets it up in named steps (starting point, data, module, optimisation,
    restored state, logs); `run()` loops, validates on `val`, checkpoints and writes the summary."""

    def __init__(self, cfg: DictConfig, rank: int, world: int, local_rank: int):
        self.rank, self.world, self.main = rank, world, rank == 0
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = pick_device(cfg.trainer.device, local_rank)
        self.bs = int(cfg.trainer.batch_size)
        self.cfg, saved, init, self.resume_path = self._starting_point(cfg)
        self.tcfg = self.cfg.trainer
        seed_everything(int(self.cfg.seed))
        self._build_data()
        self._build_module(saved, init)
        self._build_optimisation()
        self.state = TrainState(world_size=world, batch_size=self.bs)
        if self.main:
            check_checkpoint_space(self.ckpt_dir, unwrap(self.module), self.ema,
                                   save_init=bool(self.tcfg.get("save_init")) and saved is None)
        self.skips = SkipCounter(saved.get("skipped_bad", 0) if saved is not None else 0)
        if saved is not None:
            self._restore(saved)
        self._open_logs()
        self.recorder = (SampleRecorder(self.run_dir / "samples" / f"rank{rank}.jsonl")
                         if self.tcfg.get("record_samples") else None)
        self.grads_checked = False
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ set-up steps
    def _starting_point(self, cfg: DictConfig):
        """(config, checkpoint to resume, checkpoint to initialise from, resume path), refusing a folder
        that holds another run and a resume that cannot continue exactly."""
        resume_path = find_resume_checkpoint(self.run_dir, cfg.resume)
        if resume_path is None and (self.ckpt_dir / "last.pt").is_file() and self.main:
            raise ConfigError(f"{self.ckpt_dir / 'last.pt'} exists: this run folder already holds a run.\n"
                             f"  fix: resume=auto to continue it, or name=<new name> (or run_dir=...) for a new run")
        # init_from: start from another checkpoint's weights (e.g. the imported released network), with its
        # architecture; a resumed run keeps the same adopted config, so the resume check still holds
        init = load_checkpoint(Path(str(cfg.init_from)).expanduser()) if cfg.get("init_from") else None
        if init is not None:
            cfg = adopt_init_config(cfg, checkpoint_config(init, str(cfg.init_from)), _cli_overrides())
        saved = load_checkpoint(resume_path) if resume_path is not None else None
        if saved is not None:
            check_resumable(saved, cfg, resume_path, world_size=self.world, batch_size=self.bs)
        return cfg, saved, init, resume_path

    def _build_data(self) -> None:
        prompts = build_prompts(self.cfg)
        sets = build_datasets(self.cfg, prompts, splits=("train", "val"))  # never test: it must not choose best.pt
        self.train_set, self.val_set = sets["train"], sets["val"]
        self.sampler = ResumableSampler(len(self.train_set), shuffle=True, seed=int(self.cfg.seed), rank=self.rank,
                                        world_size=self.world, batch_size=self.bs, drop_last=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(f"trainer.batch_size={self.bs} x {self.world} process(es) is larger than the training "
                             f"set ({len(self.train_set)} samples): lower trainer.batch_size or use more data")
        self.val_loader = make_loader(self.val_set, batch_size=int(self.tcfg.val_batch_size),
                                      num_workers=int(self.tcfg.num_workers), device=self.device)

    def _build_module(self, saved: dict | None, init: dict | None) -> None:
        cfg = self.cfg
        if saved is not None:
            self.template = template_from_state(saved["template"])
        elif init is not None:
            self.template = template_from_state(init["template"])
        else:
            self.template = build_template(cfg, self.train_set)
        model = build_model(cfg, self.template)
        encoder, adapters = build_text(cfg)
        module = TrainingModule(model, build_criterion(cfg), encoder, adapters).to(self.device)  # freezes what weighs 0
        if init is not None and saved is None:
            fresh = load_init_weights(module, init, str(cfg.init_from))
            if self.main:
                log.info("init_from %s: model weights loaded; training heads not in it (start fresh): %s",
                         cfg.init_from, fresh or "none")
        if self.main and module.frozen:
            log.info("frozen, as only zero-weighted loss terms train them: %d parameter tensors (%s)",
                     len(module.frozen), ", ".join(sorted({n.rsplit(".", 2)[0] for n in module.frozen})))
        self.text_branch = TextBranch(encoder, adapters) if encoder is not None else None
        if self.world > 1:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.module = module

    def _build_optimisation(self) -> None:
        ocfg, tcfg = self.cfg.optim, self.tcfg
        self.optimizer = build_optimizer(self.module, lr=ocfg.lr, weight_decay=ocfg.weight_decay, betas=ocfg.betas,
                                         backbone_lr_mult=ocfg.backbone_lr_mult, fused=ocfg.get("fused", False))
        total = int(tcfg.max_steps) if tcfg.get("max_steps") else int(tcfg.epochs) * self.steps_per_epoch
        warmup = int(ocfg.warmup_steps if ocfg.warmup_steps >= 1 else ocfg.warmup_steps * total)
        self.total_steps = total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup_steps=warmup, total_steps=total,
                                                    min_lr_ratio=ocfg.min_lr_ratio))
        _, self.scaler = autocast_for(self.device, tcfg.amp)
        self.ema = (ModelEMA(unwrap(self.module).model, decay=float(tcfg.ema_decay))
                    if tcfg.get("ema_decay") else None)

    def _restore(self, saved: dict) -> None:
        inner = unwrap(self.module)
        load_model_weights(inner.model, saved["model"], str(self.resume_path))
        inner.load_state_dict({**{f"model.{k}": v for k, v in saved["model"].items()}, **saved["train_heads"]},
                              strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])
        self.state = TrainState.from_dict(saved["train_state"])
        restore_rng_state(saved["rng"])
        if self.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.resume_path, self.state.step,
                     self.state.epoch, self.state.batch_in_epoch)

    def _open_logs(self) -> None:
        self.logger = RunLogger(self.run_dir, enabled=self.main, tensorboard=bool(self.cfg.logger.tensorboard))
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            log.info("run dir %s | device %s x %d | %d train / %d val samples | %d steps (%d per epoch)",
                     self.run_dir, self.device, self.world, len(self.train_set), len(self.val_set),
                     self.total_steps, self.steps_per_epoch)

    # ------------------------------------------------------------------ during the run
    def checkpoint(self, name: str) -> None:
        if not self.main:
            return
        st = self.state
        # from the position, not counted per step: a batch skipped for its gradients is consumed too
        st.samples_seen = (st.epoch * self.steps_per_epoch + st.batch_in_epoch) * self.bs * self.world
        inner = unwrap(self.module)
        save_checkpoint(self.ckpt_dir / name, {
            "model": inner.model.state_dict(),
            "train_heads": {k: v for k, v in inner.state_dict().items() if not k.startswith("model.")},
            "template": template_state(self.template),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "train_state": st.to_dict(),
            "rng": capture_rng_state(),
            "config": config_to_container(self.cfg),
            "protocol": getattr(self.train_set, "protocol", "freihand"),
            "skipped_bad": self.skips.total,
        })

    def on_step(self, st: TrainState) -> None:
        if self.recorder is not None:
            self.recorder.commit(st)
        if not self.grads_checked:
            self.grads_checked = check_gradients(unwrap(self.module))
        every = self.tcfg.get("val_every_steps")
        if every and st.step % int(every) == 0 and st.step < self.total_steps:
            self.validate()
        if self.tcfg.ckpt_every_steps and st.step % int(self.tcfg.ckpt_every_steps) == 0:
            self.skips.sync(self.device)
            self.checkpoint("last.pt")

    def validate(self) -> dict:
        """Validate on `val` (rank 0), log, and keep best.pt by `trainer.monitor`."""
        st, res = self.state, {}
        self.skips.sync(self.device)  # a collective, so here where every rank is, not where rank 0 saves best.pt
        if self.main:
            eval_model = self.ema.module if self.ema is not None else unwrap(self.module).model
            res, preds = validate(eval_model, self.val_loader, self.device,
                                  getattr(self.val_set, "protocol", "freihand"), text_branch=self.text_branch)
            for k, v in res.items():
                self.logger.scalar(f"val/{k}", v, st.step)
            self.logger.validation_figures(self.val_set, preds, st.step)
            monitor = self.tcfg.monitor
            if monitor not in res:
                raise KeyError(f"trainer.monitor={monitor!r} is not a validation metric; choose from {sorted(res)}")
            st.history.append({"step": st.step, **res})
            if improves(monitor, float(res[monitor]), st):
                st.best_metric, st.best_step = float(res[monitor]), st.step
                self.checkpoint("best.pt")
            log.info("step %d | %s", st.step, " ".join(f"{k}={v:.4g}" for k, v in res.items()))
        if dist.is_dist():
            torch.distributed.barrier()
        unwrap(self.module).train()
        return res

    def _loop(self, progress) -> None:
        st, tcfg = self.state, self.tcfg
        while st.step < self.total_steps:
            if st.batch_in_epoch >= self.steps_per_epoch:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            self.sampler.set_epoch(st.epoch, st.batch_in_epoch)
            self.train_set.set_epoch(st.epoch)
            loader = make_loader(self.train_set, batch_size=self.bs, sampler=self.sampler, drop_last=True,
                                 num_workers=int(tcfg.num_workers), device=self.device,
                                 worker_nice=int(tcfg.get("worker_nice", 0)))
            loader = self.skips.wrap(loader)
            if self.recorder is not None:
                loader = self.recorder.wrap(loader)
            train_one_epoch(self.module, loader, self.optimizer, self.scheduler, st, device=self.device,
                            total_steps=self.total_steps, amp=tcfg.amp, scaler=self.scaler, grad_clip=tcfg.grad_clip,
                            ema=self.ema, log=self.logger.scalar, log_every=int(self.cfg.logger.log_every),
                            on_step=self.on_step, progress=progress,
                            max_nonfinite_steps=int(tcfg.max_nonfinite_steps))
            epoch_done = st.batch_in_epoch >= self.steps_per_epoch
            if epoch_done and (st.epoch + 1) % int(tcfg.val_every_epochs) == 0 and st.step < self.total_steps:
                self.last_metrics = self.validate()
                self.checkpoint("last.pt")

    def run(self) -> dict:
        """Train to the end; returns the last validation metrics (also in train_summary.json)."""
        if self.tcfg.get("save_init") and self.state.step == 0:
            self.checkpoint("init.pt")  # DDP has broadcast rank 0's initial weights: what every rank starts from
        progress = self.logger.progress(total=self.total_steps, initial=self.state.step)
        t_start = time.perf_counter()
        try:
            with logging_redirect_tqdm():
                self._loop(progress)
        except NonFiniteLossError as e:
            progress.close()
            self.logger.close()
            log.error("%s", e)
            raise SystemExit(str(e)) from None
        finally:
            progress.close()  # ends the bar's line, so whatever is printed next starts its own
        history = self.state.history
        if not history or history[-1]["step"] != self.state.step:
            self.last_metrics = self.validate()
        elif not self.last_metrics:
            self.last_metrics = {k: v for k, v in history[-1].items() if k != "step"}
        self.skips.sync(self.device)
        self.checkpoint("last.pt")
        self._write_summary(time.perf_counter() - t_start)
        self.logger.close()
        return self.last_metrics

    def _write_summary(self, wall: float) -> None:
        checksums = rank_weight_checksums(unwrap(self.module))  # a collective: every rank takes part
        if not self.main:
            return
        st = self.state  # (the final checkpoint set samples_seen)
        summary = {"steps": st.step, "samples_seen": st.samples_seen, "wall_s": round(wall, 1),
                   "best_step": st.best_step, "best": st.best_metric, "last": self.last_metrics,
                   "world_size": self.world, "rank_weight_checksums": checksums, "skipped_bad": self.skips.total}
        if self.skips.total:
            log.warning("data.skip_bad: %d training item(s) were unreadable and replaced by the next readable "
                        "one (each named above); run scripts/check_data.py to list the damaged files", self.skips.total)
        (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %d steps in %.0f s; best %s=%.4g at step %d; checkpoints in %s", st.step, wall,
                 self.tcfg.monitor, st.best_metric, st.best_step, self.ckpt_dir)
