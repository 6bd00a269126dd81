"""The selection steps (dedup, retrieve, balance): each narrows the list of global pool rows.

Every step runs on any number of ranks (one code path; a single process is one rank): rank r loads only the
embeddings of its contiguous share of the step's input rows (:func:`curation.distributed.owned_range`), the
algorithms exchange only what they must (:mod:`curation.dknn`, :mod:`curation.dkmeans`), and rank 0 gathers the
selected rows and commits ``selected.npy`` plus the provenance arrays into a temporary directory that is swapped
into place with its done marker inside: the swap is the commit.

Resumption inside a step: the expensive part of dedup (each rank's k-NN search) and of balance (each level's
k-means, retrieve's k-means of the pool) is committed under ``<output>/.work/<step>-<hash>/`` as it finishes, so a restarted group skips it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from curation.config import SourceConfig
from curation.context import Context, step_directory
from curation.distributed import all_reduce_sum, broadcast_object, gather_arrays, owned_range
from curation.dkmeans import balanced_selection, distributed_hierarchical_kmeans, distributed_kmeans
from curation.dknn import build_shard_index, distributed_dedup, sharded_search
from curation.index import assign
from curation.selection import random_keys, take_smallest_per_group
from curation.step_embed import load_pool_rows, load_source_embeddings, pool_size
from curation.storage import atomic_save_npy, replace_directory, write_marker

__all__ = ["load_array", "run_balance", "run_dedup", "run_retrieve", "selection_inputs", "work_directory"]

logger = logging.getLogger(__name__)


def selection_inputs(step: str, upstream: str) -> Any:
    """Input description of a selection step: its config section and its upstream step's hash."""

    def inputs(context: Context) -> dict[str, Any]:
        section = getattr(context.spec, step).model_dump(mode="json")
        return {"config": section, "upstream": context.hashes[upstream]}

    return inputs


def work_directory(context: Context, step: str, config_hash: str) -> Path:
    """Where a step commits its partial results (per rank or per level) until the step itself commits."""
    return context.root / ".work" / f"{step}-{config_hash[:16]}"


def _commit(context: Context, step: str, config_hash: str, arrays: dict[str, np.ndarray], summary: dict) -> dict:
    """Rank 0 commits the step; every rank gets rank 0's summary."""
    if context.rank == 0:
        final = step_directory(context.root, step)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        for name, array in arrays.items():
            atomic_save_npy(tmp / f"{name}.npy", array)
        write_marker(tmp, step=step, config_hash=config_hash, summary=summary)
        context.checkpoint(f"{step}:commit")
        replace_directory(tmp, final)
        shutil.rmtree(work_directory(context, step, config_hash), ignore_errors=True)
    return broadcast_object(summary)


def load_array(context: Context, step: str, name: str) -> np.ndarray:
    """An array committed by a selection step."""
    return np.load(step_directory(context.root, step) / f"{name}.npy", allow_pickle=False)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (FileNotFoundError, ValueError, OSError):
        return None


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _share(context: Context, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, embeddings)``: this rank's contiguous share of ``rows`` (global pool rows, sorted)."""
    mine = owned_range(len(rows), context.rank, context.world_size)
    return np.arange(mine.start, mine.stop, dtype=np.int64), load_pool_rows(context, rows[mine.start : mine.stop])


def run_dedup(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Self-dedup the pool and drop components that touch an evaluation set (sharded k-NN, global union-find)."""
    spec = context.spec
    num = pool_size(context)
    arrays: dict[str, np.ndarray] = {}
    if spec.dedup.enabled:
        _, local = _share(context, np.arange(num, dtype=np.int64))
        eval_sources = spec.sources_with_role("eval")
        eval_sets = (
            np.concatenate([load_source_embeddings(context, s).embeddings for s in eval_sources])
            if eval_sources
            else None
        )
        path = work_directory(context, "dedup", config_hash) / f"rank-{context.rank}-of-{context.world_size}.npz"

        def store(found: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
            if found is None:
                return _load_npz(path)
            _save_npz(path, found)
            context.checkpoint("dedup:searched")
            return found

        advance = context.reporter.task(f"dedup: k-NN of this rank's {len(local.rows)} images", len(local.rows))
        result = distributed_dedup(local.embeddings, eval_sets, config=spec.dedup, seed=spec.seed, advance=advance,
                                   store=store)
        summary = result.summary() if result is not None else {}
        if result is not None:
            arrays = {"selected": np.flatnonzero(result.keep).astype(np.int64), "component": result.component}
    else:
        arrays = {"selected": np.arange(num, dtype=np.int64), "component": np.arange(num, dtype=np.int64)}
        summary = {"input": num, "kept": num, "enabled": False}
    summary = _commit(context, "dedup", config_hash, arrays, summary)
    if context.rank == 0 and spec.dedup.enabled:
        context.metrics.duplicates_found("copy", summary["removed_copies"])
        context.metrics.duplicates_found("eval", summary["input"] - summary["removed_copies"] - summary["kept"])
    return "done", summary


def _sample_retrieval(context: Context, source: SourceConfig, shard, dim: int) -> tuple[np.ndarray, ...] | None:
    """Rank 0 owns the queries; every shard answers them; rank 0 keeps each pool row once, with its best query."""
    config = context.spec.retrieve
    queries = load_source_embeddings(context, source).embeddings if context.rank == 0 else np.zeros((0, dim), np.float32)
    advance = context.reporter.task(f"retrieve: {source.name} (k={config.k})", len(queries))
    sims, ids = sharded_search(shard, queries, config.k, batch_size=config.index.batch_size, advance=advance)
    if context.rank != 0:
        return None
    query_rows = np.repeat(np.arange(len(queries), dtype=np.int64), ids.shape[1])
    pool_rows, sims = ids.reshape(-1), sims.reshape(-1)
    valid = pool_rows >= 0
    pool_rows, query_rows, sims = pool_rows[valid], query_rows[valid], sims[valid]
    order = np.lexsort((query_rows, -sims, pool_rows))
    first = order[np.r_[True, pool_rows[order][1:] != pool_rows[order][:-1]]] if len(order) else order
    return pool_rows[first], query_rows[first], np.full(len(first), -1, np.int64)


def _cluster_retrieval(
    context: Context, source: SourceConfig, set_index: int, positions: np.ndarray, labels: np.ndarray,
    centroids: np.ndarray,
) -> tuple[np.ndarray, ...] | None:
    """Clusters holding more than ``min_queries`` queries give up to ``images_per_cluster`` images each (a seeded
    hash of the position picks them, globally), at most ``max_per_query_set`` per query set."""
    config, seed = context.spec.retrieve.cluster, context.spec.seed
    queries = load_source_embeddings(context, source).embeddings  # small, replicated
    query_labels, _ = assign(queries, centroids, gpu=context.spec.retrieve.index.gpu)
    selected = np.bincount(query_labels, minlength=len(centroids)) > config.min_queries
    quota = np.where(selected, config.images_per_cluster, 0)
    taken = take_smallest_per_group(labels, random_keys(positions, seed=seed, salt=2 * set_index + 2), quota)
    if int(all_reduce_sum(np.array([taken.sum()]))[0]) > config.max_per_query_set:
        groups = np.where(taken, 0, 1)
        cap = np.array([config.max_per_query_set, 0])
        taken &= take_smallest_per_group(groups, random_keys(positions, seed=seed, salt=2 * set_index + 3), cap)
    rows = gather_arrays(positions[taken])
    clusters = gather_arrays(labels[taken])
    if rows is None or clusters is None:
        return None
    return np.concatenate(rows), np.full(sum(len(r) for r in rows), -1, np.int64), np.concatenate(clusters)


def _pool_kmeans(context: Context, local: np.ndarray, config_hash: str) -> np.ndarray:
    """The k-means of the kept pool shared by every cluster-based query set, committed under ``.work`` so a
    restarted group does not fit it again (every rank takes rank 0's reading of the file: the fit is collective)."""
    config = context.spec.retrieve
    path = work_directory(context, "retrieve", config_hash) / "centroids.npy"
    centroids = broadcast_object(np.load(path) if context.rank == 0 and path.is_file() else None)
    if centroids is None:
        context.reporter.task(f"retrieve: k-means of the pool ({config.cluster.num_clusters})", None)
        centroids = distributed_kmeans(
            local, config.cluster.num_clusters, iterations=config.cluster.iterations, seed=context.spec.seed,
            gpu=config.index.gpu, field="retrieve.cluster.num_clusters",
            on_iteration=lambda it, inertia: context.metrics.kmeans_iteration("retrieve", it, inertia),
        )
        if context.rank == 0:
            atomic_save_npy(path, centroids)
        context.checkpoint("retrieve:kmeans")
    return centroids


def run_retrieve(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Union of the images retrieved by every query set (a pass-through when there is none)."""
    kept = load_array(context, "dedup", "selected")
    query_sources = context.spec.sources_with_role("query")
    if not query_sources:
        summary = {"input": len(kept), "selected": len(kept), "query_sets": 0}
        none = np.full(len(kept), -1, np.int64)
        arrays = {"selected": kept, "query_set": none, "query_row": none, "cluster": none}
        return "done", _commit(context, "retrieve", config_hash, arrays, summary)
    spec, config = context.spec, context.spec.retrieve
    positions, local = _share(context, kept)
    dim = local.embeddings.shape[1]
    summary: dict[str, Any] = {"input": len(kept)}
    parts, shard, clusters = [], None, None
    for set_index, source in enumerate(query_sources):
        if source.retrieval == "sample":
            shard = shard or build_shard_index(local.embeddings, config=config.index, field="retrieve.index",
                                               seed=spec.seed)
            found = _sample_retrieval(context, source, shard, dim)
        else:
            if clusters is None:
                centroids = _pool_kmeans(context, local.embeddings, config_hash)
                clusters = (centroids, assign(local.embeddings, centroids, gpu=config.index.gpu)[0])
            found = _cluster_retrieval(context, source, set_index, positions, clusters[1], clusters[0])
        if found is not None:
            summary[f"{source.name}.{source.retrieval}"] = len(found[0])
            parts.append((found[0], np.full(len(found[0]), set_index), found[1], found[2]))
    arrays: dict[str, np.ndarray] = {}
    if context.rank == 0:
        rows, set_ids, query_rows, cluster = (np.concatenate(col).astype(np.int64) for col in zip(*parts, strict=True))
        # A pool image retrieved by several query sets keeps the provenance of the first set (spec order).
        order = np.lexsort((set_ids, rows))
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
        arrays = {"selected": kept[rows[first]], "query_set": set_ids[first], "query_row": query_rows[first],
                  "cluster": cluster[first]}
        summary["selected"] = len(first)
    return "done", _commit(context, "retrieve", config_hash, arrays, summary)


def run_balance(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Hierarchical k-means with resampling over the candidates, then balanced sampling to the target size."""
    spec, config = context.spec, context.spec.balance
    candidates = load_array(context, "retrieve", "selected")
    if not config.enabled:
        summary = {"input": len(candidates), "selected": len(candidates), "enabled": False}
        arrays = {"selected": candidates, "clusters": np.zeros((len(candidates), 0), np.int64)}
        return "done", _commit(context, "balance", config_hash, arrays, summary)
    assert config.target_size is not None  # checked by the spec validation
    positions, local = _share(context, candidates)
    work = work_directory(context, "balance", config_hash)

    def store(level: int, fitted: np.ndarray | None) -> np.ndarray | None:
        path = work / f"level-{level + 1}.npy"
        if fitted is None:  # every rank takes rank 0's answer: level 1 is collective
            return broadcast_object(np.load(path) if context.rank == 0 and path.is_file() else None)
        if context.rank == 0:
            atomic_save_npy(path, fitted)
        context.checkpoint(f"balance:level-{level + 1}")
        return fitted

    context.reporter.task(f"balance: hierarchical k-means {list(config.levels)}", None)
    hierarchy = distributed_hierarchical_kmeans(
        local.embeddings, levels=config.levels, resampling_rounds=config.resampling_rounds,
        resample_fraction=config.resample_fraction, iterations=config.iterations, seed=spec.seed,
        gpu=config.index.gpu, store=store,
        on_iteration=lambda stage, it, inertia: context.metrics.kmeans_iteration(f"balance/{stage}", it, inertia),
    )
    mask = balanced_selection(hierarchy, positions, config.target_size, sampling=config.sampling, seed=spec.seed)
    chosen_sizes = all_reduce_sum(np.bincount(hierarchy.labels[0][mask], minlength=len(hierarchy.sizes[0])))
    chosen = gather_arrays(positions[mask])
    paths = gather_arrays(hierarchy.point_clusters()[mask])
    arrays, summary = {}, {}
    if chosen is not None and paths is not None:
        chosen_all = np.concatenate(chosen)
        arrays = {"selected": candidates[chosen_all], "clusters": np.concatenate(paths).astype(np.int64)}
        summary = {
            "input": len(candidates),
            "selected": len(chosen_all),
            "leaf_clusters": len(hierarchy.sizes[0]),
            "largest_leaf_before": int(hierarchy.sizes[0].max()),
            "largest_leaf_after": int(chosen_sizes.max()),
        }
    return "done", _commit(context, "balance", config_hash, arrays, summary)
