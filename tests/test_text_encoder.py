"""Text branch: the frozen open_clip text tower (savings are exact, weights stay out of checkpoints,
offline failures are one clear error) and the per-axis adapters."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cliphand3d.errors import PretrainedWeightsError as PretrainedWeightsUnavailable
from cliphand3d.models.text_adapter import AxisAdapters
from cliphand3d.models.text_encoder import TextEncoder
from cliphand3d.skeleton import JOINT_NAMES

TINY = dict(layers=2, width=64, heads=2, embed_dim=64)


def order_prompt(names) -> str:
    names = list(names)
    return "Order are: " + ", ".join(names[:-1]) + " and " + names[-1] + "."


# Different token lengths (2 .. 21 joints); the 21-joint one fills all 77 tokens.
PROMPTS = [order_prompt(JOINT_NAMES[i:i + k]) for i, k in ((0, 2), (3, 5), (1, 9), (0, 21))]


def tiny(**kw) -> TextEncoder:
    return TextEncoder(tower=TINY, **kw)


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return tiny(cache_size=0)


def record_tower_inputs(e: TextEncoder) -> list[tuple[int, ...]]:
    """Shapes (rows, tokens) that reach the first transformer block: what the tower really ran on."""
    shapes: list[tuple[int, ...]] = []
    e.tower.transformer.resblocks[0].register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[:2])))
    return shapes


# --------------------------------------------------------------------------- exactness
def test_matches_open_clip_text_tower(enc):
    tokens = enc.tokenizer(PROMPTS)
    reference = enc.tower(tokens)  # open_clip's own full-length TextTransformer.forward
    assert torch.allclose(enc(PROMPTS), reference, atol=1e-5)
    assert torch.allclose(enc.encode_tokens(tokens, truncate_to_eot=False), reference, atol=1e-5)


def test_truncation_to_eot_is_exact():
    enc = tiny(cache_size=0)
    shapes = record_tower_inputs(enc)
    short = PROMPTS[:3]
    tokens = enc.tokenizer(short)
    longest = int(enc.eot_positions(tokens).max()) + 1
    full = enc.encode_tokens(tokens, truncate_to_eot=False)
    cut = enc.encode_tokens(tokens, truncate_to_eot=True)
    assert shapes == [(3, enc.context_length), (3, longest)] and longest < enc.context_length
    assert torch.allclose(cut, full, atol=1e-5)
    # A prompt's feature does not depend on how long its batch-mates are.
    alone = enc.encode_tokens(enc.tokenizer(short[:1]), truncate_to_eot=True)
    assert torch.allclose(alone[0], full[0], atol=1e-5)


def test_dedup_and_cache_are_exact_and_counted():
    plain = tiny(cache_size=0, dedup=False, truncate_to_eot=False)
    fast = tiny(cache_size=8, dedup=True, truncate_to_eot=True)
    shapes = record_tower_inputs(fast)
    batch = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    ref = plain(batch)
    first = fast(batch)
    assert torch.allclose(first, ref, atol=1e-5)
    assert [rows for rows, _ in shapes] == [3]
    assert (fast.hits, fast.misses) == (0, 3)  # 3 distinct prompts, each encoded once
    first.add_(1.0)  # callers may modify outputs without corrupting the cache
    again = fast(batch[::-1])
    assert torch.allclose(again, ref.flip(0), atol=1e-5)
    assert (fast.hits, fast.misses) == (3, 3)
    assert len(shapes) == 1  # all hits: the tower did not run
    assert fast.hit_rate == pytest.approx(0.5)


def test_cache_is_bounded_lru():
    e = tiny(cache_size=2)
    e(PROMPTS[:1]); e(PROMPTS[1:2]); e(PROMPTS[:1]); e(PROMPTS[2:3])  # PROMPTS[1] is least recent
    assert list(e._cache) == [PROMPTS[0], PROMPTS[2]]
    before = e.misses
    e(PROMPTS[1:2])
    assert e.misses == before + 1


def test_cached_rows_from_inference_mode_are_usable_in_training():
    e = tiny(cache_size=4)
    with torch.inference_mode():
        e(PROMPTS[:2])
    head = torch.nn.Linear(64, 1)
    head(e(PROMPTS[:2])).sum().backward()  # cache hits; would fail on inference tensors
    assert e.hits == 2 and head.weight.grad is not None


def test_encode_axes_matches_per_axis_calls(enc):
    prompts = {"x": PROMPTS[:2], "y": PROMPTS[1:3], "z": PROMPTS[2:4]}
    out = enc.encode_axes(prompts)
    for a, p in prompts.items():
        assert torch.allclose(out[a], enc(p), atol=1e-5)


# --------------------------------------------------------------------------- frozen, not in checkpoints
def test_tower_is_frozen_and_not_in_state_dict(enc):
    assert all(not p.requires_grad for p in enc.tower.parameters())
    assert len(list(enc.tower.parameters())) > 0
    assert len(enc.state_dict()) == 0 and len(list(enc.parameters())) == 0
    parent = torch.nn.ModuleDict({"text": enc, "head": torch.nn.Linear(64, 2)})
    assert all(not k.startswith("text.") for k in parent.state_dict())
    parent.load_state_dict(parent.state_dict(), strict=True)
    enc.train()
    assert not enc.tower.training
    assert not enc(PROMPTS[:1]).requires_grad


def test_module_moves_carry_the_tower():
    e = tiny(cache_size=4)
    e(PROMPTS[:1])
    e.to(torch.float64)
    assert e.tower.token_embedding.weight.dtype == torch.float64
    assert len(e._cache) == 0  # cached rows of the old dtype/device are dropped
    assert e(PROMPTS[:1]).dtype == torch.float32


def test_random_tower_is_reproducible_and_leaves_global_rng_alone(enc):
    state = torch.get_rng_state()
    same, other = tiny(seed=0), tiny(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(same(PROMPTS), enc(PROMPTS))
    assert not torch.allclose(other(PROMPTS), enc(PROMPTS))


def test_vit_b32_shaped_tower_encodes():
    e = TextEncoder(model_name="ViT-B-32", pretrained=None)
    assert e.embed_dim == 512
    assert len(e.tower.transformer.resblocks) == 12 and e.tower.transformer.width == 512
    out = e(PROMPTS[:2])
    assert out.shape == (2, 512) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- weights and errors
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches, whatever this machine has downloaded before."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's ~/.cache/clip
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    except ImportError:
        pass


def test_offline_openai_is_one_clear_error_fast(offline):
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        TextEncoder(model_name="ViT-B-32", pretrained="openai")
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert "text.pretrained=null" in msg and "text.pretrained=/path/to" in msg
    assert info.value.__cause__ is None and info.value.__context__ is None  # no chained traceback


def _fake_clip_checkpoint(tower_state: dict, prefix: str = "") -> dict:
    # A full CLIP checkpoint also holds a vision tower and the logit scale; only text keys matter.
    sd = {prefix + k: v.clone() for k, v in tower_state.items()}
    sd["visual.conv1.weight"] = torch.zeros(3)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


@pytest.mark.parametrize("prefix,wrap", [("", False), ("text.", False), ("module.", True)])
def test_local_checkpoint_loads_text_weights(tmp_path, enc, prefix, wrap):
    source = tiny(seed=7)
    sd = _fake_clip_checkpoint(source.tower.state_dict(), prefix)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": sd} if wrap else sd, path)
    loaded = tiny(pretrained=str(path), seed=0)
    assert torch.equal(loaded(PROMPTS), source(PROMPTS))
    assert not torch.allclose(loaded(PROMPTS), enc(PROMPTS))


def test_bad_checkpoints_and_configs_are_clear_errors(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(TextEncoder(tower=dict(TINY, width=32)).tower.state_dict(), path)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not match"):
        tiny(pretrained=str(path))
    with pytest.raises(PretrainedWeightsUnavailable, match="file not found"):
        tiny(pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(PretrainedWeightsUnavailable, match="neither a file nor an open_clip tag"):
        tiny(pretrained="no_such_tag")
    with pytest.raises(ValueError, match="text.tower has unknown keys"):
        TextEncoder(tower={"depth": 2})
    with pytest.raises(ValueError, match="text.embed_dim=512"):
        tiny(embed_dim=512)
    with pytest.raises(ValueError, match="text.precision"):
        tiny(precision="fp8")
    with pytest.raises(TypeError, match="list of prompt strings"):
        tiny()("one string")


# --------------------------------------------------------------------------- adapters
def _feats(b=6, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {a: torch.randn(b, d, generator=g) for a in "xyz"}


def test_mlp_adapter_starts_as_identity_and_is_per_sample():
    ad = AxisAdapters(embed_dim=32, kind="mlp", hidden=16)
    x = _feats()
    out = ad(x)
    for a in "xyz":
        assert torch.allclose(out[a], F.normalize(x[a], dim=-1), atol=1e-6)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out, part = ad(x), ad({a: v[:2] for a, v in x.items()})
    for a in "xyz":
        assert torch.allclose(out[a].norm(dim=-1), torch.ones(6), atol=1e-6)
        assert torch.allclose(out[a][:2], part[a], atol=1e-6)  # no mixing across the batch


def test_batch_attention_adapter_attends_across_the_batch():
    ad = AxisAdapters(embed_dim=32, kind="batch_attention", layers=2, heads=16)
    assert len(ad.heads["x"].encoder.layers) == 2
    x = _feats()
    out, part = ad(x), ad({a: v[:2] for a, v in x.items()})
    perm = torch.randperm(6)
    shuffled = ad({a: v[perm] for a, v in x.items()})
    for a in "xyz":
        assert torch.allclose(out[a].norm(dim=-1), torch.ones(6), atol=1e-6)
        assert not torch.allclose(out[a][:2], part[a], atol=1e-4)  # batch-mates change the output
        assert torch.allclose(shuffled[a], out[a][perm], atol=1e-5)  # a set, not a sequence


@pytest.mark.parametrize("kind", ["mlp", "batch_attention"])
def test_adapter_gradients_reach_every_axis(kind):
    ad = AxisAdapters(embed_dim=32, kind=kind, heads=4)
    target = _feats(seed=1)
    out = ad(_feats())
    sum((out[a] * target[a]).sum() for a in "xyz").backward()
    for a in "xyz":
        grads = [p.grad for p in ad.heads[a].parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_bad_config_errors():
    with pytest.raises(ValueError, match="kind='transformer' is unknown"):
        AxisAdapters(embed_dim=32, kind="transformer")
    with pytest.raises(ValueError, match="heads=5 must divide embed_dim=32"):
        AxisAdapters(embed_dim=32, kind="batch_attention", heads=5)
    with pytest.raises(KeyError, match="axes"):
        AxisAdapters(embed_dim=32)({"x": torch.zeros(2, 32)})


# --------------------------------------------------------------------------- configs
def _text_config(name: str, **overrides):
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "configs" / "text"
    cfg = OmegaConf.create({"text": OmegaConf.load(root / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_tiny_config_builds_encoder_and_adapters():
    from hydra.utils import instantiate

    cfg = _text_config("tiny", **{"text.adapters.kind": "batch_attention"})
    encoder = instantiate(cfg.text.encoder)
    adapters = instantiate(cfg.text.adapters, embed_dim=encoder.embed_dim, axes=["x", "y", "z"])
    assert encoder.embed_dim == cfg.text.embed_dim == 64 and encoder.pretrained is None
    out = adapters(encoder.encode_axes({a: PROMPTS[:2] for a in "xyz"}))
    assert all(v.shape == (2, 64) for v in out.values())


def test_openai_config_offline_names_the_override(offline):
    from hydra.utils import instantiate

    with pytest.raises(Exception, match=r"text\.pretrained=null"):
        instantiate(_text_config("vit_b32_openai").text.encoder)
    # The override the message names is the one that works.
    encoder = instantiate(_text_config("vit_b32_openai", **{"text.pretrained": None}).text.encoder)
    assert encoder.pretrained is None and encoder.embed_dim == 512
