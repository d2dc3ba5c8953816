"""Predictions -> the protocol's metrics and pose -> text retrieval: the one scorer of train-time validation
and eval.py (`cliphand3d.metrics` computes each metric)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from .. import dist, metrics
from .predict import exact_labels, predict
from .sharding import merge_predictions

AXES = ("x", "y", "z")


def score_predictions(protocol: str, preds: dict, retrieval_batch_sizes: Sequence[int] | None = None) -> dict:
    """metrics.evaluate under `protocol`, then pose -> text top-1 retrieval per axis where the predictions
    carry features: over all samples (`retrieval_<axis>`, validation) or within batches of each size
    (`retrieval_<axis>_<size>`, eval.py)."""
    res = metrics.evaluate(protocol, preds["pred_xyz"], preds["gt_xyz"], preds.get("pred_verts"),
                           preds.get("gt_verts"), preds.get("visible"))
    for a in AXES:
        if f"pose_feat_{a}" not in preds:
            continue
        feats = (preds[f"pose_feat_{a}"], preds[f"text_feat_{a}"], preds[f"prompt_{a}"])
        if retrieval_batch_sizes is None:
            res[f"retrieval_{a}"] = metrics.retrieval_top1(*feats)
        else:
            for bs, acc in metrics.retrieval_by_batch(*feats, tuple(retrieval_batch_sizes)).items():
                res[f"retrieval_{a}_{bs}"] = acc
    return res


def validate(model, loader, device, protocol: str, text_branch=None) -> tuple[dict, dict]:
    """Predictions over the val loader -> the same metrics eval.py reports (and the predictions).

    On several processes (torch.distributed) every rank calls this with a loader over its share of the split
    (sharding.shard_positions): the shares are gathered on rank 0 in dataset order and scored there once, so
    the metrics are exactly one process's; every rank returns them, and rank 0 the predictions ({} elsewhere)."""
    share = predict(model, loader, device, text_branch=text_branch)
    parts, res, preds = dist.gather_to_main(share), None, {}
    if parts is not None:
        preds = merge_predictions(parts)
        preds.update(exact_labels(loader.dataset, preds))
        res = score_predictions(protocol, preds)
    return dist.broadcast_from_main(res), preds


def protocol_errors(protocol: str, preds: dict) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample (N,), per-joint (21,)) means in mm of metrics.protocol_joint_errors; NaN for a sample or
    joint never visible (RHD)."""
    visible = preds.get("visible") if protocol == "rhd" else None
    joint_err = metrics.protocol_joint_errors(protocol, preds["pred_xyz"], preds["gt_xyz"], visible)
    with warnings.catch_warnings():  # no visible joint: no mean (NaN: not picked, no bar), not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(joint_err, axis=1), np.nanmean(joint_err, axis=0)
