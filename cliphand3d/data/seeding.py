"""Item generators for a batch at once: `default_rng([seed, epoch, index])` for every item of a loader
worker's batch, the same streams, seeded together.

numpy seeds a Generator through SeedSequence, a hash of the entropy words (numpy/random/bit_generator.pyx,
after M. O'Neill's seed_seq_fe): it costs ~9 us an item, as much as the crop's warp. The hash is
arithmetic on 32-bit words, so it runs here over the batch's words at once, and PCG64 is seeded with the
words it would have produced. tests/test_seeding.py checks the streams against default_rng, so a numpy that
changed its seeding would fail there, not drift silently.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.random import PCG64, Generator
from numpy.random.bit_generator import ISeedSequence

# SeedSequence's constants (pool of 4 words, 32-bit hash multipliers and shift)
POOL_SIZE = 4
INIT_A, MULT_A = 0x43B0D7E5, 0x931E8875
INIT_B, MULT_B = 0x8B51F9DD, 0x58F38DED
MIX_MULT_L, MIX_MULT_R = 0xCA01F9DD, 0x4973F715
XSHIFT = np.uint32(16)
MASK32 = 0xFFFFFFFF


def item_generators(entropy: Sequence[Sequence[int]]) -> list[Generator]:
    """One Generator per row of `entropy` (e.g. [seed, epoch, index]), each exactly
    `np.random.default_rng(row)`. Rows of up to 4 values in [0, 2**32) are hashed at once; others (a seed of
    2**32 or more takes two words) go through numpy's own SeedSequence."""
    rows = [[int(v) for v in row] for row in entropy]
    if not rows:
        return []
    if len({len(r) for r in rows}) > 1 or not 0 < len(rows[0]) <= POOL_SIZE or \
            not all(0 <= v <= MASK32 for r in rows for v in r):
        return [np.random.default_rng(r) for r in rows]
    words = seed_words(np.array(rows, dtype=np.uint32))
    return [Generator(PCG64(_HashedSeed(w))) for w in words]


def seed_words(entropy: np.ndarray) -> np.ndarray:
    """(B, k<=4) uint32 entropy words -> (B, 4) uint64: `SeedSequence(row).generate_state(4, np.uint64)` of
    each row, which PCG64 seeds itself from.

    SeedSequence hashes word by word, each hash with the next of a fixed series of constants. A word is hashed
    with three consecutive constants into the other three words, which do not depend on each other, so each
    round runs as one (3, B) step; the result is the same words."""
    pool = np.zeros((POOL_SIZE, len(entropy)), np.uint32)
    pool[:entropy.shape[1]] = entropy.T
    consts = _hash_constants(INIT_A, MULT_A, POOL_SIZE * POOL_SIZE + 1)
    pool = _hashmix(pool, consts[:POOL_SIZE + 1])
    for src in range(POOL_SIZE):
        dst = [d for d in range(POOL_SIZE) if d != src]
        first = POOL_SIZE + (POOL_SIZE - 1) * src
        hashed = _hashmix(pool[src][None], consts[first:first + POOL_SIZE])
        mixed = np.uint32(MIX_MULT_L) * pool[dst] - np.uint32(MIX_MULT_R) * hashed
        pool[dst] = mixed ^ (mixed >> XSHIFT)
    words = 2 * POOL_SIZE
    state = _hashmix(pool[np.arange(words) % POOL_SIZE], _hash_constants(INIT_B, MULT_B, words + 1))
    return np.ascontiguousarray(state.T).astype("<u4", copy=False).view("<u8").astype(np.uint64)


def _hash_constants(init: int, mult: int, n: int) -> np.ndarray:
    """The series init, init * mult, init * mult**2, ... (mod 2**32) a run of hashes steps through."""
    out = [init]
    for _ in range(n - 1):
        out.append((out[-1] * mult) & MASK32)
    return np.array(out, np.uint32)[:, None]


def _hashmix(values: np.ndarray, consts: np.ndarray) -> np.ndarray:
    """SeedSequence's hash of each row of `values` (or one row broadcast) with its run of constants: row i is
    xor-ed with consts[i], multiplied by consts[i + 1], then xor-shifted."""
    hashed = (values ^ consts[:-1]) * consts[1:]
    return hashed ^ (hashed >> XSHIFT)


class _HashedSeed(ISeedSequence):
    """A seed sequence whose state words are already computed (`seed_words`)."""

    def __init__(self, words: np.ndarray):
        self.words = words

    def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
        if n_words != POOL_SIZE or np.dtype(dtype) != np.uint64:
            raise ValueError("item_generators' seeds hold the 4 uint64 words PCG64 takes, nothing else")
        return self.words
