"""A sampler whose order depends only on (seed, epoch, rank), and which can start mid-epoch.

torch's DataLoader shuffles with its own RNG and DistributedSampler cannot skip ahead, so neither
lets a killed run resume on exactly the batches it would have seen. With `with_epoch` it yields
(epoch, index) keys: a dataset item is a function of (seed, epoch, index), and loader workers that live
across epochs (persistent workers) learn the epoch from the key, not from a copy of the dataset.

`WeightedResumableSampler` does the same over a concatenation of datasets (data/mix.py, data=mix): each epoch
draws every set's share of the epoch, in proportion to its sampling weight, then shuffles them together.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, length: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, drop_last: bool = True, with_epoch: bool = False):
        if length <= 0:
            raise ValueError("ResumableSampler: the dataset is empty")
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.with_epoch = bool(with_epoch)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _epoch_order(self) -> list[int]:
        """Every index this epoch deals out, in order, before the ranks take their shares."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return torch.randperm(self.length, generator=g).tolist()
        return list(range(self.length))

    def _rank_indices(self) -> list[int]:
        order = self._epoch_order()
        per_rank = self.length // self.world_size
        if not self.drop_last and self.length % self.world_size:
            per_rank += 1  # pad by wrapping, as DistributedSampler does, so ranks stay in step
            order = (order * 2)[: per_rank * self.world_size]
        return order[self.rank: per_rank * self.world_size: self.world_size]

    def batches_per_epoch(self) -> int:
        n = len(self._rank_indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._rank_indices()
        if self.drop_last:
            idx = idx[: (len(idx) // self.batch_size) * self.batch_size]
        idx = idx[self.start_batch * self.batch_size:]
        return iter([(self.epoch, i) for i in idx] if self.with_epoch else idx)

    def __len__(self) -> int:
        idx = self._rank_indices()
        if self.drop_last:
            idx = idx[: (len(idx) // self.batch_size) * self.batch_size]
        return max(len(idx) - self.start_batch * self.batch_size, 0)


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` into whole numbers summing to `total` (Hamilton's method: each
    share's floor, then one more for the largest remainders; ties go to the earlier weight)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"sampling weights must be finite, >= 0 and not all 0, got {list(weights)}")
    quota = total * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    left = int(total - counts.sum())
    counts[np.argsort(-(quota - counts), kind="stable")[:left]] += 1
    return counts.tolist()


class WeightedResumableSampler(ResumableSampler):
    """ResumableSampler over datasets laid end to end (indices `offset_i + j`, as data/mix.MixedHands has them).

    An epoch deals `epoch_size` indices (default: all the sets' lengths together): set i's share is
    `largest_remainder(epoch_size, weights)[i]`, drawn from whole permutations of the set (a share larger than
    the set repeats it, each index at most once more than any other), and the shares are shuffled together. The
    order is a function of (seed, epoch) alone and the ranks split it as ResumableSampler does, so a resumed or
    a DDP run sees exactly the batches it would have.
    """

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], *, epoch_size: int | None = None, **kw):
        self.lengths = [int(n) for n in lengths]
        if len(self.lengths) != len(weights) or any(n < 0 for n in self.lengths):
            raise ValueError(f"WeightedResumableSampler: {len(weights)} weight(s) for set lengths {self.lengths}")
        self.weights = [float(w) for w in weights]
        super().__init__(sum(self.lengths) if epoch_size is None else int(epoch_size), **kw)
        empty = [i for i, (n, c) in enumerate(zip(self.lengths, self.epoch_counts())) if c and not n]
        if empty:
            raise ValueError(f"WeightedResumableSampler: set(s) {empty} weigh more than 0 but are empty")

    def epoch_counts(self) -> list[int]:
        """How many of this epoch's indices each set gives (before the ranks split them)."""
        return largest_remainder(self.length, self.weights)

    def _epoch_order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        offsets = np.cumsum([0, *self.lengths[:-1]])
        parts = []
        for n, count, offset in zip(self.lengths, self.epoch_counts(), offsets):
            if count:
                cycles = -(-count // n)
                perms = [rng.permutation(n) if self.shuffle else np.arange(n) for _ in range(cycles)]
                parts.append(np.concatenate(perms)[:count] + offset)
        order = np.concatenate(parts)
        return (rng.permutation(order) if self.shuffle else order).tolist()


def sampler_for(dataset, **kw) -> ResumableSampler:
    """The training sampler of `dataset`: weighted over its sets where it has them (data/mix.MixedHands, with
    `lengths` and `sampling_weights`), else over its indices. `kw` as ResumableSampler takes them."""
    weights = getattr(dataset, "sampling_weights", None)
    if weights is None:
        return ResumableSampler(len(dataset), **kw)
    return WeightedResumableSampler(dataset.lengths, weights, **kw)
