"""Small pure pieces of the training run: the resumable sampler, the LR schedule, CLI error unwrapping."""
import copy
import math

import pytest
import torch

from cliphand3d.apps.cli import _user_error
from cliphand3d.data.sampler import ResumableSampler
from cliphand3d.errors import DatasetError
from cliphand3d.train.optim import warmup_cosine


def test_sampler_order_depends_only_on_seed_and_epoch_and_skips_exactly():
    s = ResumableSampler(50, seed=3, batch_size=4)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 48 and len(set(full)) == 48  # drop_last: 12 whole batches, no repeats
    again = ResumableSampler(50, seed=3, batch_size=4)
    again.set_epoch(2, start_batch=5)
    assert list(again) == full[20:] and len(again) == 28  # resuming mid-epoch sees the same tail
    s.set_epoch(3)
    assert list(s) != full  # a new epoch reshuffles
    assert s.batches_per_epoch() == 12


def test_sampler_ranks_partition_the_epoch():
    ranks = [ResumableSampler(40, seed=0, rank=r, world_size=3, batch_size=2) for r in range(3)]
    parts = [list(r) for r in ranks]
    assert all(len(p) == 12 for p in parts)  # 40 // 3 = 13 per rank, 6 whole batches of 2
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat)  # disjoint
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0)


def test_warmup_cosine_known_values():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)  # cosine starts at its peak
    assert warmup_cosine(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)  # stays at the floor


def test_cli_finds_our_error_under_a_wrapper():
    try:
        try:
            raise DatasetError("folder not found: /x\n  fix: ...")
        except DatasetError as inner:
            raise RuntimeError("Error in call to target 'FreiHAND'") from inner
    except RuntimeError as outer:
        found = _user_error(outer)
    assert isinstance(found, DatasetError) and "fix:" in str(found)
    assert _user_error(KeyError("x")) is None  # anything else keeps its traceback


def test_cli_error_starts_on_its_own_line_after_a_progress_bar(capsys):
    import sys

    from tqdm import tqdm

    from cliphand3d.apps.cli import friendly_errors

    bar = tqdm(total=3, desc="train", file=sys.stderr, mininterval=0)
    bar.update(1)  # the bar's line is open: tqdm ends it only when the bar closes
    with pytest.raises(SystemExit) as stop:
        with friendly_errors():
            raise DatasetError("image is truncated or corrupt: /x.jpg")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "train:" in err
    assert "\nerror: image is truncated or corrupt: /x.jpg\n" in err
    assert err.count("error: ") == 1


def _composed(*overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from cliphand3d.checkpoint.state import config_to_container

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return config_to_container(compose(config_name="train", overrides=["run_dir=/tmp/x", *overrides]))


def test_resume_refuses_what_changes_the_data_position_or_the_optimisation():
    from cliphand3d.checkpoint.state import config_value
    from cliphand3d.train.resume import RESUME_MAY_CHANGE, resume_mismatches

    cfg = _composed()
    # every key a resume may change is a real key (a typo would let nothing through silently)
    assert all(config_value(cfg, k) != "<absent>" for k in RESUME_MAY_CHANGE if "*" not in k)
    saved = {"config": cfg, "train_state": {"step": 7, "batch_in_epoch": 7, "world_size": 2, "batch_size": 32}}
    check = lambda c, world=2, bs=32: resume_mismatches(saved, c, world_size=world, batch_size=bs)  # noqa: E731
    assert check(cfg) == []
    allowed = _composed("trainer.num_workers=0", "trainer.val_every_steps=50", "trainer.ckpt_every_steps=7",
                        "logger.log_every=5", "logger.tensorboard=false", "name=other", "trainer.device=cpu")
    assert check(allowed) == []
    assert check(cfg, world=1) == ["world size (processes): saved 2, now 1"]
    # the batch size is named once, from the config
    assert check(_composed("trainer.batch_size=16"), bs=16) == ["trainer.batch_size: saved 32, now 16"]
    changed = _composed("optim.lr=0.01", "trainer.max_steps=1000", "seed=3", "trainer.ema_decay=0.9",
                        "trainer.monitor=mpjpe_mm", "trainer.num_workers=0")
    lines = check(changed)
    assert "data.train.seed: saved 0, now 3" in lines  # the training stream follows seed
    assert [x for x in lines if not x.startswith("data.")] == [
        "optim.lr: saved 0.001, now 0.01", "seed: saved 0, now 3", "trainer.ema_decay: saved None, now 0.9",
        "trainer.max_steps: saved 900, now 1000", "trainer.monitor: saved 'pa_mpjpe_mm', now 'mpjpe_mm'"]
    # under data=mix each set has its own skip_bad, which may change as data.skip_bad may; a set's weight may not
    mix = _composed("data=mix")
    assert all(config_value(mix, k.replace("*", "rhd")) != "<absent>" for k in RESUME_MAY_CHANGE if "*" in k)
    saved_mix = {**saved, "config": mix}
    assert resume_mismatches(saved_mix, _composed("data=mix", "data.sets.rhd.skip_bad=true"), world_size=2,
                             batch_size=32) == []
    assert resume_mismatches(saved_mix, _composed("data=mix", "data.sets.rhd.weight=2"), world_size=2,
                             batch_size=32) == ["data.sets.rhd.weight: saved 1.0, now 2"]
    # a checkpoint from before the position was qualified cannot be checked: refused, saying why
    old = {"config": cfg, "train_state": {"step": 7, "batch_in_epoch": 7}}
    (line,) = resume_mismatches(old, cfg, world_size=2, batch_size=32)
    assert "world_size / batch_size" in line and "predates" in line


def test_an_item_does_not_depend_on_the_worker_that_loads_it():
    """Why trainer.num_workers may change on resume: mid-epoch batches are the same with 0 or 1 workers."""
    import torch
    from torch.utils.data import DataLoader

    from cliphand3d.data.synthetic import SyntheticHands
    from cliphand3d.data.transforms import CropAugment

    ds = SyntheticHands(length=12, seed=1, img_size=32, num_verts=200, augment=CropAugment())
    ds.set_epoch(2)
    batches = []
    for workers in (0, 1):
        sampler = ResumableSampler(len(ds), seed=5, batch_size=3)
        sampler.set_epoch(2, start_batch=1)
        batches.append(list(DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers,
                                       generator=torch.Generator().manual_seed(workers))))
    assert len(batches[0]) == len(batches[1]) == 3
    for a, b in zip(*batches):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["joints_uvd"], b["joints_uvd"])
        assert torch.equal(a["meta"]["index"], b["meta"]["index"])


def test_validation_draws_from_no_training_rng():
    """Why trainer.val_every_steps / val_every_epochs may change on resume: validating (with a loader
    worker) leaves every RNG the training steps draw from as it was."""
    import random

    import numpy as np
    import torch

    from cliphand3d.data.synthetic import SyntheticHands
    from cliphand3d.evaluation.scoring import validate
    from cliphand3d.models.cliphand3d import CLIPHand3D
    from cliphand3d.models.template import joints_only_template
    from cliphand3d.runtime import make_loader

    ds = SyntheticHands(length=8, seed=1, img_size=64, num_verts=200)  # no augmentation
    model = CLIPHand3D(template=joints_only_template(ds.all_labels()[0]), img_size=64, backbone="resnet18",
                       deconv_channels=16, depth_bins=16, joint_feature_hidden=16, token_dim=32,
                       widths=(32, 16, 16, 8, 8), blocks_per_stage=1, heads=2, embed_dim=32)
    loader = make_loader(ds, batch_size=4, num_workers=1, device=torch.device("cpu"))
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    res, _ = validate(model, loader, torch.device("cpu"), "freihand")
    assert np.isfinite(res["pa_mpjpe_mm"])
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


class _NicenessSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import os
        return os.nice(0)


@pytest.mark.parametrize("nice", [0, 7])
def test_loader_workers_run_at_the_configured_lower_priority(nice):
    import os

    from cliphand3d.runtime import make_loader
    loader = make_loader(_NicenessSeen(), batch_size=1, num_workers=1, device=torch.device("cpu"), worker_nice=nice)
    assert [int(b) for b in loader] == [os.nice(0) + nice] * 2


def test_a_constructor_keyword_absent_from_an_older_run_means_its_default():
    """A run saved before model.backbone_stages existed resumes under today's config: absent, the key means the
    constructor's default (4). A value other than that default is still refused, and so is a key no constructor
    takes (trainer.*: only RESUME_ABSENT_MEANS speaks for those)."""
    from cliphand3d.train.resume import resume_mismatches

    cfg = _composed("model=cliphand3d")
    assert cfg["model"]["backbone_stages"] == 4
    older = copy.deepcopy(cfg)
    del older["model"]["backbone_stages"]
    for node in (older["data"]["augment"], older["data"]["train"]["augment"]):  # a nested _target_ too
        del node["rot_prob"]
    saved = {"config": older, "train_state": {"step": 7, "batch_in_epoch": 7, "world_size": 1, "batch_size": 32}}
    check = lambda c: resume_mismatches(saved, c, world_size=1, batch_size=32)  # noqa: E731
    assert check(cfg) == []
    assert check(_composed("model=cliphand3d", "model.backbone_stages=3")) == [
        "model.backbone_stages: saved 4, now 3"]
    assert check(_composed("model=cliphand3d", "data.augment.rot_prob=0.5")) == [
        "data.augment.rot_prob: saved 0.6, now 0.5", "data.train.augment.rot_prob: saved 0.6, now 0.5"]
    del older["trainer"]["grad_clip"]
    assert check(cfg) == [f"trainer.grad_clip: saved '<absent>', now {cfg['trainer']['grad_clip']!r}"]


def test_a_loss_weight_absent_from_an_older_run_weighed_nothing():
    """Runs saved before loss.weights.edge / normal existed resume under a config that adds them at 0; a nonzero
    weight is reported as a change from 0 (loss.weights.edge=0 resumes), and a per-axis clip weight added later
    is compared with the `clip` weight that covered it."""
    from cliphand3d.train.resume import resume_mismatches

    older = _composed("model=cliphand3d")
    for term in ("edge", "normal"):
        del older["loss"]["weights"][term]
    saved = {"config": older, "train_state": {"step": 7, "batch_in_epoch": 7, "world_size": 1, "batch_size": 32}}
    check = lambda c: resume_mismatches(saved, c, world_size=1, batch_size=32)  # noqa: E731
    assert check(_composed("model=cliphand3d")) == []
    assert check(_composed("model=cliphand3d", "loss.weights.edge=1.0")) == ["loss.weights.edge: saved 0.0, now 1.0"]
    clip = older["loss"]["weights"]["clip"]
    assert check(_composed("model=cliphand3d", f"+loss.weights.clip_x={clip}")) == []
    assert check(_composed("model=cliphand3d", f"+loss.weights.clip_x={clip * 2}")) == [
        f"loss.weights.clip_x: saved {clip!r}, now {clip * 2!r}"]
