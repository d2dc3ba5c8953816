"""Config -> objects, shared by training, evaluation and the apps. Hydra `_target_` builds each leaf; these
functions only pass along what one leaf needs from another (image size, embedding width, template).

The one place that composes configs (`compose_config`) and instantiates them, and the one place that turns
a checkpoint back into a model (`load_model`) or a text branch (`text_branch_from_checkpoint`).
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpoint.io import load_checkpoint
from .checkpoint.state import adapter_weights, head_weights, model_weights, template_from_state
from .checkpoint.weights import load_model_weights
from .data.mix import MixedHands
from .data.sampler import largest_remainder
from .errors import CheckpointError, ConfigError, DatasetError
from .losses import MESH_TERMS
from .models.template import MeshTemplate, load_or_build_template
from .models.training import TextBranch, TrainingModule

log = logging.getLogger(__name__)

# The repository's Hydra configs (scripts/*.py read them as ../configs).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_config(name: str, overrides=(), *, fresh: bool = False) -> DictConfig:
    """configs/<name>.yaml composed with `overrides`, inside a running Hydra app (its config search path)
    or outside one (tests, notebooks: CONFIGS). fresh=True always composes from CONFIGS, dropping any Hydra
    state a caller left behind (the released import: its preset is defined by this repository's configs)."""
    overrides = [str(o) for o in overrides]
    if GlobalHydra.instance().is_initialized():
        if not fresh:
            return compose(config_name=name, overrides=overrides)
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def build_prompts(cfg: DictConfig, **overrides):
    """The prompt generator (`prompt` group, with keyword `overrides`), or None without a prompt config."""
    return instantiate(cfg.prompt, **overrides) if cfg.get("prompt") is not None else None


# The entries of every data config: train, val (held out of the training data: validation and best.pt)
# and test (the official evaluation split: eval.py only).
DATA_SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    if split not in DATA_SPLITS:
        raise DatasetError(f"split={split!r} is not an entry of the data config; choose one of "
                           f"{', '.join(DATA_SPLITS)} (test = the official evaluation split)")
    return split


def build_dataset(cfg: DictConfig, split: str, prompts=None):
    """The data group's entry `split`, given the prompt generator (data=mix: its sets', as one MixedHands)."""
    members = data_sets(cfg)
    if members is not None:
        return build_mix(cfg, members, split, prompts)
    node = cfg.data.get(check_split(split))
    if node is None:
        raise DatasetError(f"data.{split} is missing from the data config ({cfg.data.get('name', '?')}); a "
                           "checkpoint trained before the train/val/test split stores such a config: pass "
                           "data=<name> to eval.py to evaluate with the current data config")
    return instantiate(node, prompts=prompts)


def build_datasets(cfg: DictConfig, prompts=None, splits=("train", "val")):
    """The data group's entries named in `splits` (default: what training uses, never test), each given
    the prompt generator."""
    return {split: build_dataset(cfg, split, prompts) for split in splits}


# ----------------------------------------------------------------------------- data=mix (configs/data/mix.yaml)
def data_sets(cfg: DictConfig) -> dict | None:
    """A mix's member data configs, name -> node (data.sets); None for one dataset."""
    sets = cfg.data.get("sets")
    return None if sets is None else {str(name): node for name, node in sets.items()}


def holds_out(data: DictConfig) -> bool:
    """Does this data config have a `val` split? (val_fraction=0 trains on every id and holds none out.)"""
    return data.get("val_fraction", None) != 0


def validates(cfg: DictConfig) -> bool:
    """Does the run validate (and choose best.pt)? A mix does when any of its sets holds data out."""
    members = data_sets(cfg)
    return holds_out(cfg.data) if members is None else any(holds_out(m) for m in members.values())


def build_mix(cfg: DictConfig, members: dict, split: str, prompts=None) -> MixedHands:
    """data=mix: entry `split` of every set, as one MixedHands weighed by data.sets.<name>.weight (absent: 1), the
    meshes of a set with data.sets.<name>.use_mesh=false left out (absent: true).
    `val` leaves out the sets that hold nothing out; `test` is refused: each set's official split is scored on
    its own, with its own protocol (eval.py ... data=<set> root=<its folder>)."""
    if check_split(split) == "test":
        raise DatasetError(f"data=mix ({', '.join(members)}): the test split is scored one dataset at a time, each "
                           "with its own protocol.\n  fix: eval.py ckpt=... data=<one of them> root=<its folder>, "
                           "once per set (trainer.final_eval=null for a mix)")
    chosen = {name: node for name, node in members.items() if split != "val" or holds_out(node)}
    sets = {}
    for name, node in chosen.items():
        if node.get(split) is None:
            raise DatasetError(f"data.sets.{name}.{split} is missing: a set of a mix is a whole data config "
                               f"(configs/data/<name>.yaml, in data=mix's defaults as - <name>@sets.{name})")
        sets[name] = instantiate(node[split], prompts=prompts)
    # only training draws by weight: val and test score every item of every set
    weights = {name: node.get("weight", 1.0) for name, node in chosen.items()} if split == "train" else None
    without_mesh = [name for name, node in chosen.items() if not node.get("use_mesh", True)]
    return MixedHands(sets, weights=weights, img_size=cfg.data.get("img_size"), without_mesh=without_mesh)


def monitor_set(cfg: DictConfig) -> str | None:
    """data=mix: the set whose validation chooses best.pt (data.monitor_set; null: the first set that holds data
    out); None for one dataset."""
    members = data_sets(cfg)
    if members is None:
        return None
    named, validated = cfg.data.get("monitor_set"), [n for n, m in members.items() if holds_out(m)]
    if named is None:
        return validated[0] if validated else None
    if str(named) not in validated:
        raise ConfigError(f"data.monitor_set={named!r} is not a set of this mix that validates (those are: "
                          f"{', '.join(validated) or 'none'}): best.pt is chosen on trainer.monitor of that set's "
                          "val split.\n  fix: name one of them, or null for the first")
    return str(named)


def monitor_data(cfg: DictConfig) -> DictConfig:
    """The data config whose val split chooses best.pt: the data group, or data=mix's monitor set."""
    name = monitor_set(cfg)
    return cfg.data if name is None else cfg.data.sets[name]


def template_labels(dataset, max_samples: int):
    """(xyz, verts or None) raw camera-frame labels for the template fit, without loading images. A mix pools
    its mesh sets' (max_samples split in proportion to their sizes), or every set's joints when none has one."""
    if isinstance(dataset, MixedHands):
        return _mix_template_labels(dataset, max_samples)
    for name in ("labels_for_template", "all_labels"):
        fn = getattr(dataset, name, None)
        if fn is not None:
            try:
                return fn(max_samples)
            except TypeError:
                xyz, verts = fn()
                return xyz[:max_samples], verts[:max_samples]
    raise TypeError(f"{type(dataset).__name__} has no labels_for_template() to derive the mesh template from")


def _mix_template_labels(mix: MixedHands, max_samples: int):
    sets = list((mix.mesh_sets() or mix.sets).values())
    counts = largest_remainder(min(int(max_samples), sum(len(ds) for ds in sets)), [len(ds) for ds in sets])
    parts = [template_labels(ds, k) for ds, k in zip(sets, counts) if k]
    xyz = np.concatenate([np.asarray(p[0], dtype=np.float64) for p in parts])
    if not mix.has_verts:
        return xyz, None
    return xyz, np.concatenate([np.asarray(p[1], dtype=np.float32) for p in parts])


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
    encoder = build_text_encoder(cfg)
    return encoder, build_adapters(cfg, encoder.embed_dim)


def build_text_encoder(cfg: DictConfig):
    """The frozen CLIP text tower (text.encoder)."""
    return instantiate(cfg.text.encoder)


def build_adapters(cfg: DictConfig, embed_dim: int):
    """The trainable per-axis text adapters (text.adapters), one per prompt axis."""
    return instantiate(cfg.text.adapters, embed_dim=embed_dim, axes=list(cfg.prompt.axes))


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


def build_criterion(cfg: DictConfig, template: MeshTemplate | dict | None = None):
    """The loss; when a mesh regulariser (loss.weights.edge / normal) weighs, it reads its neighbour graph
    off `template`."""
    weights = cfg.loss.get("weights") or {}
    if template is None or not any(float(weights.get(t, 0.0)) != 0.0 for t in MESH_TERMS):
        return instantiate(cfg.loss, _convert_="all")
    # partial, then called: Hydra would try to merge the template's arrays into the config
    return instantiate(cfg.loss, _partial_=True, _convert_="all")(template=template)


def build_training_module(cfg: DictConfig, template: MeshTemplate | dict) -> tuple[TrainingModule, TextBranch | None]:
    """Everything that trains, as train.py builds it: the model, the text encoder and adapters, the loss
    (TrainingModule freezes what only zero-weighted terms train); and the text branch validation scores
    retrieval with (None when the contrastive term is off)."""
    model = build_model(cfg, template)
    encoder, adapters = build_text(cfg)
    module = TrainingModule(model, build_criterion(cfg, template), encoder, adapters)
    return module, (TextBranch(encoder, adapters) if encoder is not None else None)


def text_branch_from_checkpoint(run: DictConfig, ckpt: dict, device: torch.device) -> TextBranch | None:
    """The frozen text encoder (from config) and the trained adapters (from the checkpoint), for retrieval;
    None when the checkpoint trained no text branch. Without the text weights (offline, no local file)
    retrieval is skipped with a warning: pose metrics still stand."""
    heads = adapter_weights(ckpt)
    if not heads:
        return None
    try:
        encoder = build_text_encoder(run)
    except Exception as e:  # noqa: BLE001 - the text tower is optional for evaluation
        log.warning("retrieval skipped: the text encoder cannot be built (%s)", str(e).splitlines()[0])
        return None
    adapters = build_adapters(run, encoder.embed_dim)
    adapters.load_state_dict(heads)
    return TextBranch(encoder.to(device), adapters.to(device).eval())


def model_overrides(cfg: DictConfig) -> list[str]:
    """eval.yaml's (demo.yaml's, export.yaml's) non-null `model.*` entries as overrides of the checkpoint's
    model config."""
    return [f"+model.{k}={v}" for k, v in (cfg.get("model") or {}).items() if v is not None]


def checkpoint_config(ckpt: dict, where: str, overrides=()) -> DictConfig:
    """A checkpoint's stored config with `overrides` ("model.coord_units=unit", ...) applied."""
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
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, str(path), overrides)
    check_model_config(cfg, str(path))
    built = cfg.copy()
    if "pretrained" in built.model:  # the checkpoint brings every weight: never fetch ImageNet ones
        built.model.pretrained = None
    model = build_model(built, template_from_state(ckpt["template"]))
    load_model_weights(model, model_weights(ckpt, use_ema), str(path))
    return model.to(torch.device(device)).eval(), cfg, ckpt


# Arguments build_model passes itself, never read from the config.
_BUILD_ARGS = ("template", "embed_dim")


def check_model_config(cfg: DictConfig, where: str) -> None:
    """A checkpoint's stored `model` config against the model class it names, before anything is built:
    keys the current code no longer takes (a config from an older or newer cliphand3d) and required ones
    it lacks are listed in one CheckpointError; keys it lacks that have defaults are logged."""
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
    load_model_weights(module.model, ckpt["model"], where)
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("model.")}
    heads = {k: v for k, v in head_weights(ckpt).items()
             if k in own and tuple(v.shape) == tuple(own[k].shape)}
    module.load_state_dict(heads, strict=False)
    return sorted(k for k in own if k not in heads)
