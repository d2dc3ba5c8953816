"""Validation on several processes: which items each rank predicts, and how the shares come back together.

Each rank predicts a contiguous run of whole batches of the split (`shard_positions`), the batches one process
would run with the same batch size: no item is padded or repeated, the shares differ by at most one batch
(the last one may be partial), and every item goes through the network in the very batch it would in one
process, so its prediction is bitwise the same even where a kernel's result depends on the batch (cuDNN picks
algorithms by shape). `merge_predictions` concatenates the shares in rank order, which is dataset order.
`scoring.validate` gathers the shares on rank 0 (dist.gather_to_main) and scores them once there.
"""
from __future__ import annotations

import numpy as np


def shard_positions(length: int, batch_size: int, rank: int, world_size: int) -> range:
    """The dataset positions rank `rank` of `world_size` predicts: whole batches of `batch_size`, contiguous,
    in order; together the ranks cover range(length) exactly once. A rank may get none (fewer batches than
    ranks)."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_positions: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    batches = -(-length // batch_size)
    first, stop = batches * rank // world_size, batches * (rank + 1) // world_size
    return range(min(first * batch_size, length), min(stop * batch_size, length))


def merge_predictions(parts: list[dict]) -> dict:
    """`evaluation.predict` outputs of consecutive shares -> one, as if predicted in one pass: arrays
    concatenated along the samples, prompt lists joined. Empty shares ({}) are skipped; a single share is
    returned as it is."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else {}
    keys = list(parts[0])
    if any(set(p) != set(keys) for p in parts[1:]):
        raise RuntimeError(f"validation shares carry different keys: {[sorted(p) for p in parts]}; report this as a bug")
    return {k: [x for p in parts for x in p[k]] if k.startswith("prompt_") else np.concatenate([p[k] for p in parts], 0)
            for k in keys}
