"""Section `inference`: images/s of the inference path beside the bare backbone, and onnxruntime."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ...build import compose_config
from ..export import OnnxModel, export_onnx
from .harness import Rows, interleave, median, per_s, timed
from .runs import eval_model, train_overrides

ONNX_EXTRA = "skipped: pip install -e .[onnx]"


def bench_inference(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Images/s of `model(images)` (eval, no text) beside `model.backbone(images)` on the same input,
    per preset and batch size, and onnxruntime beside both where it is installed."""
    s = cfg.inference
    rows, raw = Rows("inference"), {}
    for preset, overrides in s.presets.items():
        tcfg = compose_config("train", train_overrides(cfg, overrides))
        model, size = eval_model(tcfg, device), int(tcfg.data.img_size)
        label = f"{preset}@{size}"
        ort = onnx_runner(model, label, size, device, Path(cfg.out_dir), preset in s.onnx_presets, rows)
        for b in s.batch_sizes:
            raw[f"{label} b{b}"] = inference_pair(model, size, int(b), device, ort, rows, label,
                                                  rounds=int(s.rounds), warmup=int(s.warmup))
        del model, ort
    return rows.items, raw


def onnx_runner(model, label: str, size: int, device: torch.device, out: Path, wanted: bool, rows: Rows):
    """onnxruntime session of `model` via cliphand3d.apps.export, or None with a row saying why."""
    if not wanted:
        return None
    name = f"{label} onnxruntime"
    if device.type != "cpu":
        rows.skip(name, "skipped: onnxruntime is compared with eager PyTorch on CPU")
        return None
    try:
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
