"""The per-word token cache gives open_clip's token ids exactly, for every prompt the generator writes
and for text outside the cached path's alphabet (which goes to open_clip whole)."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from cliphand3d.data.prompts import PromptGenerator
from cliphand3d.models.tokens import CachedTokenizer

CONFIGS = [dict(template="order_are"), dict(template="figure3", num_joints=10),
           dict(template="figure3", num_joints=18, naming="demo"), dict(template="order_are", naming="anatomical"),
           dict(template="order_are", num_joints=5, shared_subset=True)]


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")


def generated(cfg: dict, n: int = 60) -> list[str]:
    gen, rng = PromptGenerator(**cfg), np.random.default_rng(0)
    return [s for _ in range(n) for s in gen(rng.normal(size=(21, 3)), rng=rng).values()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_generated_prompts_tokenise_exactly(tok, cfg):
    texts = generated(cfg)
    cached = CachedTokenizer(tok, 77)
    assert cached.enabled
    torch.testing.assert_close(cached(texts), tok(texts), rtol=0, atol=0)
    # and again from the warm cache
    torch.testing.assert_close(cached(texts[::-1]), tok(texts[::-1]), rtol=0, atol=0)


@pytest.mark.parametrize("text", [
    "",                                                    # only start and end tokens
    "  Order   are:\twrist ,thumb MCP  ",                   # odd whitespace and punctuation
    "x " * 120,                                            # longer than the context: open_clip's cut
    "it's the wrist's turn",                               # apostrophes: sent whole
    "caf\u00e9 &amp; \u201cquotes\u201d",                  # ftfy / HTML cleaning: sent whole
])
def test_edge_cases_match_open_clip(tok, text):
    cached = CachedTokenizer(tok, 77)
    torch.testing.assert_close(cached([text, "Order are: wrist."]), tok([text, "Order are: wrist."]), rtol=0, atol=0)


def test_a_tokenizer_that_disagrees_is_not_cached(tok):
    class Shouting:
        """Upper-cases before tokenising: per-word ids from `encode` no longer match whole sentences."""
        sot_token_id, eot_token_id, reduction_fn = tok.sot_token_id, tok.eot_token_id, None

        def encode(self, text):
            return tok.encode(text)

        def __call__(self, texts, context_length=77):
            return tok([t.upper() + " !" for t in texts], context_length=context_length)

    cached = CachedTokenizer(Shouting(), 77)
    assert not cached.enabled
    torch.testing.assert_close(cached(["Order are: wrist."]), Shouting()(["Order are: wrist."]), rtol=0, atol=0)
