"""The selection steps (dedup, retrieve, balance): each narrows the list of global pool rows.

Each writes ``selected.npy`` (sorted global pool rows) plus its provenance arrays into a temporary directory that
is swapped into place with its done marker inside: the swap is the commit.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from curation.balance import balanced_sample, hierarchical_kmeans
from curation.config import SourceConfig
from curation.context import Context, step_directory
from curation.dedup import deduplicate
from curation.retrieve import cluster_retrieval, fit_pool_clusters, sample_retrieval
from curation.step_embed import load_pool, load_source_embeddings
from curation.storage import atomic_save_npy, replace_directory, write_marker

__all__ = ["run_balance", "run_dedup", "run_retrieve", "selection_inputs"]

logger = logging.getLogger(__name__)


def selection_inputs(step: str, upstream: str) -> Any:
    """Input description of a selection step: its config section and its upstream step's hash."""

    def inputs(context: Context) -> dict[str, Any]:
        section = getattr(context.spec, step).model_dump(mode="json")
        return {"config": section, "upstream": context.hashes[upstream]}

    return inputs


def _commit(context: Context, step: str, config_hash: str, arrays: dict[str, np.ndarray], summary: dict) -> None:
    final = step_directory(context.root, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    for name, array in arrays.items():
        atomic_save_npy(tmp / f"{name}.npy", array)
    write_marker(tmp, step=step, config_hash=config_hash, summary=summary)
    context.checkpoint(f"{step}:commit")
    replace_directory(tmp, final)


def load_array(context: Context, step: str, name: str) -> np.ndarray:
    """An array committed by a selection step."""
    return np.load(step_directory(context.root, step) / f"{name}.npy", allow_pickle=False)


def run_dedup(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Self-dedup the pool and drop components that touch an evaluation set."""
    spec = context.spec
    pool = load_pool(context)
    num = len(pool.ids)
    if spec.dedup.enabled:
        eval_sources = spec.sources_with_role("eval")
        eval_sets = (
            np.concatenate([load_source_embeddings(context, s).embeddings for s in eval_sources])
            if eval_sources
            else None
        )
        advance = context.reporter.task("dedup: k-NN over the pool", num)
        result = deduplicate(pool.embeddings, eval_sets, config=spec.dedup, seed=spec.seed, advance=advance)
        keep, component, summary = result.keep, result.component, result.summary()
    else:
        keep, component = np.ones(num, bool), np.arange(num, dtype=np.int64)
        summary = {"input": num, "kept": num, "enabled": False}
    arrays = {"selected": np.flatnonzero(keep).astype(np.int64), "component": component}
    _commit(context, "dedup", config_hash, arrays, summary)
    return "done", summary


def _retrieve_one(
    context: Context, source: SourceConfig, pool: np.ndarray, clusters: list, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(kept-pool positions, query rows or -1, retrieval clusters or -1)`` for one query set.

    ``clusters`` caches the pool's k-means (shared by every cluster-based query set) as ``[centroids, labels]``."""
    config, seed = context.spec.retrieve, context.spec.seed
    queries = load_source_embeddings(context, source).embeddings
    if source.retrieval == "sample":
        advance = context.reporter.task(f"retrieve: {source.name} (k={config.k})", len(queries))
        found = sample_retrieval(pool, queries, k=config.k, index_config=config.index, seed=seed, advance=advance)
        return found.pool_rows, found.query_rows, np.full(len(found.pool_rows), -1)
    if not clusters:
        context.reporter.task(f"retrieve: k-means of the pool ({config.cluster.num_clusters})", None)
        clusters.extend(fit_pool_clusters(pool, config=config.cluster, gpu=config.index.gpu, seed=seed))
    found = cluster_retrieval(clusters[1], clusters[0], queries, config=config.cluster, gpu=config.index.gpu, rng=rng)
    return found.pool_rows, np.full(len(found.pool_rows), -1), found.clusters


def run_retrieve(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Union of the images retrieved by every query set (a pass-through when there is none)."""
    kept = load_array(context, "dedup", "selected")
    query_sources = context.spec.sources_with_role("query")
    if not query_sources:
        summary = {"input": len(kept), "selected": len(kept), "query_sets": 0}
        none = np.full(len(kept), -1, np.int64)
        arrays = {"selected": kept, "query_set": none, "query_row": none, "cluster": none}
        _commit(context, "retrieve", config_hash, arrays, summary)
        return "done", summary
    pool = load_pool(context).embeddings[kept]
    summary: dict[str, Any] = {"input": len(kept)}
    parts, clusters, rng = [], [], np.random.default_rng(context.spec.seed)
    for set_index, source in enumerate(query_sources):
        rows, query_rows, cluster = _retrieve_one(context, source, pool, clusters, rng)
        summary[f"{source.name}.{source.retrieval}"] = len(rows)
        parts.append((rows, np.full(len(rows), set_index), query_rows, cluster))
    rows, set_ids, query_rows, cluster = (np.concatenate(col).astype(np.int64) for col in zip(*parts, strict=True))
    # A pool image retrieved by several query sets keeps the provenance of the first set (spec order).
    order = np.lexsort((set_ids, rows))
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
    arrays = {"selected": kept[rows[first]], "query_set": set_ids[first], "query_row": query_rows[first]}
    arrays["cluster"] = cluster[first]
    summary["selected"] = len(first)
    _commit(context, "retrieve", config_hash, arrays, summary)
    return "done", summary


def run_balance(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Hierarchical k-means with resampling over the candidates, then balanced sampling to the target size."""
    spec, config = context.spec, context.spec.balance
    candidates = load_array(context, "retrieve", "selected")
    if not config.enabled:
        summary = {"input": len(candidates), "selected": len(candidates), "enabled": False}
        arrays = {"selected": candidates, "clusters": np.zeros((len(candidates), 0), np.int64)}
        _commit(context, "balance", config_hash, arrays, summary)
        return "done", summary
    assert config.target_size is not None  # checked by the spec validation
    embeddings = load_pool(context).embeddings[candidates]
    context.reporter.task(f"balance: hierarchical k-means {list(config.levels)}", None)
    hierarchy = hierarchical_kmeans(
        embeddings,
        levels=config.levels,
        resampling_rounds=config.resampling_rounds,
        resample_fraction=config.resample_fraction,
        iterations=config.iterations,
        seed=spec.seed,
        gpu=config.index.gpu,
    )
    chosen = balanced_sample(
        hierarchy, config.target_size, sampling=config.sampling, rng=np.random.default_rng(spec.seed)
    )
    leaf_sizes = hierarchy.cluster_sizes()[0]
    chosen_sizes = np.bincount(hierarchy.labels[0][chosen], minlength=len(leaf_sizes))
    summary = {
        "input": len(candidates),
        "selected": len(chosen),
        "leaf_clusters": len(leaf_sizes),
        "largest_leaf_before": int(leaf_sizes.max()),
        "largest_leaf_after": int(chosen_sizes.max()),
    }
    arrays = {"selected": candidates[chosen], "clusters": hierarchy.point_clusters()[chosen]}
    _commit(context, "balance", config_hash, arrays, summary)
    return "done", summary
