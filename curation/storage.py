"""Atomic files, done markers and embedding shards: what makes every curation step resumable.

A step's output exists only once its done marker does; the marker is written last (temp file + rename) and holds a
hash of the step's configuration and inputs, so a changed configuration or a changed upstream output reruns the
step, and a crash at any point leaves either the previous complete state or nothing.

Embedding shards: ``<dir>/part-00003-of-00008.npy`` (float16/float32 ``[n, D]``, L2-normalised rows) next to
``part-00003-of-00008.json`` (``{"source", "ids", "indices"}``; ``indices`` are row numbers inside the source).
Precomputed embeddings given as a source of kind ``embeddings`` use the same layout (see :func:`save_embeddings`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from trainer.storage import check_reachable, storage_errors

__all__ = [
    "EmbeddingShard",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npy",
    "hash_json",
    "l2_normalize",
    "read_shard_meta",
    "replace_directory",
    "list_embedding_shards",
    "load_embeddings",
    "publish_dataset",
    "read_marker",
    "save_embeddings",
    "shard_name",
    "write_marker",
]

MARKER_NAME = "DONE.json"


def hash_json(value: Any) -> str:
    """A stable sha256 of a JSON-able value (sorted keys, no whitespace)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, value: Any) -> None:
    """Pretty, key-sorted JSON written atomically (byte-identical for equal values)."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with tmp.open("wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_marker(directory: str | Path, *, step: str, config_hash: str, summary: dict[str, Any]) -> None:
    """Commit a step (or part) directory: the marker is the last file written."""
    atomic_write_json(Path(directory) / MARKER_NAME, {"step": step, "hash": config_hash, "summary": summary})


def read_marker(directory: str | Path, *, config_hash: str) -> dict[str, Any] | None:
    """The marker's content if the directory was committed with this hash, else None."""
    path = Path(directory) / MARKER_NAME
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return marker if marker.get("hash") == config_hash else None


def replace_directory(tmp: Path, final: Path) -> None:
    """Swap a fully written temporary directory into place (the old one, if any, is removed after)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def publish_dataset(dataset: Path, manifest: Path, remote: str, *, partitions: Sequence[str]) -> None:
    """Upload a merged MDS dataset to ``remote`` so that no reader ever sees half of it.

    ``index.json`` is what makes an MDS directory a dataset: the remote one is deleted first (unpublished), then
    every partition's files and ``manifest.json`` go up, and the merged ``index.json`` goes last. Partitions of an
    earlier publication that the new index does not name are removed once it is unpublished.
    """
    fs, root = fsspec.core.url_to_fs(remote)
    root = root.rstrip("/")
    with storage_errors(remote, fs):
        check_reachable(remote)
        index = f"{root}/index.json"
        try:
            fs.rm_file(index)
        except FileNotFoundError:
            pass
        fs.invalidate_cache()
        if fs.exists(root):
            for stale in fs.ls(root, detail=False):
                name = stale.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("part-") and name not in partitions:
                    fs.rm(stale, recursive=True)
        for name in partitions:
            for path in sorted((dataset / name).rglob("*")):
                if path.is_file() and path.name != MARKER_NAME:
                    fs.put_file(str(path), f"{root}/{path.relative_to(dataset).as_posix()}")
        fs.put_file(str(manifest), f"{root}/{manifest.name}")
        fs.put_file(str(dataset / "index.json"), index)


def shard_name(index: int, count: int) -> str:
    """``part-00003-of-00008``: the stem shared by a shard's files."""
    return f"part-{index:05d}-of-{count:05d}"


@dataclass(frozen=True, kw_only=True)
class EmbeddingShard:
    """One shard of a source's embeddings."""

    source: str
    ids: list[str]
    indices: np.ndarray
    """int64 row numbers inside the source."""
    embeddings: np.ndarray
    """``[len(ids), D]`` float16/float32."""


def save_embeddings(
    directory: str | Path,
    *,
    source: str,
    ids: Sequence[str],
    indices: np.ndarray,
    embeddings: np.ndarray,
    name: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one embedding shard (array first, metadata second: the ``.json`` commits the pair).

    ``extra`` keys (e.g. the hash of the configuration that produced it) are stored in the metadata."""
    if embeddings.ndim != 2 or len(embeddings) != len(ids) or len(indices) != len(ids):
        raise ValueError(f"shard {name}: {len(ids)} ids, {len(indices)} indices, embeddings {embeddings.shape}")
    directory = Path(directory)
    atomic_save_npy(directory / f"{name}.npy", embeddings)
    meta = {**(extra or {}), "source": source, "ids": list(ids), "indices": [int(i) for i in indices]}
    atomic_write_bytes(directory / f"{name}.json", json.dumps(meta).encode())


def read_shard_meta(stem: str | Path) -> dict[str, Any] | None:
    """A committed shard's metadata, or None when the shard is missing or half-written."""
    try:
        meta = json.loads(Path(f"{stem}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if Path(f"{stem}.npy").is_file() else None


def list_embedding_shards(directory: str | Path) -> list[Path]:
    """The committed shard stems (those with their ``.json``) of a directory, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"embedding directory {directory} does not exist")
    return sorted(p.with_suffix("") for p in directory.glob("part-*.json") if p.with_suffix(".npy").is_file())


def load_embeddings(stems: Sequence[str | Path]) -> EmbeddingShard:
    """Concatenate shards (in the given order) into float32, L2-normalised rows."""
    ids: list[str] = []
    indices, arrays = [], []
    source = ""
    for stem in stems:
        meta = json.loads(Path(f"{stem}.json").read_text())
        array = np.load(f"{stem}.npy", allow_pickle=False)
        if len(array) != len(meta["ids"]):
            raise ValueError(f"{stem}: {len(array)} embeddings but {len(meta['ids'])} ids")
        source = meta["source"]
        if not len(array):
            continue  # an empty shard (fewer rows than shards, or nothing decodable) has no dimension
        ids.extend(meta["ids"])
        indices.append(np.asarray(meta["indices"], dtype=np.int64))
        arrays.append(array)
    if not arrays:
        raise ValueError(f"no embeddings in shards {[str(s) for s in stems]}")
    embeddings = np.concatenate(arrays).astype(np.float32, copy=False)
    return EmbeddingShard(source=source, ids=ids, indices=np.concatenate(indices), embeddings=l2_normalize(embeddings))


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (cosine similarity = inner product), float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
