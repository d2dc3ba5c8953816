"""Section `params`: parameters and FLOPs of the inference path and of a training step."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from ...build import compose_config
from ...models.training import TrainingModule
from .harness import Rows, count_flops
from .runs import build_run, first_batch, train_overrides


def bench_params(cfg: DictConfig, device: torch.device, shared: dict) -> tuple[list, dict]:
    """Parameters and FLOPs of the inference path and of a training step (forward and backward of the
    model, the frozen text tower, adapters and loss), per preset."""
    s = cfg.params
    rows, raw = Rows("params"), {}
    for preset, overrides in s.presets.items():
        tcfg = compose_config("train", train_overrides(cfg, overrides))
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
