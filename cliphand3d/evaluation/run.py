"""scripts/eval.py's work: rebuild the model from a checkpoint, run the data's protocol, write results.

Outputs (in `out_dir`): metrics.json, per_sample.csv, pck.png, samples.png (best / median / worst
predictions on their crops), per_joint.png (mean error per joint), a Markdown table (printed too) with a
mean-pose baseline row, and for FreiHAND-format data the official submission file pred.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..build import (build_dataset, build_datasets, build_prompts, check_split, compose_config, load_model,
                     model_overrides, text_branch_from_checkpoint)
from ..checkpoint.state import template_from_state
from ..data.reframe import Reframed, check_framing
from ..errors import ConfigError
from ..preflight import check_writable
from ..runtime import configure_cuda, make_loader, pick_device
from .baselines import score_baselines, training_mean_uvd
from .predict import check_placement, exact_labels, predict
from .report import markdown_table, write_per_sample_csv, write_pictures, write_pred_json
from .scoring import score_predictions

log = logging.getLogger(__name__)


def eval_batch_size(cfg: DictConfig, model) -> int:
    """batch_size=auto: 64, or 32 for a model whose outputs depend on its batch-mates (the released
    network's attention over the batch, model.attention_over=batch): the batches its figure came from."""
    if str(cfg.batch_size) != "auto":
        return int(cfg.batch_size)
    return 32 if model.mixes_batch else 64


def eval_config(cfg: DictConfig, saved: DictConfig) -> DictConfig:
    """The run's config with eval-time data overrides: `data=NAME` replaces the data group,
    `root=DIR` (or `data.root=DIR`, the key train.py takes) sets data.root and the root of every split entry;
    without data=NAME, any other `+data.<key>=...` (e.g. +data.test.crop=centre) changes the run's own data config."""
    run = saved.copy()
    OmegaConf.set_struct(run, False)
    data = cfg.get("data")
    if _data_config_chosen(data):
        run.data = data  # its split entries read ${data.root}, data.root=DIR included
        run.data.img_size = saved.data.img_size  # the model was built for this crop size
    elif data is not None:
        changes = {k: v for k, v in OmegaConf.to_container(data, resolve=False).items() if k != "root"}
        run.data = OmegaConf.merge(run.data, changes)
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


def run_eval(cfg: DictConfig) -> dict:
    split = check_split(cfg.split)  # before any time is spent on the checkpoint
    framing = check_framing(str(cfg.get("framing", "single")), cfg.get("two_pass_scale", 1.3))
    ckpt_path = Path(cfg.ckpt).expanduser()
    out_dir = Path(cfg.out_dir).expanduser() if cfg.get("out_dir") else ckpt_path.parent.parent / f"eval_{ckpt_path.stem}"
    check_writable(out_dir, "out_dir", keep=False)  # before minutes of predictions are spent
    device = pick_device(cfg.device, 0, key="device")
    configure_cuda(benchmark=bool(cfg.get("cudnn_benchmark", False)), tf32=bool(cfg.get("tf32", False)))
    model, saved, ckpt = load_model(ckpt_path, model_overrides(cfg), device, use_ema=bool(cfg.use_ema))
    run = eval_config(cfg, saved)
    template = template_from_state(ckpt["template"])
    placement = check_placement(str(cfg.placement))

    text_branch = text_branch_from_checkpoint(run, ckpt, device)
    dataset = _eval_dataset(run, split, bool(cfg.require_gt), build_prompts(run) if text_branch is not None else None)
    labelled = getattr(dataset, "has_labels", True)
    if not labelled:
        text_branch = None  # retrieval scores prompts, which are made from labels
        check_placement(placement, dataset, split)
    preds, scored = _framed_predictions(cfg, framing, model, dataset, device, text_branch, placement)
    num = len(preds["index"])
    placed = "estimated" if "scale" in preds else "gt"
    inexact = int((preds["placement_exact"] == 0).sum()) if "placement_exact" in preds else 0
    if inexact:
        log.warning("%d of %d samples: no root depth makes the predicted wrist -> middle-MCP bone one bone long "
                    "(its predicted depth step exceeds it); the nearest depth was used", inexact, num)

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(ckpt_path), "protocol": getattr(dataset, "protocol", "freihand"), "split": split,
              "num_samples": num, "step": ckpt.get("train_state", {}).get("step"), "placement": placed,
              "placement_inexact": inexact, "framing": framing}
    if framing == "two_pass":
        result["two_pass_scale"] = float(cfg.two_pass_scale)
    if _wants_pred_json(cfg, dataset):
        write_pred_json(out_dir / "pred.json", preds["pred_xyz"], preds.get("pred_verts"))
    if not labelled:
        return _predictions_only(result, dataset, out_dir, _wants_pred_json(cfg, dataset))
    result.update(_score(cfg, run, preds, template, model, ckpt_path, out_dir, result["protocol"], scored))
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    where = ("the true root depth and bone (demo protocol)" if placed == "gt" else
             "root depth and bone estimated from the predicted uvd, K and the scale |xyz[9] - xyz[10]|")
    print(f"\n{result['protocol']} protocol, {num} samples ({split} split of {type(dataset).__name__}), "
          f"xyz placed with {where}\n")
    print((out_dir / "table.md").read_text())
    print(f"written to {out_dir}")
    return result


def _framed_predictions(cfg: DictConfig, framing: str, model, dataset, device, text_branch, placement: str):
    """(predictions in dataset order with float64 labels, the items they were made on): `dataset`'s, or with
    framing=two_pass those of its items cropped again about the joints a first pass found (data/reframe.py)."""
    def on(items) -> dict:
        loader = make_loader(items, batch_size=eval_batch_size(cfg, model), num_workers=int(cfg.num_workers),
                             device=device)
        return _in_index_order(predict(model, loader, device, text_branch=text_branch, placement=placement))

    preds, items = on(dataset), dataset
    if framing == "two_pass":
        items = Reframed(dataset, preds["pred_uvd"], scale=float(cfg.two_pass_scale),
                         pixel_offset=getattr(model, "uv_pixel_offset", 0.5))
        preds = on(items)
    preds.update(exact_labels(items, preds))
    return preds, items


def _in_index_order(preds: dict) -> dict:
    order = np.argsort(preds["index"], kind="stable")
    return {k: (np.asarray(v)[order] if not k.startswith("prompt_") else [v[i] for i in order])
            for k, v in preds.items()}


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
    return build_dataset(run, split, prompts)


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
    res = score_predictions(protocol, preds, tuple(cfg.retrieval_batch_sizes))
    train_set = build_datasets(run, None, splits=("train",))["train"]
    mean_uvd = training_mean_uvd(train_set, int(cfg.baseline_samples))
    baselines, base_preds = score_baselines(protocol, preds, int(run.data.img_size), mean_uvd=mean_uvd,
                                            template=template, joints_only=model.regressor.joints_only)
    write_per_sample_csv(out_dir / "per_sample.csv", preds)
    per_joint = write_pictures(out_dir, protocol, preds, base_preds, dataset)
    (out_dir / "table.md").write_text(markdown_table({f"CLIP-Hand3D ({ckpt_path.name})": res, **baselines}))
    return {**res, "per_joint_mm": per_joint, "baseline_mean_pose": baselines["mean-pose baseline"],
            "baseline_mean_shape_oracle_rotation": baselines["mean shape, oracle rotation"]}


def _wants_pred_json(cfg: DictConfig, dataset) -> bool:
    if cfg.write_pred_json == "auto":
        # the submission format is for the official evaluation split only, not the held-out val ids
        return type(dataset).__name__ == "FreiHAND" and getattr(dataset, "split", None) == "eval"
    return bool(cfg.write_pred_json)
