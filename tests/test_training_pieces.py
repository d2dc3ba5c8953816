"""Small pure pieces of the training run: the resumable sampler, the LR schedule, CLI error unwrapping."""
import math

import pytest

from cliphand3d.cli import _user_error
from cliphand3d.data.base import DatasetError
from cliphand3d.data.sampler import ResumableSampler
from cliphand3d.trainer import warmup_cosine


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
