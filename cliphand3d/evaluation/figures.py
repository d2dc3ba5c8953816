"""Pictures of predictions: skeletons over their crops, the best / median / worst samples, the PCK curve and
the error per joint; eval.py writes them as files (report.py), training logs them to TensorBoard."""
from __future__ import annotations

import numpy as np

from .. import metrics, viz
from ..data.transforms import denormalize_image
from ..geometry import project
from ..skeleton import JOINT_NAMES
from .scoring import protocol_errors

SAMPLE_GROUPS = ("best", "median", "worst")


def prediction_tile(item: dict, pred_xyz, gt_xyz) -> np.ndarray:
    """A dataset item's crop with the predicted skeleton over the true one, then the prediction alone
    (viz.draw_pred_vs_gt); both projected with the item's K."""
    K = item["K"].numpy().astype(np.float64)
    gt_uv = project(np.asarray(gt_xyz, np.float64), K)
    pred_uv = project(np.asarray(pred_xyz, np.float64), K)
    return viz.draw_pred_vs_gt(denormalize_image(item["image"]), pred_uv, gt_uv)


def pick_best_median_worst(errors, k: int) -> dict[str, list[int]]:
    """Positions of the k lowest, the k around the median and the k highest of `errors` (N,), each group in
    ascending error except `worst` (highest first). NaN errors (no visible joint) are never picked."""
    e = np.asarray(errors, dtype=np.float64)
    order = [int(i) for i in np.argsort(e, kind="stable") if np.isfinite(e[i])]
    n, k = len(order), max(1, int(k))
    k = min(k, n)
    start = max(0, (n - k) // 2)
    return {"best": order[:k], "median": order[start:start + k], "worst": order[::-1][:k]}


def error_sample_grid(dataset, preds: dict, errors, k: int, unit: str = "mm") -> tuple[list, list]:
    """(tiles, captions): best / median / worst predictions by `errors` (one per row of preds), each as
    viz.draw_pred_vs_gt on its crop. Only the chosen items are read back from `dataset`, so memory does
    not grow with the set."""
    tiles, captions = [], []
    for group, positions in pick_best_median_worst(errors, k).items():
        for rank, pos in enumerate(positions):
            index = int(preds["index"][pos])
            tiles.append(prediction_tile(dataset[index], preds["pred_xyz"][pos], preds["gt_xyz"][pos]))
            captions.append([f"{group} {rank + 1}: item {index}, {float(errors[pos]):.1f} {unit}"])
    return tiles, captions


def ranked_samples(dataset, preds: dict, protocol: str, k: int) -> tuple[list, list, int] | None:
    """(tiles, captions, columns) of a grid whose rows are the best, median and worst k samples by the
    protocol's per-sample error (viz.make_grid / viz.grid_image draw it); None when no sample has a visible
    joint."""
    per_sample, _ = protocol_errors(protocol, preds)
    if not np.isfinite(per_sample).any():
        return None
    tiles, captions = error_sample_grid(dataset, preds, per_sample, k)
    return tiles, captions, len(tiles) // len(SAMPLE_GROUPS)


def pck_curve_figure(protocol: str, named_xyz: dict, preds: dict, title: str):
    """The PCK curve whose area the protocol reports, one line per entry of `named_xyz` (name -> predicted
    xyz), against `preds`' labels."""
    # RHD counts visible joints only
    visible = preds.get("visible") if protocol == "rhd" else None
    curves = {name: metrics.protocol_pck_curve(protocol, xyz, preds["gt_xyz"], visible)
              for name, xyz in named_xyz.items()}
    return viz.pck_figure(curves, title=title)


def per_joint_figure(protocol: str, preds: dict):
    """(figure, {joint name: mean error in mm}) of the protocol's error per joint."""
    per_sample, per_joint = protocol_errors(protocol, preds)
    name = "PA joint error" if protocol != "rhd" else "hand3d EPE (visible joints)"
    fig = viz.per_joint_figure(JOINT_NAMES, per_joint, title=f"mean {name} per joint, {len(per_sample)} samples")
    return fig, {n: float(v) for n, v in zip(JOINT_NAMES, per_joint)}
