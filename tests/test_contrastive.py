"""Per-axis CLIP loss: known answers, symmetry, multi-positive handling, the scale clamp, gradients,
and equality of the 2-rank gathered loss (gloo) with the single-process loss on the whole batch."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliphand3d import dist
from cliphand3d.models.contrastive import PerAxisContrastiveLoss, prompt_hash

AXES = ("x", "y", "z")


def orthonormal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g))
    return q.t().contiguous()  # (n, d), rows orthonormal


def same_on_axes(t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {a: t.clone() for a in AXES}


def test_aligned_features_reach_the_minimum_and_shuffled_do_not():
    loss = PerAxisContrastiveLoss(init_logit_scale=math.log(100.0))
    e = orthonormal(8, 16)
    aligned = loss(same_on_axes(e), same_on_axes(e))
    shuffled = loss(same_on_axes(e), same_on_axes(e.roll(1, dims=0)))
    for a in AXES:
        assert aligned[f"clip_{a}"] < 1e-3
        assert shuffled[f"clip_{a}"] > 50  # each positive scores 0 against a negative scoring 100
        assert aligned[f"acc_{a}"] == 1.0 and shuffled[f"acc_{a}"] == 0.0


def test_minimum_with_duplicates_is_log_of_positives():
    # Groups of identical prompts of sizes 3, 2, 1: the best reachable loss is mean log(group size).
    groups = [0, 0, 0, 1, 1, 2]
    e = orthonormal(3, 16)[groups]
    prompts = {a: [f"prompt {g}" for g in groups] for a in AXES}
    out = PerAxisContrastiveLoss(init_logit_scale=math.log(100.0))(same_on_axes(e), same_on_axes(e), prompts)
    expected = (3 * math.log(3) + 2 * math.log(2)) / 6
    for a in AXES:
        assert out[f"clip_{a}"].item() == pytest.approx(expected, abs=1e-4)


def test_identical_prompts_known_answer():
    # Samples 0 and 1 share a prompt and a feature e0; the others are orthonormal and distinct.
    # Counting 0 and 1 as each other's positives (uniform targets), every row and column gives
    # rows 0,1: log(2 + (B-2) exp(-s)),   rows i >= 2: log(1 + (B-1) exp(-s)).
    b, s = 6, 10.0
    e = orthonormal(b, 16)
    e[1] = e[0]
    prompts = {a: ["same"] * 2 + [f"p{i}" for i in range(2, b)] for a in AXES}
    out = PerAxisContrastiveLoss(init_logit_scale=math.log(s))(same_on_axes(e), same_on_axes(e), prompts)
    expected = (2 * math.log(2 + (b - 2) * math.exp(-s)) + (b - 2) * math.log(1 + (b - 1) * math.exp(-s))) / b
    for a in AXES:
        assert out[f"clip_{a}"].item() == pytest.approx(expected, rel=1e-6)


def test_identical_prompts_are_interchangeable_not_negatives():
    g = torch.Generator().manual_seed(3)
    pose = {a: torch.randn(5, 8, generator=g) for a in AXES}
    text = {a: torch.randn(5, 8, generator=g) for a in AXES}
    swap = [1, 0, 2, 3, 4]
    text_swapped = {a: t[swap] for a, t in text.items()}
    prompts = {a: ["dup", "dup", "p2", "p3", "p4"] for a in AXES}
    loss = PerAxisContrastiveLoss()
    with_dups, swapped = loss(pose, text, prompts), loss(pose, text_swapped, prompts)
    plain, plain_swapped = loss(pose, text), loss(pose, text_swapped)
    for a in AXES:
        # Which of two same-prompt texts pairs with which pose does not matter...
        assert torch.allclose(with_dups[f"clip_{a}"], swapped[f"clip_{a}"], atol=1e-6)
        # ...whereas plain CLIP (every other sample a negative) does care.
        assert not torch.allclose(plain[f"clip_{a}"], plain_swapped[f"clip_{a}"], atol=1e-3)


def test_distinct_prompts_equal_plain_clip_loss():
    g = torch.Generator().manual_seed(4)
    pose, text = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    loss = PerAxisContrastiveLoss(axes=("x",))
    out = loss({"x": pose}, {"x": text}, {"x": [f"p{i}" for i in range(7)]})
    logits = loss.scale("x") * F.normalize(pose, dim=-1) @ F.normalize(text, dim=-1).t()
    labels = torch.arange(7)
    reference = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(out["clip_x"], reference, atol=1e-6)


def test_symmetric_in_pose_and_text():
    g = torch.Generator().manual_seed(5)
    pose = {a: torch.randn(6, 8, generator=g) for a in AXES}
    text = {a: torch.randn(6, 8, generator=g) for a in AXES}
    prompts = {a: ["a", "b", "a", "c", "d", "b"] for a in AXES}
    loss = PerAxisContrastiveLoss()
    fwd, bwd = loss(pose, text, prompts), loss(text, pose, prompts)
    for a in AXES:
        assert torch.allclose(fwd[f"clip_{a}"], bwd[f"clip_{a}"], atol=1e-6)


def test_retrieval_accuracy_counts_positives():
    e = orthonormal(4, 8)
    pose = e.clone()
    pose[1] = e[0]  # sample 1 retrieves text 0: right only if they share a prompt
    pose[3] = e[2]  # sample 3 retrieves text 2: a different prompt, wrong
    prompts = {"x": ["a", "a", "b", "c"]}
    out = PerAxisContrastiveLoss(axes=("x",))({"x": pose}, {"x": e}, prompts)
    assert out["acc_x"].item() == pytest.approx(0.75)


def test_scale_is_reported_unclamped_and_the_parameter_clamped_after_a_step():
    feats = same_on_axes(orthonormal(4, 8))
    loss = PerAxisContrastiveLoss(init_logit_scale=math.log(20.0), max_scale=50.0)
    with torch.no_grad():  # where an optimiser step may leave them
        loss.logit_scale["x"].fill_(math.log(1000.0))
        loss.logit_scale["y"].fill_(math.log(0.1))
    out = loss(feats, feats)
    # forward: exp(logit_scale) as is, so the gradient is never cut off
    assert [out[f"scale_{a}"].item() for a in AXES] == pytest.approx([1000.0, 0.1, 20.0])
    assert not out["scale_x"].requires_grad
    loss.clamp_scales_()  # after the step: back into [log 1, log 50]; the one in bounds is untouched
    assert [loss.logit_scale[a].item() for a in AXES] == pytest.approx([math.log(50.0), 0.0, math.log(20.0)])
    with pytest.raises(ValueError, match="init_logit_scale=5.0 is outside"):
        PerAxisContrastiveLoss(init_logit_scale=5.0)  # > log 100


def test_gradients_reach_features_and_scales():
    g = torch.Generator().manual_seed(6)
    pose = {a: torch.randn(5, 8, generator=g, requires_grad=True) for a in AXES}
    text = {a: torch.randn(5, 8, generator=g, requires_grad=True) for a in AXES}
    loss = PerAxisContrastiveLoss()
    out = loss(pose, text, {a: ["p", "p", "q", "r", "s"] for a in AXES})
    sum(out[f"clip_{a}"] for a in AXES).backward()
    for a in AXES:
        for t in (pose[a], text[a], loss.logit_scale[a]):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_prompt_hash_is_stable_int64():
    # Pinned: ranks, runs and Python versions must agree (the built-in hash() is salted per process).
    h = prompt_hash("Order are: wrist and thumb MCP.")
    assert h == 7277774596558888118
    assert h != prompt_hash("Order are: wrist and thumb PIP.")
    assert torch.tensor([h, prompt_hash("x" * 500)], dtype=torch.int64).dtype == torch.int64


def test_bad_inputs_are_clear_errors():
    loss = PerAxisContrastiveLoss()
    f = same_on_axes(torch.randn(3, 4))
    with pytest.raises(KeyError, match=r"axes \['z'\]"):
        loss({"x": f["x"], "y": f["y"]}, f)
    with pytest.raises(ValueError, match=r"prompts\['x'\] must be a list of 3"):
        loss(f, f, {a: ["a", "b"] for a in AXES})
    with pytest.raises(ValueError, match="differ"):
        loss(f, same_on_axes(torch.randn(4, 4)))
    with pytest.raises(ValueError, match="min_scale"):
        PerAxisContrastiveLoss(min_scale=10.0, max_scale=5.0)


def test_dist_helpers_single_process():
    t = torch.randn(3, 2, requires_grad=True)
    assert not dist.is_dist() and dist.get_rank() == 0 and dist.get_world_size() == 1
    assert dist.is_main_process()
    assert dist.all_gather_with_grad(t) is t
    assert not dist.all_gather_no_grad(t).requires_grad


# --------------------------------------------------------------------------- two ranks (gloo)
# Global batch of 5 split unevenly (3 on rank 0, 2 on rank 1); "shared" appears on both ranks.
SPLIT = (3, 2)
GLOBAL_PROMPTS = {
    "x": ["shared", "a", "b", "shared", "c"],
    "y": ["p", "q", "r", "s", "t"],
    "z": ["u", "u", "v", "w", "u"],
}


def _problem(seed: int = 0):
    """A tiny 'model' (pose and text heads, loss scales) and a global batch of inputs."""
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({"pose": torch.nn.Linear(6, 8), "text": torch.nn.Linear(6, 8)})
    loss = PerAxisContrastiveLoss(init_logit_scale=math.log(5.0))
    inputs = torch.randn(sum(SPLIT), len(AXES), 6)
    return heads, loss, inputs


def _step(heads, loss, inputs, prompts):
    pose = heads["pose"](inputs)
    text = heads["text"](inputs.flip(-1) + 0.3)
    out = loss({a: pose[:, k] for k, a in enumerate(AXES)}, {a: text[:, k] for k, a in enumerate(AXES)}, prompts)
    total = sum(out[f"clip_{a}"] for a in AXES)
    total.backward()
    return out, total


def _grads(heads, loss) -> dict[str, torch.Tensor]:
    named = list(heads.named_parameters()) + [(f"scale.{a}", loss.logit_scale[a]) for a in AXES]
    return {n: p.grad.detach().clone() for n, p in named}


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        heads, loss, inputs = _problem()
        start = sum(SPLIT[:rank])
        local = slice(start, start + SPLIT[rank])
        prompts = {a: p[local] for a, p in GLOBAL_PROMPTS.items()}
        out, total = _step(heads, loss, inputs[local], prompts)
        grads = _grads(heads, loss)
        for g in grads.values():  # what DDP does: average parameter gradients over ranks
            torch_dist.all_reduce(g)
            g /= world
        torch.save({"total": total.detach(), "out": {k: v.detach() for k, v in out.items()}, "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def test_two_rank_gather_equals_single_process(tmp_path):
    world = len(SPLIT)
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=world, join=True)

    heads, loss, inputs = _problem()
    out, total = _step(heads, loss, inputs, GLOBAL_PROMPTS)
    grads = _grads(heads, loss)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["total"], total, atol=1e-6)
        for k, v in out.items():
            assert torch.allclose(got["out"][k], v.detach(), atol=1e-6), k
        for n, g in grads.items():
            assert torch.allclose(got["grads"][n], g, atol=1e-6), n
