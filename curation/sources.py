"""Image sources: random access by row number, so N workers can split a source by index range.

Row numbers are fixed by a deterministic listing (sorted relative paths for folders, line order for file lists,
index order for MDS datasets); every later step refers to images as ``(source, row)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from curation.config import SourceConfig
from curation.storage import hash_json, list_embedding_shards

__all__ = ["ImageRecord", "ImageSource", "open_source", "source_fingerprint", "shard_range"]


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One image: its id inside the source, the original encoded bytes and a label (-1 when unknown)."""

    id: str
    image: bytes
    label: int = -1


class ImageSource(Protocol):
    """Random-access images of one source."""

    name: str

    def __len__(self) -> int: ...

    def read(self, row: int) -> ImageRecord: ...


def shard_range(num_rows: int, shard_index: int, num_shards: int) -> range:
    """Rows ``[start, stop)`` of shard ``shard_index``: contiguous, sizes differing by at most one."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is outside [0, {num_shards})")
    return range(num_rows * shard_index // num_shards, num_rows * (shard_index + 1) // num_shards)


class _FileSource:
    """Images stored as files; ``ids`` are the paths as listed (relative to the folder or as written in the list)."""

    def __init__(self, name: str, paths: list[Path], ids: list[str]) -> None:
        self.name, self._paths, self.ids = name, paths, ids

    def __len__(self) -> int:
        return len(self._paths)

    def read(self, row: int) -> ImageRecord:
        return ImageRecord(id=self.ids[row], image=self._paths[row].read_bytes())

    def stats(self) -> list[tuple[str, int, int]]:
        out = []
        for path, sample_id in zip(self._paths, self.ids, strict=True):
            st = path.stat()
            out.append((sample_id, st.st_size, st.st_mtime_ns))
        return out


def _folder_source(config: SourceConfig) -> _FileSource:
    root = Path(config.path)
    if not root.is_dir():
        raise FileNotFoundError(f"source {config.name!r}: folder {root} does not exist")
    suffixes = {s.lower() for s in config.extensions}
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in suffixes)
    return _FileSource(config.name, [root / r for r in rel], rel)


def _filelist_source(config: SourceConfig) -> _FileSource:
    listing = Path(config.path)
    if not listing.is_file():
        raise FileNotFoundError(f"source {config.name!r}: file list {listing} does not exist")
    lines = [ln.strip() for ln in listing.read_text().splitlines()]
    ids = [ln for ln in lines if ln and not ln.startswith("#")]
    return _FileSource(config.name, [listing.parent / i for i in ids], ids)


class MDSSource:
    """A local MDS dataset (``index.json`` at the root, shards possibly in partition sub-directories)."""

    def __init__(self, name: str, root: str | Path) -> None:
        from streaming.base.format import reader_from_json

        self.name, self.root = name, Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"source {name!r}: {index_path} does not exist (not an MDS dataset)")
        self._index_text = index_path.read_text()
        shards = json.loads(self._index_text)["shards"]
        self._readers = [reader_from_json(str(self.root), None, shard) for shard in shards]
        self._starts = np.cumsum([0] + [r.samples for r in self._readers])
        self._cached: tuple[int, bytes] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def fingerprint(self) -> str:
        return hash_json(self._index_text)

    def _raw_sample(self, shard: int, local: int) -> bytes:
        reader = self._readers[shard]
        if (self.root / reader.raw_data.basename).is_file():
            return reader.get_sample_data(local)
        # Compressed-only shard: decompress it once and keep it while rows of the same shard are read.
        if self._cached is None or self._cached[0] != shard:
            from streaming.base.compression import decompress

            data = (self.root / reader.zip_data.basename).read_bytes()
            self._cached = (shard, decompress(reader.compression, data))
        data = self._cached[1]
        begin, end = np.frombuffer(data, np.uint32, count=2, offset=(1 + local) * 4)
        return data[begin:end]

    def sample(self, row: int) -> dict[str, Any]:
        """Every column of one row, decoded."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the {len(self)} samples of {self.root}")
        shard = int(np.searchsorted(self._starts, row, side="right") - 1)
        return self._readers[shard].decode_sample(self._raw_sample(shard, row - int(self._starts[shard])))

    def read(self, row: int) -> ImageRecord:
        sample = self.sample(row)
        return ImageRecord(id=str(sample["id"]), image=sample["image"], label=int(sample.get("label", -1)))


def open_source(config: SourceConfig) -> ImageSource:
    """Open an image source; sources of kind ``embeddings`` have no images and raise ValueError."""
    if config.kind == "folder":
        return _folder_source(config)
    if config.kind == "filelist":
        return _filelist_source(config)
    if config.kind == "mds":
        return MDSSource(config.name, config.path)
    raise ValueError(f"source {config.name!r} has kind {config.kind!r}: it holds embeddings, not images")


def source_fingerprint(config: SourceConfig) -> str:
    """A hash that changes when the source's content may have changed (listing, sizes, mtimes, MDS index)."""
    if config.kind == "embeddings":
        stems = list_embedding_shards(config.path)
        stats = []
        for stem in stems:
            for suffix in (".npy", ".json"):
                st = os.stat(f"{stem}{suffix}")
                stats.append((Path(f"{stem}{suffix}").name, st.st_size, st.st_mtime_ns))
        return hash_json(stats)
    source = open_source(config)
    if isinstance(source, MDSSource):
        return source.fingerprint()
    assert isinstance(source, _FileSource)
    return hash_json(source.stats())
