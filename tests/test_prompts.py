"""Prompt generator: known sentences, sorting conventions, subsets, determinism, token lengths."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cliphand3d.data import prompts as P
from cliphand3d.skeleton import ANATOMICAL_JOINT_NAMES, JOINT_NAMES, NUM_JOINTS

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "prompt"

DEMO_21 = (
    "Order are: wrist, thumb MCP, thumb PIP, thumb DIP, thumb fingertip, index MCP, index PIP, "
    "index DIP, index fingertip, middle MCP, middle PIP, middle DIP, middle fingertip, ring MCP, "
    "ring PIP, ring DIP, ring fingertip, little MCP, little PIP, little DIP and little fingertip."
)


def line_hand() -> np.ndarray:
    """Joints on known lines: x grows with the joint index, y shrinks with it, z follows a fixed
    permutation. Metres, in front of the camera."""
    i = np.arange(NUM_JOINTS, dtype=np.float64)
    z_rank = np.array([(5 * k) % NUM_JOINTS for k in range(NUM_JOINTS)])  # 5 coprime with 21
    return np.stack([0.01 * i, -0.01 * i, 0.5 + 0.001 * z_rank], axis=1)


def listed(sentence: str, template: P.Template, axis: str) -> list[str]:
    """Names in a sentence, in order (inverse of Template.sentence)."""
    before, after = template.formats[axis].split("{joints}")
    body = sentence[len(before): len(sentence) - len(after)]
    head, _, last = body.rpartition(template.last_sep)
    return (head.split(template.sep) if head else []) + [last]


def test_known_sentences_on_line_hand():
    out = P.PromptGenerator()(line_hand())
    assert set(out) == {"x", "y", "z"}
    assert out["x"] == DEMO_21  # ascending x = index order
    assert listed(out["y"], P.get_template("order_are"), "y") == list(JOINT_NAMES[::-1])  # y down
    z_order = np.argsort([(5 * k) % NUM_JOINTS for k in range(NUM_JOINTS)])
    assert listed(out["z"], P.get_template("order_are"), "z") == [JOINT_NAMES[i] for i in z_order]


def test_fixed_subset_literal_sentences():
    j = line_hand()
    gen = P.PromptGenerator(joint_subset=[8, 0, 4], axes=["y", "x"])
    assert gen(j) == {
        "y": "Order are: index fingertip, thumb fingertip and wrist.",
        "x": "Order are: wrist, thumb fingertip and index fingertip.",
    }
    fig = P.PromptGenerator(template="figure3", joint_subset=[0, 4, 8], naming="anatomical")
    assert fig(j)["x"] == "From left to right, the joints are: wrist, thumb tip and index tip."
    assert fig(j)["y"].startswith("From top to bottom, the joints are: index tip")
    assert fig(j)["z"].startswith("From near to far, the joints are: ")
    assert P.PromptGenerator(joint_subset=[9])(j)["x"] == "Order are: middle MCP."


def test_ties_keep_joint_index_order_and_torch_input():
    import torch

    j = np.zeros((NUM_JOINTS, 3))
    j[:, 2] = 0.5
    out = P.PromptGenerator()(torch.from_numpy(j).float())
    assert out["x"] == out["y"] == out["z"] == DEMO_21


@pytest.mark.parametrize("kw", [{}, {"axes": ["z", "x"]}, {"naming": "anatomical"},
                                {"num_joints": 5}, {"num_joints": 5, "shared_subset": True}, {"joint_subset": [0, 4, 8]}])
def test_a_batch_of_hands_gets_each_hands_sentences_as_alone(kw):
    """`batch` (a loader worker's stack of hands) is `__call__` hand by hand, ties and random subsets included."""
    rng = np.random.default_rng(3)
    hands = rng.normal(size=(6, NUM_JOINTS, 3))
    hands[2] = np.round(hands[2], 1)  # ties: kept in joint index order
    hands[4, :, :] = 0.5  # every joint tied on every axis
    gen = P.PromptGenerator(**kw)
    alone = [gen(h, np.random.default_rng(10 + i)) for i, h in enumerate(hands)]
    assert gen.batch(hands, [np.random.default_rng(10 + i) for i in range(6)]) == alone


def test_a_batch_with_a_bad_hand_fails_as_the_hand_alone_does():
    hands = np.random.default_rng(0).normal(size=(3, NUM_JOINTS, 3))
    hands[1, 5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        P.PromptGenerator().batch(hands, [None] * 3)
    with pytest.raises(ValueError, match="3 hands but 2 generators"):
        P.PromptGenerator().batch(hands[[0, 2, 0]], [None] * 2)


def test_random_subsets_have_k_names_in_sorted_order():
    j = line_hand()
    tmpl = P.get_template("figure3")
    gen = P.PromptGenerator(template="figure3", num_joints=10)
    for seed in range(20):
        out = gen(j, np.random.default_rng(seed))
        for axis in "xy":
            idx = [JOINT_NAMES.index(n) for n in listed(out[axis], tmpl, axis)]
            assert len(idx) == len(set(idx)) == 10
            assert idx == (sorted(idx) if axis == "x" else sorted(idx, reverse=True))


def test_determinism_and_variation_across_seeds():
    j = np.random.default_rng(123).normal(size=(NUM_JOINTS, 3))
    gen = P.PromptGenerator(num_joints=5)
    assert gen(j, np.random.default_rng(7)) == gen(j, np.random.default_rng(7))
    seen = {gen(j, np.random.default_rng(s))["x"] for s in range(10)}
    assert len(seen) >= 5
    rng = np.random.default_rng(7)
    assert gen(j, rng) != gen(j, rng)  # the generator's state advances between samples
    with pytest.raises(ValueError, match="rng=np.random.default_rng"):
        gen(j)


def test_shared_vs_per_axis_subsets():
    j = np.random.default_rng(0).normal(size=(NUM_JOINTS, 3))
    tmpl = P.get_template("order_are")

    def name_sets(out):
        return [frozenset(listed(out[a], tmpl, a)) for a in "xyz"]

    shared = P.PromptGenerator(num_joints=5, shared_subset=True)
    per_axis = P.PromptGenerator(num_joints=5, shared_subset=False)
    for s in range(10):
        assert len(set(name_sets(shared(j, np.random.default_rng(s))))) == 1
    assert any(len(set(name_sets(per_axis(j, np.random.default_rng(s))))) > 1 for s in range(10))


def test_demo_prompt_is_exactly_77_tokens():
    import open_clip

    assert P.count_tokens(DEMO_21) == 77
    ids = open_clip.tokenizer.tokenize([DEMO_21])[0]
    tok = P._tokenizer()
    # Reference: open_clip's own tokenize fills the context exactly, SOT first, EOT last, no cut.
    assert ids.shape[0] == 77 and int(ids[0]) == tok.sot_token_id and int(ids[-1]) == tok.eot_token_id
    assert P.PromptGenerator().max_tokens == 77


def test_figure3_21_joints_overflows_unless_truncate_or_fewer_joints():
    with pytest.raises(ValueError) as e:
        P.PromptGenerator(template="figure3")
    msg = str(e.value)
    assert "'figure3'" in msg and "83" in msg and "77" in msg and "prompt.truncate=true" in msg
    assert "at most 18 fits" in msg
    with pytest.warns(UserWarning, match="truncate"):
        gen = P.PromptGenerator(template="figure3", truncate=True)
    assert P.count_tokens(gen(line_hand())["x"]) == 83
    assert P.PromptGenerator(template="figure3", num_joints=18).max_tokens <= 77
    with pytest.raises(ValueError, match="num_joints=19"):
        P.PromptGenerator(template="figure3", num_joints=19)
    k10 = P.PromptGenerator(template="figure3", num_joints=10)
    assert k10.max_tokens <= 77


def test_token_count_does_not_depend_on_joint_order():
    rng = np.random.default_rng(0)
    for name in ("order_are", "figure3"):
        tmpl = P.get_template(name)
        for names in (JOINT_NAMES, ANATOMICAL_JOINT_NAMES):
            ref = P.count_tokens(tmpl.sentence("x", names))
            for _ in range(10):
                perm = rng.permutation(NUM_JOINTS)
                assert P.count_tokens(tmpl.sentence("x", [names[i] for i in perm])) == ref


def test_worst_case_bounds_every_random_subset():
    gen = P.PromptGenerator(template="figure3", num_joints=16)
    counts = []
    for s in range(30):
        counts += [P.count_tokens(t) for t in gen(line_hand(), np.random.default_rng(s)).values()]
    assert max(counts) <= gen.max_tokens
    longest = sorted(JOINT_NAMES, key=lambda n: -P.count_tokens(n))[:16]
    assert P.count_tokens(P.get_template("figure3").sentence("x", longest)) == gen.max_tokens


def test_unknown_template_and_naming_errors():
    with pytest.raises(ValueError) as e:
        P.PromptGenerator(template="nope")
    for part in ("'nope'", "order_are", "figure3", "register_template", "configs/prompt/"):
        assert part in str(e.value)
    with pytest.raises(ValueError, match="unknown joint naming 'klingon'.*anatomical"):
        P.PromptGenerator(naming="klingon")


def test_register_and_use_a_new_template(monkeypatch):
    monkeypatch.setattr(P, "_TEMPLATES", dict(P._TEMPLATES))  # keep the global registry clean
    P.register_template("arrows", "Sorted: {joints}.", sep=" < ", last_sep=" < ")
    gen = P.PromptGenerator(template="arrows", joint_subset=[0, 4, 8], axes=["x"])
    assert gen(line_hand()) == {"x": "Sorted: wrist < thumb fingertip < index fingertip."}
    with pytest.raises(ValueError, match="already registered"):
        P.register_template("arrows", "Again: {joints}.")
    bad = {
        "Missing slot.": "exactly one",
        "Two {joints} {joints}": "exactly one",
        "{joints} and {other}": "exactly one",
        "Order:{joints}s": "separated",
    }
    for fmt, why in bad.items():
        with pytest.raises(ValueError, match=why):
            P.register_template("bad", fmt)
    with pytest.raises(ValueError, match="keys"):
        P.register_template("bad", {"x": "{joints}."})
    with pytest.raises(ValueError, match="sep"):
        P.register_template("bad", "{joints}.", sep="and")


def test_bad_inputs_name_the_key():
    j = line_hand()
    cases = [
        (dict(axes=["x", "w"]), "prompt.axes"),
        (dict(axes=["x", "x"]), "prompt.axes"),
        (dict(num_joints=0), "prompt.num_joints"),
        (dict(num_joints=22), "prompt.num_joints"),
        (dict(num_joints=5, joint_subset=[1, 2]), "exclusive"),
        (dict(joint_subset=[1, 21]), "prompt.joint_subset"),
        (dict(joint_subset=[3, 3]), "prompt.joint_subset"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ValueError, match=key):
            P.PromptGenerator(**kwargs)
    gen = P.PromptGenerator()
    with pytest.raises(ValueError, match=r"joints_xyz.*\(21, 3\)"):
        gen(j[:20])
    j[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gen(j)


@pytest.mark.parametrize(
    "name, template, k, truncate",
    [
        ("order_are", "order_are", None, False),
        ("order_are_k5", "order_are", 5, False),
        ("order_are_k16", "order_are", 16, False),
        ("figure3", "figure3", None, True),
        ("figure3_k10", "figure3", 10, False),
    ],
)
def test_configs_instantiate(name, template, k, truncate):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # figure3.yaml warns that it will be truncated
        gen = instantiate(cfg)
    assert (gen.template_name, gen.num_joints, gen.truncate) == (template, k, truncate)
    out = gen(line_hand(), np.random.default_rng(0))
    assert set(out) == {"x", "y", "z"}
    tmpl = P.get_template(template)
    assert all(len(listed(out[a], tmpl, a)) == (k or NUM_JOINTS) for a in "xyz")
