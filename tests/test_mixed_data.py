"""Training on a mix of datasets (data=mix; issue 20, item 1) on the FreiHAND and RHD format fixtures.

The sampling weights are honoured (each set's count over an epoch is its largest-remainder share), the mesh terms
are exactly zero for the joint-only samples (RHD) and a mean over the mesh samples, every set validates with its
own protocol and best.pt follows the stated set, and a killed mixed run resumes to the uninterrupted run's weights.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from cliphand3d.build import build_datasets, build_template, compose_config, monitor_set
from cliphand3d.checkpoint.io import load_checkpoint
from cliphand3d.data.sampler import WeightedResumableSampler, largest_remainder, sampler_for
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import CropAugment
from cliphand3d.data.writers import write_freihand, write_rhd
from cliphand3d.errors import ConfigError
from cliphand3d.geometry import points_to_uvd
from cliphand3d.losses import CLIPHand3DLoss
from cliphand3d.models.template import build_template as fit_template
from cliphand3d.preflight import check_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S = 64
TINY = [
    f"data.img_size={S}", "model.backbone=resnet18", "model.pretrained=null", "model.deconv_channels=16",
    "model.depth_bins=16", "model.joint_feature_hidden=16", "model.token_dim=32", "model.widths=[32,16,16,8,8]",
    "model.blocks_per_stage=1", "model.heads=2", "model_template.num_samples=32", "trainer.batch_size=4",
    "trainer.val_batch_size=8", "trainer.num_workers=0", "logger.tensorboard=false", "text=tiny",
    "text.pretrained=null", "trainer.device=cpu",
]


@pytest.fixture(scope="module")
def roots(fixture_dir):
    # FreiHAND: 6 hands x 2 versions, 1 hand held out -> 10 train, 2 val; RHD: 8 samples, 1 held out -> 7 train, 1 val
    return (fixture_dir("mix_frei", write_freihand, num_train=6, num_eval=2, seed=3, versions=2),
            fixture_dir("mix_rhd", write_rhd, num_train=8, num_eval=2, seed=3))


def mix(roots, *extra: str) -> list[str]:
    fh, rhd = roots
    return ["data=mix", f"data.sets.freihand.root={fh}", f"data.sets.rhd.root={rhd}", "data.sets.freihand.versions=[0,1]",
            f"model_template.cache_dir={fh.parent / 'template_cache'}", *extra]


# --------------------------------------------------------------------------- configs
def test_each_set_of_a_mix_reads_its_own_keys(roots):
    # the member data configs interpolate relatively, so composed under data.sets.<name> they read their own keys
    for name in ("freihand", "rhd", "synthetic"):
        values = [line.split("#")[0] for line in (CONFIGS / "data" / f"{name}.yaml").read_text().splitlines()]
        assert not [v for v in values if "${data." in v], name
    cfg = compose_config("train", mix(roots, "run_dir=/tmp/unused", "data.img_size=96", "data.sets.rhd.holdout_seed=5"))
    fh, rhd = roots
    for split in ("train", "val", "test"):
        assert cfg.data.sets.freihand[split].root == str(fh) and cfg.data.sets.rhd[split].root == str(rhd)
        assert cfg.data.sets.freihand[split].img_size == cfg.data.sets.rhd[split].img_size == 96
    assert cfg.data.sets.rhd.train.holdout_seed == cfg.data.sets.rhd.val.holdout_seed == 5
    assert cfg.data.sets.freihand.train.holdout_seed == 0 and cfg.data.sets.freihand.train.augment.train
    # best.pt's set: the first by default, the first that validates when it holds nothing out, or the named one
    assert monitor_set(cfg) == "freihand"
    assert monitor_set(compose_config("train", mix(roots, "run_dir=/x", "data.sets.freihand.val_fraction=0"))) == "rhd"
    assert monitor_set(compose_config("train", mix(roots, "run_dir=/x", "data.monitor_set=rhd"))) == "rhd"
    # preflight reads trainer.monitor against the monitor set's protocol: RHD's hand3d metrics have no F-score
    check_config(compose_config("train", mix(roots, "run_dir=/x", "trainer.monitor=f5")))
    with pytest.raises(ConfigError, match="trainer.monitor='f5'"):
        check_config(compose_config("train", mix(roots, "run_dir=/x", "trainer.monitor=f5", "data.monitor_set=rhd")))


# --------------------------------------------------------------------------- the sampler
def test_largest_remainder_known_answers():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(7, [1, 3]) == [2, 5]  # quotas 1.75, 5.25
    assert largest_remainder(17, [1, 3]) == [4, 13]  # 4.25, 12.75
    assert largest_remainder(5, [0, 2, 0]) == [0, 5, 0]
    for bad in ([], [0, 0], [1, -1], [1, float("nan")]):
        with pytest.raises(ValueError):
            largest_remainder(5, bad)


def set_of(index: int, lengths) -> int:
    return int(np.searchsorted(np.cumsum(lengths), index, side="right"))


def test_the_weighted_sampler_deals_each_sets_share_of_every_epoch():
    lengths, weights = [10, 7, 5, 4], [1.0, 3.0, 0.5, 0.0]
    sampler = WeightedResumableSampler(lengths, weights, seed=3, batch_size=1, drop_last=False)
    want = largest_remainder(26, weights)
    assert want == [6, 17, 3, 0]  # quotas 5.78, 17.33, 2.89, 0: the 7 of set 1 come 2 or 3 times each
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        orders.append(order)
        counted = Counter(set_of(i, lengths) for i in order)
        assert [counted[k] for k in range(4)] == want == sampler.epoch_counts()
        # within a set, whole permutations first: no index comes twice before every index came once
        ones = Counter(i for i in order if set_of(i, lengths) == 1)
        assert sorted(ones) == list(range(10, 17)) and max(ones.values()) - min(ones.values()) <= 1
        zeros = [i for i in order if set_of(i, lengths) == 0]
        assert len(set(zeros)) == len(zeros) == 6  # a share under the set's size: no index twice
    assert orders[0] != orders[1] != orders[2]
    # a function of (seed, epoch): another sampler deals the same; start_batch skips exactly that many
    again = WeightedResumableSampler(lengths, weights, seed=3, batch_size=4, drop_last=True, with_epoch=True)
    again.set_epoch(1, start_batch=2)
    assert list(again) == [(1, i) for i in orders[1][8:24]] and len(again) == 16
    # DDP: the ranks split the same epoch order as ResumableSampler does, together dealing it all
    ranks = [WeightedResumableSampler(lengths, weights, seed=3, rank=r, world_size=2, batch_size=1, drop_last=False)
             for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    assert sorted(i for r in ranks for i in r) == sorted(orders[2])
    assert [i for pair in zip(*ranks) for i in pair] == orders[2]


def test_a_mixed_epoch_draws_each_set_by_its_weight(roots):
    cfg = compose_config("train", mix(roots, "run_dir=/tmp/unused", f"data.img_size={S}", "data.sets.rhd.weight=3"))
    mixed = build_datasets(cfg, None, splits=("train",))["train"]
    assert mixed.names == ("freihand", "rhd") and mixed.lengths == [10, 7] and mixed.sampling_weights == [1.0, 3.0]
    sampler = sampler_for(mixed, seed=0, batch_size=1, drop_last=False, with_epoch=True)
    loader = DataLoader(mixed, batch_size=1, sampler=sampler, collate_fn=lambda items: items[0])
    items = list(loader)
    # 17 per epoch, 1:3 -> 4.25 : 12.75 -> 4 FreiHAND and 13 RHD (each of RHD's 7 once, 6 of them twice)
    assert Counter(it["meta"]["dataset"] for it in items) == {"freihand": 4, "rhd": 13}
    assert Counter(it["meta"]["set_index"] for it in items if it["meta"]["dataset"] == "rhd").most_common()[-1][1] == 1
    for it in items:
        frei = it["meta"]["dataset"] == "freihand"
        assert it["has_mesh"].item() is frei and it["verts_uvd"].shape == it["verts_xyz"].shape == (778, 3)
        assert it["meta"]["index"] == it["meta"]["set_index"] + (0 if frei else 10)
        if not frei:  # the placeholder mesh: zeros, masked out of the loss
            assert not it["verts_uvd"].any() and not it["verts_xyz"].any()
        else:  # FreiHAND has no visibility flags: every joint counts, as in its own protocol
            assert it["visible"].all()
    # the template comes from the mesh set alone (RHD's joints have no vertices to regress J from)
    assert build_template(cfg, mixed).num_verts == 778


# --------------------------------------------------------------------------- the masked loss
@pytest.fixture(scope="module")
def hands():
    ds = SyntheticHands(length=6, seed=3, img_size=S, num_verts=200, augment=CropAugment())
    xyz, verts = ds.all_labels()
    items = [ds[i] for i in range(3)]
    h = {k: torch.stack([it[k] for it in items]).double() for k in ("joints_xyz", "verts_xyz", "K", "root_depth", "bone")}
    return h, fit_template(verts, xyz, levels=(40, 80, 120))


def loss_inputs(h, shift: float, junk: int | None = None):
    uvd = lambda xyz: points_to_uvd(xyz, h["K"], S, h["root_depth"], h["bone"]).float()
    batch = {"image": torch.zeros(3, 3, S, S), "K": h["K"].float(), "root_depth": h["root_depth"].float(),
             "bone": h["bone"].float(), "joints_uvd": uvd(h["joints_xyz"]), "verts_uvd": uvd(h["verts_xyz"])}
    if junk is not None:  # sample 1 has no mesh: its verts are whatever placeholder, masked out
        batch["verts_uvd"][1] = torch.randn(200, 3, generator=torch.Generator().manual_seed(junk))
        batch["has_mesh"] = torch.tensor([True, False, True])
    verts = (uvd(h["verts_xyz"]) + shift * torch.linspace(-1, 1, 600).reshape(200, 3)).requires_grad_(True)
    idx = torch.tensor([0, 7, 30, 99])
    joints = uvd(h["joints_xyz"]) + shift
    return {"joints_coarse": joints, "joints": joints, "verts": verts, "stages": [verts[:, idx]],
            "stage_index": [idx]}, batch


MESH_TERMS = ("verts", "edge", "normal", "stages")


@pytest.mark.parametrize("units", ["uvd", "metric"])
def test_mesh_terms_are_exactly_zero_for_joint_only_samples(hands, units):
    h, template = hands
    loss = CLIPHand3DLoss(weights={"joints_coarse": 1, "joints": 1, "verts": 1, "stages": 1, "edge": 1, "normal": 1},
                          units=units, template=template)
    out, batch = loss_inputs(h, 0.01, junk=0)
    terms = loss(out, batch)
    assert all(terms[t] > 0 for t in MESH_TERMS)
    # whatever the placeholder holds, nothing changes, to the bit
    out2, batch2 = loss_inputs(h, 0.01, junk=1)
    assert all(torch.equal(terms[t], loss(out2, batch2)[t]) for t in terms)
    # the mesh terms are the means over the two mesh samples, as a batch of those two alone gives them
    keep = [0, 2]
    alone_out = {**out, "joints_coarse": out["joints_coarse"][keep], "joints": out["joints"][keep],
                 "verts": out["verts"][keep], "stages": [out["stages"][0][keep]]}
    alone = loss(alone_out, {k: v[keep] for k, v in batch.items() if k != "has_mesh"})
    for t in MESH_TERMS:
        torch.testing.assert_close(terms[t], alone[t], rtol=1e-6, atol=0)
    # the joint terms still cover every sample: they equal the unmasked batch's
    plain = loss(out, {k: v for k, v in batch.items() if k != "has_mesh"})
    assert torch.equal(terms["joints"], plain["joints"]) and not torch.equal(terms["verts"], plain["verts"])
    # and no gradient reaches the joint-only sample's vertices
    loss.total(terms).backward()
    grad = out["verts"].grad
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[2]) > 0
    # a batch without any mesh: every mesh term is exactly 0, the objective finite and still trainable
    out, batch = loss_inputs(h, 0.01, junk=2)
    batch["has_mesh"] = torch.zeros(3, dtype=torch.bool)
    terms = loss(out, batch)
    assert all(torch.equal(terms[t], torch.zeros(())) for t in MESH_TERMS) and terms["joints"] > 0
    loss.total(terms).backward()
    assert torch.count_nonzero(out["verts"].grad) == 0


# --------------------------------------------------------------------------- training, validation, resume
class Killed(Exception):
    pass


def test_a_mixed_run_validates_every_set_and_resumes_exactly(roots, tmp_path, monkeypatch, caplog):
    from cliphand3d.train import run as run_module

    caplog.set_level(logging.INFO, logger="cliphand3d.train.run")
    over = lambda d, *x: compose_config("train", mix(roots, f"run_dir={d}", *TINY, *x))
    stated = ["data.sets.rhd.weight=2", "data.monitor_set=rhd", "trainer.monitor=epe_mean_mm", "trainer.max_steps=6",
              "trainer.ckpt_every_steps=1", "trainer.record_samples=true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    last = run_module.train(over(full, *stated, "logger.tensorboard=true"))
    assert "data.monitor_set=rhd (val/rhd/epe_mean_mm)" in caplog.text  # the log states what chooses best.pt
    # every set's pictures, under its own name, at each validation
    events = EventAccumulator(str(full / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {t: sorted(e.step for e in events.Images(t)) for t in events.Tags()["images"]} == {
        f"val/{name}/{kind}": [4, 6] for name in ("freihand", "rhd") for kind in ("skeletons", "samples", "pck")}
    # each set with its own protocol: FreiHAND's mesh metrics, RHD's hand3d EPE; no metric without its set
    assert {"freihand/pa_mpjpe_mm", "freihand/f5", "rhd/epe_mean_mm", "rhd/auc_20_50"} <= set(last)
    assert "rhd/f5" not in last and "pa_mpjpe_mm" not in last
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    history = a["train_state"]["history"]
    assert [h["step"] for h in history] == [4, 6]  # 17 a epoch (6 FreiHAND + 11 RHD at 1:2): 4 batches of 4
    best = min(history, key=lambda h: h["rhd/epe_mean_mm"])
    assert a["train_state"]["best_step"] == best["step"] and a["train_state"]["best_metric"] == best["rhd/epe_mean_mm"]

    save = run_module.Run.checkpoint

    def save_then_die(self, name):
        save(self, name)
        if name == "last.pt" and self.state.step == 5:  # in the second epoch
            raise Killed

    monkeypatch.setattr(run_module.Run, "checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_module.train(over(killed, *stated))
    monkeypatch.setattr(run_module.Run, "checkpoint", save)
    run_module.train(over(killed, *stated, "resume=auto"))
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    for part in ("model", "train_heads"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["train_state"]["history"] == b["train_state"]["history"]
    records = [[json.loads(line) for line in (d / "samples" / "rank0.jsonl").read_text().splitlines()]
               for d in (full, killed)]
    # the same batches, step by step (the resumed run appended steps 6 on to the killed run's file)
    assert [r["step"] for r in records[1]] == [1, 2, 3, 4, 5, 6]
    assert records[0] == records[1]
