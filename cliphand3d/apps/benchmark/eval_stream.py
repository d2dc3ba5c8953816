"""Section `eval_stream`: evaluation of a FreiHAND-size set streamed in batches, in a fresh process
(eval_stream_task): per-batch time, the whole set's time, memory per batch."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Subset

from ...build import build_datasets, compose_config
from ...evaluation.predict import predict
from ...runtime import make_loader
from .harness import Rows, median, per_s, run_child
from .machine import MB, memory_mb
from .runs import eval_model, train_overrides


def bench_eval_stream(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Evaluation of a FreiHAND-size set streamed in batches (evaluation.predict.predict, as eval.py): per-batch
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
    """In a fresh process: evaluation.predict.predict over the first `batches` crops of the test split, recording
    the time and RSS at every batch boundary."""
    device = torch.device(spec["device"])
    tcfg = compose_config("train", spec["overrides"])
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

    preds = predict(model, probe(), device)
    intervals = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    timed_rss = rss[1:]
    growth = (timed_rss[-1] - timed_rss[0]) / max(len(timed_rss) - 1, 1)
    kept = sum(v.nbytes for v in preds.values() if isinstance(v, np.ndarray)) / MB / max(len(intervals), 1)
    peak = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else memory_mb("VmHWM")
    return {"first_s": stamps[1] - stamps[0], "intervals": intervals, "rss_mb": rss, "growth_mb": growth,
            "kept_mb": kept, "peak_mb": peak,
            "label": f"batch {spec['batch_size']} @ {tcfg.data.img_size} px, {tcfg.model.backbone}"}
