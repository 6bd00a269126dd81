"""Exact "k smallest keys per group" over points sharded across ranks, without gathering the points.

Sampling inside clusters (balanced sampling's leaves, the resampling rounds' cluster cores, cluster-based
retrieval's random images) needs, for every group g, the ``quota[g]`` points with the smallest keys among ALL ranks'
points. Each rank keeps its points; a per-group threshold is found by a bisection over the 64-bit key space in which
every step all-reduces one count per group (64 rounds of ``G`` int64s). Keys are unique (the point's global position
is part of every key), so exactly ``min(quota, size)`` points are taken per group and the choice does not depend on
the number of ranks.

Keys: :func:`closest_keys` orders by similarity (largest first), :func:`random_keys` is a seeded hash of the global
position (a bijection, so no two points tie, and no random stream whose draws would depend on the sharding).
"""

from __future__ import annotations

import numpy as np

from curation.distributed import all_reduce_sum

__all__ = ["closest_keys", "random_keys", "take_smallest_per_group"]

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 with good avalanche (Steele et al. 2014)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def random_keys(positions: np.ndarray, *, seed: int, salt: int = 0) -> np.ndarray:
    """A pseudo-random uint64 per global position, unique per position, the same on any number of ranks."""
    with np.errstate(over="ignore"):
        stream = _splitmix64(np.array([seed * 1_000_003 + salt], dtype=np.uint64))[0]
        return _splitmix64(np.asarray(positions, dtype=np.uint64) ^ stream)


def closest_keys(similarities: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """uint64 keys ordering points by similarity, largest first, ties by global position (< 2**32 points)."""
    bits = (-np.asarray(similarities, dtype=np.float32)).view(np.uint32).astype(np.uint64)
    # IEEE floats order like sign-magnitude integers: flip negatives entirely and set the sign bit of positives.
    ordered = np.where(bits >> np.uint64(31), ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    return (ordered << np.uint64(32)) | (np.asarray(positions, dtype=np.uint64) & np.uint64(0xFFFFFFFF))


def take_smallest_per_group(groups: np.ndarray, keys: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Local boolean mask: this rank's share of the ``quota[g]`` globally smallest keys of every group ``g``.

    Collective: every rank calls it with its own points and the same ``quota``."""
    groups = np.asarray(groups, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    quota = np.asarray(quota, dtype=np.int64)
    num_groups = len(quota)
    sizes = all_reduce_sum(np.bincount(groups, minlength=num_groups).astype(np.int64))
    # Smallest threshold t per group with count(key <= t) >= quota; groups that are taken whole get the maximum.
    low = np.zeros(num_groups, np.uint64)
    high = np.full(num_groups, _MASK, np.uint64)
    searching = (quota > 0) & (quota < sizes)
    for _ in range(64):
        if not searching.any():
            break
        mid = low + (high - low) // np.uint64(2)
        counts = all_reduce_sum(np.bincount(groups, weights=keys <= mid[groups], minlength=num_groups).astype(np.int64))
        enough = counts >= quota
        high = np.where(searching & enough, mid, high)
        low = np.where(searching & ~enough, mid + np.uint64(1), low)
        searching &= low < high
    threshold = np.where(quota >= sizes, _MASK, high)
    return (keys <= threshold[groups]) & (quota[groups] > 0)
