"""The write step: the selected images as an MDS dataset (``trainer/data/contract.py``) plus ``manifest.json``.

The selection is shuffled once with the spec's seed and cut into ``write.num_shards`` contiguous partitions; each
partition is written by one worker into ``dataset/part-<j>/`` (a temporary directory renamed when complete), and
whoever completes the last partition merges the partition indexes into ``dataset/index.json`` (mosaicml-streaming's
``merge_index``) and writes the manifest. Sample bytes are the original encoded files, never re-encoded. With
``write.remote`` the finished dataset is then published to an object store (:func:`curation.storage.publish_dataset`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.context import Context, step_directory
from curation.sources import ImageSource, open_source
from curation.distributed import barrier, broadcast_object
from curation.step_embed import PoolTable, load_pool_meta, load_source_embeddings
from curation.step_select import load_array
from curation.storage import atomic_write_json, publish_dataset, read_marker, replace_directory, write_marker
from trainer.data.contract import make_sample, open_writer

__all__ = ["run_write", "write_inputs"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def write_inputs(context: Context) -> dict[str, Any]:
    """The write config, the dataset name and the balance step's hash (which chains every earlier step)."""
    config = context.spec.write.model_dump(mode="json")
    if config.get("remote") is None:
        del config["remote"]  # specs without a remote keep the hashes (and the markers) they had
    return {"config": config, "name": context.spec.name, "upstream": context.hashes["balance"]}


@dataclass(frozen=True, kw_only=True)
class _Selection:
    """The final rows in write order with everything their provenance needs."""

    pool: PoolTable
    rows: np.ndarray
    component: np.ndarray
    retrieval: dict[str, np.ndarray]
    clusters: np.ndarray
    query_sets: list[str]
    query_ids: list[list[str]]


def _load_selection(context: Context) -> _Selection:
    selected = load_array(context, "balance", "selected")
    order = np.random.default_rng(context.spec.seed).permutation(len(selected))
    retrieved = load_array(context, "retrieve", "selected")
    position = np.searchsorted(retrieved, selected)  # retrieve's rows are sorted and contain balance's
    retrieval = {
        name: load_array(context, "retrieve", name)[position][order] for name in ("query_set", "query_row", "cluster")
    }
    query_sources = context.spec.sources_with_role("query")
    return _Selection(
        pool=load_pool_meta(context),
        rows=selected[order],
        component=load_array(context, "dedup", "component"),
        retrieval=retrieval,
        clusters=load_array(context, "balance", "clusters")[order],
        query_sets=[s.name for s in query_sources],
        query_ids=[load_source_embeddings(context, s).ids for s in query_sources],
    )


def _provenance(sel: _Selection, i: int, source: str) -> dict[str, Any]:
    row = int(sel.rows[i])
    set_index, query_row = int(sel.retrieval["query_set"][i]), int(sel.retrieval["query_row"][i])
    retrieval_cluster = int(sel.retrieval["cluster"][i])
    step = "dedup" if set_index < 0 else ("retrieve/sample" if query_row >= 0 else "retrieve/cluster")
    return {
        "source": source,
        "row": int(sel.pool.rows[row]),
        "step": step,
        "query_set": sel.query_sets[set_index] if set_index >= 0 else None,
        "query_id": sel.query_ids[set_index][query_row] if query_row >= 0 else None,
        "retrieval_cluster": retrieval_cluster if retrieval_cluster >= 0 else None,
        "component": int(sel.component[row]),
        "cluster": [int(c) for c in sel.clusters[i]],
    }


def _write_partition(
    context: Context, sel: _Selection, part: int, images: dict[str, ImageSource], config_hash: str
) -> None:
    config = context.spec.write
    positions = range(len(sel.rows) * part // config.num_shards, len(sel.rows) * (part + 1) // config.num_shards)
    final = step_directory(context.root, "write") / f"part-{part:05d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    advance = context.reporter.task(f"write {final.name}", len(positions))
    with open_writer(str(tmp), size_limit=config.size_limit, compression=config.compression) as writer:
        for i in positions:
            row = int(sel.rows[i])
            source = sel.pool.sources[sel.pool.source_of[row]]
            record = images[source].read(int(sel.pool.rows[row]))
            sample_id = f"{source}/{record.id}"
            writer.write(
                make_sample(
                    sample_id, record.image, label=record.label, source=source, provenance=_provenance(sel, i, source)
                )
            )
            advance(1)
    write_marker(tmp, step="write", config_hash=config_hash, summary={"samples": len(positions)})
    replace_directory(tmp, final)


@contextlib.contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    """merge_index warns on the root logger about its temporary folder and the existing output directory on every
    call; neither is actionable here, so keep them out of the command's output."""
    root, streaming_logger = logging.getLogger(), logging.getLogger("streaming")
    levels = root.level, streaming_logger.level
    root.setLevel(logging.ERROR)
    streaming_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(levels[0])
        streaming_logger.setLevel(levels[1])


def run_write(context: Context, config_hash: str) -> tuple[str, dict[str, Any]]:
    """Write this worker's missing partitions; merge and write the manifest once all exist."""
    from streaming.base.util import merge_index

    config, dataset = context.spec.write, step_directory(context.root, "write")
    if not config.enabled:  # e.g. a pool of precomputed embeddings: the selection arrays are the result
        summary = {"enabled": False}
        if context.rank == 0:
            write_marker(dataset, step="write", config_hash=config_hash, summary=summary)
        return "done", summary
    sel = _load_selection(context)
    images = {s.name: open_source(s) for s in context.spec.sources_with_role("pool")}
    parts = [dataset / f"part-{j:05d}" for j in range(config.num_shards)]
    for j in context.shards(config.num_shards, "write.num_shards"):
        if read_marker(parts[j], config_hash=config_hash) is None:
            _write_partition(context, sel, j, images, config_hash)
            context.metrics.shard("write", "computed")
            context.checkpoint(f"write:{parts[j].name}")
        else:
            context.metrics.shard("write", "reused")
    barrier()  # every rank's partitions are in place; rank 0 merges them into one dataset
    if context.rank != 0:
        return "done", broadcast_object(None)
    if any(read_marker(p, config_hash=config_hash) is None for p in parts):
        return "partial", broadcast_object({"partitions": f"{config.num_shards} expected, others still missing"})
    for stale in [*dataset.glob("part-*"), *dataset.glob(".part-*.tmp-*")]:
        if stale not in parts:
            shutil.rmtree(stale)  # partitions of an earlier, larger num_shards, or left by a crashed writer
    (dataset / "index.json").unlink(missing_ok=True)  # merge_index refuses to overwrite an earlier merge
    with _quiet_root_warnings():
        merge_index([str(p / "index.json") for p in parts], str(dataset))
    summary = {"samples": len(sel.rows), "partitions": config.num_shards}
    atomic_write_json(context.root / MANIFEST_NAME, _manifest(context, summary))
    if config.remote is not None:  # before the marker: a failed upload reruns the publication, not the dataset
        publish_dataset(dataset, context.root / MANIFEST_NAME, config.remote, partitions=[p.name for p in parts])
        summary["remote"] = config.remote
    write_marker(dataset, step="write", config_hash=config_hash, summary=summary)
    return "done", broadcast_object(summary)


def _manifest(context: Context, write_summary: dict[str, Any]) -> dict[str, Any]:
    """Counts per step and the hashes that identify this output; no timestamps, so reruns are byte-identical."""
    steps: dict[str, Any] = {}
    for step in ("embed", "dedup", "retrieve", "balance"):
        marker = read_marker(step_directory(context.root, step), config_hash=context.hashes[step])
        assert marker is not None  # the runner checked every upstream step
        steps[step] = {"hash": context.hashes[step], "summary": marker["summary"]}
    steps["write"] = {"hash": context.hashes["write"], "summary": write_summary}
    return {
        "name": context.spec.name,
        "seed": context.spec.seed,
        "dataset": "dataset",
        "samples": write_summary["samples"],
        "sources": {s.name: s.role for s in context.spec.sources},
        "steps": steps,
    }
