"""labels=FILE.json: the mean 2D error of the demo's predictions against COCO-style keypoint labels, beside a
constant mean pose of the model's training labels."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ... import metrics
from ...build import build_datasets
from ...errors import ConfigError
from ...evaluation.baselines import training_mean_uvd
from ...skeleton import NUM_JOINTS
from .hand import DemoModel, crop_uv_to_image

log = logging.getLogger(__name__)


def read_keypoint_labels(path: Path) -> dict[str, np.ndarray]:
    """COCO-style keypoints (`images` with file_name and id, `annotations` with image_id and 21 x (u, v, vis))
    -> {file name: (21, 2) pixels}."""
    data = json.loads(path.read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    return {names[a["image_id"]]: np.asarray(a["keypoints"], np.float64).reshape(NUM_JOINTS, 3)[:, :2]
            for a in data["annotations"]}


def score_against_labels(done: list[dict], labels_path: Path, dm: DemoModel, out: Path) -> dict:
    """Mean 2D error of the predictions on the labelled images, beside a constant pose: the mean of the
    model's training labels in its output space (evaluation.baselines.training_mean_uvd), placed in each crop."""
    labels = read_keypoint_labels(labels_path)
    hits = [d for d in done if "joints_2d" in d and Path(d["file"]).name in labels]
    if not hits:
        raise ConfigError(f"labels={labels_path}: none of its file names is among the processed images")
    gt = np.stack([labels[Path(d["file"]).name] for d in hits])
    pred = np.stack([d["joints_2d"] for d in hits])
    report = {"labels": str(labels_path), "num_images": len(hits),
              "mean_2d_error_px": metrics.mean_error_2d(pred, gt)[0]}
    mean_uv = training_mean_uv(dm)
    if mean_uv is not None:
        base = np.stack([crop_uv_to_image(mean_uv, d["result"], dm.img_size, d["result"]["uv_offset"])
                         for d in hits])
        report["mean_pose_baseline_px"] = metrics.mean_error_2d(base, gt)[0]
    (out / "labels_2d_error.json").write_text(json.dumps(report, indent=1))
    print(f"2D error on {len(hits)} labelled images: {report['mean_2d_error_px']:.2f} px (model), "
          f"{report.get('mean_pose_baseline_px', float('nan')):.2f} px (constant mean pose of the training labels)")
    return report


def training_mean_uv(dm: DemoModel, num_samples: int = 256):
    """The training labels' mean joints in normalised uv (right hands), or None without the training data."""
    cfg = getattr(dm, "config", None)
    if cfg is None:
        return None
    try:
        train = build_datasets(cfg, None, splits=("train",))["train"]
        return training_mean_uvd(train, num_samples)["joints_uvd"][:, :2]
    except Exception as e:  # noqa: BLE001 - the baseline is optional; the data may not be on this machine
        log.warning("mean-pose baseline skipped: the training data cannot be built (%s)", str(e).splitlines()[0])
        return None
