"""What a run shows a person: a tqdm bar, then scalars, skeleton images, the best / median / worst validation
samples and the PCK curve, sent to TensorBoard (<run_dir>/tb), to W&B (logger=wandb), or to both.

The training code calls one interface, RunLogger; each backend is a sink with the same four methods (scalar,
images, image, close), so the loop never asks which backends are on. Only rank 0 logs; on other ranks
RunLogger has no sink and every method is a no-op, so the training code needs no rank checks.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import viz
from ..errors import MissingExtraError
from ..evaluation.figures import pck_curve_figure, prediction_tile, ranked_samples

log = logging.getLogger(__name__)

WANDB_INSTALL_HINT = 'pip install -e ".[wandb]"'


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def figure_rgb(fig) -> np.ndarray:
    """A matplotlib figure as an (H, W, 3) uint8 image, rendered as TensorBoard's add_figure renders it, then
    closed (pyplot would keep one figure per validation alive). Rendered once, every backend shows the same
    pixels."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


class TensorBoardSink:
    """Event files in `log_dir` (TensorBoard's SCALARS and IMAGES tabs)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def images(self, tag: str, images: Sequence[np.ndarray], step: int) -> None:
        self.writer.add_images(tag, np.stack(images), step, dataformats="NHWC")

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def import_wandb():
    """The `wandb` extra's package, or a MissingExtraError with the command that installs it."""
    try:
        import wandb
    except ImportError as e:
        raise MissingExtraError(f"logger=wandb needs the optional package wandb (missing: {e.name or e}); install "
                                f"it with: {WANDB_INSTALL_HINT}, or log to TensorBoard instead: logger=tensorboard"
                                ) from None
    return wandb


WANDB_ID_FILE = "wandb_run_id"  # in the run folder: the W&B run a resumed training run continues


class WandbSink:
    """One W&B run: the scalars at the training step (W&B's x axis is the same step TensorBoard shows), the
    images as W&B images, the resolved `config` as the run's config. `mode` None leaves it to WANDB_MODE (else
    online); offline runs are uploaded later with `wandb sync <dir>/wandb/offline-run-*`. `dir` None: WANDB_DIR,
    else the run folder, so a run's W&B files sit beside its checkpoints. The run's W&B id is kept in the run
    folder (WANDB_ID_FILE); `resume`: a resumed training run continues that W&B run instead of opening another."""

    def __init__(self, run_dir: str | Path, *, project: str | None = "cliphand3d", entity: str | None = None,
                 mode: str | None = None, dir: str | None = None, name: str | None = None,
                 config: Mapping | None = None, resume: bool = False):
        self.wandb = import_wandb()
        if dir is None and not os.environ.get("WANDB_DIR"):
            dir = str(run_dir)
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)  # W&B falls back to a temp folder when it is missing
        id_file = Path(run_dir) / WANDB_ID_FILE
        earlier = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = self.wandb.init(project=project, entity=entity, mode=mode, dir=dir, name=name,
                                   config=dict(config) if config is not None else None,
                                   id=earlier or None, resume="allow" if earlier else None)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id + "\n")
        log.info("W&B run %s (mode %s%s) in %s", self.run.id, self.run.settings.mode,
                 ", continued" if earlier else "", self.run.dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        # W&B merges every log call of one step into one history row and writes it when the step moves on
        self.run.log({tag: value}, step=step)

    def images(self, tag: str, images: Sequence[np.ndarray], step: int) -> None:
        self.run.log({tag: [self.wandb.Image(im) for im in images]}, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a run that exits non-zero as failed


class RunLogger:
    """`tensorboard`: event files in <run_dir>/tb. `wandb`: WandbSink's keywords (project, entity, mode, dir,
    name), None for no W&B run. `config`: the resolved run config, W&B's run config (TensorBoard needs none: the
    run folder holds config.yaml). `resume`: the run continues from a checkpoint (its W&B run continues too)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: Mapping | None = None, config: Mapping | None = None, num_images: int = 8,
                 samples_per_group: int = 3, resume: bool = False):
        self.enabled = enabled
        self.num_images = num_images
        self.samples_per_group = samples_per_group  # tiles per row of val/samples (best, median, worst)
        self.sinks: list = []
        if enabled and tensorboard:
            self.sinks.append(TensorBoardSink(Path(run_dir) / "tb"))
        if enabled and wandb is not None:
            self.sinks.append(WandbSink(run_dir, config=config, resume=resume, **wandb))

    def progress(self, total: int, initial: int = 0):
        if not self.enabled:
            return _NullBar()
        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    def scalar(self, tag: str, value: float, step: int) -> None:
        for sink in self.sinks:
            sink.scalar(tag, float(value), step)

    def validation_figures(self, dataset, preds: dict, step: int, prefix: str = "val/") -> None:
        """Predicted skeletons on the first validation crops (over the true one, and alone), the best /
        median / worst samples (eval.py's samples.png) and the protocol's PCK curve, as <prefix>skeletons,
        <prefix>samples and <prefix>pck (data=mix: val/<set>/...)."""
        if not self.sinks:
            return
        n = min(self.num_images, len(preds["pred_xyz"]))
        tiles = []
        for i in range(n):
            item = dataset[int(preds["index"][i])]
            tiles.append(prediction_tile(item, preds["pred_xyz"][i], item["joints_xyz"].numpy()))
        protocol = getattr(dataset, "protocol", "freihand")
        grid = ranked_samples(dataset, preds, protocol, self.samples_per_group)
        samples = viz.grid_image(*grid[:2], cols=grid[2]) if grid is not None else None
        # the curve whose area is logged as val/auc_pa_0_50 (FreiHAND) or val/auc_0_50 (RHD)
        title = "val PCK, hand3d (root, bone, visible)" if protocol == "rhd" else "val PCK, Procrustes-aligned"
        pck = figure_rgb(pck_curve_figure(protocol, {"model": preds["pred_xyz"]}, preds, title))
        for sink in self.sinks:
            if tiles:
                sink.images(f"{prefix}skeletons", tiles, step)
            if samples is not None:
                sink.image(f"{prefix}samples", samples, step)
            sink.image(f"{prefix}pck", pck, step)

    def close(self, failed: bool = False) -> None:
        """Close every sink; failed=True: the run stopped short (W&B marks it failed)."""
        for sink in self.sinks:
            sink.close(failed)
        self.sinks = []
