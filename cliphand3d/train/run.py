"""scripts/train.py's work: one training run, from its config to its checkpoints and summary.

`Run` builds everything from the config (build.py), then loops (loop.train_one_epoch), validates on `val`
(evaluation/scoring.validate, the same metrics eval.py reports), checkpoints (last.pt, best.pt; their
entries: checkpoint/state.py) and resumes (resume.py). Devices and DDP come from runtime.py / dist.py.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import dist, metrics
from ..build import (adopt_init_config, build_datasets, build_prompts, build_template, build_training_module,
                     checkpoint_config, load_init_weights, monitor_set, validates)
from ..checkpoint.io import load_checkpoint, save_checkpoint
from ..checkpoint.state import template_from_state, training_checkpoint
from ..data.base import SkipCounter
from ..data.sampler import sampler_for
from ..errors import ConfigError, NonFiniteLossError
from ..evaluation.run import evaluate_run
from ..evaluation.scoring import validate
from ..preflight import check_config, check_writable
from ..runtime import (autocast_for, configure_cuda, guard_shared_memory, make_loader, pick_device, seed_everything,
                       unwrap)
from .ema import ModelEMA
from .guards import check_checkpoint_space, check_gradients, rank_weight_checksums
from .logger import RunLogger
from .loop import TrainState, train_one_epoch
from .optim import optimizer_from_config, schedule_from_config
from .resume import check_resumable, find_resume_checkpoint, restore
from .validation import Validation

log = logging.getLogger(__name__)


def _cli_overrides() -> list[str]:
    """The command line's overrides (they still win over an init_from checkpoint's architecture)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # train() called without Hydra's runtime (tests, notebooks)
        return []


def improves(monitor: str, value: float, state: TrainState) -> bool:
    """Does this validation beat the best so far? AUCs, F-scores and retrieval rise, errors fall; the
    first finite value always counts (best_metric starts at inf)."""
    if state.best_step < 0:
        return math.isfinite(value)
    return value > state.best_metric if metrics.higher_is_better(monitor) else value < state.best_metric


class SampleRecorder:
    """trainer.record_samples (debugging data order): one JSON line per optimiser step,
    {"step", "epoch", "index": the dataset indices this rank trained on}, appended to `path`. A resumed
    run appends again from its checkpoint on, so the last line of a step is the one that counts. A step's
    indices are the last `per_step` read (trainer.accumulate: its micro-batches together)."""

    def __init__(self, path: Path, per_step: int):
        self.path, self.pending, self.per_step = path, [], per_step
        path.parent.mkdir(parents=True, exist_ok=True)

    def wrap(self, loader):
        for batch in loader:
            self.pending = (self.pending + batch["meta"]["index"].tolist())[-self.per_step:]
            yield batch

    def commit(self, state: TrainState) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.step, "epoch": state.epoch, "index": self.pending}) + "\n")


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
        configure_cuda(benchmark=bool(cfg.trainer.get("cudnn_benchmark", True)), tf32=bool(cfg.trainer.get("tf32", True)))
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
        self.recorder = (SampleRecorder(self.run_dir / "samples" / f"rank{rank}.jsonl", per_step=self.bs)
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
        # never test: it must not choose best.pt. data.val_fraction=0 (a final model on every training hand)
        # holds nothing out: no validation, best.pt is the last weights
        self.holds_out = validates(self.cfg)
        sets = build_datasets(self.cfg, prompts, splits=("train", "val") if self.holds_out else ("train",))
        self.train_set, self.val_set = sets["train"], sets.get("val")
        # data=mix: each epoch draws every set's share by its weight (data/mix.py); else a shuffle of the set
        self.sampler = sampler_for(self.train_set, shuffle=True, seed=int(self.cfg.seed), rank=self.rank,
                                   world_size=self.world, batch_size=self.bs, drop_last=True, with_epoch=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(f"trainer.batch_size={self.bs} x {self.world} process(es) is larger than the training "
                             f"set ({len(self.train_set)} samples): lower trainer.batch_size or use more data")
        # built once: their workers live for the whole run (the sampler tells them the epoch). The sampler deals
        # whole batches; with trainer.accumulate=N the loader cuts each into N micro-batches (preflight: N divides)
        self.accumulate = int(self.tcfg.get("accumulate", 1))
        self.train_loader = self._loader(self.train_set, self.bs // self.accumulate, sampler=self.sampler,
                                         drop_last=True)
        self.validation = Validation(self.val_set, monitor_set=monitor_set(self.cfg), loader=self._loader,
                                     batch_size=int(self.tcfg.val_batch_size), rank=self.rank,
                                     world=self.world) if self.holds_out else None
        if self.main and self.validation is not None and self.validation.mixed:
            log.info("%s", self.validation.describe(self.tcfg.monitor))

    def _loader(self, dataset, batch_size: int, **kw):
        t = self.tcfg
        return make_loader(dataset, batch_size=batch_size, num_workers=int(t.num_workers), device=self.device,
                           worker_nice=int(t.get("worker_nice", 0)), cv2_threads=int(t.get("worker_cv2_threads", 1)),
                           sharing_strategy=t.get("sharing_strategy"), **kw)

    def _build_module(self, saved: dict | None, init: dict | None) -> None:
        cfg = self.cfg
        if saved is not None:
            self.template = template_from_state(saved["template"])
        elif init is not None:
            self.template = template_from_state(init["template"])
        else:
            self.template = build_template(cfg, self.train_set)
        module, self.text_branch = build_training_module(cfg, self.template)  # freezes what weighs 0
        module.to(self.device)
        if init is not None and saved is None:
            fresh = load_init_weights(module, init, str(cfg.init_from))
            if self.main:
                log.info("init_from %s: model weights loaded; training heads not in it (start fresh): %s",
                         cfg.init_from, fresh or "none")
        if self.main and module.frozen:
            log.info("frozen, as only zero-weighted loss terms train them: %d parameter tensors (%s)",
                     len(module.frozen), ", ".join(sorted({n.rsplit(".", 2)[0] for n in module.frozen})))
        if self.world > 1:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.module = module

    def _build_optimisation(self) -> None:
        """The optimiser and the schedule, defined in samples (train/optim.py): the same curve over samples on
        any number of processes, ceil(total samples / global batch) steps."""
        ocfg, tcfg = self.cfg.optim, self.tcfg
        self.schedule = schedule_from_config(tcfg, ocfg, train_size=len(self.train_set), batch_size=self.bs,
                                             world_size=self.world)
        self.optimizer = optimizer_from_config(self.module, ocfg, lr_scale=self.schedule.lr_scale)
        self.total_steps = self.schedule.steps
        self.scheduler = self.schedule.scheduler(self.optimizer)
        if self.main:
            sch = self.schedule
            log.info("schedule: %d samples (%d batches of trainer.schedule_batch=%d, warm-up %d samples) in %d steps "
                     "of %d x %d; lr x %.4g (optim.lr_scaling=%s)", sch.total, sch.total // sch.unit, sch.unit,
                     sch.warmup, sch.steps, self.world, self.bs, sch.lr_scale, ocfg.get("lr_scaling", "none"))
        _, self.scaler = autocast_for(self.device, tcfg.amp)
        self.ema = (ModelEMA(unwrap(self.module).model, decay=float(tcfg.ema_decay))
                    if tcfg.get("ema_decay") else None)

    def _restore(self, saved: dict) -> None:
        self.state = restore(saved, self.resume_path, module=self.module, optimizer=self.optimizer,
                             scheduler=self.scheduler, scaler=self.scaler, ema=self.ema)
        if self.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.resume_path, self.state.step,
                     self.state.epoch, self.state.batch_in_epoch)

    def _open_logs(self) -> None:
        lcfg = OmegaConf.to_container(self.cfg.logger, resolve=True)
        self.logger = RunLogger(self.run_dir, enabled=self.main, tensorboard=bool(lcfg["tensorboard"]),
                                wandb=lcfg.get("wandb"), config=OmegaConf.to_container(self.cfg, resolve=True),
                                resume=self.resume_path is not None)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            log.info("run dir %s | device %s x %d | %d train / %d val samples | %d steps (%d per epoch)",
                     self.run_dir, self.device, self.world, len(self.train_set),
                     len(self.val_set) if self.holds_out else 0, self.total_steps, self.steps_per_epoch)
            if not self.holds_out:
                log.info("data.val_fraction=0: every training sample trains and none validates; best.pt will be "
                         "the last weights")

    # ------------------------------------------------------------------ during the run
    def checkpoint(self, name: str) -> None:
        if not self.main:
            return
        st = self.state
        # from the position, not counted per step: a batch skipped for its gradients is consumed too
        st.samples_seen = (st.epoch * self.steps_per_epoch + st.batch_in_epoch) * self.bs * self.world
        save_checkpoint(self.ckpt_dir / name, training_checkpoint(
            module=unwrap(self.module), template=self.template, config=self.cfg,
            protocol=getattr(self.train_set, "protocol", "freihand"), optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, ema=self.ema, train_state=st.to_dict(),
            skipped_bad=self.skips.total))

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
        """Validate on `val` (data=mix: each set's, with its own protocol: train/validation.py), sharded over the
        ranks: each predicts its share, rank 0 scores the gathered predictions once (exactly one process's metrics:
        evaluation/scoring.validate), logs them and keeps best.pt by `trainer.monitor` (of data.monitor_set). Every
        rank gets the metrics and keeps the same history and best step."""
        st, monitor = self.state, self.tcfg.monitor
        if not self.holds_out:
            return {}
        self.skips.sync(self.device)  # a collective, so here where every rank is, not where rank 0 saves best.pt
        eval_model = self.ema.module if self.ema is not None else unwrap(self.module).model
        # each rank's last training forward moved its own BatchNorm statistics (the EMA copies them): validate
        # rank 0's on every rank (DDP would send them at the next step anyway)
        dist.broadcast_buffers(unwrap(self.module))
        if self.ema is not None:
            dist.broadcast_buffers(self.ema.module)
        res, preds = self.validation.run(eval_model, self.device, validate, text_branch=self.text_branch)
        key = self.validation.monitor_key(monitor)  # data=mix: <monitor set>/<monitor>
        if key not in res:
            raise KeyError(f"trainer.monitor={monitor!r} is not a validation metric; choose from {sorted(res)}")
        st.history.append({"step": st.step, **res})
        best = improves(monitor, float(res[key]), st)
        if best:
            st.best_metric, st.best_step = float(res[key]), st.step
        if self.main:
            for k, v in res.items():
                self.logger.scalar(f"val/{k}", v, st.step)
            for name, set_preds in preds.items():  # data=mix: every set's pictures, under val/<set>/
                self.logger.validation_figures(self.validation.sets[name], set_preds, st.step,
                                               prefix=f"val/{self.validation.key(name, '')}")
            if best:
                self.checkpoint("best.pt")
            log.info("step %d | %s", st.step, " ".join(f"{k}={v:.4g}" for k, v in res.items()))
        if dist.is_dist():
            torch.distributed.barrier()  # rank 0 writes best.pt meanwhile
        unwrap(self.module).train()
        return res

    def _loop(self, progress) -> None:
        st, tcfg = self.state, self.tcfg
        while st.step < self.total_steps:
            if st.batch_in_epoch >= self.steps_per_epoch:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            self.sampler.set_epoch(st.epoch, st.batch_in_epoch)
            self.train_set.set_epoch(st.epoch)
            loader = self.skips.wrap(guard_shared_memory(self.train_loader))
            if self.recorder is not None:
                loader = self.recorder.wrap(loader)
            train_one_epoch(self.module, loader, self.optimizer, self.scheduler, st, device=self.device,
                            total_steps=self.total_steps, amp=tcfg.amp, scaler=self.scaler, grad_clip=tcfg.grad_clip,
                            ema=self.ema, log=self.logger.scalar, log_every=int(self.cfg.logger.log_every),
                            on_step=self.on_step, progress=progress,
                            max_nonfinite_steps=int(tcfg.max_nonfinite_steps), accumulate=self.accumulate)
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
            self.logger.close(failed=True)
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
        if not self.holds_out:  # nothing validated: the final weights are the model this run gives
            self.state.best_step = self.state.step
            self.checkpoint("best.pt")
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
                   "world_size": self.world, "rank_weight_checksums": checksums, "skipped_bad": self.skips.total,
                   # rank 0's CUDA allocator peak (MB), None on the CPU
                   "peak_memory_mb": (round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20)
                                      if self.device.type == "cuda" else None)}
        if self.skips.total:
            log.warning("data.skip_bad: %d training item(s) were unreadable and replaced by the next readable "
                        "one (each named above); run scripts/check_data.py to list the damaged files", self.skips.total)
        (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %d steps in %.0f s; best %s=%.4g at step %d; checkpoints in %s", st.step, wall,
                 self.validation.monitor_key(self.tcfg.monitor) if self.validation else self.tcfg.monitor,
                 st.best_metric, st.best_step, self.ckpt_dir)
