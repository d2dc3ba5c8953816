"""eval.py's files: the Markdown table, per-sample errors, the official submission file and the pictures."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .. import metrics, viz
from .figures import pck_curve_figure, per_joint_figure, ranked_samples

TABLE_KEYS = ("pa_mpjpe_mm", "mpjpe_mm", "auc_pa_0_50", "pa_mpvpe_mm", "f5", "f15",
              "epe_mean_mm", "epe_median_mm", "auc_20_50", "auc_0_50")


def markdown_table(rows: dict[str, dict]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in r for r in rows.values())]
    retrieval = {k for r in rows.values() for k in r if k.startswith("retrieval_")}
    keys += sorted(retrieval, key=lambda k: (k.split("_")[1], int(k.rsplit("_", 1)[1]) if k.count("_") > 1 else 0))
    head = "| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = ""
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None or (isinstance(v, float) and np.isnan(v)) else
                         f"{v:.2f}" if k.endswith("_mm") else f"{v:.3f}")
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def write_pred_json(path: Path, pred_xyz: np.ndarray, pred_verts: np.ndarray | None) -> None:
    """The official FreiHAND submission: [xyz_list, verts_list], metres, dataset order."""
    xyz_list = np.asarray(pred_xyz, dtype=np.float64).tolist()
    verts_list = (np.asarray(pred_verts, dtype=np.float64).tolist() if pred_verts is not None
                  else [[] for _ in xyz_list])
    path.write_text(json.dumps([xyz_list, verts_list]))


def write_per_sample_csv(path: Path, preds: dict) -> None:
    """index, PA-MPJPE and MPJPE (mm) of every sample, in the order of `preds`."""
    per = metrics.per_sample_errors(preds["pred_xyz"], preds["gt_xyz"], preds.get("visible"))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "pa_mpjpe_mm", "mpjpe_mm"])
        for i, idx in enumerate(preds["index"]):
            w.writerow([int(idx), f"{per['pa_mpjpe_mm'][i]:.3f}", f"{per['mpjpe_mm'][i]:.3f}"])


def write_pictures(out_dir: Path, protocol: str, preds: dict, baselines: dict, dataset, k: int = 4) -> dict:
    """pck.png (the model and the baselines: name -> predicted xyz), samples.png (best / median / worst rows)
    and per_joint.png; returns the per-joint mean errors (mm)."""
    title = "PCK (Procrustes-aligned)" if protocol != "rhd" else "PCK (hand3d: root-relative, GT MCP-PIP bone)"
    pck_curve_figure(protocol, {"model": preds["pred_xyz"], **baselines}, preds, title).savefig(
        out_dir / "pck.png", dpi=120, bbox_inches="tight")
    grid = ranked_samples(dataset, preds, protocol, k)
    if grid is not None:
        tiles, captions, cols = grid
        viz.make_grid(tiles, captions, out_dir / "samples.png", cols=cols)
    fig, per_joint = per_joint_figure(protocol, preds)
    fig.savefig(out_dir / "per_joint.png", dpi=120, bbox_inches="tight")
    return per_joint
