"""``data.streams`` -> mosaicml-streaming ``Stream`` objects and the training ``StreamingDataset``.

``import streaming`` imports torchvision and transformers (seconds): it happens inside the builders only, so the
synthetic dataset and the rest of the trainer never pay for it.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import fsspec

from trainer.config import ConfigError, DataConfig, StreamConfig
from trainer.storage import check_reachable, storage_errors

if TYPE_CHECKING:
    from trainer.data.positioned import PositionedStreamingDataset

__all__ = ["build_streaming_dataset", "build_streams", "resolve_stream_location"]


def resolve_stream_location(stream: StreamConfig, *, cache_dir: str, path: str) -> tuple[str | None, str]:
    """``(remote, local)`` for streaming's ``Stream``.

    A local directory (a plain path or ``file://``) is read in place: no remote, no copy. An object-store URI is
    downloaded into ``stream.local`` or, by default, into a per-URI directory under ``cache_dir``.
    """
    if stream.remote is None and stream.local is None:
        raise ConfigError(path, None, "a stream with `remote` (a path or object-store URI) and/or `local`")
    if stream.remote is None:
        return None, os.path.abspath(stream.local)
    parsed = urlparse(stream.remote)
    if parsed.scheme in ("", "file"):
        remote_dir = os.path.abspath(parsed.path if parsed.scheme else stream.remote)
        if stream.local is None or os.path.abspath(stream.local) == remote_dir:
            return None, remote_dir
        return remote_dir, os.path.abspath(stream.local)
    if stream.local is not None:
        return stream.remote, os.path.abspath(stream.local)
    digest = hashlib.sha1(stream.remote.encode()).hexdigest()[:16]
    return stream.remote, os.path.join(os.path.abspath(cache_dir), digest)


def _remote_index_exists(remote: str) -> bool:
    """Whether ``remote`` holds an MDS index; a bucket, credentials or endpoint problem raises StorageError (streaming
    itself would retry, then fail with a botocore traceback that names neither the stream nor the setting)."""
    fs, root = fsspec.core.url_to_fs(remote)
    with storage_errors(remote, fs):
        check_reachable(remote)
        return fs.exists(f"{root.rstrip('/')}/index.json")


def build_streams(data: DataConfig) -> list:
    """streaming ``Stream`` objects for ``data.streams`` (mixing by proportion, repeat or choose)."""
    from streaming import Stream

    streams = []
    for index, stream in enumerate(data.streams):
        path = f"data.streams[{index}]"
        weights = {k: getattr(stream, k) for k in ("proportion", "repeat", "choose") if getattr(stream, k) is not None}
        if len(weights) > 1:
            raise ConfigError(path, weights, "at most one of proportion, repeat, choose per stream")
        for key, value in weights.items():
            if value < 0 or (key == "proportion" and value == 0):
                raise ConfigError(f"{path}.{key}", value, "a positive number (proportion) or >= 0 (repeat, choose)")
        remote, local = resolve_stream_location(stream, cache_dir=data.cache_dir, path=path)
        if remote is None and not os.path.isfile(os.path.join(local, "index.json")):
            raise ConfigError(f"{path}.remote", stream.remote or stream.local, "a directory holding MDS index.json")
        if remote is not None and not _remote_index_exists(remote):
            raise ConfigError(f"{path}.remote", remote, "a directory holding MDS index.json")
        streams.append(Stream(remote=remote, local=local, **weights))
    return streams


def build_streaming_dataset(
    data: DataConfig, *, global_batch_size: int, share: range, seed: int, num_canonical_nodes: int
) -> PositionedStreamingDataset:
    """The training ``StreamingDataset`` of one rank over ``data.streams``: its ``share`` of every global batch of
    ``global_batch_size`` samples; shuffle seed ``seed``."""
    from trainer.data.positioned import PositionedStreamingDataset

    if seed < 0:
        raise ConfigError("seed", seed, "a non-negative integer (it is streaming's shuffle seed)")
    return PositionedStreamingDataset(
        streams=build_streams(data),
        global_batch_size=global_batch_size,
        share=share,
        shuffle=data.shuffle,
        shuffle_algo=data.shuffle_algo,
        shuffle_seed=seed,
        shuffle_block_size=data.shuffle_block_size,
        num_canonical_nodes=num_canonical_nodes,
    )
