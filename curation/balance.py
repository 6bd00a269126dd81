"""Balanced hierarchical k-means and balanced sampling, implemented from Vo et al. 2024 ("Automatic Data Curation
for Self-Supervised Learning: A Clustering-Based Approach"), not from their code.

Bottom-up: level 1 runs k-means on the embeddings, level t+1 on the centroids of level t. Inside a level, each of
``resampling_rounds`` rounds keeps the points closest to every centroid (``resample_fraction`` of the mean cluster
size), re-fits k-means on that subsample from the current centroids and re-assigns every point: dense concepts can
no longer pull many centroids towards themselves, so centroids spread over concepts more uniformly.

Top-down: a target size is split over the top clusters by water-filling (``sum_i min(x, size_i) = target``), each
cluster's share over its children the same way, down to the leaves, where images are picked at random or closest
to the centroid first. Everything is vectorised over clusters (bincount, np.add.at, lexsort ranks), in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curation.grouping import group_means, take_first_per_group, water_fill
from curation.index import assign, kmeans
from curation.storage import l2_normalize

__all__ = ["Hierarchy", "balanced_sample", "hierarchical_kmeans", "kmeans_with_resampling"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Hierarchy:
    """Clusters of every level. ``labels[0][i]`` is point i's level-1 cluster; ``labels[t][c]`` is the level-(t+1)
    cluster of level-t cluster c. ``similarities`` is each point's cosine to its level-1 centroid."""

    centroids: list[np.ndarray]
    labels: list[np.ndarray]
    similarities: np.ndarray

    def point_clusters(self) -> np.ndarray:
        """``[n, num_levels]`` cluster id of every point at every level (bottom-up)."""
        path = [self.labels[0]]
        for parents in self.labels[1:]:
            path.append(parents[path[-1]])
        return np.stack(path, axis=1)

    def cluster_sizes(self) -> list[np.ndarray]:
        """Number of points under every cluster of every level."""
        sizes = [np.bincount(self.labels[0], minlength=len(self.centroids[0]))]
        for level, parents in enumerate(self.labels[1:], start=1):
            sizes.append(np.bincount(parents, weights=sizes[-1], minlength=len(self.centroids[level])).astype(np.int64))
        return sizes


def kmeans_with_resampling(
    points: np.ndarray,
    num_clusters: int,
    *,
    rounds: int,
    fraction: float,
    iterations: int,
    seed: int,
    gpu: str = "auto",
    field: str = "balance.levels",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centroids, labels, similarities)`` of one level (Vo et al., resampling-clustering)."""
    centroids = kmeans(points, num_clusters, iterations=iterations, seed=seed, gpu=gpu, field=field)
    per_cluster = max(1, round(fraction * len(points) / num_clusters))
    quota = np.full(num_clusters, per_cluster)
    for round_index in range(rounds):
        labels, sims = assign(points, centroids, gpu=gpu)
        subset = points[take_first_per_group(labels, -sims, quota)]
        if len(subset) < num_clusters:
            logger.info(
                "resampling stopped at round %d: %d points for %d clusters", round_index, len(subset), num_clusters
            )
            break
        # A fresh fit, not a warm start: the subset is made of cluster cores, so every current centroid already
        # sits at its core's mean (a fixed point); a new fit places centroids by the subset's flatter density.
        centroids = kmeans(
            subset, num_clusters, iterations=iterations, seed=seed + round_index + 1, gpu=gpu, field=field
        )
    labels, sims = assign(points, centroids, gpu=gpu)
    return centroids, labels, sims


def hierarchical_kmeans(
    x: np.ndarray,
    *,
    levels: Sequence[int],
    resampling_rounds: int,
    resample_fraction: float,
    iterations: int,
    seed: int,
    gpu: str = "auto",
) -> Hierarchy:
    """Cluster ``x`` (L2-normalised ``[n, D]``) into ``levels`` (bottom-up cluster counts)."""
    centroids_per_level, labels_per_level = [], []
    points, similarities = x, None
    for level, num_clusters in enumerate(levels):
        centroids, labels, sims = kmeans_with_resampling(
            points,
            num_clusters,
            rounds=resampling_rounds,
            fraction=resample_fraction,
            iterations=iterations,
            seed=seed + 1000 * level,
            gpu=gpu,
            field=f"balance.levels[{level}]",
        )
        # The next level clusters the member means (what the cluster holds), not the fitted centroids; an empty
        # cluster keeps its centroid (it carries no points, so it cannot skew the sampling).
        means, counts = group_means(points, labels, num_clusters)
        centroids = np.where(counts[:, None] > 0, l2_normalize(means), centroids).astype(np.float32)
        centroids_per_level.append(centroids)
        labels_per_level.append(labels)
        similarities = sims if similarities is None else similarities
        points = centroids
    assert similarities is not None
    return Hierarchy(centroids=centroids_per_level, labels=labels_per_level, similarities=similarities)


def balanced_sample(hierarchy: Hierarchy, target_size: int, *, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Row numbers (sorted) of ``target_size`` points spread as evenly as possible over the hierarchy's clusters."""
    sizes = hierarchy.cluster_sizes()
    num_points = len(hierarchy.labels[0])
    target = min(target_size, num_points)
    if target < target_size:
        logger.warning("balance.target_size %d exceeds the %d candidate images: taking all", target_size, num_points)
    # Top level: one virtual root over the top clusters; then each level's budgets split over its children.
    budgets = water_fill(sizes[-1], np.zeros(len(sizes[-1]), np.int64), np.array([target]), rng=rng)
    for level in range(len(sizes) - 1, 0, -1):
        budgets = water_fill(sizes[level - 1], hierarchy.labels[level], budgets, rng=rng)
    keys = rng.random(num_points) if sampling == "random" else -hierarchy.similarities
    return np.flatnonzero(take_first_per_group(hierarchy.labels[0], keys, budgets))
