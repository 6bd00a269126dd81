"""Curation benchmark on synthetic clustered embeddings; prints ONE JSON object.

    python bench/curation.py [--n 100000 --dim 384] [--quick]

Measures, on one pool of ``n`` L2-normalised embeddings (Zipf-sized concepts plus 2% planted near-copies):
- exact (IndexFlatIP) vs approximate (IVF-Flat, IVF-PQ) k-NN: build and search time on a query subsample and
  recall@10 of each approximate index against exact; the exact all-pairs time is extrapolated from the subsample;
- time per step: dedup (k-NN k=64 + threshold + components), sample- and cluster-based retrieval, balance;
- hierarchical k-means with resampling against plain ``faiss.Kmeans`` with the same first-level k (the baseline);
- how balanced sampling flattens the concept distribution, against a uniform random sample (the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from curation.balance import balanced_sample, hierarchical_kmeans  # noqa: E402
from curation.config import ClusterRetrievalConfig, DedupConfig, IndexConfig  # noqa: E402
from curation.dedup import deduplicate  # noqa: E402
from curation.index import build_index, knn_search  # noqa: E402
from curation.retrieve import cluster_retrieval, fit_pool_clusters, sample_retrieval  # noqa: E402
from curation.storage import l2_normalize  # noqa: E402


def synthetic_pool(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-sized Gaussian concepts (the long tail a crawled pool has) with 2% near-copies appended."""
    rng = np.random.default_rng(seed)
    num_concepts = max(10, n // 100)
    weights = 1.0 / np.arange(1, num_concepts + 1)
    num_base = n - n // 50
    concept = rng.choice(num_concepts, num_base, p=weights / weights.sum())
    centres = l2_normalize(rng.normal(size=(num_concepts, dim)).astype(np.float32))
    # Per-dimension spread 2/sqrt(dim): two images of a concept sit around cosine 0.2 (each 0.45 from its centre),
    # below both dedup thresholds; planted copies sit around 0.98.
    base = l2_normalize(centres[concept] + (2.0 / np.sqrt(dim)) * rng.normal(size=(num_base, dim)).astype(np.float32))
    copied = rng.choice(num_base, n - num_base, replace=False)
    copies = l2_normalize(base[copied] + (0.15 / np.sqrt(dim)) * rng.normal(size=(len(copied), dim)).astype(np.float32))
    return np.concatenate([base, copies]), np.concatenate([concept, concept[copied]])


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - start, 3)


def bench_indexes(x: np.ndarray, num_queries: int, k: int = 10) -> dict:
    queries = x[np.random.default_rng(1).choice(len(x), num_queries, replace=False)]
    report: dict = {"queries": num_queries, "k": k}
    exact_index, build = timed(build_index, x, config=IndexConfig(kind="flat"))
    (_, exact), search = timed(knn_search, exact_index, queries, k)
    report["flat"] = {"build_s": build, "search_s": search}
    report["flat_all_pairs_estimate_s"] = round(search * len(x) / num_queries, 1)
    dim = x.shape[1]
    for kind in ("ivf_flat", "ivf_pq"):
        config = IndexConfig(kind=kind, nprobe=16, pq_bytes=dim // 8 if dim % 8 == 0 else dim)
        index, build = timed(build_index, x, config=config)
        (_, approx), search = timed(knn_search, index, queries, k)
        recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
        report[kind] = {
            "build_s": build,
            "search_s": search,
            f"recall@{k}": round(recall, 4),
            "speedup_vs_flat": round(report["flat"]["search_s"] / max(search, 1e-9), 1),
        }
    return report


def concept_stats(counts: np.ndarray) -> dict:
    present = counts[counts > 0]
    share = present / present.sum()
    entropy = float(-(share * np.log(share)).sum() / np.log(len(counts)))
    return {
        "max_over_min": round(float(counts.max() / max(counts.min(), 1)), 2),
        "normalised_entropy": round(entropy, 4),
        "concepts_present": int((counts > 0).sum()),
    }


def bench_steps(x: np.ndarray, concept: np.ndarray, *, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, report = len(x), {}
    eval_sets = l2_normalize(
        x[rng.choice(n, 200, replace=False)] + 0.02 * rng.normal(size=(200, x.shape[1])).astype(np.float32)
    )
    dedup, report["dedup_s"] = timed(deduplicate, x, eval_sets, config=DedupConfig(), seed=seed)
    report["dedup"] = dedup.summary()
    report["dedup_index"] = "ivf_flat" if n > IndexConfig().flat_max_size else "flat"
    pool = x[dedup.keep]
    queries = pool[rng.choice(len(pool), 500, replace=False)]
    found, report["retrieve_sample_s"] = timed(sample_retrieval, pool, queries, k=4, index_config=IndexConfig())
    report["retrieve_sample_selected"] = int(len(found.pool_rows))
    cluster_config = ClusterRetrievalConfig(num_clusters=max(10, len(pool) // 100), images_per_cluster=200)
    (centroids, labels), fit_s = timed(fit_pool_clusters, pool, config=cluster_config, gpu="auto", seed=seed)
    # Cluster-based retrieval serves small topical query sets: 20 images of the tenth most frequent concept.
    kept_concept = concept[dedup.keep]
    topic = np.argsort(-np.bincount(kept_concept))[9]
    topical = pool[kept_concept == topic][:20]
    by_cluster, select_s = timed(
        cluster_retrieval, labels, centroids, topical, config=cluster_config, gpu="auto", rng=rng
    )
    report["retrieve_cluster_s"] = round(fit_s + select_s, 3)
    report["retrieve_cluster_selected"] = int(len(by_cluster.pool_rows))
    return report, pool, kept_concept


def bench_balance(pool: np.ndarray, concept: np.ndarray, *, rounds: int, seed: int) -> dict:
    n, num_concepts = len(pool), int(concept.max()) + 1
    levels = (max(8, n // 100), max(4, n // 1000), max(2, n // 10000))
    hierarchy, hk_s = timed(
        hierarchical_kmeans,
        pool,
        levels=levels,
        resampling_rounds=rounds,
        resample_fraction=0.5,
        iterations=20,
        seed=seed,
    )
    target = n // 4
    chosen, sample_s = timed(balanced_sample, hierarchy, target, sampling="random", rng=np.random.default_rng(seed))
    baseline = faiss.Kmeans(pool.shape[1], levels[0], niter=20, seed=seed, spherical=True, max_points_per_centroid=256)
    _, faiss_s = timed(baseline.train, pool)
    uniform = np.random.default_rng(seed).choice(n, target, replace=False)
    return {
        "levels": list(levels),
        "resampling_rounds": rounds,
        "hierarchical_kmeans_s": hk_s,
        "faiss_kmeans_baseline_s": faiss_s,
        "faiss_kmeans_baseline_k": levels[0],
        "balanced_sample_s": sample_s,
        "target": target,
        "concepts_pool": concept_stats(np.bincount(concept, minlength=num_concepts)),
        "concepts_uniform_sample": concept_stats(np.bincount(concept[uniform], minlength=num_concepts)),
        "concepts_balanced_sample": concept_stats(np.bincount(concept[chosen], minlength=num_concepts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--quick", action="store_true", help="20k x 128, fewer queries and resampling rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, dim = (20_000, 128) if args.quick else (args.n, args.dim)
    start = time.perf_counter()
    x, concept = synthetic_pool(n, dim, args.seed)
    result: dict = {
        "n": n,
        "dim": dim,
        "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
    }
    result["knn"] = bench_indexes(x, 500 if args.quick else 2000)
    steps, pool, pool_concept = bench_steps(x, concept, seed=args.seed)
    result["steps"] = steps
    result["balance"] = bench_balance(pool, pool_concept, rounds=2 if args.quick else 3, seed=args.seed)
    result["steps"]["balance_s"] = round(
        result["balance"]["hierarchical_kmeans_s"] + result["balance"]["balanced_sample_s"], 3
    )
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
