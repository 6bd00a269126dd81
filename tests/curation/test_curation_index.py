"""faiss helpers: index choice by pool size, approximate recall against exact, k-means, GPU when present."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import IndexConfig
from curation.index import assign, build_index, choose_index_kind, gpu_available, kmeans, knn_search
from curation_data import skewed_concepts
from trainer.config import ConfigError


@pytest.mark.parametrize(
    "num,expected",
    [(10, "flat"), (50_000, "flat"), (50_001, "ivf_flat"), (4_999_999, "ivf_flat"), (5_000_000, "ivf_pq")],
)
def test_auto_index_kind_by_pool_size(num: int, expected: str) -> None:
    assert choose_index_kind(num, IndexConfig()) == expected
    assert choose_index_kind(num, IndexConfig(kind="flat")) == "flat"


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


@pytest.mark.parametrize("kind,min_recall", [("ivf_flat", 0.9), ("ivf_pq", 0.5)])
def test_approximate_indexes_recall_against_exact(kind: str, min_recall: float) -> None:
    x, _ = skewed_concepts(np.random.default_rng(0), [2000] * 5, 32, spread=0.3)
    queries = x[:200]
    _, exact = knn_search(build_index(x, config=IndexConfig(kind="flat")), queries, 10)
    config = IndexConfig(kind=kind, nlist=32, nprobe=8, pq_bytes=8)
    _, approx = knn_search(build_index(x, config=config), queries, 10, batch_size=64)
    recall = _recall(approx, exact)
    print(f"{kind} recall@10 = {recall:.3f}")
    assert recall >= min_recall


def test_knn_reports_missing_neighbours_and_clamps_k() -> None:
    x = np.eye(3, dtype=np.float32)
    sims, ids = knn_search(build_index(x, config=IndexConfig()), x, 10)
    assert ids.shape == (3, 3)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])
    np.testing.assert_allclose(sims[:, 0], 1.0)


def test_pq_bytes_must_divide_the_dimension() -> None:
    x = np.random.default_rng(0).normal(size=(2000, 30)).astype(np.float32)
    with pytest.raises(ConfigError, match=r"dedup.index.pq_bytes: invalid value 8; allowed: a divisor .* 30"):
        build_index(x, config=IndexConfig(kind="ivf_pq", pq_bytes=8), field="dedup.index")


def test_kmeans_finds_separated_concepts() -> None:
    x, concept = skewed_concepts(np.random.default_rng(1), [300, 200, 100], 16, spread=0.05)
    centroids = kmeans(x, 3, iterations=10, seed=0, gpu="off")
    labels, sims = assign(x, centroids, gpu="off")
    assert len(set(zip(concept.tolist(), labels.tolist()))) == 3  # a one-to-one match of concepts and clusters
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ConfigError, match="at most the number of points"):
        kmeans(x[:2], 3, iterations=1, seed=0, field="retrieve.cluster.num_clusters")


def test_gpu_on_without_gpu_is_a_clear_error() -> None:
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="index.gpu: invalid value 'on'"):
        build_index(np.eye(4, dtype=np.float32), config=IndexConfig(gpu="on"))


@pytest.mark.gpu
def test_gpu_index_matches_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not gpu_available():
        pytest.skip("needs CUDA and faiss-gpu")
    x, _ = skewed_concepts(np.random.default_rng(0), [5000] * 4, 64, spread=0.3)
    _, cpu = knn_search(build_index(x, config=IndexConfig(kind="flat", gpu="off")), x[:500], 8)
    _, gpu = knn_search(build_index(x, config=IndexConfig(kind="flat", gpu="on")), x[:500], 8)
    assert _recall(gpu, cpu) >= 0.99  # fp16 storage on the GPU may swap near-ties
