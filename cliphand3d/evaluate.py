"""scripts/eval.py's work: rebuild the model from a checkpoint, run the data's protocol, write results.

Outputs (in `out_dir`): metrics.json, per_sample.csv, pck.png, samples.png (best / median / worst
predictions on their crops), per_joint.png (mean error per joint), a Markdown table (printed too) with a
mean-pose baseline row, and for FreiHAND-format data the official submission file pred.json.
"""
from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import metrics
from .build import build_datasets, build_prompts, check_split, compose_config, load_model
from .data.base import DatasetError
from .engine import PLACEMENTS, exact_labels, predict
from .errors import ConfigError
from .geometry import root_and_bone_from_uvd, uvd_to_xyz
from .preflight import check_writable
from .skeleton import bone_length
from .trainer import TextBranch, make_loader, pick_device, template_from_state

log = logging.getLogger(__name__)

TABLE_KEYS = ("pa_mpjpe_mm", "mpjpe_mm", "auc_pa_0_50", "pa_mpvpe_mm", "f5", "f15",
              "epe_mean_mm", "epe_median_mm", "auc_20_50", "auc_0_50")


def model_overrides(cfg: DictConfig) -> list[str]:
    """eval.yaml's non-null `model.*` entries as overrides of the checkpoint's model config."""
    return [f"+model.{k}={v}" for k, v in (cfg.get("model") or {}).items() if v is not None]


def eval_batch_size(cfg: DictConfig, model) -> int:
    """batch_size=auto: 64, or 32 for a model whose outputs depend on its batch-mates (the released
    network's attention over the batch, model.attention_over=batch): the batches its figure came from."""
    if str(cfg.batch_size) != "auto":
        return int(cfg.batch_size)
    return 32 if model.mixes_batch else 64


def eval_config(cfg: DictConfig, saved: DictConfig) -> DictConfig:
    """The run's config with eval-time data overrides: `data=NAME` replaces the data group,
    `root=DIR` (or `data.root=DIR`, the key train.py takes) sets data.root and the root of every split entry."""
    run = saved.copy()
    OmegaConf.set_struct(run, False)
    data = cfg.get("data")
    if _data_config_chosen(data):
        run.data = data  # its split entries read ${data.root}, data.root=DIR included
        run.data.img_size = saved.data.img_size  # the model was built for this crop size
    root = _eval_root(cfg)
    if root is not None and run.data.get("format") == "synthetic":
        # generated hands read no files: the folder would be ignored and the numbers be the synthetic ones
        raise ConfigError(f"root={root}: the data this evaluates ({run.data.get('name', 'synthetic')}) are generated "
                          "and read no folder; to evaluate on a dataset on disk, name its config too: "
                          f"eval.py ckpt=... data=freihand root={root} (or data=rhd)")
    if root is not None:
        run.data.root = root
        # a checkpoint stores its config resolved: the split entries hold the old path, not ${data.root}
        for node in run.data.values():
            if OmegaConf.is_dict(node) and "root" in node:
                node.root = root
    return run


def _data_config_chosen(data) -> bool:
    """eval.yaml's `data` node holds only `root` unless data=NAME composed a whole data config into it."""
    return data is not None and data.get("name") is not None


def _eval_root(cfg: DictConfig):
    """root=DIR, or data.root=DIR without data=NAME; both with different folders is refused."""
    data = cfg.get("data")
    data_root = data.get("root") if data is not None and not _data_config_chosen(data) else None
    root = cfg.get("root")
    if root is not None and data_root is not None and str(root) != str(data_root):
        raise ConfigError(f"root={root} and data.root={data_root} name different folders; give one of them "
                          "(eval.py root=DIR or data.root=DIR)")
    return root if root is not None else data_root


def training_mean_uvd(train_set, num_samples: int) -> dict:
    """Mean joints (and vertices) in the model's output space over `num_samples` training items spread
    evenly over the set, with the training augmentation: what a regressor that learned nothing from the
    image would output. Computed from the labels (`label_targets`): no RGB image is decoded."""
    n = min(int(num_samples), len(train_set))
    # evenly spaced, not the first n: FreiHAND's ids follow capture order (and versions come in blocks)
    indices = np.unique(np.linspace(0, len(train_set) - 1, n).round().astype(int))
    sums: dict[str, np.ndarray] = {}
    for i in indices:
        t = train_set.label_targets(int(i))
        for k in ("joints_uvd", "verts_uvd"):
            if k in t:
                sums[k] = sums.get(k, 0) + t[k]
    return {k: v / len(indices) for k, v in sums.items()}


def baseline_predictions(preds: dict, img_size: int, *, mean_uvd: dict | None = None, template=None,
                         joints_only: bool = False):
    """Two constant predictors placed as the model's predictions are (`preds`):
    - `mean_uvd`: the training labels' mean in the model's output space (the mean-pose baseline), at the
      true root depth and bone, or, when `preds` were placed without them (placement=estimated), at the
      root depth and bone estimated from the mean pose itself, each sample's K and scale;
    - `template`: the data-derived mean shape in its canonical orientation at the true root and bone
      (under Procrustes alignment this is the mean articulation with an oracle rotation: a stronger bar
      than any constant in uvd)."""
    K = torch.as_tensor(preds["K"], dtype=torch.float64)
    want_verts = preds.get("gt_verts") is not None and not joints_only
    if mean_uvd is not None:
        joints = torch.as_tensor(mean_uvd["joints_uvd"], dtype=torch.float64)[None].expand(len(K), -1, -1)
        if "scale" in preds:
            root, bone, _ = root_and_bone_from_uvd(joints, K, img_size, torch.as_tensor(preds["scale"]))
        else:
            root = torch.as_tensor(preds["root_depth"], dtype=torch.float64)
            bone = torch.as_tensor(preds["bone"], dtype=torch.float64)

        def place(m):
            u = torch.as_tensor(m, dtype=torch.float64)[None].expand(len(K), -1, -1)
            return uvd_to_xyz(u, K, img_size, root, bone).numpy()

        verts = place(mean_uvd["verts_uvd"]) if want_verts and "verts_uvd" in mean_uvd else None
        return place(mean_uvd["joints_uvd"]), verts
    gt_xyz = preds["gt_xyz"]
    b = bone_length(np.asarray(gt_xyz, dtype=np.float64))[:, None, None]
    r = gt_xyz[:, :1]
    tj = np.asarray(template.joints)
    verts = r + (np.asarray(template.verts) - tj[:1])[None] * b if want_verts else None
    return r + (tj - tj[:1])[None] * b, verts


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


def check_placement(placement: str, dataset=None, split: str = "test") -> str:
    """eval.py's placement=, before predictions are spent on it: a known name, and labels when it is gt."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement={placement!r} is not one of {PLACEMENTS} (eval.py placement=...)")
    if dataset is not None and placement == "gt" and not getattr(dataset, "has_labels", True):
        raise DatasetError(f"placement=gt places predictions at the true root depth and bone, and the {split} "
                           f"split has no ground truth here.\n  fix: {dataset.labels_hint()}; or use "
                           "placement=estimated")
    return placement


def run_eval(cfg: DictConfig) -> dict:
    split = check_split(cfg.split)  # before any time is spent on the checkpoint
    ckpt_path = Path(cfg.ckpt).expanduser()
    out_dir = Path(cfg.out_dir).expanduser() if cfg.get("out_dir") else ckpt_path.parent.parent / f"eval_{ckpt_path.stem}"
    check_writable(out_dir, "out_dir", keep=False)  # before minutes of predictions are spent
    device = pick_device(cfg.device, 0)
    model, saved, ckpt = load_model(ckpt_path, model_overrides(cfg), device, use_ema=bool(cfg.use_ema))
    run = eval_config(cfg, saved)
    template = template_from_state(ckpt["template"])
    placement = check_placement(str(cfg.placement))

    text_branch = _text_branch(run, ckpt, device) if _has_adapters(ckpt) else None
    dataset = _eval_dataset(run, split, bool(cfg.require_gt), build_prompts(run) if text_branch is not None else None)
    labelled = getattr(dataset, "has_labels", True)
    if not labelled:
        text_branch = None  # retrieval scores prompts, which are made from labels
        check_placement(placement, dataset, split)
    loader = make_loader(dataset, batch_size=eval_batch_size(cfg, model), num_workers=int(cfg.num_workers),
                         device=device)
    preds = predict(model, loader, device, text_branch=text_branch, placement=placement)
    order = np.argsort(preds["index"], kind="stable")
    preds = {k: (np.asarray(v)[order] if not k.startswith("prompt_") else [v[i] for i in order])
             for k, v in preds.items()}
    preds.update(exact_labels(dataset, preds))
    placed = "estimated" if "scale" in preds else "gt"
    inexact = int((preds["placement_exact"] == 0).sum()) if "placement_exact" in preds else 0
    if inexact:
        log.warning("%d of %d samples: no root depth makes the predicted wrist -> middle-MCP bone one bone long "
                    "(its predicted depth step exceeds it); the nearest depth was used", inexact, len(order))

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(ckpt_path), "protocol": getattr(dataset, "protocol", "freihand"), "split": split,
              "num_samples": len(order), "step": ckpt.get("train_state", {}).get("step"), "placement": placed,
              "placement_inexact": inexact}
    if _wants_pred_json(cfg, dataset):
        write_pred_json(out_dir / "pred.json", preds["pred_xyz"], preds.get("pred_verts"))
    if not labelled:
        return _predictions_only(result, dataset, out_dir, _wants_pred_json(cfg, dataset))
    result.update(_score(cfg, run, preds, template, model, ckpt_path, out_dir, result["protocol"], dataset))
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    where = ("the true root depth and bone (demo protocol)" if placed == "gt" else
             "root depth and bone estimated from the predicted uvd, K and the scale |xyz[9] - xyz[10]|")
    print(f"\n{result['protocol']} protocol, {len(order)} samples ({split} split of {type(dataset).__name__}), "
          f"xyz placed with {where}\n")
    print((out_dir / "table.md").read_text())
    print(f"written to {out_dir}")
    return result


def evaluate_run(run_dir: str | Path, split: str, *, device: str = "auto", num_workers: int = 2) -> dict:
    """trainer.final_eval: the run's best.pt (chosen on val) scored on `split` exactly as
    `scripts/eval.py ckpt=<run_dir>/checkpoints/best.pt split=<split>` does, eval.yaml's other settings
    included; writes <run_dir>/eval_best/ (metrics.json, table, pictures) and returns the metrics."""
    cfg = compose_config("eval")
    cfg.ckpt = str(Path(run_dir) / "checkpoints" / "best.pt")  # set, not an override: any path is literal
    cfg.split, cfg.device, cfg.num_workers = check_split(split), device, int(num_workers)
    return run_eval(cfg)


def _eval_dataset(run: DictConfig, split: str, require_gt: bool, prompts):
    """The split to evaluate. Where the data config has a `require_gt` switch (FreiHAND evaluation), eval.py's
    own `require_gt` sets it: false reads a split without released labels for predictions only."""
    node = run.data.get(split)
    if node is not None and "require_gt" in node:
        node.require_gt = require_gt
    return build_datasets(run, prompts, splits=(split,))[split]


def _predictions_only(result: dict, dataset, out_dir: Path, wrote_pred: bool) -> dict:
    """No labels: nothing can be scored. Say so, and where the predictions and the labels are."""
    hint = dataset.labels_hint() if hasattr(dataset, "labels_hint") else "provide the split's labels"
    note = (f"no ground truth for the {result['split']} split, so no metrics can be computed (they need the released "
            f"labels: {hint}). Predictions are placed with the root depth and bone estimated from the predicted "
            "uvd, K and each image's scale (evaluation_scale.json)")
    result["note"] = note
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    log.warning(note)
    what = f"pred.json ({result['num_samples']} samples, the official submission format)" if wrote_pred else \
        "no pred.json (write_pred_json=false)"
    print(f"written to {out_dir}: {what}, metrics.json")
    return result


def _score(cfg: DictConfig, run: DictConfig, preds: dict, template, model, ckpt_path: Path, out_dir: Path,
           protocol: str, dataset) -> dict:
    """Metrics, retrieval and the two baselines; writes per_sample.csv, pck.png, samples.png, per_joint.png
    and table.md."""
    res = metrics.evaluate(protocol, preds["pred_xyz"], preds["gt_xyz"], preds.get("pred_verts"),
                           preds.get("gt_verts"), preds.get("visible"))
    for a in ("x", "y", "z"):
        if f"pose_feat_{a}" in preds:
            by_bs = metrics.retrieval_by_batch(preds[f"pose_feat_{a}"], preds[f"text_feat_{a}"],
                                               preds[f"prompt_{a}"], tuple(cfg.retrieval_batch_sizes))
            for bs, acc in by_bs.items():
                res[f"retrieval_{a}_{bs}"] = acc
    S = int(run.data.img_size)
    train_set = build_datasets(run, None, splits=("train",))["train"]
    mean_uvd = training_mean_uvd(train_set, int(cfg.baseline_samples))
    baselines, base_preds = {}, {}
    for name, kw in (("mean-pose baseline", {"mean_uvd": mean_uvd}),
                     ("mean shape, oracle rotation", {"template": template})):
        bx, bv = baseline_predictions(preds, S, joints_only=model.regressor.joints_only, **kw)
        base_preds[name] = bx
        baselines[name] = metrics.evaluate(protocol, bx, preds["gt_xyz"], bv,
                                           preds.get("gt_verts") if bv is not None else None, preds.get("visible"))
    per = metrics.per_sample_errors(preds["pred_xyz"], preds["gt_xyz"], preds.get("visible"))
    with open(out_dir / "per_sample.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "pa_mpjpe_mm", "mpjpe_mm"])
        for i, idx in enumerate(preds["index"]):
            w.writerow([int(idx), f"{per['pa_mpjpe_mm'][i]:.3f}", f"{per['mpjpe_mm'][i]:.3f}"])
    _pck_plot(out_dir / "pck.png", protocol, preds, base_preds)
    per_joint = _error_pictures(out_dir, protocol, preds, dataset)
    (out_dir / "table.md").write_text(markdown_table({f"CLIP-Hand3D ({ckpt_path.name})": res, **baselines}))
    return {**res, "per_joint_mm": per_joint, "baseline_mean_pose": baselines["mean-pose baseline"],
            "baseline_mean_shape_oracle_rotation": baselines["mean shape, oracle rotation"]}


def _has_adapters(ckpt: dict) -> bool:
    return any(k.startswith("adapters.") for k in ckpt.get("train_heads", {}))


def _text_branch(run: DictConfig, ckpt: dict, device: torch.device):
    """The frozen text encoder (from config) and the trained adapters (from the checkpoint), for retrieval.
    Without the text weights (offline, no local file) retrieval is skipped with a warning."""
    from hydra.utils import instantiate

    try:
        encoder = instantiate(run.text.encoder)
    except Exception as e:  # the text tower is optional for evaluation: pose metrics still stand
        log.warning("retrieval skipped: the text encoder cannot be built (%s)", str(e).splitlines()[0])
        return None
    adapters = instantiate(run.text.adapters, embed_dim=encoder.embed_dim, axes=list(run.prompt.axes))
    heads = {k[len("adapters."):]: v for k, v in ckpt["train_heads"].items() if k.startswith("adapters.")}
    adapters.load_state_dict(heads)
    return TextBranch(encoder.to(device), adapters.to(device).eval())


def _wants_pred_json(cfg: DictConfig, dataset) -> bool:
    if cfg.write_pred_json == "auto":
        # the submission format is for the official evaluation split only, not the held-out val ids
        return type(dataset).__name__ == "FreiHAND" and getattr(dataset, "split", None) == "eval"
    return bool(cfg.write_pred_json)


def _pck_plot(path: Path, protocol: str, preds: dict, baselines: dict) -> None:
    from . import viz

    # the curve whose area the protocol reports (the same one train-time validation logs)
    visible = preds.get("visible") if protocol == "rhd" else None
    curves = {name: metrics.protocol_pck_curve(protocol, p, preds["gt_xyz"], visible)
              for name, p in (("model", preds["pred_xyz"]), *baselines.items())}
    title = "PCK (Procrustes-aligned)" if protocol != "rhd" else "PCK (hand3d: root-relative, GT MCP-PIP bone)"
    viz.pck_figure(curves, title=title).savefig(path, dpi=120, bbox_inches="tight")


# --------------------------------------------------------------------------- pictures of the errors
SAMPLE_GROUPS = ("best", "median", "worst")


def pick_best_median_worst(errors, k: int) -> dict[str, list[int]]:
    """Positions of the k lowest, the k around the median and the k highest of `errors` (N,), each group in
    ascending error except `worst` (highest first). NaN errors (no visible joint) are never picked."""
    e = np.asarray(errors, dtype=np.float64)
    order = [int(i) for i in np.argsort(e, kind="stable") if np.isfinite(e[i])]
    n, k = len(order), max(1, int(k))
    k = min(k, n)
    start = max(0, (n - k) // 2)
    return {"best": order[:k], "median": order[start:start + k], "worst": order[::-1][:k]}


def protocol_errors(protocol: str, preds: dict) -> tuple[np.ndarray, np.ndarray]:
    """(per-sample (N,), per-joint (21,)) means in mm of metrics.protocol_joint_errors; NaN for a sample or
    joint never visible (RHD)."""
    visible = preds.get("visible") if protocol == "rhd" else None
    joint_err = metrics.protocol_joint_errors(protocol, preds["pred_xyz"], preds["gt_xyz"], visible)
    with warnings.catch_warnings():  # no visible joint: no mean (NaN: not picked, no bar), not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(joint_err, axis=1), np.nanmean(joint_err, axis=0)


def error_sample_grid(dataset, preds: dict, errors, k: int, unit: str = "mm") -> tuple[list, list]:
    """(tiles, captions): best / median / worst predictions by `errors` (one per row of preds), each as
    viz.draw_pred_vs_gt on its crop. Only the chosen items are read back from `dataset`, so memory does
    not grow with the set."""
    from . import viz
    from .data.transforms import denormalize_image
    from .geometry import project

    tiles, captions = [], []
    for group, positions in pick_best_median_worst(errors, k).items():
        for rank, pos in enumerate(positions):
            index = int(preds["index"][pos])
            item = dataset[index]
            K = item["K"].numpy().astype(np.float64)
            gt_uv = project(np.asarray(preds["gt_xyz"][pos], np.float64), K)
            pred_uv = project(np.asarray(preds["pred_xyz"][pos], np.float64), K)
            tiles.append(viz.draw_pred_vs_gt(denormalize_image(item["image"]), pred_uv, gt_uv))
            captions.append([f"{group} {rank + 1}: item {index}, {float(errors[pos]):.1f} {unit}"])
    return tiles, captions


def _error_pictures(out_dir: Path, protocol: str, preds: dict, dataset, k: int = 4) -> dict[str, float]:
    """samples.png (best / median / worst rows) and per_joint.png; returns the per-joint mean errors (mm)."""
    from . import viz
    from .skeleton import JOINT_NAMES

    per_sample, per_joint = protocol_errors(protocol, preds)
    if np.isfinite(per_sample).any():
        tiles, captions = error_sample_grid(dataset, preds, per_sample, k)
        viz.make_grid(tiles, captions, out_dir / "samples.png", cols=len(tiles) // len(SAMPLE_GROUPS))
    name = "PA joint error" if protocol != "rhd" else "hand3d EPE (visible joints)"
    fig = viz.per_joint_figure(JOINT_NAMES, per_joint, title=f"mean {name} per joint, {len(per_sample)} samples")
    fig.savefig(out_dir / "per_joint.png", dpi=120, bbox_inches="tight")
    return {n: float(v) for n, v in zip(JOINT_NAMES, per_joint)}
