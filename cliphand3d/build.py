"""Config -> objects, shared by training and evaluation. Hydra `_target_` builds each leaf; these
functions only pass along what one leaf needs from another (image size, embedding width, template).
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data.base import DatasetError
from .errors import ConfigError
from .models.template import MeshTemplate, load_or_build_template

log = logging.getLogger(__name__)

# The repository's Hydra configs (scripts/*.py read them as ../configs).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_config(name: str, overrides=()) -> DictConfig:
    """configs/<name>.yaml composed with `overrides`, inside a running Hydra app (its config search path)
    or outside one (tests, notebooks: CONFIGS)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


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
    if not text_branch_on(cfg):
        return None, None
    encoder = instantiate(cfg.text.encoder)
    adapters = instantiate(cfg.text.adapters, embed_dim=encoder.embed_dim, axes=list(cfg.prompt.axes))
    return encoder, adapters


def text_branch_on(cfg: DictConfig) -> bool:
    """Does any contrastive term weigh more than 0 (so the text encoder and adapters are built)?"""
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


def checkpoint_config(ckpt: dict, where: str, overrides=()) -> DictConfig:
    """A checkpoint's stored config with `overrides` ("model.coord_units=unit", ...) applied."""
    from .checkpoint import CheckpointError

    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{where} is not a cliphand3d checkpoint (no 'config'/'model' entries); pass a "
                              "last.pt / best.pt written by scripts/train.py or a file written by "
                              "scripts/import_checkpoint.py")
    cfg = OmegaConf.create(ckpt["config"])
    absent = object()
    for item in overrides:
        key, sep, value = str(item).partition("=")
        add, key = key.startswith("+"), key.lstrip("+")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.coord_units=unit")
        if not add and OmegaConf.select(cfg, key, default=absent) is absent:
            raise ConfigError(f"override {item!r}: the config stored in {where} has no key {key!r}; "
                             f"write +{key}={value} to add it")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
    return cfg


def model_from_checkpoint(path, overrides=(), device="cpu", use_ema: bool = True):
    """An eval-mode model from any cliphand3d checkpoint (trained or imported), its config's model
    keys overridden by `overrides` (e.g. ["model.coord_units=unit"]); EMA weights when present."""
    return load_model(path, overrides, device, use_ema)[0]


def load_model(path, overrides=(), device="cpu", use_ema: bool = True):
    """(eval-mode model, config used, checkpoint dict): model_from_checkpoint for callers that need more."""
    import torch

    from .checkpoint import load_checkpoint, load_model_weights
    from .trainer import template_from_state

    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, str(path), overrides)
    check_model_config(cfg, str(path))
    built = cfg.copy()
    if "pretrained" in built.model:  # the checkpoint brings every weight: never fetch ImageNet ones
        built.model.pretrained = None
    model = build_model(built, template_from_state(ckpt["template"]))
    weights = ckpt["model"]
    if use_ema and ckpt.get("ema") and "module" in ckpt["ema"]:
        weights = ckpt["ema"]["module"]
    load_model_weights(model, weights, str(path))
    return model.to(torch.device(device)).eval(), cfg, ckpt


# Arguments build_model passes itself, never read from the config.
_BUILD_ARGS = ("template", "embed_dim")


def check_model_config(cfg: DictConfig, where: str) -> None:
    """A checkpoint's stored `model` config against the model class it names, before anything is built:
    keys the current code no longer takes (a config from an older or newer cliphand3d) and required ones
    it lacks are listed in one CheckpointError; keys it lacks that have defaults are logged."""
    import inspect

    from hydra.utils import get_class

    from .checkpoint import CheckpointError

    target = cfg.model.get("_target_") if OmegaConf.is_dict(cfg.get("model")) else None
    try:
        params = inspect.signature(get_class(str(target))).parameters
    except Exception as e:  # noqa: BLE001 - a missing module, class or _target_ all mean the same here
        raise CheckpointError(f"{where}: its config's model._target_={target!r} cannot be imported by this "
                              f"cliphand3d ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it was "
                              "written by another version: evaluate it with that version") from None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    given = {str(k) for k in cfg.model if not str(k).startswith("_")}
    taken = {n for n in params if n not in _BUILD_ARGS}
    unknown = sorted(given - taken)
    required = sorted(n for n in taken - given if params[n].default is inspect.Parameter.empty)
    defaulted = sorted(n for n in taken - given if params[n].default is not inspect.Parameter.empty)
    if defaulted:
        log.warning("%s: its config has no model.%s; using the current defaults (%s)", where,
                    ", model.".join(defaulted), ", ".join(f"{n}={params[n].default!r}" for n in defaulted))
    if unknown or required:
        lines = [f"{where}: its config does not fit the current model code ({target}):"]
        if unknown:
            lines.append("  keys the current code does not take: " + ", ".join(f"model.{k}" for k in unknown))
        if required:
            lines.append("  required keys the config lacks: " + ", ".join(f"model.{k}" for k in required))
        lines.append("  fix: the checkpoint was written by another cliphand3d version (older config); evaluate it "
                     "with that version, or re-save its config without those keys if you know they are inert")
        raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------- init_from (fine-tuning)
INIT_ADOPTED = ("model", "text.adapters")  # config the weights fix; command-line overrides of them still win


def adopt_init_config(cfg: DictConfig, init_cfg, cli_overrides=()) -> DictConfig:
    """cfg with the architecture of the checkpoint it starts from (`init_from`): its `model` group and
    text adapters replace the composed ones, then the command line's model.* / text.adapters.* overrides
    are applied again (e.g. model.attention_over=nodes). The weights bring everything: no pretrained fetch."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    init_cfg = OmegaConf.create(init_cfg)
    for key in INIT_ADOPTED:
        node = OmegaConf.select(init_cfg, key)
        if node is not None:
            OmegaConf.update(cfg, key, node, merge=False, force_add=True)
    mine = [o.lstrip("+") for o in cli_overrides if o.lstrip("+").startswith(tuple(f"{k}." for k in INIT_ADOPTED))]
    if mine:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(mine))
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None
    check_model_config(cfg, f"init_from={cfg.get('init_from')}")
    saved_size = OmegaConf.select(init_cfg, "data.img_size")
    if saved_size is not None and int(saved_size) != int(cfg.data.img_size):
        raise ConfigError(f"init_from: the checkpoint's model was built for data.img_size={saved_size}, this run "
                         f"has data.img_size={cfg.data.img_size}; set data.img_size={saved_size}")
    return cfg


def load_init_weights(module, ckpt: dict, where: str) -> list[str]:
    """Model weights (strict, listing every difference) and the training heads the checkpoint has
    (adapters, logit scales) into a TrainingModule; returns the heads that start fresh."""
    from .checkpoint import load_model_weights

    load_model_weights(module.model, ckpt["model"], where)
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("model.")}
    heads = {k: v for k, v in ckpt.get("train_heads", {}).items()
             if k in own and tuple(v.shape) == tuple(own[k].shape)}
    module.load_state_dict(heads, strict=False)
    return sorted(k for k in own if k not in heads)
