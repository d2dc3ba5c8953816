"""docs/extending.md, done as written: its marked code blocks are read from the page and used as they are (a
template registered the documented way, a text config and a model config written into configs/, the documented
overrides), so the page and the code cannot drift apart."""
from __future__ import annotations

import ast
import itertools
import re
import shlex
import shutil
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cliphand3d import preflight
from cliphand3d.build import build_model, build_text
from cliphand3d.data import prompts as P
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.models import backbone as bb
from cliphand3d.models.template import build_template

REPO = Path(__file__).resolve().parents[1]
EXTENDING = REPO / "docs" / "extending.md"


def fenced_block_after(text: str, marker: str, where: str) -> str:
    """The body of the first fenced code block after `marker` in `text`."""
    start = text.index(marker)
    m = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no code block after {marker!r} in {where}"
    return m.group(1)


def doc_block(name: str) -> str:
    return fenced_block_after(EXTENDING.read_text(), f"<!-- tested: {name} -->", "docs/extending.md")


def configs_with(tmp_path: Path, block: str) -> tuple[Path, str]:
    """A copy of configs/ with the documented yaml `block` written where its first line says
    ("# configs/GROUP/NAME.yaml: ..."); returns the copy and NAME."""
    rel = re.match(r"# (configs/\S+\.yaml)", block).group(1)
    root = tmp_path / "configs"
    shutil.copytree(REPO / "configs", root)
    (tmp_path / rel).write_text(block)
    return root, Path(rel).stem


def composed(config_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches, whatever this machine downloaded before."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    except ImportError:
        pass


# --------------------------------------------------------------------------- 1. a prompt template
def test_documented_prompt_template(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_TEMPLATES", dict(P._TEMPLATES))  # the registry stays as it was
    # step 1 of docs/prompts.md, its code as printed
    code = fenced_block_after((REPO / "docs" / "prompts.md").read_text(), "## Adding a template", "docs/prompts.md")
    exec(textwrap.dedent(code), {"register_template": P.register_template})
    # step 2: configs/prompt/sorted_by.yaml, a copy of order_are.yaml with the template set
    root = tmp_path / "configs"
    shutil.copytree(REPO / "configs", root)
    order_are = (root / "prompt" / "order_are.yaml").read_text()
    assert "\ntemplate: order_are\n" in order_are
    (root / "prompt" / "sorted_by.yaml").write_text(order_are.replace("\ntemplate: order_are\n", "\ntemplate: sorted_by\n"))
    # step 3: prompt=sorted_by overflows as the page says, and fits at the number of joints it names
    with pytest.raises(Exception, match=r"'sorted_by' with num_joints=21 .* is 82 CLIP tokens .*at most 19 fits"):
        instantiate(composed(root, "prompt=sorted_by").prompt)
    gen = instantiate(composed(root, "prompt=sorted_by", "prompt.num_joints=19").prompt)
    hand = SyntheticHands(length=1, seed=0, img_size=64).label_sample(0).xyz
    out = gen(hand, np.random.default_rng(0))
    assert out["x"].startswith("Joints sorted by horizontal position: ") and out["x"].count(",") == 17
    assert out["z"].startswith("Joints sorted by depth, nearest first: ")
    assert max(P.count_tokens(s) for s in out.values()) <= gen.max_tokens <= 77


# --------------------------------------------------------------------------- 2. a text encoder
def test_documented_text_config(tmp_path, offline):
    root, name = configs_with(tmp_path, doc_block("text-config"))
    cfg = composed(root, f"text={name}")
    enc = cfg.text.encoder
    assert (enc.model_name, enc.pretrained, enc.embed_dim, enc.quick_gelu) == ("ViT-B-16", "laion2b_s34b_b88k", 512, None)
    assert cfg.text.adapters.kind == "mlp" and enc.cache_size == 4096  # the rest from the config it extends
    preflight.check_config(cfg)  # the context length fits the tower
    # the tag is one of ViT-B-16's (otherwise: "neither a file nor an open_clip tag"); offline it is the
    # one error the page quotes, naming both fixes
    with pytest.raises(Exception) as info:
        instantiate(enc)
    msg = str(info.value)
    assert ("text encoder: pretrained weights (open_clip tag 'laion2b_s34b_b88k' of ViT-B-16) are not in the "
            "local cache and HF_HUB_OFFLINE=1 forbids downloading. Fix: ") in msg
    assert "text.pretrained=null" in msg and "text.pretrained=/path/to/checkpoint.pt" in msg


def test_documented_local_text_checkpoint(tmp_path):
    import open_clip

    # the page's recipe, torch.save(model.state_dict(), path), on an open_clip CLIP model with the tiny
    # text tower of configs/text/tiny.yaml (and a one-layer vision tower, ignored on loading)
    torch.manual_seed(3)
    clip = open_clip.model.CLIP(embed_dim=64, quick_gelu=False,
                                vision_cfg=dict(layers=1, width=32, head_width=32, patch_size=32, image_size=32),
                                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    path = tmp_path / "clip_tiny.pt"
    torch.save(clip.state_dict(), path)
    overrides = [a for a in shlex.split(doc_block("text-file").replace("\\\n", " ")) if "=" in a]
    assert overrides == ["text=vit_b16_laion", "text.pretrained=/path/to/clip_vit_b16_laion.pt"]
    cfg = composed(REPO / "configs", "text=tiny", f"text.pretrained={path}")
    encoder, _ = build_text(cfg)
    prompts = ["Order are: wrist, thumb MCP and index fingertip.", "Order are: little DIP and wrist."]
    with torch.no_grad():
        assert torch.allclose(encoder(prompts), clip.encode_text(open_clip.tokenize(prompts)), atol=1e-5)


# --------------------------------------------------------------------------- 3. a backbone
SMALL_HEAD = ["data.img_size=64", "model.depth_bins=16", "model.deconv_channels=32", "model.joint_feature_hidden=16",
              "model.token_dim=32", "model.widths=[32,16,16,8,8]", "model.blocks_per_stage=1", "model.heads=2"]


def test_documented_backbone(tmp_path, monkeypatch, offline):
    entry = ast.literal_eval("{" + doc_block("backbone-choice") + "}")
    (name, channels), = entry.items()
    monkeypatch.setitem(bb.CHOICES, name, channels)  # the one line the page adds to backbone.py
    root, config = configs_with(tmp_path, doc_block("backbone-config"))
    ds = SyntheticHands(length=8, seed=0, img_size=64, num_verts=200)
    xyz, verts = ds.all_labels()
    template = build_template(verts, xyz, levels=(40, 80, 120))

    model = build_model(composed(root, f"model={config}", "model.pretrained=null", *SMALL_HEAD), template).eval()
    assert model.backbone.name == name == "resnext50_32x4d"
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 64))
        out = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels  # the channels the page lists are the network's
    assert [f.shape[-1] for f in feats] == [16, 16, 8, 4, 2]  # strides 4, 4, 8, 16, 32
    assert out["joints"].shape == (2, 21, 3)

    # a local state dict loads exactly
    path = tmp_path / f"{name}.pth"
    torch.save(model.backbone.state_dict(), path)
    again = build_model(composed(root, f"model={config}", f"model.pretrained={path}", *SMALL_HEAD), template)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in again.backbone.state_dict().items())

    # the config's tag, offline and not cached: the error the page quotes
    with pytest.raises(bb.PretrainedWeightsError) as info:
        build_model(composed(root, f"model={config}", *SMALL_HEAD), template)
    assert str(info.value).startswith(f"model.pretrained='IMAGENET1K_V2': {name} weights ")
    assert "model.pretrained=null (random init) or model.pretrained=/path/to/state_dict.pth" in str(info.value)


# --------------------------------------------------------------------------- 4. an ablation sweep
def test_documented_sweep_composes():
    train_line = doc_block("sweep").splitlines()[0]
    words = shlex.split(train_line)
    assert words[:4] == ["python", "scripts/train.py", "-m", "prompt=order_are,figure3_k10"]
    axes = [[f"{k}={v}" for v in vals.split(",")] for k, vals in (w.split("=", 1) for w in words[3:])]
    jobs = [list(job) for job in itertools.product(*axes)]
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        cfg = composed(REPO / "configs", *job)
        preflight.check_config(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither prompt config may be cut at 77 tokens
            gen = instantiate(cfg.prompt)
        seen.add((gen.template_name, gen.num_joints, int(cfg.seed), int(cfg.trainer.max_steps), cfg.name))
    assert seen == {(t, k, s, 900, "prompt_sweep") for (t, k) in (("order_are", None), ("figure3", 10)) for s in (0, 1)}
    summarize = shlex.split(doc_block("sweep").splitlines()[2])
    from cliphand3d.apps.summarize import main

    with pytest.raises(SystemExit) as help_exit:  # the documented options are the script's
        main(["--help"])
    assert help_exit.value.code == 0 and summarize[1] == "scripts/summarize.py" and summarize[3] == "--csv"
