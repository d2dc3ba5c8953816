"""docs/faq_errors.md against the code: every message the FAQ quotes is reproduced here and matched against the
FAQ's own text, and every user-facing raise in the package and scripts has an entry.

The FAQ's tables have three columns: the message(s) in backticks (`<...>` stands for any text, `...` for an
elided part), what to do, and the reproducers: `faq[ID]` names an entry of REPRODUCERS below (run as
test_faq_message[ID]), `test_file::test_name` another test that reproduces the message end to end. A reproducer
returns what a script prints for the error, without its `error: ` prefix (cli.friendly_errors), or a list of
messages.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import importlib.util
import io
import json
import logging
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cliphand3d.apps.cli import _user_error

REPO = Path(__file__).resolve().parents[1]
FAQ = REPO / "docs" / "faq_errors.md"
CONFIGS = REPO / "configs"


# --------------------------------------------------------------------------- the FAQ, parsed
@dataclass
class Row:
    line: int
    patterns: list[str]  # the backticked messages of the first column
    ids: list[str]  # faq[ID] reproducers
    tests: list[str]  # other tests, "test_file::test_name"


def faq_rows(text: str | None = None) -> list[Row]:
    rows = []
    for n, line in enumerate((text if text is not None else FAQ.read_text()).splitlines(), 1):
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")] if line.startswith("| ") else []
        if len(cells) != 3 or cells[0] in ("Message", "Message (start)") or set(cells[0]) <= set("-: "):
            continue
        rows.append(Row(n, re.findall(r"`([^`]+)`", cells[0]), re.findall(r"faq\[([\w-]+)\]", cells[2]),
                        re.findall(r"(test_\w+::test_\w+)", cells[2])))
    return rows


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def pattern_regex(pattern: str) -> re.Pattern:
    """`<...>` and `...` match any text (an elision also takes the spaces around it); everything else
    literally, whitespace runs as one space."""
    parts = re.split(r"(<[^<>]+>| ?\.\.\. ?)", _norm(pattern))
    return re.compile("".join(".*?" if p.strip() == "..." or (p.startswith("<") and p.endswith(">")) else re.escape(p)
                              for p in parts), re.S)


def literal_pieces(pattern: str) -> list[str]:
    return [p.strip() for p in re.split(r"<[^<>]+>|\.\.\.", _norm(pattern)) if p.strip()]


# --------------------------------------------------------------------------- reproducers
REPRODUCERS: dict = {}


def faq(rid: str):
    def register(fn):
        assert rid not in REPRODUCERS, rid
        REPRODUCERS[rid] = fn
        return fn
    return register


@dataclass
class Ctx:
    tmp: Path
    mp: pytest.MonkeyPatch
    data: "Data"

    def frei(self) -> Path:
        return self.data.copy("frei", self.tmp)

    def rhd(self) -> Path:
        return self.data.copy("rhd", self.tmp)


class Data:
    """Small FreiHAND / RHD folders written once per session, copied for each reproducer that changes one."""

    def __init__(self, factory):
        self.factory, self.roots = factory, {}

    def copy(self, name: str, tmp: Path) -> Path:
        from cliphand3d.data.writers import write_freihand, write_rhd

        if name not in self.roots:
            out = self.factory.mktemp(name)
            if name == "frei":
                write_freihand(out, num_train=2, num_eval=1, seed=0, versions=1)
            else:
                write_rhd(out, num_train=2, num_eval=1, seed=0)
            self.roots[name] = out
        dst = tmp / name
        shutil.copytree(self.roots[name], dst)
        return dst


def printed(fn) -> str:
    """What a script prints for the error `fn` raises: the user error under any wrapper, else the exception."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - SystemExit and Hydra's errors included
        err = _user_error(e)
        if err is not None:
            return str(err)
        cause = e.__cause__
        return str(e) + (f"\n{cause}" if cause is not None and str(cause) not in str(e) else "")
    raise AssertionError("no error was raised")


def composed(*overrides: str, config: str = "train"):
    extra = ["run_dir=/tmp/unused"] if config == "train" else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config, overrides=[*extra, *overrides])


def compose_error(*overrides: str, config: str = "train") -> str:
    return printed(lambda: composed(*overrides, config=config))


def logged(fn, logger: str) -> list[str]:
    """Warnings `fn` logs on `logger`."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        fn()
    finally:
        log.removeHandler(handler)
    return records


def offline(ctx: Ctx) -> None:
    """No network and empty weight caches, whatever this machine downloaded before."""
    ctx.mp.setenv("HF_HUB_OFFLINE", "1")
    ctx.mp.setenv("HOME", str(ctx.tmp / "home"))
    ctx.mp.setattr(torch.hub, "_hub_dir", str(ctx.tmp / "torch_hub"))
    try:
        import huggingface_hub.constants as hf_constants

        ctx.mp.setattr(hf_constants, "HF_HUB_CACHE", str(ctx.tmp / "hf_hub"))
    except ImportError:
        pass


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"faq_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_TOWER = dict(layers=2, width=64, heads=2, embed_dim=64)


# command line and Hydra ------------------------------------------------------------------------------
@faq("hydra-typo")
def _(ctx):
    return compose_error("trainer.mx_steps=5")


@faq("hydra-option")
def _(ctx):
    return compose_error("prompt=order_is")


@faq("missing-value")
def _(ctx):
    return [printed(lambda: composed(config="eval").ckpt), printed(lambda: composed(config="demo").input)]


@faq("not-a-number")
def _(ctx):
    return printed(lambda: int(composed("trainer.max_steps=abc").trainer.max_steps))


# checks before any work -----------------------------------------------------------------------------
@faq("preflight")
def _(ctx):
    from cliphand3d.preflight import check_config

    return [printed(lambda: check_config(composed(o))) for o in (
        "trainer.monitor=pa_mpjpe", "data.img_size=65", "prompt.context_length=78", "trainer.max_nonfinite_steps=0",
        "trainer.accumulate=0", "trainer.accumulate=3")]


@faq("run-dir-unwritable")
def _(ctx):
    from cliphand3d.preflight import check_writable

    (ctx.tmp / "a_file").write_text("x")
    return printed(lambda: check_writable(ctx.tmp / "a_file" / "run" / "checkpoints", "run_dir"))


@faq("out-dir-unwritable")
def _(ctx):
    from cliphand3d.preflight import check_writable

    (ctx.tmp / "a_file").write_text("x")
    return printed(lambda: check_writable(ctx.tmp / "a_file" / "eval", "out_dir"))


@faq("free-space")
def _(ctx):
    from cliphand3d import preflight
    from cliphand3d.train.guards import check_checkpoint_space

    ctx.mp.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 1000))
    return printed(lambda: check_checkpoint_space(ctx.tmp, nn.Linear(10, 10), None))


@faq("run-folder-holds-run")
def _(ctx):
    from cliphand3d.checkpoint.io import save_checkpoint
    from cliphand3d.train.run import train

    save_checkpoint(ctx.tmp / "checkpoints" / "last.pt", {"step": 1})
    return printed(lambda: train(composed(f"run_dir={ctx.tmp}", "debug=fast")))


@faq("resume-mismatch")
def _(ctx):
    from cliphand3d.checkpoint.state import config_to_container
    from cliphand3d.train.resume import check_resumable

    saved = {"config": config_to_container(composed("model.depth_bins=16")),
             "train_state": {"world_size": 1, "batch_size": 32}}
    return printed(lambda: check_resumable(saved, composed("model.depth_bins=8"), ctx.tmp / "checkpoints" / "last.pt",
                                           world_size=2, batch_size=32))


@faq("resume-path")
def _(ctx):
    from cliphand3d.train.resume import find_resume_checkpoint

    return [printed(lambda: find_resume_checkpoint(ctx.tmp, str(ctx.tmp / "nope.pt"))),
            printed(lambda: find_resume_checkpoint(ctx.tmp, str(ctx.tmp)))]


@faq("batch-larger-than-data")
def _(ctx):
    from cliphand3d.train.run import train

    return printed(lambda: train(composed(f"run_dir={ctx.tmp}", "debug=fast", "data.num_train=4", "trainer.batch_size=8")))


@faq("device-cuda")
def _(ctx):
    from cliphand3d.runtime import pick_device

    ctx.mp.setattr(torch.cuda, "is_available", lambda: False)
    ctx.mp.setenv("CUDA_VISIBLE_DEVICES", "")
    return [printed(lambda: pick_device("cuda", 0)), printed(lambda: pick_device("cuda", 0, key="device"))]


@faq("init-from-size")
def _(ctx):
    from cliphand3d.build import adopt_init_config
    from cliphand3d.checkpoint.state import config_to_container

    saved = config_to_container(composed("data.img_size=128"))
    return printed(lambda: adopt_init_config(composed("data.img_size=96", "init_from=/x.pt"), saved))


# config values refused when a part is built ---------------------------------------------------------
@faq("prompt-overflow")
def _(ctx):
    return printed(lambda: instantiate(composed("prompt=figure3", "prompt.truncate=false").prompt))


@faq("prompt-unknown")
def _(ctx):
    return [printed(lambda: instantiate(composed("prompt.template=nope").prompt)),
            printed(lambda: instantiate(composed("prompt.naming=klingon").prompt))]


@faq("prompt-values")
def _(ctx):
    return [printed(lambda: instantiate(composed(*o).prompt)) for o in (
        ["prompt.num_joints=0"], ["prompt.num_joints=5", "prompt.joint_subset=[1,2]"], ["prompt.joint_subset=[1,21]"],
        ["prompt.axes=[x,w]"], ["prompt.context_length=2"])]


@faq("model-options")
def _(ctx):
    from cliphand3d.models import regressor
    from cliphand3d.models.backbone import ResNetBackbone
    from cliphand3d.models.joint_features import JointFeatures
    from cliphand3d.models.joint_regressor import JointRegressor

    return [printed(lambda: ResNetBackbone(name="resnet101")), printed(lambda: ResNetBackbone(name="resnet18", stages=5)),
            printed(lambda: ResNetBackbone(name="resnet18", input_norm="caffe")),
            printed(lambda: JointRegressor(in_channels=8, z_head="mlp")),
            printed(lambda: regressor._choice("cue_maps", "all", regressor.CUE_MAPS)),
            printed(lambda: JointFeatures(in_channels=8, impl="fast")),
            printed(lambda: JointFeatures(in_channels=8, tokens="flatten", hidden=16, map_size=16))]


@faq("model-widths")
def _(ctx):
    from cliphand3d.models.cliphand3d import CLIPHand3D
    from cliphand3d.models.template import joints_only_template

    template = joints_only_template(np.random.default_rng(0).normal(size=(8, 21, 3)) * 0.05 + [0, 0, 0.5])
    kw = dict(template=template, img_size=64, backbone="resnet18", depth_bins=16, deconv_channels=16,
              joint_feature_hidden=16, token_dim=32, heads=2, embed_dim=32)
    return [printed(lambda: CLIPHand3D(widths=(32, 16), **kw)), printed(lambda: CLIPHand3D(widths=(32, 16, 15, 8, 8), **kw)),
            printed(lambda: CLIPHand3D(widths=(32, 16, 16, 8, 8), blocks_per_stage=[1, 0], **kw))]


@faq("text-tower")
def _(ctx):
    from cliphand3d.models.text_encoder import TextEncoder

    return [printed(lambda: TextEncoder(model_name="ViT-Q-99")),
            printed(lambda: TextEncoder(tower={"depth": 2})),
            printed(lambda: TextEncoder(tower=dict(TINY_TOWER, heads=3))),
            printed(lambda: TextEncoder(tower=TINY_TOWER, embed_dim=512)),
            printed(lambda: TextEncoder(tower=TINY_TOWER, precision="fp8")),
            printed(lambda: TextEncoder(tower=TINY_TOWER, cache_size=-1))]


@faq("text-tower-kind")
def _(ctx):
    import open_clip

    from cliphand3d.models.text_encoder import TextEncoder, build_text_tower

    hf = next(m for m in open_clip.list_models() if (open_clip.get_model_config(m) or {}).get("text_cfg", {})
              .get("hf_model_name"))
    cfg = dict(open_clip.get_model_config("ViT-B-32")["text_cfg"], **TINY_TOWER, pool_type="first")
    cfg.pop("embed_dim")
    return [printed(lambda: TextEncoder(model_name=hf)), printed(lambda: build_text_tower(cfg, 64, False, 0))]


@faq("text-adapters")
def _(ctx):
    from cliphand3d.models.text_adapter import AxisAdapters

    return [printed(lambda: AxisAdapters(embed_dim=32, kind="transformer")),
            printed(lambda: AxisAdapters(embed_dim=32, kind="batch_attention", heads=5)),
            printed(lambda: AxisAdapters(embed_dim=32, block="gpt")),
            printed(lambda: AxisAdapters(embed_dim=32, kind="batch_attention", block="clip", hidden=48, heads=4)),
            printed(lambda: AxisAdapters(embed_dim=32, layers=0)),
            printed(lambda: AxisAdapters(embed_dim=32, axes=["x", "x"]))]


@faq("loss-values")
def _(ctx):
    from cliphand3d.losses import CLIPHand3DLoss, weighted_total
    from cliphand3d.models.contrastive import PerAxisContrastiveLoss

    return [printed(lambda: CLIPHand3DLoss(weights={"jionts": 1.0})),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0}, kind="l3")),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0}, heatmap_sigma=0)),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0}, units="mm")),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0, "edge": 1.0}, graph_neighbours=0)),
            printed(lambda: weighted_total({"joints": torch.ones(())}, {"joints": 0.0})),
            printed(lambda: PerAxisContrastiveLoss(init_logit_scale=10.0)),
            printed(lambda: PerAxisContrastiveLoss(min_scale=10.0, max_scale=1.0)),
            printed(lambda: PerAxisContrastiveLoss(axes=("x", "x")))]


@faq("text-branch-missing")
def _(ctx):
    from cliphand3d.losses import CLIPHand3DLoss
    from cliphand3d.models.contrastive import PerAxisContrastiveLoss
    from cliphand3d.models.training import TrainingModule

    crit = instantiate(composed().loss, _convert_="all")
    outputs = {"joints_coarse": torch.zeros(1, 21, 3), "joints": torch.zeros(1, 21, 3)}
    batch = {"joints_uvd": torch.zeros(1, 21, 3)}

    class Model(nn.Module):
        def parameter_terms(self):
            return {}

        def forward(self, images, pose_features=False):
            return {"pose_feats": {"x": torch.zeros(1, 4), "z": torch.zeros(1, 4)}}

    from cliphand3d.models.text_adapter import AxisAdapters

    module = TrainingModule(Model(), crit, nn.Identity(), AxisAdapters(embed_dim=4, axes=["x", "z"]))
    return [printed(lambda: TrainingModule(nn.Linear(1, 1), crit, None, None)),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0, "heatmap": 1.0})(outputs, batch)),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0, "edge": 1.0})(
                {**outputs, "verts": torch.zeros(1, 30, 3)}, {**batch, "verts_uvd": torch.zeros(1, 30, 3)})),
            printed(lambda: CLIPHand3DLoss(weights={"joints": 1.0, "clip": 1.0},
                                           contrastive=PerAxisContrastiveLoss())(outputs, batch)),
            printed(lambda: module({"image": torch.zeros(1), "prompts": {"x": ["a"]}}))]


@faq("worker-nice")
def _(ctx):
    from cliphand3d.runtime import make_loader

    return printed(lambda: make_loader([0], batch_size=1, num_workers=1, device=torch.device("cpu"), worker_nice=-5))


@faq("loader-options")
def _(ctx):
    from cliphand3d.runtime import make_loader

    cpu = torch.device("cpu")
    return [printed(lambda: make_loader([0], batch_size=1, num_workers=1, device=cpu, cv2_threads=0)),
            printed(lambda: make_loader([0], batch_size=1, num_workers=1, device=cpu, sharing_strategy="carrier_pigeon"))]


@faq("shared-memory")
def _(ctx):
    from cliphand3d.runtime import guard_shared_memory

    def died():
        yield 1
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
                           "dataloader's workers are out of shared memory. Please try to raise your shared memory limit.")

    return printed(lambda: list(guard_shared_memory(died())))


@faq("benchmark-options")
def _(ctx):
    from omegaconf import OmegaConf

    from cliphand3d.apps.benchmark import run as bench

    cfg = OmegaConf.create({"train_step": {"variants": {"tiny": [], "no_clip": []}, "default": "tiny",
                                           "baseline": "old", "previous": None}})
    return "\n".join([printed(lambda: bench.check_sections(["speed"])),
                      printed(lambda: bench.apply_targets([], {"s/r": "about 1"})),
                      printed(lambda: bench.bench_train_step(cfg, torch.device("cpu"), {}))])


@faq("benchmark-photos")
def _(ctx):
    from cliphand3d.apps.benchmark.loader import put_photos

    return printed(lambda: put_photos([str(ctx.tmp / "00000000.jpg")], str(ctx.tmp / "no_photos"), "freihand"))


@faq("ema-decay")
def _(ctx):
    from cliphand3d.train.ema import ModelEMA

    return printed(lambda: ModelEMA(nn.Linear(1, 1), decay=1.5))


@faq("schedule")
def _(ctx):
    from cliphand3d.train.optim import schedule_from_config

    def sched(*overrides):
        cfg = composed(*overrides)
        return schedule_from_config(cfg.trainer, cfg.optim, train_size=40, batch_size=4, world_size=1)

    return [printed(lambda: sched("trainer.schedule_batch=0")),
            printed(lambda: sched("trainer.schedule_batch=64", "trainer.max_steps=null")),
            printed(lambda: sched("optim.lr_scaling=cubic"))]


@faq("synthetic-values")
def _(ctx):
    from cliphand3d.data.synthetic import SyntheticHands, sample_hand

    return [*(printed(lambda: instantiate(composed(o).data.train)) for o in ("data.view=random", "data.num_verts=3")),
            printed(lambda: sample_hand(0, 0, view="random")),
            printed(lambda: SyntheticHands(length=0)),
            printed(lambda: SyntheticHands(length=4, split="dev")),
            printed(lambda: SyntheticHands(length=4, seed=-1))]


@faq("template-levels")
def _(ctx):
    from cliphand3d.models.template import build_template

    xyz = np.random.default_rng(0).normal(size=(8, 21, 3)) * 0.05 + [0, 0, 0.5]
    verts = xyz[:, :20].repeat(10, 1)
    return [printed(lambda: build_template(verts, xyz, levels=(98, 40))),
            printed(lambda: build_template(verts, xyz, levels=(40, 98), k_nearest=0)),
            printed(lambda: build_template(verts, xyz, levels=(40, 98), ridge=-1.0))]


# pretrained weights ---------------------------------------------------------------------------------
@faq("backbone-weights")
def _(ctx):
    import torchvision

    from cliphand3d.models import backbone as bb
    from cliphand3d.models import pretrained

    offline(ctx)
    (ctx.tmp / "junk.pth").write_bytes(b"not a torch file" * 8)
    torch.save([1, 2], ctx.tmp / "list.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ctx.tmp / "r18.pth")
    out = [printed(lambda: bb.ResNetBackbone("resnet18", pretrained="/nowhere/resnet18.pth")),
           printed(lambda: bb.ResNetBackbone("resnet18", pretrained="IMAGENET_NOPE")),
           printed(lambda: bb.ResNetBackbone("resnet18", pretrained="IMAGENET1K_V1")),
           printed(lambda: bb.ResNetBackbone("resnet18", pretrained=ctx.tmp / "junk.pth")),
           printed(lambda: bb.ResNetBackbone("resnet18", pretrained=ctx.tmp / "list.pth")),
           printed(lambda: bb.ResNetBackbone("resnet34", pretrained=ctx.tmp / "r18.pth"))]
    ctx.mp.setattr(pretrained, "offline", lambda: False)
    ctx.mp.setattr(pretrained, "reachable", lambda url: True)

    def fail(*a, **k):
        raise OSError("connection reset")

    ctx.mp.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fail)
    return out + [printed(lambda: bb.ResNetBackbone("resnet18", pretrained="IMAGENET1K_V1"))]


@faq("text-weights")
def _(ctx):
    from open_clip import pretrained as oc_pretrained

    from cliphand3d.models import pretrained
    from cliphand3d.models import text_encoder as te

    offline(ctx)
    tiny = lambda **kw: te.TextEncoder(tower=TINY_TOWER, **kw)  # noqa: E731
    (ctx.tmp / "junk.pt").write_bytes(b"not a torch file" * 8)
    torch.save([1, 2], ctx.tmp / "list.pt")
    torch.save(te.TextEncoder(tower=dict(TINY_TOWER, width=32)).tower.state_dict(), ctx.tmp / "wide.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's archives still are
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), ctx.tmp / "script.pt")
    out = [printed(lambda: tiny(pretrained=str(ctx.tmp / "missing.pt"))),
           printed(lambda: tiny(pretrained="no_such_tag")),
           printed(lambda: te.TextEncoder(model_name="ViT-B-32", pretrained="openai")),
           printed(lambda: tiny(pretrained=str(ctx.tmp / "junk.pt"))),
           printed(lambda: tiny(pretrained=str(ctx.tmp / "list.pt"))),
           printed(lambda: tiny(pretrained=str(ctx.tmp / "wide.pt"))),
           printed(lambda: tiny(pretrained=str(ctx.tmp / "script.pt")))]
    ctx.mp.setattr(pretrained, "offline", lambda: False)
    ctx.mp.setattr(pretrained, "reachable", lambda host, timeout=3.0: False)
    out.append(printed(lambda: te.TextEncoder(model_name="ViT-B-32", pretrained="openai")))
    ctx.mp.setattr(pretrained, "reachable", lambda host, timeout=3.0: True)

    def fail(*a, **k):
        raise OSError("connection reset")

    ctx.mp.setattr(oc_pretrained, "download_pretrained", fail)
    return out + [printed(lambda: te.TextEncoder(model_name="ViT-B-32", pretrained="openai"))]


# data -----------------------------------------------------------------------------------------------
@faq("data-root")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND
    from cliphand3d.data.rhd import RHD

    return [printed(lambda: FreiHAND(ctx.tmp / "nowhere")), printed(lambda: RHD(ctx.tmp / "nowhere"))]


@faq("annotation-files")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND

    out, root = [], ctx.frei()
    xyz = root / "training_xyz.json"
    saved = xyz.read_text()
    (root / "training_K.json").rename(root / "K.bak")
    out.append(printed(lambda: FreiHAND(root)))
    (root / "K.bak").rename(root / "training_K.json")
    for bad in ("[[1, 2", json.dumps({"a": 1}), json.dumps([[["x"] * 3] * 21] * 2),
                json.dumps([[[0.0, 0.0, 1.0]] * 20] * 2), json.dumps([[[0.0, 0.0, 1.0]] * 21] * 1)):
        xyz.write_text(bad)
        out.append(printed(lambda: FreiHAND(root)))
    xyz.write_text(saved)
    for name in ("training_K", "training_xyz", "training_verts", "training_scale"):
        (root / f"{name}.json").write_text("[]")
    return out + [printed(lambda: FreiHAND(root))]


@faq("eval-labels")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND

    root = ctx.frei()
    (root / "evaluation_xyz.json").unlink()
    return [printed(lambda: FreiHAND(root, split="eval")),
            printed(lambda: FreiHAND(root, split="eval", require_gt=False).label_sample(0)),
            printed(lambda: FreiHAND(root, split="eval", require_gt=False, crop="joints"))]


@faq("data-choices")
def _(ctx):
    from cliphand3d.build import check_split
    from cliphand3d.data.freihand import FreiHAND

    root = ctx.frei()
    from cliphand3d.build import build_datasets
    from cliphand3d.data.rhd import RHD

    old = OmegaConf.create({"data": {"name": "freihand", "train": {}}})
    one = ctx.tmp / "one"
    shutil.copytree(root, one)
    for name in ("training_K", "training_xyz", "training_verts", "training_scale"):
        (one / f"{name}.json").write_text(json.dumps(json.loads((one / f"{name}.json").read_text())[:1]))
    return [printed(lambda: check_split("tset")),
            printed(lambda: build_datasets(old, splits=("test",))),
            printed(lambda: RHD(ctx.rhd(), split="val", val_fraction=0.0)),
            printed(lambda: FreiHAND(one, val_fraction=0.5)),
            printed(lambda: FreiHAND(root, split="validation")),
            printed(lambda: FreiHAND(root, split="val", val_fraction=0.0)),
            printed(lambda: FreiHAND(root, val_fraction=1.0)),
            printed(lambda: FreiHAND(root, holdout_seed=-1)),
            printed(lambda: FreiHAND(root, versions=(0, 0))),
            printed(lambda: FreiHAND(root, crop="box")),
            printed(lambda: FreiHAND(root, split="eval", crop="mask")),
            printed(lambda: FreiHAND(root, crop="centre", centre_fraction=0.0)),
            printed(lambda: RHD(ctx.tmp / "rhd", crop="box"))]


@faq("images")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND

    root = ctx.frei()
    ds = FreiHAND(root, val_fraction=0.0)
    a, b = ds.image_path(0), ds.image_path(1)
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    b.write_bytes(b"garbage" * 10 + b"\xff\xd9")
    out = [printed(lambda: ds[0]), printed(lambda: ds[1])]
    b.unlink()
    from cliphand3d.data.base import read_image_raw

    return out + [printed(lambda: ds[1]), printed(lambda: read_image_raw(b))]


@faq("mask-empty")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND

    root = ctx.frei()
    cv2.imwrite(str(root / "training" / "mask" / "00000000.jpg"), np.zeros((224, 224), np.uint8))
    from cliphand3d.data.rhd import RHD

    rhd = ctx.rhd()
    mask = RHD(rhd, val_fraction=0.0).mask_path(0)
    cv2.imwrite(str(mask), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)[:100])
    return [printed(lambda: FreiHAND(root, val_fraction=0.0, crop="mask")[0]),
            printed(lambda: RHD(rhd, val_fraction=0.0)[0])]


@faq("rhd-annotations")
def _(ctx):
    from cliphand3d.data.rhd import RHD

    root = ctx.rhd()
    path = root / "training" / "anno_training.pickle"
    anno = pickle.loads(path.read_bytes(), encoding="latin1")
    out = []
    entry = {k: anno[0][k] for k in ("xyz", "uv_vis", "K")}
    for bad in ({**anno, 0: {**anno[0], "extra": argparse.Namespace()}}, [1, 2], {0: {"xyz": [[0.0] * 3] * 42}},
                {0: [1, 2]}, {0: {**entry, "K": [[1.0] * 3] * 2}}, {"a": entry}):
        path.write_bytes(pickle.dumps(bad, protocol=2))
        out.append(printed(lambda: RHD(root)))
    path.write_bytes(b"\x80\x02garbage")
    out.append(printed(lambda: RHD(root)))
    path.write_bytes(b"")
    return out + [printed(lambda: RHD(root))]


@faq("label-cache")
def _(ctx):
    from cliphand3d.data import label_cache
    from cliphand3d.data.freihand import FreiHAND

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    root = ctx.frei()
    shutil.rmtree(root / label_cache.CACHE_FOLDER, ignore_errors=True)
    (root / label_cache.CACHE_FOLDER).write_text("x")  # the data folder cannot hold the cache, even for root
    (ctx.tmp / "a_file").write_text("x")
    ctx.mp.setenv(label_cache.ENV, str(ctx.tmp / "fallback"))
    out = logged(lambda: FreiHAND(root, split="eval"), "cliphand3d.data.label_cache")[:1]
    ctx.mp.setenv(label_cache.ENV, str(ctx.tmp / "a_file"))
    out.append(printed(lambda: FreiHAND(root)))
    ctx.mp.setenv(label_cache.ENV, str(ctx.tmp / "full"))
    ctx.mp.setattr(label_cache.np, "save", disk_full)
    return out + [printed(lambda: FreiHAND(root))]


@faq("skip-bad")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND

    root = ctx.frei()
    ds = FreiHAND(root, val_fraction=0.0, skip_bad=True)
    first = ds.image_path(0)
    first.write_bytes(first.read_bytes()[:100])
    warnings = logged(lambda: ds[0], "cliphand3d.data.base")
    second = ds.image_path(1)
    second.write_bytes(second.read_bytes()[:100])
    return warnings + [printed(lambda: ds[0])]


@faq("check-data")
def _(ctx):
    from cliphand3d.apps import doctor

    root = ctx.frei()
    (root / "training_verts.json").unlink()
    problems = doctor.run(data_format="freihand", root=root, builders={}, out=None, image_check=None,
                          check_kwargs={"versions": [0]}, log=lambda *a: None)
    return [f"PROBLEM {p}" for p in problems]


# checkpoints ----------------------------------------------------------------------------------------
@faq("checkpoint-file")
def _(ctx):
    from cliphand3d.build import checkpoint_config
    from cliphand3d.checkpoint.io import load_checkpoint

    (ctx.tmp / "empty.pt").write_bytes(b"")
    (ctx.tmp / "notes.pt").write_text("my notes\n")
    torch.save(torch.ones(3), ctx.tmp / "tensor.pt")
    torch.save({"x": argparse.Namespace()}, ctx.tmp / "object.pt")
    return [printed(lambda: load_checkpoint(ctx.tmp / "missing.pt")),
            printed(lambda: load_checkpoint(ctx.tmp)),
            printed(lambda: load_checkpoint(ctx.tmp / "empty.pt")),
            printed(lambda: load_checkpoint(ctx.tmp / "notes.pt")),
            printed(lambda: load_checkpoint(ctx.tmp / "tensor.pt")),
            printed(lambda: load_checkpoint(ctx.tmp / "object.pt")),
            printed(lambda: checkpoint_config({"state_dict": {}}, "dict.pt"))]


@faq("checkpoint-fit")
def _(ctx):
    from cliphand3d.build import check_model_config
    from cliphand3d.checkpoint.weights import check_state_dict_compat

    old = composed()
    OmegaConf.set_struct(old, False)
    old.model.hidden_layers = 3
    moved = OmegaConf.create({"model": {"_target_": "cliphand3d.models.old.Net"}})
    return [printed(lambda: check_state_dict_compat(nn.Linear(2, 3), {"weight": torch.zeros(3, 4), "scale": torch.ones(1)},
                                                     "last.pt")),
            printed(lambda: check_state_dict_compat(nn.Linear(2, 3), [1, 2], "list.pt")),
            printed(lambda: check_model_config(old, "old.pt")),
            printed(lambda: check_model_config(moved, "moved.pt"))]


@faq("eval-overrides")
def _(ctx):
    from cliphand3d.build import checkpoint_config
    from cliphand3d.checkpoint.state import config_to_container
    from cliphand3d.evaluation.run import eval_config

    ckpt = {"config": config_to_container(composed()), "model": {}}
    saved = OmegaConf.create({"data": {"root": "/old", "img_size": 64, "test": {"root": "/old"}}})
    return [printed(lambda: checkpoint_config(ckpt, "best.pt", ["model.nope=1"])),
            printed(lambda: checkpoint_config(ckpt, "best.pt", ["model.coord_units"])),
            printed(lambda: eval_config(OmegaConf.create({"data": {"root": "/b"}, "root": "/a"}), saved)),
            printed(lambda: eval_config(OmegaConf.create({"data": {"root": "/b"}, "root": None}),
                                        OmegaConf.create({"data": {"format": "synthetic", "name": "synthetic"}})))]


@faq("placement")
def _(ctx):
    from cliphand3d.data.freihand import FreiHAND
    from cliphand3d.data.reframe import check_framing
    from cliphand3d.evaluation.predict import _placement, check_placement, predict

    root = ctx.frei()
    (root / "evaluation_xyz.json").unlink()
    unlabelled = FreiHAND(root, split="eval", require_gt=False)
    uvd = torch.zeros(1, 21, 3)
    return [printed(lambda: check_placement("best")),
            printed(lambda: check_placement("gt", unlabelled, "test")),
            printed(lambda: predict(nn.Identity(), [], "cpu", placement="best")),
            printed(lambda: _placement(uvd, {"K": torch.eye(3)[None]}, 64, "gt")),
            printed(lambda: _placement(uvd, {"K": torch.eye(3)[None]}, 64, "estimated")),
            printed(lambda: check_framing("twice", 1.3)),
            printed(lambda: check_framing("two_pass", -1.0, "demo.py"))]


# during training ------------------------------------------------------------------------------------
@faq("non-finite")
def _(ctx):
    from cliphand3d.train.guards import loss_error as _loss_error
    from cliphand3d.train.guards import skip_or_stop as _skip_or_stop

    net = nn.Linear(2, 2)
    net.weight.grad = torch.full((2, 2), float("nan"))
    return [str(_loss_error({"verts": torch.tensor(float("nan")), "joints": torch.tensor(1.0)}, 7)),
            printed(lambda: _skip_or_stop(net, 9, 3, 3))]


@faq("checkpoint-write")
def _(ctx):
    import cliphand3d.checkpoint.io as ck

    path = ctx.tmp / "last.pt"
    out = [printed(lambda: ck.save_checkpoint(path, {"model": {"w": torch.tensor([float("nan")])}}))]
    ck.save_checkpoint(path, {"step": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.mp.setattr(ck.torch, "save", full)
    return out + [printed(lambda: ck.save_checkpoint(path, {"step": 2}))]


# demo -----------------------------------------------------------------------------------------------
@faq("demo-config")
def _(ctx):
    from cliphand3d.apps.demo import inputs, labels

    (ctx.tmp / "boxes.json").write_text("[1, 2")
    (ctx.tmp / "list.json").write_text("[1, 2]")
    (ctx.tmp / "empty").mkdir()
    cfg = composed("hand=middle", "ckpt=x.pt", "input=y", config="demo")
    labels_file = ctx.tmp / "labels.json"
    labels_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                       "annotations": [{"image_id": 1, "keypoints": [0] * 63}]}))
    return [printed(lambda: inputs.settings(cfg)),
            printed(lambda: inputs.settings(composed("box_scale=0", "ckpt=x.pt", "input=y", config="demo"))),
            printed(lambda: labels.score_against_labels([], labels_file, None, ctx.tmp)),
            printed(lambda: inputs.parse_numbers("[1,2]", "K", 4)),
            printed(lambda: inputs.check_box([0, 0, -5, 10], "box")),
            printed(lambda: inputs.load_boxes(ctx.tmp / "none.json")),
            printed(lambda: inputs.load_boxes(ctx.tmp / "boxes.json")),
            printed(lambda: inputs.load_boxes(ctx.tmp / "list.json")),
            printed(lambda: inputs.list_inputs(ctx.tmp / "nowhere")),
            printed(lambda: inputs.list_inputs(ctx.tmp / "empty"))]


@faq("demo-inputs")
def _(ctx):
    from cliphand3d.apps.demo import hand, inputs
    from cliphand3d.apps.demo import run as demo

    (ctx.tmp / "bad.png").write_bytes(b"\x89PNG garbage")
    (ctx.tmp / "empty.jpg").write_bytes(b"")
    (ctx.tmp / "bad.mp4").write_bytes(b"not a video")
    class NoFrames:
        def __init__(self, path):
            pass

        def isOpened(self):
            return True

        def read(self):
            return False, None

        def release(self):
            pass

    photos = ctx.tmp / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "hand.jpg"), np.full((64, 64, 3), 128, np.uint8))
    (ctx.tmp / "boxes.json").write_text(json.dumps({"other.jpg": [0, 0, 10, 10]}))
    ctx.mp.setattr(demo, "load_demo_model", lambda cfg: None)
    cfg = composed("ckpt=x.pt", f"input={photos}", f"boxes={ctx.tmp / 'boxes.json'}", f"out={ctx.tmp / 'out'}",
                   config="demo")
    failed, total, reasons = demo.run_demo(cfg)
    assert (failed, total) == (1, 1)
    no_frames = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs.cv2, "VideoCapture", NoFrames)
        no_frames.append(printed(lambda: list(inputs.video_frames(ctx.tmp / "empty.mp4"))))
    return reasons + no_frames + [printed(lambda: inputs.read_image(ctx.tmp / "bad.png")),
            printed(lambda: inputs.read_image(ctx.tmp / "empty.jpg")),
            printed(lambda: inputs.read_image(ctx.tmp)),
            printed(lambda: inputs.to_rgb8(np.zeros((40, 40, 2), np.uint8), "two.png")),
            printed(lambda: inputs.check_size(np.zeros((20, 30, 3), np.uint8), "small.png", 32)),
            printed(lambda: hand.crop_square((500, 500, 10, 10), 224, 224, 1.3, "photo.jpg")),
            printed(lambda: list(inputs.video_frames(ctx.tmp / "bad.mp4")))]


@faq("demo-live")
def _(ctx):
    from cliphand3d.apps.demo import inputs, smoothing

    def opened(value):
        return printed(lambda: inputs.open_capture(inputs.list_sources(value)[0]))

    return [opened(97), opened("file:///no/such/clip.mp4"), printed(lambda: inputs.check_max_frames(-3)),
            printed(lambda: smoothing.make_smoother({"enabled": True, "min_cutoff": 0}))]


# the other scripts ----------------------------------------------------------------------------------
@faq("import-checkpoint")
def _(ctx):
    from cliphand3d.apps.released import read_released

    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, ctx.tmp / "other.pth.tar")
    torch.save([1, 2], ctx.tmp / "list.pth.tar")
    torch.save({"state_dict": {"J_Reg": torch.zeros(1)}, "hook": argparse.Namespace()}, ctx.tmp / "obj.pth.tar")
    (ctx.tmp / "cut.pth.tar").write_bytes(b"PK\x03\x04 cut")
    return [printed(lambda: script("import_checkpoint").main([])),
            printed(lambda: read_released(ctx.tmp / "missing.pth.tar")),
            printed(lambda: read_released(ctx.tmp / "other.pth.tar")),
            printed(lambda: read_released(ctx.tmp / "list.pth.tar")),
            printed(lambda: read_released(ctx.tmp / "obj.pth.tar")),
            printed(lambda: read_released(ctx.tmp / "cut.pth.tar"))]


@faq("released-content")
def _(ctx):
    from cliphand3d.apps import released

    zeros = {"J_Reg": torch.zeros(21, 778), **{f"Vertx_{n}": torch.zeros(n, 3) for n in released.LEVELS}}
    return [printed(lambda: released.released_template({})),
            printed(lambda: released.released_template(zeros)),
            printed(lambda: released.map_state({"Foo.weight": torch.zeros(1)}, {}))]


@faq("summarize")
def _(ctx):
    from cliphand3d.apps.summarize import main

    out = []
    for folder in (ctx.tmp / "nowhere", ctx.tmp):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main([str(folder)]) == 1
        out.append(err.getvalue().removeprefix("error: "))
    return out


@faq("make-synthetic")
def _(ctx):
    cfg = composed("format=coco", f"out={ctx.tmp}", config="make_synthetic")
    return printed(lambda: script("make_synthetic").main.__wrapped__(cfg))


@faq("wandb-extra")
def _(ctx):
    import sys

    from cliphand3d.train.run import train

    ctx.mp.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as without the extra
    return printed(lambda: train(composed(f"run_dir={ctx.tmp}", "debug=fast", "logger=wandb")))


@faq("onnx-extra")
def _(ctx):
    import sys

    from cliphand3d.apps import export

    ctx.mp.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    return printed(lambda: export.OnnxModel(ctx.tmp / "model.onnx"))


@faq("onnx-options")
def _(ctx):
    from cliphand3d.apps import export

    ctx.mp.setattr(export, "require", lambda *names: [None] * len(names))  # with or without the extra
    (ctx.tmp / "folder").mkdir()
    return [printed(lambda: export.export_onnx(nn.Identity(), ctx.tmp / "x.onnx", img_size=64, opset=17)),
            printed(lambda: export.export_onnx(nn.Identity(), ctx.tmp / "x.onnx", img_size=64, batch_size=1)),
            printed(lambda: export.run_export(composed("ckpt=x.pt", f"out={ctx.tmp / 'x.tflite'}", "format=tflite",
                                                       config="export"))),
            printed(lambda: export.run_export(composed("ckpt=x.pt", f"out={ctx.tmp / 'folder'}", config="export"))),
            printed(lambda: export.OnnxModel(ctx.tmp / "none.onnx"))]


@faq("onnx-parity")
def _(ctx):
    from types import SimpleNamespace

    from cliphand3d.apps import export

    ctx.mp.setattr(export, "_parity", lambda model, path, images: (0.25, 1.5))
    return printed(lambda: export.check_export(SimpleNamespace(img_size=8), ctx.tmp / "model.onnx", batch=3))


@faq("internal")
def _(ctx):
    from cliphand3d.checkpoint.io import save_checkpoint
    from cliphand3d.data.sample import check_item
    from cliphand3d.train.guards import check_gradients

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0](torch.ones(1, 2)).sum().backward()
    return [printed(lambda: check_gradients(net)),
            printed(lambda: save_checkpoint(ctx.tmp / "x.pt", {"a": np.float32(1)})),
            printed(lambda: check_item({"image": None}))]


def _mix(ctx, *overrides: str):
    """data=mix over copies of the FreiHAND and RHD fixtures (one training hand each, one held out)."""
    if not hasattr(ctx, "mix_roots"):
        ctx.mix_roots = (ctx.frei(), ctx.rhd())
    return composed("data=mix", f"data.sets.freihand.root={ctx.mix_roots[0]}", f"data.sets.rhd.root={ctx.mix_roots[1]}",
                    "data.sets.freihand.versions=[0]", *overrides)


@faq("mix-sets")
def _(ctx):
    from cliphand3d.build import build_dataset
    from cliphand3d.data.mix import MixedHands

    cfg = _mix(ctx)
    frei = build_dataset(cfg, "train")
    return [printed(lambda: MixedHands({})),
            printed(lambda: MixedHands({"a": frei}, weights={"b": 1.0})),
            printed(lambda: build_dataset(OmegaConf.merge(cfg, {"data": {"sets": {"rhd": {"weight": -1}}}}), "train")),
            printed(lambda: MixedHands({"a": frei}, weights={"a": 0})),
            printed(lambda: MixedHands({"a": frei, "b": []})),
            printed(lambda: build_dataset(OmegaConf.merge(cfg, {"data": {"sets": {"rhd": {"img_size": 128}}}}),
                                          "train")),
            printed(lambda: build_dataset(_mix(ctx, "~data.sets.rhd.val"), "val"))]


@faq("mix-meshes")
def _(ctx):
    from cliphand3d.build import build_dataset

    extra = ("+data@data.sets.synthetic=synthetic", "data.sets.synthetic.num_verts=200",
             "data.sets.synthetic.img_size=256")
    return printed(lambda: build_dataset(_mix(ctx, *extra), "train"))


@faq("mix-eval")
def _(ctx):
    from cliphand3d.build import build_dataset, monitor_set
    from cliphand3d.preflight import check_config

    return [printed(lambda: build_dataset(_mix(ctx), "test")),
            printed(lambda: check_config(_mix(ctx, "trainer.final_eval=test"))),
            printed(lambda: monitor_set(_mix(ctx, "data.monitor_set=interhand"))),
            printed(lambda: monitor_set(_mix(ctx, "data.monitor_set=rhd", "data.sets.rhd.val_fraction=0")))]


# --------------------------------------------------------------------------- the tests
_MESSAGES: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return Data(tmp_path_factory)


def messages_of(rid: str, tmp_path_factory, data) -> list[str]:
    """A reproducer's messages, run once per session (the FAQ-wide test reuses them)."""
    if rid not in _MESSAGES:
        with pytest.MonkeyPatch.context() as mp:
            out = REPRODUCERS[rid](Ctx(tmp_path_factory.mktemp(rid), mp, data))
        _MESSAGES[rid] = [out] if isinstance(out, str) else list(out)
    return _MESSAGES[rid]


def rows_citing(rid: str) -> list[Row]:
    return [r for r in faq_rows() if rid in r.ids]


@pytest.mark.parametrize("rid", sorted(REPRODUCERS))
def test_faq_message(rid, tmp_path_factory, data):
    """Every message this reproducer gets from the code is one its FAQ entry quotes."""
    rows = rows_citing(rid)
    assert rows, f"no row of docs/faq_errors.md cites faq[{rid}]"
    regexes = [pattern_regex(p) for row in rows for p in row.patterns]
    for msg in messages_of(rid, tmp_path_factory, data):
        assert any(rx.search(_norm(msg)) for rx in regexes), (
            f"docs/faq_errors.md (line {', '.join(str(r.line) for r in rows)}) quotes no message that matches what "
            f"the code gives:\n{msg}")


def test_every_faq_entry_is_reproduced(tmp_path_factory, data):
    """Each quoted message is reproduced by one of its row's reproducers, or by a cited test that asserts its
    text; every cited test exists."""
    tests_src = {f.stem: f.read_text() for f in (REPO / "tests").glob("test_*.py")}
    rows = faq_rows()
    assert len(rows) > 30
    for row in rows:
        assert row.patterns and (row.ids or row.tests), f"line {row.line}: no message or no reproducer"
        unknown = [i for i in row.ids if i not in REPRODUCERS]
        assert not unknown, f"line {row.line}: faq{unknown} is not in tests/test_faq_errors.py"
        for t in row.tests:
            file, name = t.split("::")
            assert re.search(rf"^def {name}\(", tests_src.get(file, ""), re.M), f"line {row.line}: no test {t}"
        messages = [_norm(m) for i in row.ids for m in messages_of(i, tmp_path_factory, data)]
        cited = "\n".join(tests_src[t.split("::")[0]] for t in row.tests)
        for p in row.patterns:
            rx = pattern_regex(p)
            by_test = any(piece in cited for piece in literal_pieces(p) if len(piece) >= 12)
            assert any(rx.search(m) for m in messages) or by_test, f"line {row.line}: nothing reproduces `{p}`"


# --------------------------------------------------------------------------- every user-facing raise is listed
USER_ERRORS = ("DatasetError", "CheckpointError", "ConfigError", "PretrainedWeightsError",
               "PretrainedWeightsUnavailable", "ReleasedCheckpointError", "InputError", "FileNotFoundError",
               "SystemExit", "NonFiniteGradientError", "NonFiniteLossError", "MissingExtraError", "ParityError")


def user_raises(path: Path) -> list[tuple[int, str]]:
    """(line, first literal piece of at least 10 characters) of each `raise <user error>("...")`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
            continue
        name = ast.unparse(node.exc.func).split(".")[-1]
        if name not in USER_ERRORS or not node.exc.args:
            continue
        arg = node.exc.args[0]
        while isinstance(arg, ast.BinOp):  # "..." + "".join(...)
            arg = arg.left
        pieces = [arg.value] if isinstance(arg, ast.Constant) else [
            v.value for v in getattr(arg, "values", []) if isinstance(v, ast.Constant)]
        words = [_norm(p) for p in pieces if isinstance(p, str) and len(_norm(p)) >= 10]
        if words:
            found.append((node.lineno, words[0]))
    return found


def test_every_user_facing_raise_has_a_faq_entry():
    text = _norm(FAQ.read_text().replace("\\|", "|"))
    files = sorted([*(REPO / "cliphand3d").rglob("*.py"), *(REPO / "scripts").glob("*.py")])
    sites = {f"{f.relative_to(REPO)}:{line}": piece for f in files for line, piece in user_raises(f)}
    assert len(sites) > 80
    # the FAQ quotes a message's start: its first literal words must be there
    missing = {k: v for k, v in sites.items() if _start(v) not in text}
    assert not missing, "user-facing messages without a docs/faq_errors.md entry (quote their start there):\n" + \
        "\n".join(f"  {k}: {v}" for k, v in sorted(missing.items()))


def _start(piece: str, n: int = 24) -> str:
    piece = piece.split(" fix:")[0].strip(" .;:,")
    return piece if len(piece) <= n else piece[:n].rsplit(" ", 1)[0]


def test_the_pattern_reader():
    rx = pattern_regex("checkpoint <file> is empty (0 bytes) ... start afresh")
    assert rx.search("checkpoint /a/b.pt is empty (0 bytes): not a checkpoint, or start afresh")
    assert not rx.search("checkpoint /a/b.pt is empty (1 bytes)")
    rows = faq_rows("| Message | What to do | Reproduced by |\n|---|---|---|\n"
                    "| `a <x>` / `b` | do | faq[one], faq[two-2], test_x::test_y |\n")
    assert [(r.patterns, r.ids, r.tests) for r in rows] == [(["a <x>", "b"], ["one", "two-2"], ["test_x::test_y"])]
