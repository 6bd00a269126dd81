"""The embed step: every image source split into ``embed.num_shards`` row ranges, one embedding shard each.

Shard files live in ``<output>/embed/<source>/part-<i>-of-<N>.{npy,json}``; the ``.json`` carries the hash of the
embed configuration and the source's fingerprint, so a shard is recomputed only when either changed. Sources of kind
``embeddings`` are read where they are. The step's marker is written once every shard of every source is present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.config import SourceConfig
from curation.context import Context, step_directory
from curation.distributed import barrier
from curation.embedders import Embedder, build_embedder
from curation.sources import open_source, shard_range, source_fingerprint
from curation.storage import (
    EmbeddingShard,
    l2_normalize,
    hash_json,
    list_embedding_shards,
    load_embeddings,
    read_shard_meta,
    save_embeddings,
    shard_name,
    write_marker,
)

__all__ = [
    "PoolRows",
    "PoolTable",
    "embed_inputs",
    "load_pool",
    "load_pool_meta",
    "load_pool_rows",
    "load_source_embeddings",
    "pool_size",
    "run_embed",
]

logger = logging.getLogger(__name__)


def _source_hash(context: Context, source: SourceConfig) -> str:
    embed = context.spec.embed.model_dump(mode="json", exclude={"num_workers"})  # workers do not change the output
    return hash_json({"embed": embed, "source": source.model_dump(mode="json"), "content": source_fingerprint(source)})


def embed_inputs(context: Context) -> dict[str, Any]:
    """What the embed step's output depends on: one hash per source, in spec order."""
    return {"sources": [_source_hash(context, s) for s in context.spec.sources]}


def _stem(context: Context, source: SourceConfig, shard: int) -> Path:
    num_shards = context.spec.embed.num_shards
    return step_directory(context.root, "embed") / source.name / shard_name(shard, num_shards)


def _embed_shard(context: Context, embedder: Embedder, source: SourceConfig, shard: int, part_hash: str) -> None:
    images = open_source(source)
    rows = shard_range(len(images), shard, context.spec.embed.num_shards)
    advance = context.reporter.task(
        f"embed {source.name} {shard_name(shard, context.spec.embed.num_shards)}", len(rows)
    )
    kept, ids, arrays, num_bad = [], [], [], 0
    for batch in embedder.embed_rows(images, rows):
        num_bad += batch.num_bad
        if len(batch.rows):
            kept.append(batch.rows)
            ids.extend(batch.ids)
            arrays.append(batch.embeddings)
        advance(len(batch.rows) + batch.num_bad)
        context.metrics.images_embedded(source.name, len(batch.rows))
    if not arrays and len(rows):
        logger.warning("source %s shard %d: none of its %d images could be decoded", source.name, shard, len(rows))
    dtype = np.dtype(context.spec.embed.dtype)
    save_embeddings(
        _stem(context, source, shard).parent,
        source=source.name,
        ids=ids,
        indices=np.concatenate(kept) if kept else np.zeros(0, np.int64),
        embeddings=np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, 0), dtype),
        name=shard_name(shard, context.spec.embed.num_shards),
        extra={"hash": part_hash, "num_bad": num_bad, "num_rows": len(rows)},
    )


def run_embed(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Compute this worker's missing shards (rank r of W: shards r, r+W, ...); commit the step when every shard
    exists (rank 0 writes the marker once every rank is past its shards)."""
    spec = context.spec
    embedder: Embedder | None = None
    image_sources = [s for s in spec.sources if s.kind != "embeddings"]
    for source in image_sources:
        part_hash = _source_hash(context, source)
        for shard in context.shards(spec.embed.num_shards, "embed.num_shards"):
            meta = read_shard_meta(_stem(context, source, shard))
            if meta is not None and meta.get("hash") == part_hash:
                context.metrics.shard("embed", "reused")
                continue
            embedder = embedder or build_embedder(spec.embed)  # loads the backbone only when there is work
            _embed_shard(context, embedder, source, shard, part_hash)
            context.metrics.shard("embed", "computed")
            context.checkpoint(f"embed:{source.name}:{shard_name(shard, spec.embed.num_shards)}")
    barrier()
    summary: dict[str, Any] = {}
    for source in image_sources:
        part_hash = _source_hash(context, source)
        metas = [read_shard_meta(_stem(context, source, i)) for i in range(spec.embed.num_shards)]
        if any(m is None or m.get("hash") != part_hash for m in metas):
            return "partial", {"shards_done": "this worker's shards", "waiting_for": "other shards"}
        summary[f"{source.name}.embedded"] = sum(len(m["ids"]) for m in metas)
        summary[f"{source.name}.undecodable"] = sum(m["num_bad"] for m in metas)
    for source in spec.sources:
        if source.kind == "embeddings":
            summary[f"{source.name}.precomputed"] = len(load_source_embeddings(context, source).ids)
    if context.rank == 0:
        write_marker(step_directory(context.root, "embed"), step="embed", config_hash=config_hash, summary=summary)
    return "done", summary


def load_source_embeddings(context: Context, source: SourceConfig) -> EmbeddingShard:
    """All embeddings of one source (float32, L2-normalised), in row order."""
    if source.kind == "embeddings":
        return load_embeddings(list_embedding_shards(source.path))
    return load_embeddings([_stem(context, source, i) for i in range(context.spec.embed.num_shards)])


@dataclass(frozen=True, kw_only=True)
class PoolTable:
    """The pool: every pool source's embeddings concatenated in spec order (position = global pool row)."""

    sources: list[str]
    source_of: np.ndarray
    """int32 ``[n]`` index into ``sources``."""
    rows: np.ndarray
    """int64 ``[n]`` row inside its source (what :meth:`ImageSource.read` takes)."""
    ids: list[str]
    embeddings: np.ndarray | None
    """None from :func:`load_pool_meta`."""


def load_pool_meta(context: Context) -> PoolTable:
    """The pool's sources, rows and ids without the embeddings (what the write step needs)."""
    pool_sources = context.spec.sources_with_role("pool")
    names, source_of, rows, ids = [], [], [], []
    for i, source in enumerate(pool_sources):
        names.append(source.name)
        for stem in _source_stems(context, source):
            meta = read_shard_meta(stem)
            if meta is None:
                raise FileNotFoundError(f"embedding shard {stem} is missing")
            ids.extend(meta["ids"])
            rows.append(np.asarray(meta["indices"], dtype=np.int64))
            source_of.append(np.full(len(meta["ids"]), i, np.int32))
    return PoolTable(sources=names, source_of=np.concatenate(source_of), rows=np.concatenate(rows), ids=ids,
                     embeddings=None)


def load_pool(context: Context) -> PoolTable:
    """Concatenate the pool sources' embeddings."""
    pool_sources = context.spec.sources_with_role("pool")
    shards = [load_source_embeddings(context, s) for s in pool_sources]
    dims = {s.embeddings.shape[1] for s in shards}
    if len(dims) != 1:
        raise ValueError(f"pool sources have different embedding dimensions: {sorted(dims)}")
    return PoolTable(
        sources=[s.name for s in pool_sources],
        source_of=np.concatenate([np.full(len(s.ids), i, np.int32) for i, s in enumerate(shards)]),
        rows=np.concatenate([s.indices for s in shards]),
        ids=[i for s in shards for i in s.ids],
        embeddings=np.concatenate([s.embeddings for s in shards]),
    )


def _source_stems(context: Context, source: SourceConfig) -> list[Path]:
    if source.kind == "embeddings":
        return list_embedding_shards(source.path)
    return [_stem(context, source, i) for i in range(context.spec.embed.num_shards)]


def _pool_files(context: Context) -> list[tuple[Path, int, int]]:
    """``(stem, first global pool row, rows)`` of every non-empty pool shard, in global row order."""
    files, start = [], 0
    for source in context.spec.sources_with_role("pool"):
        for stem in _source_stems(context, source):
            count = len(np.load(f"{stem}.npy", mmap_mode="r", allow_pickle=False))
            if count:
                files.append((stem, start, count))
                start += count
    return files


def pool_size(context: Context) -> int:
    """Number of pool rows (every pool source's embeddings, in spec order)."""
    return sum(count for _, _, count in _pool_files(context))


@dataclass(frozen=True, kw_only=True)
class PoolRows:
    """Some global pool rows and their embeddings (float32, L2-normalised)."""

    rows: np.ndarray
    embeddings: np.ndarray


def load_pool_rows(context: Context, rows: np.ndarray) -> PoolRows:
    """The embeddings of the given global pool rows (sorted ascending), read through memory maps: a rank reads only
    the rows it owns, never the whole pool."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    dim = 0
    for stem, start, count in _pool_files(context):
        array = np.load(f"{stem}.npy", mmap_mode="r", allow_pickle=False)
        dim = array.shape[1]
        lo, hi = np.searchsorted(rows, [start, start + count])
        if hi > lo:
            parts.append(np.asarray(array[rows[lo:hi] - start], dtype=np.float32))
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    if len(embeddings) != len(rows):
        raise ValueError(f"{len(rows)} pool rows asked, {len(embeddings)} found (rows outside the pool)")
    return PoolRows(rows=rows, embeddings=l2_normalize(embeddings))
