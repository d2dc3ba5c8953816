"""A sampler whose order depends only on (seed, epoch, rank), and which can start mid-epoch.

torch's DataLoader shuffles with its own RNG and DistributedSampler cannot skip ahead, so neither
lets a killed run resume on exactly the batches it would have seen. With `with_epoch` it yields
(epoch, index) keys: a dataset item is a function of (seed, epoch, index), and loader workers that live
across epochs (persistent workers) learn the epoch from the key, not from a copy of the dataset.
"""
from __future__ import annotations

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

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
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
