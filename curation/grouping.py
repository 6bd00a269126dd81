"""Vectorised per-group operations (no Python loop over clusters): ranks, centroid sums, water-filling caps."""

from __future__ import annotations

import numpy as np

__all__ = ["group_means", "rank_within_groups", "take_first_per_group", "water_fill"]


def rank_within_groups(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank of every element inside its group when the group is sorted by ``keys`` ascending (ties by position)."""
    order = np.lexsort((np.arange(len(groups)), keys, groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(groups)])
    ranks = np.empty(len(groups), np.int64)
    ranks[order] = np.arange(len(groups)) - np.repeat(starts, lengths)
    return ranks


def take_first_per_group(groups: np.ndarray, keys: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Boolean mask taking the ``quota[g]`` smallest-key elements of every group ``g``."""
    return rank_within_groups(groups, keys) < quota[groups]


def group_means(x: np.ndarray, labels: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(means [G, D] float32, counts [G])`` of the rows of ``x`` per label; empty groups have zero means."""
    counts = np.bincount(labels, minlength=num_groups)
    sums = np.zeros((num_groups, x.shape[1]), np.float32)
    np.add.at(sums, labels, x.astype(np.float32, copy=False))
    return sums / np.maximum(counts, 1)[:, None].astype(np.float32), counts


def water_fill(sizes: np.ndarray, parents: np.ndarray, budgets: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Integer allocation per child: ``alloc = min(cap_p, size)`` with ``sum(alloc over children of p) = budget_p``.

    ``sizes[c]`` is child c's capacity, ``parents[c]`` its group and ``budgets[p]`` the group's target (at most the
    group's total size). The real cap x_p solves ``sum_c min(x_p, size_c) = budget_p`` (water-filling: small
    children are taken whole, large ones are cut to the same level); the floor of x_p is given to everyone and the
    remaining units go one each to randomly chosen children still above the floor.
    """
    sizes = np.asarray(sizes, np.int64)
    num_groups = len(budgets)
    totals = np.bincount(parents, weights=sizes, minlength=num_groups).astype(np.int64)
    if np.any(budgets > totals):
        raise ValueError("a group's budget exceeds the total size of its children")
    # Sort children by (group, size): with cap = the j-th smallest size s_j in a group of m children, the take is
    # prefix_sum(before j) + (m - j) * s_j; the cap lies in the first segment whose take reaches the budget.
    order = np.lexsort((sizes, parents))
    g, s = parents[order], sizes[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(g)])
    position = np.arange(len(g)) - np.repeat(starts, counts)
    before = np.cumsum(s) - s - np.repeat(np.cumsum(s)[starts] - s[starts], counts)
    remaining = np.repeat(counts, counts) - position
    take_at = before + remaining * s
    reached = take_at >= budgets[g]
    first = np.full(num_groups, np.iinfo(np.int64).max)
    np.minimum.at(first, g[reached], np.flatnonzero(reached))
    has = first < len(g)
    floor_cap = np.zeros(num_groups, np.int64)
    idx = first[has]
    floor_cap[has] = (budgets[has] - before[idx]) // remaining[idx]
    alloc = np.minimum(sizes, floor_cap[parents])
    leftover = budgets - np.bincount(parents, weights=alloc, minlength=num_groups).astype(np.int64)
    eligible = sizes > alloc
    keys = np.where(eligible, rng.random(len(sizes)), np.inf)
    extra = take_first_per_group(parents, keys, leftover) & eligible
    return alloc + extra
