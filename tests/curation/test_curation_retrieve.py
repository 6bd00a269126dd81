"""Retrieval: sample-based finds the planted neighbours; cluster-based takes the clusters the queries fall into."""

from __future__ import annotations

import numpy as np

from curation.config import ClusterRetrievalConfig, IndexConfig
from curation.retrieve import cluster_retrieval, fit_pool_clusters, sample_retrieval
from curation_data import noisy_copies, random_unit, skewed_concepts


def test_sample_retrieval_returns_the_planted_neighbours() -> None:
    rng = np.random.default_rng(0)
    dim, num_queries, k = 64, 20, 4
    queries = random_unit(rng, num_queries, dim)
    background = random_unit(rng, 2000, dim)
    planted = np.concatenate([noisy_copies(rng, queries, 0.7) for _ in range(k)])  # k neighbours per query
    pool = np.concatenate([background, planted])
    planted_rows = 2000 + np.arange(k * num_queries)
    found = sample_retrieval(pool, queries, k=k, index_config=IndexConfig())
    assert set(found.pool_rows.tolist()) == set(planted_rows.tolist())
    # Each planted row is credited to the query it was planted for.
    expected_query = np.tile(np.arange(num_queries), k)
    order = np.argsort(found.pool_rows)
    np.testing.assert_array_equal(found.query_rows[order], expected_query)
    assert np.all(found.similarities > 0.6)


def test_sample_retrieval_reports_a_shared_neighbour_once() -> None:
    rng = np.random.default_rng(1)
    pool = random_unit(rng, 100, 32)
    queries = np.concatenate([pool[:1], pool[:1]])  # two identical queries retrieve the same rows
    found = sample_retrieval(pool, queries, k=3, index_config=IndexConfig())
    assert len(found.pool_rows) == len(set(found.pool_rows.tolist())) == 3


def test_cluster_retrieval_takes_clusters_with_enough_queries_and_caps() -> None:
    rng = np.random.default_rng(2)
    pool, concept = skewed_concepts(rng, [300, 300, 300, 300], 32, spread=0.05)
    config = ClusterRetrievalConfig(num_clusters=4, min_queries=3, images_per_cluster=100, max_per_query_set=1000)
    centroids, labels = fit_pool_clusters(pool, config=config, gpu="off", seed=0)
    # 5 queries from concept 0 (> 3), 2 from concept 1 (not enough).
    queries = np.concatenate([pool[concept == 0][:5], pool[concept == 1][:2]])
    found = cluster_retrieval(labels, centroids, queries, config=config, gpu="off", rng=np.random.default_rng(0))
    assert len(found.selected_clusters) == 1
    assert len(found.pool_rows) == 100  # capped per cluster
    assert set(concept[found.pool_rows].tolist()) == {0}
    capped = cluster_retrieval(
        labels,
        centroids,
        queries,
        config=config.model_copy(update={"max_per_query_set": 40}),
        gpu="off",
        rng=np.random.default_rng(0),
    )
    assert len(capped.pool_rows) == 40
