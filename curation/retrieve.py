"""Retrieval of pool images close to query sets (DINOv2 paper, appendix A).

Sample-based: the k nearest pool images of every query image. Cluster-based: k-means of the pool; every cluster
holding more than ``min_queries`` query images contributes up to ``images_per_cluster`` random pool images, and a
query set contributes at most ``max_per_query_set`` images in total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.config import ClusterRetrievalConfig, IndexConfig
from curation.grouping import take_first_per_group
from curation.index import Advance, assign, build_index, kmeans, knn_search

__all__ = ["ClusterRetrieval", "SampleRetrieval", "cluster_retrieval", "fit_pool_clusters", "sample_retrieval"]


@dataclass(frozen=True, kw_only=True)
class SampleRetrieval:
    """Pool rows retrieved by a query set, with the query (row in the query set) that retrieved each."""

    pool_rows: np.ndarray
    query_rows: np.ndarray
    similarities: np.ndarray


@dataclass(frozen=True, kw_only=True)
class ClusterRetrieval:
    """Pool rows retrieved by a query set through their k-means cluster."""

    pool_rows: np.ndarray
    clusters: np.ndarray
    selected_clusters: np.ndarray
    """Clusters holding more than ``min_queries`` of the set's queries."""


def sample_retrieval(
    pool: np.ndarray,
    queries: np.ndarray,
    *,
    k: int,
    index_config: IndexConfig,
    seed: int = 0,
    advance: Advance | None = None,
) -> SampleRetrieval:
    """The ``k`` nearest pool rows of each query; a pool row retrieved twice is reported once (its best query)."""
    index = build_index(pool, config=index_config, field="retrieve.index", seed=seed)
    sims, ids = knn_search(index, queries, k, batch_size=index_config.batch_size, advance=advance)
    query_rows = np.repeat(np.arange(len(queries), dtype=np.int64), ids.shape[1])
    pool_rows, sims = ids.reshape(-1), sims.reshape(-1)
    valid = pool_rows >= 0
    pool_rows, query_rows, sims = pool_rows[valid], query_rows[valid], sims[valid]
    # Keep each pool row once, with the query that is most similar to it.
    order = np.lexsort((-sims, pool_rows))
    first = np.r_[True, pool_rows[order][1:] != pool_rows[order][:-1]]
    chosen = order[first]
    return SampleRetrieval(pool_rows=pool_rows[chosen], query_rows=query_rows[chosen], similarities=sims[chosen])


def fit_pool_clusters(
    pool: np.ndarray, *, config: ClusterRetrievalConfig, gpu: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids, labels of the pool rows)``: the k-means shared by every cluster-based query set."""
    centroids = kmeans(
        pool,
        config.num_clusters,
        iterations=config.iterations,
        seed=seed,
        gpu=gpu,
        field="retrieve.cluster.num_clusters",
    )
    labels, _ = assign(pool, centroids, gpu=gpu)
    return centroids, labels


def cluster_retrieval(
    pool_labels: np.ndarray,
    centroids: np.ndarray,
    queries: np.ndarray,
    *,
    config: ClusterRetrievalConfig,
    gpu: str,
    rng: np.random.Generator,
) -> ClusterRetrieval:
    """Pool rows of the clusters that hold more than ``config.min_queries`` of these queries."""
    num_clusters = len(centroids)
    query_labels, _ = assign(queries, centroids, gpu=gpu)
    selected = np.bincount(query_labels, minlength=num_clusters) > config.min_queries
    quota = np.where(selected, config.images_per_cluster, 0)
    # Random images inside each selected cluster, up to the per-cluster quota.
    taken = take_first_per_group(pool_labels, rng.random(len(pool_labels)), quota)
    rows = np.flatnonzero(taken)
    if len(rows) > config.max_per_query_set:
        rows = np.sort(rng.choice(rows, config.max_per_query_set, replace=False))
    return ClusterRetrieval(pool_rows=rows, clusters=pool_labels[rows], selected_clusters=np.flatnonzero(selected))
