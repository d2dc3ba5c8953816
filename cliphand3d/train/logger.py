"""What a run shows a person: a tqdm bar, TensorBoard scalars, skeleton images, the best / median / worst
validation samples and the PCK curve.

Only rank 0 logs; on other ranks every method is a no-op so the training code needs no rank checks.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import viz
from ..evaluation.figures import pck_curve_figure, prediction_tile, ranked_samples

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
        """Predicted skeletons on the first validation crops (over the true one, and alone), the best /
        median / worst samples (eval.py's samples.png) and the protocol's PCK curve."""
        if self.writer is None:
            return
        n = min(self.num_images, len(preds["pred_xyz"]))
        tiles = []
        for i in range(n):
            item = dataset[int(preds["index"][i])]
            tiles.append(prediction_tile(item, preds["pred_xyz"][i], item["joints_xyz"].numpy()))
        if tiles:
            self.writer.add_images("val/skeletons", np.stack(tiles), step, dataformats="NHWC")
        protocol = getattr(dataset, "protocol", "freihand")
        grid = ranked_samples(dataset, preds, protocol, self.samples_per_group)
        if grid is not None:
            self.writer.add_image("val/samples", viz.grid_image(*grid[:2], cols=grid[2]), step, dataformats="HWC")
        # the curve whose area is logged as val/auc_pa_0_50 (FreiHAND) or val/auc_0_50 (RHD)
        title = "val PCK, hand3d (root, bone, visible)" if protocol == "rhd" else "val PCK, Procrustes-aligned"
        self.writer.add_figure("val/pck", pck_curve_figure(protocol, {"model": preds["pred_xyz"]}, preds, title),
                               step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
