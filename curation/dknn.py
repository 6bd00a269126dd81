"""Sharded k-NN over ranks: deduplication and sample-based retrieval past one machine.

Every rank indexes only its shard of the database (global positions ``[offset, offset + n_r)``). An approximate
index's coarse quantizer (and PQ codebook) is trained once, on rank 0, on the same training rows a single process
would draw, then broadcast, so every shard's index is a slice of the same global index. Queries are answered by all
shards: each batch of every rank's queries is all-gathered, searched against every shard, each shard's top-k sent
back to the queries' owner (``gather``), and merged there by (similarity descending, global id ascending).

What does not depend on the number of ranks: with an exact (flat) index the merged top-k is the global top-k, so the
k-NN graph, its thresholded edges, the union-find components and every dedup decision are identical for any rank
count (ties broken by global id). With IVF indexes the shards share one quantizer, so the lists probed are the same;
the result equals the single-process one except where faiss's per-shard top-k drops a tie.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from curation.config import DedupConfig, IndexConfig
from curation.dedup import DedupResult
from curation.distributed import (
    all_gather_arrays,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    gather_arrays,
    get_rank,
    get_world_size,
    global_offset,
)
from curation.graph import connected_components, knn_edges
from curation.index import Advance, build_index, knn_search, to_device, training_positions, untrained_index

__all__ = ["ShardIndex", "build_shard_index", "distributed_dedup", "merge_topk", "sharded_search"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ShardIndex:
    """This rank's index over its database shard; ``offset`` turns its ids into global positions."""

    index: faiss.Index
    offset: int
    total: int
    ivf: faiss.IndexIVF | None = None
    """The CPU IVF index (None for flat or GPU indexes): queries are coarse-quantized once, by their owner, and each
    shard scans the lists it was told (``search_preassigned``) instead of quantizing every query again."""


def build_shard_index(local: np.ndarray, *, config: IndexConfig, field: str, seed: int = 0) -> ShardIndex:
    """Index this rank's rows; the index kind and the training follow the GLOBAL size. Collective."""
    local = np.ascontiguousarray(local, dtype=np.float32)
    offset, total = global_offset(len(local))
    index = untrained_index(total, local.shape[1], config=config, field=field, seed=seed)
    rows = training_positions(total, index, seed)
    if rows is not None:
        lo, hi = np.searchsorted(rows, [offset, offset + len(local)])
        sample = np.concatenate(all_gather_arrays(local[rows[lo:hi] - offset]))
        trained = None
        if get_rank() == 0:
            index.train(sample)
            trained = faiss.serialize_index(index)
        index = faiss.deserialize_index(broadcast_object(trained))
    index = to_device(index, config=config, field=field)
    index.add(local)
    ivf = faiss.try_extract_index_ivf(index) if not hasattr(index, "getDevice") else None
    return ShardIndex(index=index, offset=offset, total=total, ivf=ivf)


def merge_topk(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` per row of candidates ``[nq, m]`` by similarity descending, ties by id ascending (missing last)."""
    by_id = np.argsort(np.where(ids < 0, np.iinfo(np.int64).max, ids), axis=1, kind="stable")
    sims, ids = np.take_along_axis(sims, by_id, 1), np.take_along_axis(ids, by_id, 1)
    by_sim = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, by_sim, 1), np.take_along_axis(ids, by_sim, 1)


def _search(
    shard: ShardIndex, queries: np.ndarray, k: int, probes: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    if shard.index.ntotal == 0 or len(queries) == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if probes is not None and shard.ivf is not None:
        sims, ids = shard.ivf.search_preassigned(queries, k, probes[1], probes[0])
    else:
        sims, ids = shard.index.search(queries, k)
    missing = ids < 0
    sims[missing] = -np.inf
    return sims, np.where(missing, -1, ids + shard.offset)


def _pack(sims: np.ndarray, ids: np.ndarray, min_similarity: float | None) -> np.ndarray:
    """``[m, 4]`` int64 rows (query, column, similarity bits, id) of the candidates worth sending."""
    keep = ids >= 0 if min_similarity is None else (ids >= 0) & (sims > min_similarity)
    query, column = np.nonzero(keep)
    return np.stack([query, column, sims[keep].view(np.int32).astype(np.int64), ids[keep]], axis=1)


def _unpack(parts: list[np.ndarray], num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``[num_queries, W * k]`` from every shard's packed rows (missing ones: id -1, similarity -inf)."""
    sims = np.full((num_queries, len(parts) * k), -np.inf, np.float32)
    ids = np.full((num_queries, len(parts) * k), -1, np.int64)
    for shard, rows in enumerate(parts):
        sims[rows[:, 0], shard * k + rows[:, 1]] = rows[:, 2].astype(np.int32).view(np.float32)
        ids[rows[:, 0], shard * k + rows[:, 1]] = rows[:, 3]
    return sims, ids


def sharded_search(
    shard: ShardIndex,
    queries: np.ndarray,
    k: int,
    *,
    batch_size: int = 16_384,
    advance: Advance | None = None,
    min_similarity: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities [nq, k], global ids [nq, k])`` of THIS rank's queries against every rank's shard. Collective:
    every rank calls it (with its own queries, possibly none).

    ``min_similarity``: only neighbours above it are sent back (and returned; the others are id -1). Deduplication
    only keeps edges above its threshold, and dropping what is below it commutes with the top-k merge (neighbours
    above a threshold are a prefix of the sorted list), so this changes no decision while the traffic falls from
    ``k`` results per query and shard to the few copies a query has."""
    world, rank = get_world_size(), get_rank()
    num_batches = int(all_reduce_max(np.array([-(-len(queries) // batch_size)]))[0])
    out_sims, out_ids = [], []
    for batch in range(num_batches):
        block = np.ascontiguousarray(queries[batch * batch_size : (batch + 1) * batch_size], dtype=np.float32)
        blocks = all_gather_arrays(block)
        probes = None
        if shard.ivf is not None:  # the owner's coarse quantization travels with its queries
            coarse_sims, coarse_lists = shard.ivf.quantizer.search(block, shard.ivf.nprobe)
            probes = (np.concatenate(all_gather_arrays(coarse_sims)), np.concatenate(all_gather_arrays(coarse_lists)))
        sims, ids = _search(shard, np.concatenate(blocks), k, probes)
        bounds = np.cumsum([0] + [len(b) for b in blocks])
        for owner in range(world):  # each shard's answers to `owner`'s queries go to `owner` only
            part = slice(bounds[owner], bounds[owner + 1])
            gathered = gather_arrays(_pack(sims[part], ids[part], min_similarity), dst=owner)
            if owner == rank:
                assert gathered is not None
                merged = merge_topk(*_unpack(gathered, len(blocks[owner]), k), k)
                out_sims.append(merged[0])
                out_ids.append(merged[1])
        if advance is not None:
            advance(len(block))
    if not out_sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(out_sims), np.concatenate(out_ids)


EdgeStore = Callable[[dict[str, np.ndarray] | None], dict[str, np.ndarray] | None]
"""``store(None)`` returns this rank's committed search results (or None); ``store(arrays)`` commits them."""


def distributed_dedup(
    local_pool: np.ndarray,
    eval_sets: np.ndarray | None,
    *,
    config: DedupConfig,
    seed: int = 0,
    advance: Advance | None = None,
    store: EdgeStore | None = None,
) -> DedupResult | None:
    """:func:`curation.dedup.deduplicate` over the pool sharded across ranks: the result on rank 0, None elsewhere.

    Each rank finds the k nearest neighbours of its own rows among all ranks' rows and keeps its edges above the
    thresholds and its rows near an evaluation image (committed through ``store``, so a restarted rank skips the
    search); rank 0 gathers the edge lists and runs the union-find over the global graph. Collective."""
    offset, total = global_offset(len(local_pool))
    with_eval = eval_sets is not None and len(eval_sets) > 0
    found = store(None) if store is not None else None
    missing = int(all_reduce_sum(np.array([found is None], np.int64))[0])
    if missing:
        # Every shard must answer the queries of the ranks that still search, so every rank builds its index; a
        # rank whose own search is committed sends no queries (it does not search again).
        shard = build_shard_index(local_pool, config=config.index, field="dedup.index", seed=seed)
        # k + 1: every image finds itself first; the self-match is dropped when building edges.
        graph_threshold = min(config.eval_threshold, config.threshold)
        queries = local_pool if found is None else local_pool[:0]
        sims, ids = sharded_search(shard, queries, config.k + 1, batch_size=config.index.batch_size,
                                   advance=advance, min_similarity=graph_threshold if with_eval else config.threshold)
    if found is None:
        positions = np.arange(offset, offset + len(local_pool), dtype=np.int64)
        found = {"edges": knn_edges(sims, ids, config.threshold, query_ids=positions)}
        found["eval_edges"] = knn_edges(sims, ids, graph_threshold, query_ids=positions) if with_eval else \
            np.zeros((0, 2), np.int64)
        found["direct"] = _near_eval(local_pool, eval_sets, config=config)[0] + offset if with_eval else \
            np.zeros(0, np.int64)
        if store is not None:
            store(found)
    gathered = {name: gather_arrays(np.asarray(found[name], np.int64), dst=0) for name in ("edges", "eval_edges",
                                                                                         "direct")}
    if get_rank() != 0:
        return None
    edges = np.concatenate(gathered["edges"]).reshape(-1, 2)
    component = connected_components(total, np.unique(edges, axis=0) if len(edges) else edges)
    keep = component == np.arange(total)
    eval_touched = np.zeros(total, bool)
    if with_eval:
        eval_edges = np.concatenate(gathered["eval_edges"]).reshape(-1, 2)
        eval_component = connected_components(total, np.unique(eval_edges, axis=0) if len(eval_edges) else eval_edges)
        touched = np.zeros(total, bool)
        touched[eval_component[np.concatenate(gathered["direct"])]] = True
        eval_touched = touched[eval_component]
        keep &= ~eval_touched
    return DedupResult(keep=keep, component=component, eval_touched=eval_touched)


def _near_eval(local_pool: np.ndarray, eval_sets: np.ndarray, *, config: DedupConfig) -> tuple[np.ndarray]:
    """Local rows whose nearest evaluation image is above ``eval_threshold`` (the evaluation sets are small and
    replicated: every rank indexes all of them)."""
    eval_index = build_index(eval_sets, config=config.index, field="dedup.index")
    nearest, _ = knn_search(eval_index, local_pool, 1, batch_size=config.index.batch_size)
    return (np.flatnonzero(nearest[:, 0] > config.eval_threshold),)
