"""What a run shows a person: a tqdm bar, TensorBoard scalars, skeleton images, the best / median / worst
validation samples and the PCK curve.

Only rank 0 logs; on other ranks every method is a no-op so the training code needs no rank checks.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


class RunLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 num_images: int = 8, samples_per_group: int = 3):
        self.enabled = enabled
        self.num_images = num_images
        self.samples_per_group = samples_per_group  # tiles per row of val/samples (best, median, worst)
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def progress(self, total: int, initial: int = 0):
        if not self.enabled:
            return _NullBar()
        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def validation_figures(self, dataset, preds: dict, step: int) -> None:
        """Predicted skeletons on the first validation crops (over the true one, and alone) and the
        protocol's PCK curve."""
        if self.writer is None:
            return
        from . import metrics, viz
        from .data.transforms import denormalize_image
        from .geometry import project

        n = min(self.num_images, len(preds["pred_xyz"]))
        tiles = []
        for i in range(n):
            item = dataset[int(preds["index"][i])]
            img = denormalize_image(item["image"])
            K = item["K"].numpy().astype(np.float64)
            gt_uv = project(item["joints_xyz"].numpy().astype(np.float64), K)
            pred_uv = project(preds["pred_xyz"][i].astype(np.float64), K)
            tiles.append(viz.draw_pred_vs_gt(img, pred_uv, gt_uv))
        if tiles:
            self.writer.add_images("val/skeletons", np.stack(tiles), step, dataformats="NHWC")
        # the curve whose area is logged as val/auc_pa_0_50 (FreiHAND) or val/auc_0_50 (RHD)
        protocol = getattr(dataset, "protocol", "freihand")
        visible = preds.get("visible") if protocol == "rhd" else None
        self._ranked_samples(dataset, preds, protocol, step)
        curve = metrics.protocol_pck_curve(protocol, preds["pred_xyz"], preds["gt_xyz"], visible)
        title = "val PCK, hand3d (root, bone, visible)" if protocol == "rhd" else "val PCK, Procrustes-aligned"
        self.writer.add_figure("val/pck", viz.pck_figure({"model": curve}, title=title), step)

    def _ranked_samples(self, dataset, preds: dict, protocol: str, step: int) -> None:
        """The grid eval.py writes as samples.png: best / median / worst by the protocol's per-sample error."""
        from . import viz
        from .evaluate import SAMPLE_GROUPS, error_sample_grid, protocol_errors

        per_sample, _ = protocol_errors(protocol, preds)
        if not np.isfinite(per_sample).any():
            return
        tiles, captions = error_sample_grid(dataset, preds, per_sample, self.samples_per_group)
        grid = viz.grid_image(tiles, captions, cols=len(tiles) // len(SAMPLE_GROUPS))
        self.writer.add_image("val/samples", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
