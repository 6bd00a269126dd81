"""``dino-ctl data prepare``: images -> MDS shards following :mod:`trainer.data.contract`.

Sources:

- ``folder``: a directory; each sub-directory is a class (label = its index in sorted order) holding images at any
  depth; images directly in the root get label -1. Sample id = the path relative to the root (POSIX).
- ``list``: a text file with one image path per line, optionally ``<TAB>label``; relative paths are relative to the
  file. ``#`` starts a comment. Sample id = the path as written.
- ``fashion-mnist``: the gzipped idx files of the Debian ``dataset-fashion-mnist`` package; each 28x28 image is
  encoded as PNG (its "original" bytes). Sample id = ``fashion-mnist/<split>/<index>``.

The stored ``image`` is the file's bytes, never re-encoded. Output: a local directory, an object-store URI
(streaming's ``MDSWriter`` uploads the shards), or ``(local, remote)``. Same input, same shards.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import numpy as np
from PIL import Image

from trainer.data.contract import DEFAULT_SHARD_SIZE, make_sample, open_writer
from trainer.storage import check_reachable, storage_errors

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FORMATS",
    "PrepareResult",
    "SourceItem",
    "list_fashion_mnist",
    "list_image_file",
    "list_image_folder",
    "prepare_dataset",
    "prepare_fashion_mnist",
]

logger = logging.getLogger(__name__)

FORMATS = ("folder", "list", "fashion-mnist")
SPLITS = ("train", "test")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass(frozen=True)
class SourceItem:
    """One sample to write: its id, label, and how to get its encoded bytes."""

    sample_id: str
    label: int
    read: Callable[[], bytes]


@dataclass
class PrepareResult:
    """What ``prepare_dataset`` wrote."""

    out: str
    num_samples: int
    num_skipped: int = 0
    classes: list[str] = field(default_factory=list)
    skipped_ids: list[str] = field(default_factory=list)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_folder(root: str | os.PathLike) -> tuple[list[SourceItem], list[str]]:
    """Items of an image folder (class sub-directories -> labels) and the class names, in a fixed order."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"SOURCE: {str(root)!r} is not a directory; allowed: an image folder")
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [
        SourceItem(p.relative_to(root_path).as_posix(), -1, p.read_bytes)
        for p in sorted(root_path.iterdir())
        if _is_image(p)
    ]
    for label, name in enumerate(classes):
        for path in sorted((root_path / name).rglob("*")):
            if _is_image(path):
                items.append(SourceItem(path.relative_to(root_path).as_posix(), label, path.read_bytes))
    return items, classes


def list_image_file(list_path: str | os.PathLike) -> list[SourceItem]:
    """Items of a text file listing image paths (``path`` or ``path<TAB>label`` per line)."""
    base = Path(list_path).parent
    items = []
    for number, raw in enumerate(Path(list_path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, label_text = line.partition("\t")
        try:
            label = int(label_text) if label_text.strip() else -1
        except ValueError as exc:
            raise ValueError(f"{list_path}:{number}: label {label_text!r} is not an integer") from exc
        path = Path(name.strip())
        items.append(SourceItem(name.strip(), label, (path if path.is_absolute() else base / path).read_bytes))
    return items


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found, count = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic {found}, expected {magic}")
    if magic == 2051:  # images: count x rows x cols uint8
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    return np.frombuffer(data, dtype=np.uint8, offset=8)[:count]


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def list_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR, *, split: str = "train") -> list[SourceItem]:
    """Items of one Fashion-MNIST split (PNG-encoded on read)."""
    if split not in SPLITS:
        raise ValueError(f"--split: invalid value {split!r}; allowed: {', '.join(SPLITS)}")
    stem = _FASHION_MNIST_FILES[split]
    root_path = Path(root)
    images_path = root_path / f"{stem}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(
            f"SOURCE: no {images_path.name} in {str(root)!r}; allowed: the Fashion-MNIST idx directory "
            f"(apt-get install dataset-fashion-mnist puts it in {FASHION_MNIST_DIR})"
        )
    images = _read_idx(images_path, 2051)
    labels = _read_idx(root_path / f"{stem}-labels-idx1-ubyte.gz", 2049)
    return [
        SourceItem(f"fashion-mnist/{split}/{i:05d}", int(labels[i]), lambda i=i: _png_bytes(images[i]))
        for i in range(len(images))
    ]


def _writer_out(out: str | tuple[str, str]) -> str | tuple[str, str]:
    """Plain paths for ``file://`` URIs (streaming only uploads to object stores)."""
    if isinstance(out, tuple):
        return tuple(_writer_out(part) for part in out)  # type: ignore[return-value]
    parsed = urlparse(out)
    return parsed.path if parsed.scheme == "file" else out


def _unpublish_remote(out: str, *, overwrite: bool) -> None:
    """An object-store ``out`` that already holds a dataset: refused, or with ``overwrite`` its index.json deleted
    before any shard is replaced (streaming uploads shards over the old ones and never looks at the remote)."""
    if urlparse(out).scheme in ("", "file"):
        return  # the local directory: streaming's exist_ok check
    fs, root = fsspec.core.url_to_fs(out)
    index = f"{root.rstrip('/')}/index.json"
    if not fs.exists(index):
        return
    if not overwrite:
        raise FileExistsError(f"--out: {out} already holds an MDS dataset (index.json); allowed: a new location, or "
                              "--overwrite to replace it")
    logger.warning("replacing the dataset at %s: its index.json is removed first", out)
    fs.rm_file(index)


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # any decoder failure means "not a usable image"
        return False


def _source_items(source: str, format: str, split: str) -> tuple[list[SourceItem], list[str], str]:
    if format == "folder":
        items, classes = list_image_folder(source)
        return items, classes, Path(source).name
    if format == "list":
        return list_image_file(source), [], Path(source).stem
    if format == "fashion-mnist":
        return list_fashion_mnist(source, split=split), list(FASHION_MNIST_CLASSES), "fashion-mnist"
    raise ValueError(f"--format: invalid value {format!r}; allowed: {', '.join(FORMATS)}")


def _rows(items: list[SourceItem], *, source_name: str, verify: bool) -> Iterator[tuple[SourceItem, dict | None]]:
    """``(item, MDS row)`` per item; the row is None when ``verify`` is on and the image does not decode."""
    for item in items:
        data = item.read()
        if verify and not _decodes(data):
            yield item, None
            continue
        yield item, make_sample(item.sample_id, data, label=item.label, source=source_name)


def prepare_dataset(
    source: str,
    out: str | tuple[str, str],
    *,
    format: str = "folder",
    split: str = "train",
    limit: int | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    verify: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Write ``source`` as MDS shards to ``out``; ``progress(done, total)`` is called after every sample.

    ``limit`` keeps the first N samples (in the source's fixed order). ``verify`` decodes every image and skips
    (and reports) those that fail; by default bytes are copied as they are and the training loader replaces
    undecodable samples.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit: invalid value {limit!r}; allowed: a positive number of samples")
    items, classes, source_name = _source_items(source, format, split)
    items = items[:limit] if limit is not None else items
    if not items:
        allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"SOURCE: {source!r} holds no images; allowed extensions: {allowed}")
    result = PrepareResult(out=out if isinstance(out, str) else out[1], num_samples=0, classes=classes)
    check_reachable(result.out)  # before the first shard: a wrong bucket is reported as itself
    with storage_errors(result.out):
        _unpublish_remote(result.out, overwrite=overwrite)
    # index.json is written (uploaded) last: a failure before it leaves shards that no reader uses.
    with storage_errors(result.out), open_writer(_writer_out(out), size_limit=shard_size,
                                                 exist_ok=overwrite) as writer:
        for done, (item, row) in enumerate(_rows(items, source_name=source_name, verify=verify), start=1):
            if row is None:
                result.num_skipped += 1
                result.skipped_ids.append(item.sample_id)
                logger.warning("skipping %s: the image does not decode", item.sample_id)
            else:
                writer.write(row)
                result.num_samples += 1
            if progress is not None:
                progress(done, len(items))
    return result


def prepare_fashion_mnist(
    out: str | tuple[str, str],
    *,
    split: str = "train",
    limit: int | None = None,
    source: str = FASHION_MNIST_DIR,
    overwrite: bool = False,
) -> PrepareResult:
    """Fashion-MNIST ``split`` (first ``limit`` images) as MDS shards in ``out`` (used by the quickstart)."""
    return prepare_dataset(source, out, format="fashion-mnist", split=split, limit=limit, overwrite=overwrite)
