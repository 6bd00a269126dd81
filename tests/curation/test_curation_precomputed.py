"""The selection steps on precomputed embeddings (no images): retrieval by query sets inside the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curation.config import spec_from_dict
from curation.pipeline import run_pipeline, step_directory
from curation.storage import save_embeddings, shard_name
from curation_data import noisy_copies, random_unit, skewed_concepts


def _save(directory: Path, name: str, x: np.ndarray, *, num_shards: int = 1) -> None:
    for i in range(num_shards):
        rows = np.arange(len(x) * i // num_shards, len(x) * (i + 1) // num_shards)
        save_embeddings(
            directory / name,
            source=name,
            ids=[f"{name}-{r}" for r in rows],
            indices=rows,
            embeddings=x[rows].astype(np.float16),
            name=shard_name(i, num_shards),
        )


def test_sample_and_cluster_retrieval_in_the_pipeline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim = 32
    concepts, concept = skewed_concepts(rng, [300, 300, 300, 300], dim, spread=0.05)
    near_queries = random_unit(rng, 5, dim)
    planted = np.concatenate([noisy_copies(rng, near_queries, 0.7) for _ in range(2)])  # 2 neighbours, 0.49 apart
    pool = np.concatenate([concepts, planted])
    cluster_queries = concepts[concept == 2][:6]  # > 3 queries in concept 2's cluster
    _save(tmp_path / "emb", "pool", pool, num_shards=3)
    _save(tmp_path / "emb", "near", near_queries)
    _save(tmp_path / "emb", "topic", cluster_queries)
    spec = spec_from_dict(
        {
            "name": "emb",
            "output": str(tmp_path / "out"),
            "sources": [
                {"name": "pool", "kind": "embeddings", "path": str(tmp_path / "emb" / "pool")},
                {"name": "near", "kind": "embeddings", "path": str(tmp_path / "emb" / "near"), "role": "query"},
                {
                    "name": "topic",
                    "kind": "embeddings",
                    "path": str(tmp_path / "emb" / "topic"),
                    "role": "query",
                    "retrieval": "cluster",
                },
            ],
            "dedup": {"enabled": False},  # the tight generated concepts would collapse into one component each
            "retrieve": {"k": 2, "cluster": {"num_clusters": 4, "images_per_cluster": 50}},
            "write": {"enabled": False},
        }
    )
    results = run_pipeline(spec, steps=["embed", "dedup", "retrieve"])
    assert [r.status for r in results] == ["done"] * 3
    assert results[0].summary == {"pool.precomputed": 1210, "near.precomputed": 5, "topic.precomputed": 6}
    retrieve = step_directory(spec.output, "retrieve")
    selected = np.load(retrieve / "selected.npy")
    query_set, query_row = np.load(retrieve / "query_set.npy"), np.load(retrieve / "query_row.npy")
    planted_rows = 1200 + np.arange(10)
    by_sample = selected[query_set == 0]
    np.testing.assert_array_equal(np.sort(by_sample), planted_rows)
    np.testing.assert_array_equal(query_row[query_set == 0][np.argsort(by_sample)], np.tile(np.arange(5), 2))
    by_cluster = selected[query_set == 1]
    assert len(by_cluster) == 50 and set(concept[by_cluster].tolist()) == {2}
    assert results[2].summary == {"input": 1210, "near.sample": 10, "topic.cluster": 50, "selected": 60}
