"""Data-parallel spherical k-means and the balanced hierarchical k-means of Vo et al. 2024 built on it.

Every rank holds a shard of the points; centroids ``[k, D]`` are replicated. One Lloyd iteration: each rank assigns
its points with a faiss flat inner-product index over the centroids (GPU when enabled), sums them per centroid
(``index_add_`` in float64) and counts them (``bincount``); the sums, counts and inertia are all-reduced and every
rank computes the same new centroids. Only ``k x D`` numbers cross the network per iteration; the assignment vector
never leaves its rank.

What does not depend on the number of ranks: the training subsample and the initial centroids (both drawn by
global position with the seed), so every rank count starts from the same centroids and runs the same iterations.
What does: the order of the float64 sums (relative error ~1e-16) and faiss's float32 dot products (its BLAS and
non-BLAS paths differ in rounding, ~1e-7), so centroids agree to ~1e-6, and an assignment can only flip for a point
equidistant from two centroids to that precision. The tests hold centroids to 1e-4 (max abs) across 1, 2, 3 ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from curation.distributed import all_reduce_sum, global_offset
from curation.grouping import take_first_per_group, water_fill
from curation.index import assign
from curation.selection import closest_keys, random_keys, take_smallest_per_group
from curation.storage import l2_normalize
from trainer.config import ConfigError

__all__ = [
    "DistributedHierarchy",
    "balanced_selection",
    "distributed_kmeans",
    "distributed_hierarchical_kmeans",
    "kmeans_with_resampling",
]

logger = logging.getLogger(__name__)

OnIteration = Callable[[int, float], None]
"""Called after each Lloyd iteration with (iteration, inertia); the same values on every rank."""


def _positions_owned(selected: np.ndarray, offset: int, num_local: int) -> np.ndarray:
    """Local indices of the sorted global positions ``selected`` that fall in ``[offset, offset + num_local)``."""
    lo, hi = np.searchsorted(selected, [offset, offset + num_local])
    return selected[lo:hi] - offset


def _reduce(array: np.ndarray, replicated: bool) -> np.ndarray:
    return array if replicated else all_reduce_sum(array)


def distributed_kmeans(
    points: np.ndarray,
    num_clusters: int,
    *,
    iterations: int,
    seed: int,
    replicated: bool = False,
    max_points_per_centroid: int = 256,
    gpu: str = "auto",
    field: str = "kmeans",
    on_iteration: OnIteration | None = None,
) -> np.ndarray:
    """Spherical k-means centroids ``[num_clusters, D]`` (float32, unit norm) of the points of all ranks.

    ``points`` is this rank's shard (``[n_r, D]``, L2-normalised); with ``replicated`` every rank holds all points
    and the fit runs without collectives (the upper levels of the hierarchy). Like ``faiss.Kmeans``, training uses
    at most ``max_points_per_centroid * num_clusters`` points, drawn by global position. Collective."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    offset, total = (0, len(points)) if replicated else global_offset(len(points))
    if num_clusters > total:
        raise ConfigError(field, num_clusters, f"at most the number of points to cluster ({total})")
    rng = np.random.default_rng(seed)
    train = points
    if total > max_points_per_centroid * num_clusters:
        chosen = np.sort(rng.choice(total, max_points_per_centroid * num_clusters, replace=False))
        train = points[_positions_owned(chosen, offset, len(points))]
        offset, total = (0, len(train)) if replicated else global_offset(len(train))
    dim = points.shape[1]
    init_positions = rng.choice(total, num_clusters, replace=False)
    centroids = np.zeros((num_clusters, dim), np.float64)
    mine = (init_positions >= offset) & (init_positions < offset + len(train))
    centroids[mine] = train[init_positions[mine] - offset]
    centroids = _reduce(centroids, replicated).astype(np.float32)
    for iteration in range(iterations):
        labels, sims = assign(train, centroids, gpu=gpu)
        sums = torch.zeros((num_clusters, dim), dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(labels), torch.from_numpy(train.astype(np.float64)))
        counts = np.bincount(labels, minlength=num_clusters).astype(np.float64)
        # One all-reduce: the sums, then the counts, then the inertia (sum of squared distances 2 - 2 cos).
        packed = np.concatenate([sums.numpy().ravel(), counts, [float(np.sum(2.0 - 2.0 * sims.astype(np.float64)))]])
        packed = _reduce(packed, replicated)
        sums_all = packed[: num_clusters * dim].reshape(num_clusters, dim)
        counts_all = packed[num_clusters * dim : -1]
        inertia = float(packed[-1])
        centroids = _update(centroids, sums_all, counts_all, rng=np.random.default_rng([seed, iteration]))
        if on_iteration is not None:
            on_iteration(iteration + 1, inertia)
    return centroids


def _update(old: np.ndarray, sums: np.ndarray, counts: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """New unit centroids; an empty cluster takes a perturbed copy of the largest one (faiss's rule), identically on
    every rank because everything here is replicated."""
    centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], old.astype(np.float64))
    counts = counts.copy()
    for empty in np.flatnonzero(counts == 0):
        largest = int(np.argmax(counts))
        noise = rng.normal(size=centroids.shape[1]) * 1e-3
        centroids[empty] = centroids[largest] + noise
        centroids[largest] = centroids[largest] - noise
        counts[empty] = counts[largest] / 2
        counts[largest] -= counts[empty]
    return l2_normalize(centroids.astype(np.float32))


def _global_positions(num_local: int, replicated: bool) -> np.ndarray:
    offset = 0 if replicated else global_offset(num_local)[0]
    return np.arange(offset, offset + num_local, dtype=np.int64)


def kmeans_with_resampling(
    points: np.ndarray,
    num_clusters: int,
    *,
    rounds: int,
    fraction: float,
    iterations: int,
    seed: int,
    replicated: bool = False,
    gpu: str = "auto",
    field: str = "balance.levels",
    on_iteration: Callable[[str, int, float], None] | None = None,
) -> np.ndarray:
    """Centroids of one level with Vo et al.'s resampling rounds: keep the ``fraction x mean cluster size`` points
    closest to every centroid (chosen globally, :func:`take_smallest_per_group`), fit afresh on them, repeat."""
    total = len(points) if replicated else global_offset(len(points))[1]
    positions = _global_positions(len(points), replicated)

    def fit(x: np.ndarray, fit_seed: int, label: str) -> np.ndarray:
        callback = None if on_iteration is None else (lambda it, inertia: on_iteration(label, it, inertia))
        return distributed_kmeans(x, num_clusters, iterations=iterations, seed=fit_seed, replicated=replicated,
                                  gpu=gpu, field=field, on_iteration=callback)

    centroids = fit(points, seed, "fit")
    quota = np.full(num_clusters, max(1, round(fraction * total / num_clusters)), np.int64)
    for round_index in range(rounds):
        labels, sims = assign(points, centroids, gpu=gpu)
        if replicated:
            keep = take_first_per_group(labels, closest_keys(sims, positions), quota)
        else:
            keep = take_smallest_per_group(labels, closest_keys(sims, positions), quota)
        subset_total = int(keep.sum()) if replicated else int(all_reduce_sum(np.array([keep.sum()]))[0])
        if subset_total < num_clusters:
            logger.info("resampling stopped at round %d: %d points for %d clusters", round_index, subset_total,
                        num_clusters)
            break
        # A fresh fit, not a warm start: the subset is made of cluster cores, so every current centroid already
        # sits at its core's mean (a fixed point); a new fit places centroids by the subset's flatter density.
        centroids = fit(points[keep], seed + round_index + 1, f"resample-{round_index + 1}")
    return centroids


def group_sums(points: np.ndarray, labels: np.ndarray, num_groups: int, replicated: bool) -> tuple:
    """``(means [G, D] float32, counts [G] int64)`` over all ranks' points."""
    sums = torch.zeros((num_groups, points.shape[1]), dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(labels), torch.from_numpy(points.astype(np.float64)))
    counts = np.bincount(labels, minlength=num_groups).astype(np.float64)
    packed = _reduce(np.concatenate([sums.numpy().ravel(), counts]), replicated)
    sums_all = packed[: num_groups * points.shape[1]].reshape(num_groups, -1)
    counts_all = packed[num_groups * points.shape[1] :]
    return (sums_all / np.maximum(counts_all, 1)[:, None]).astype(np.float32), counts_all.astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class DistributedHierarchy:
    """The hierarchy as one rank sees it: level-1 labels and similarities of ITS points, everything above
    replicated. ``labels[t]`` for t >= 1 maps level-t clusters to level-(t+1) clusters (as in
    :class:`curation.balance.Hierarchy`)."""

    centroids: list[np.ndarray]
    fitted: list[np.ndarray]
    """The fitted centroids of every level (what the points were assigned with; centroids are the member means)."""
    labels: list[np.ndarray]
    similarities: np.ndarray
    sizes: list[np.ndarray]
    """Global number of points under every cluster of every level."""

    def point_clusters(self) -> np.ndarray:
        """``[n_local, num_levels]`` cluster of this rank's points at every level (bottom-up)."""
        path = [self.labels[0]]
        for parents in self.labels[1:]:
            path.append(parents[path[-1]])
        return np.stack(path, axis=1)


LevelStore = Callable[[int, np.ndarray | None], np.ndarray | None]
"""``store(level, fitted)``: with None returns the level's committed fitted centroids (or None), else commits them."""


def distributed_hierarchical_kmeans(
    points: np.ndarray,
    *,
    levels: Sequence[int],
    resampling_rounds: int,
    resample_fraction: float,
    iterations: int,
    seed: int,
    gpu: str = "auto",
    store: LevelStore | None = None,
    on_iteration: Callable[[str, int, float], None] | None = None,
) -> DistributedHierarchy:
    """Cluster this rank's shard of the points (L2-normalised) into ``levels`` (bottom-up cluster counts).

    Level 1 is distributed; levels 2+ cluster the (replicated) member means of the level below, identically on
    every rank. ``store`` commits each level's fitted centroids, so a restart skips the levels already fitted (it
    re-assigns the points, one pass, instead of refitting). Collective."""
    fitted_all, centroids_all, labels_all, sizes_all = [], [], [], []
    current, replicated, similarities = points, False, None
    for level, num_clusters in enumerate(levels):
        fitted = store(level, None) if store is not None else None
        if fitted is None:
            stage = f"level-{level + 1}"
            fitted = kmeans_with_resampling(
                current, num_clusters, rounds=resampling_rounds, fraction=resample_fraction,
                iterations=iterations, seed=seed + 1000 * level, replicated=replicated, gpu=gpu,
                field=f"balance.levels[{level}]",
                on_iteration=None if on_iteration is None else (
                    lambda label, it, inertia, stage=stage: on_iteration(f"{stage}/{label}", it, inertia)),
            )
            if store is not None:
                store(level, fitted)
        labels, sims = assign(current, fitted, gpu=gpu)
        # The next level clusters the member means (what the cluster holds), not the fitted centroids; an empty
        # cluster keeps its centroid (it carries no points, so it cannot skew the sampling).
        means, counts = group_sums(current, labels, num_clusters, replicated)
        centroids = np.where(counts[:, None] > 0, l2_normalize(means), fitted).astype(np.float32)
        if level == 0:
            similarities, sizes = sims, counts
        else:
            sizes = np.bincount(labels, weights=sizes_all[-1], minlength=num_clusters).astype(np.int64)
        fitted_all.append(fitted)
        centroids_all.append(centroids)
        labels_all.append(labels)
        sizes_all.append(sizes)
        current, replicated = centroids, True
    assert similarities is not None
    return DistributedHierarchy(centroids=centroids_all, fitted=fitted_all, labels=labels_all,
                                similarities=similarities, sizes=sizes_all)


def balanced_selection(
    hierarchy: DistributedHierarchy, positions: np.ndarray, target_size: int, *, sampling: str, seed: int
) -> np.ndarray:
    """Local mask of this rank's points in the balanced sample of ``target_size`` (Vo et al.): water-filling top
    down on the replicated cluster sizes (identical on every rank), then the leaves' budgets taken globally, closest
    first or by a seeded hash of the global position. Collective; independent of the number of ranks."""
    sizes = hierarchy.sizes
    target = min(target_size, int(sizes[0].sum()))
    if target < target_size:
        logger.warning("balance.target_size %d exceeds the %d candidate images: taking all", target_size,
                       int(sizes[0].sum()))
    rng = np.random.default_rng(seed)
    budgets = water_fill(sizes[-1], np.zeros(len(sizes[-1]), np.int64), np.array([target]), rng=rng)
    for level in range(len(sizes) - 1, 0, -1):
        budgets = water_fill(sizes[level - 1], hierarchy.labels[level], budgets, rng=rng)
    if sampling == "random":
        keys = random_keys(positions, seed=seed, salt=1)
    else:
        keys = closest_keys(hierarchy.similarities, positions)
    return take_smallest_per_group(hierarchy.labels[0], keys, budgets)
