"""Config -> objects, shared by training and evaluation. Hydra `_target_` builds each leaf; these
functions only pass along what one leaf needs from another (image size, embedding width, template).
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data.base import DatasetError
from .models.template import MeshTemplate, load_or_build_template

log = logging.getLogger(__name__)


def build_prompts(cfg: DictConfig):
    return instantiate(cfg.prompt) if cfg.get("prompt") is not None else None


# The entries of every data config: train, val (held out of the training data: validation and best.pt)
# and test (the official evaluation split: eval.py only).
DATA_SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    if split not in DATA_SPLITS:
        raise DatasetError(f"split={split!r} is not an entry of the data config; choose one of "
                           f"{', '.join(DATA_SPLITS)} (test = the official evaluation split)")
    return split


def build_datasets(cfg: DictConfig, prompts=None, splits=("train", "val")):
    """The data group's entries named in `splits` (default: what training uses, never test), each given
    the prompt generator."""
    out = {}
    for split in splits:
        node = cfg.data.get(check_split(split))
        if node is None:
            raise DatasetError(f"data.{split} is missing from the data config ({cfg.data.get('name', '?')}); a "
                               "checkpoint trained before the train/val/test split stores such a config: pass "
                               "data=<name> to eval.py to evaluate with the current data config")
        out[split] = instantiate(node, prompts=prompts)
    return out


def template_labels(dataset, max_samples: int):
    """(xyz, verts or None) raw camera-frame labels for the template fit, without loading images."""
    for name in ("labels_for_template", "all_labels"):
        fn = getattr(dataset, name, None)
        if fn is not None:
            try:
                return fn(max_samples)
            except TypeError:
                xyz, verts = fn()
                return xyz[:max_samples], verts[:max_samples]
    raise TypeError(f"{type(dataset).__name__} has no labels_for_template() to derive the mesh template from")


def build_template(cfg: DictConfig, train_set) -> MeshTemplate:
    """Data-derived template and J (DESIGN 1.8), cached next to the data. Without meshes (or with
    model_template.joints_only) the regressor runs on the 21 joints."""
    if getattr(train_set, "split", "train") != "train":
        raise ValueError(f"the mesh template is derived from the training split only, got split "
                         f"{train_set.split!r}: held-out labels must not shape the model")
    tcfg = cfg.model_template
    xyz, verts = template_labels(train_set, int(tcfg.num_samples))
    # next to the data when there is a data folder; generated data uses model_template.cache_dir
    root = getattr(train_set, "root", None)
    cache_dir = Path(root) / ".cliphand3d_cache" if root else Path(tcfg.cache_dir)
    if verts is None or not getattr(train_set, "has_verts", False) or tcfg.get("joints_only", False):
        levels = len(cfg.model.widths) - 1
        return load_or_build_template(cache_dir / f"template_{type(train_set).__name__.lower()}_joints.npz",
                                      None, xyz, num_levels=levels)
    kwargs = {k: (list(v) if OmegaConf.is_list(v) else v) for k, v in tcfg.build.items()}
    return load_or_build_template(cache_dir / f"template_{type(train_set).__name__.lower()}.npz",
                                  verts, xyz, **kwargs)


def build_text(cfg: DictConfig):
    """(text encoder, adapters) or (None, None) when the contrastive term is off."""
    if not _clip_on(cfg):
        return None, None
    encoder = instantiate(cfg.text.encoder)
    adapters = instantiate(cfg.text.adapters, embed_dim=encoder.embed_dim, axes=list(cfg.prompt.axes))
    return encoder, adapters


def _clip_on(cfg: DictConfig) -> bool:
    w = cfg.loss.weights
    return any(float(v) > 0 for k, v in w.items() if k == "clip" or str(k).startswith("clip_"))


def embed_dim(cfg: DictConfig) -> int:
    """Width of the pose-aware features: the text encoder's, known from config without building it."""
    return int(cfg.text.embed_dim)


def build_model(cfg: DictConfig, template: MeshTemplate | dict):
    # partial, then called: Hydra would try to merge the template's arrays into the config
    factory = instantiate(cfg.model, _partial_=True, _convert_="all")
    return factory(template=template, embed_dim=embed_dim(cfg))


def build_criterion(cfg: DictConfig):
    return instantiate(cfg.loss, _convert_="all")
