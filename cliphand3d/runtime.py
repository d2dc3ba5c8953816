"""Where the work runs: the device, seeding, data loaders, autocast, batches on the device, DDP unwrapping.

Shared by training, evaluation and the apps, so each decides these things the same way.
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import shutil
import signal
import sys
import threading
from contextlib import nullcontext

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .errors import ConfigError


def pick_device(name: str, local_rank: int = 0, key: str = "trainer.device") -> torch.device:
    """`auto` (CUDA when usable, else CPU), `cuda` (this process's GPU, `local_rank`; refused with the reason
    when CUDA is unusable, never a silent CPU run) or any torch device name. `key`: the config key, for errors."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}=cuda but CUDA is unusable here: {cuda_unusable_reason()}.\n  fix: run where "
                              "torch sees the GPU (a container needs docker run --gpus all; a driver older than this "
                              f"torch's CUDA {torch.version.cuda} needs a torch build for it), or set {key}=cpu to "
                              "run on the CPU anyway (many times slower)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def cuda_unusable_reason() -> str:
    """Why torch.cuda.is_available() is False, in CUDA's own words where it gives them."""
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) was built without CUDA"
    try:
        torch.cuda.init()  # raises with the driver's reason: no driver, a driver too old, no device
        reason = "no CUDA device was found"
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError and AssertionError here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return reason + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def configure_cuda(*, benchmark: bool, tf32: bool) -> None:
    """cuDNN's autotuner (fastest convolution algorithms for fixed shapes, chosen per run: fine for training)
    and TF32 matrix products and convolutions on Ampere and later (~1e-3 relative: not for exact evaluation).
    No effect on the CPU."""
    torch.backends.cudnn.benchmark = bool(benchmark)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lower_priority(nice: int, worker_id: int) -> None:
    os.nice(nice)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGKILL when the thread that started it ends. A SIGKILLed training
    process cannot stop its loader workers itself, and torch's workers only look for their parent between
    items: one busy with an item, or stopped (the benchmark stops a run's workers between its turns), would
    otherwise live on. `parent`: the pid that started it; gone already, this process ends here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused (a sandbox): the workers live as torch lets them
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def start_worker(parent: int | None, started, init, worker_id: int) -> None:
    """A loader worker's first act (WorkerLoader): die with its parent, say so, then the caller's init."""
    if parent is not None:
        die_with_parent(parent)
    if started is not None:
        started.release()
    if init is not None:
        init(worker_id)


class WorkerLoader(DataLoader):
    """A DataLoader whose workers start with OpenCV on `cv2_threads` threads and die with the process that
    started them (Linux). The OpenCV count is set in this process for the moment the workers are forked, then put
    back: a forked worker must not change it itself (after this process has used OpenCV's thread pool,
    setNumThreads in the child waits forever on the pool's lock), and it keeps what it was forked with.

    Starting the workers (iter()) returns once each has armed its death signal, so a caller that then stops
    them (SIGSTOP) cannot leave one behind that never armed it."""

    def __init__(self, *args, cv2_threads: int = 1, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=worker_init_fn, **kwargs)
        self.cv2_threads, self.user_init = int(cv2_threads), worker_init_fn

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        context = self.multiprocessing_context or torch.multiprocessing
        # the death signal follows the forking thread (so only the main thread arms it), and a forkserver's
        # workers are the server's children, not ours
        parent = (os.getpid() if sys.platform.startswith("linux") and context.get_start_method() in ("fork", "spawn")
                  and threading.current_thread() is threading.main_thread() else None)
        started = context.Semaphore(0) if parent is not None else None
        self.worker_init_fn = functools.partial(start_worker, parent, started, self.user_init)
        before = cv2.getNumThreads()
        cv2.setNumThreads(self.cv2_threads)
        try:
            batches = super()._get_iterator()  # forks the workers
        finally:
            cv2.setNumThreads(before)
        if started is not None:
            _wait_started(started, getattr(batches, "_workers", []))
        return batches


def _wait_started(started, workers: list) -> None:
    """Until every worker has released `started` once, or one has died (the loader then reports why)."""
    for _ in workers:
        while not started.acquire(timeout=0.1):
            if not all(w.is_alive() for w in workers):
                return


def make_loader(dataset, *, batch_size: int, num_workers: int, sampler=None, shuffle=False, drop_last=False,
                device: torch.device, worker_nice: int = 0, cv2_threads: int = 1,
                sharing_strategy: str | None = None) -> DataLoader:
    """A DataLoader whose workers live as long as it does (persistent: an epoch or a validation starts no
    new processes), pin memory for a GPU, and run OpenCV on `cv2_threads` threads each (WorkerLoader).

    worker_nice > 0 runs the workers at that lower priority: on a machine with as many training threads
    as cores they then fill the cores' idle moments instead of preempting a training thread, which stalls
    its partner at the next synchronisation (see trainer/cpu.yaml). sharing_strategy: how workers hand
    batches over (torch.multiprocessing: file_descriptor, file_system); None leaves torch's default."""
    if worker_nice < 0:
        raise ConfigError(f"trainer.worker_nice={worker_nice} must be >= 0 (0: the workers' priority is not changed)")
    if int(cv2_threads) < 1:
        raise ConfigError(f"trainer.worker_cv2_threads={cv2_threads} must be >= 1 (1: OpenCV runs sequentially in "
                          "each worker, the workers being many)")
    if num_workers > 0 and sharing_strategy:
        set_sharing_strategy(str(sharing_strategy))
    init = functools.partial(lower_priority, int(worker_nice)) if num_workers > 0 and worker_nice > 0 else None
    # Its own generator: creating a loader iterator would otherwise draw from the global torch RNG, and a
    # resumed run (which creates one mid-epoch) would drift from an uninterrupted one.
    return WorkerLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                        num_workers=num_workers, drop_last=drop_last, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0),
                        worker_init_fn=init, cv2_threads=cv2_threads)


def set_sharing_strategy(strategy: str) -> None:
    """torch.multiprocessing's sharing strategy for loader workers (trainer.sharing_strategy)."""
    choices = sorted(torch.multiprocessing.get_all_sharing_strategies())
    if strategy not in choices:
        raise ConfigError(f"trainer.sharing_strategy={strategy!r} is not one of {choices} (null: torch's default)")
    torch.multiprocessing.set_sharing_strategy(strategy)


# How a loader worker that ran out of shared memory (/dev/shm) shows up in the main process.
SHM_MARKS = ("Bus error", "shared memory", "No space left on device", "unable to write to file </torch_",
             "unable to allocate shared memory")


def guard_shared_memory(batches):
    """Iterate a loader; a worker that died for want of shared memory (Docker's default /dev/shm is
    64 MB) stops the run with an error naming the fix instead of a bus error deep in torch."""
    try:
        yield from batches
    except RuntimeError as e:
        if not any(m in str(e) for m in SHM_MARKS):
            raise
        free = shared_memory_free()
        raise ConfigError(
            f"a data loader worker ran out of shared memory ({free}): {str(e).splitlines()[0]}\n"
            "  fix: give the container more with docker run --shm-size=8g (or --ipc=host), or pass batches "
            "through files with trainer.sharing_strategy=file_system, or load in the main process with "
            "trainer.num_workers=0") from e


def shared_memory_free() -> str:
    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError:
        return "/dev/shm not found"
    return f"/dev/shm: {usage.free / 2 ** 20:.0f} MB free of {usage.total / 2 ** 20:.0f} MB"


def to_device(batch, device: torch.device):
    """Tensors of a batch (nested dicts, lists and tuples of tensors) moved to `device`; the rest as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast_for(device: torch.device, amp: str | bool):
    """(autocast context, grad scaler or None). AMP only on CUDA: bf16 where supported, else fp16 with a
    grad scaler. CPU trains in fp32."""
    if device.type != "cuda" or amp in (False, "off", "none", None):
        return nullcontext(), None
    if amp in ("auto", True, "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper, else `module`."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return module.module if isinstance(module, wrappers) else module
