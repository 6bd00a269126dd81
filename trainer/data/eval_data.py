"""Labelled evaluation images (``dino-ctl eval knn|linear``): resize, centre crop, normalise.

Sources: MDS shards following :mod:`trainer.data.contract` (a local directory or an object-store URI, read through
mosaicml-streaming) or an image folder (class sub-directories -> labels, as ``dino-ctl data prepare`` reads them).
Items are ``(image float [3, S, S], label int, sample id str)`` in a fixed order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from trainer.data.augment import BadImageError, decode_image
from trainer.data.colour import normalize_, uint8_to_float
from trainer.data.prepare import list_image_folder

__all__ = ["EvalDataset", "build_eval_dataset", "eval_transform"]

logger = logging.getLogger(__name__)

RESIZE_RATIO = 256 / 224  # resize the short side to S * 256/224, then centre-crop S (the usual ImageNet protocol)


def eval_transform(data: bytes | Image.Image, *, image_size: int) -> torch.Tensor:
    """Encoded image -> normalised float [3, S, S]: bicubic short-side resize, centre crop. Raises BadImageError."""
    image = decode_image(data)
    short = max(1, round(image_size * RESIZE_RATIO))
    width, height = image.size
    scale = short / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    return normalize_(uint8_to_float(pixels))[0]


class EvalDataset(Dataset):
    """Map-style dataset of ``(image, label, id)``; undecodable images become zeros (logged with their id)."""

    def __init__(self, records: Any, *, image_size: int) -> None:
        self.records, self.image_size = records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        sample_id, label, data = self.records[index]
        try:
            image = eval_transform(data, image_size=self.image_size)
        except BadImageError as exc:
            logger.warning("eval sample %s does not decode (%s): using a blank image", sample_id, exc)
            image = torch.zeros(3, self.image_size, self.image_size)
        return image, label, sample_id


class _FolderRecords:
    def __init__(self, root: Path) -> None:
        self.items, self.classes = list_image_folder(root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, int, bytes]:
        item = self.items[index]
        return item.sample_id, item.label, item.read()


class _MDSRecords:
    """Random access to MDS samples (streaming downloads remote shards on first access)."""

    def __init__(self, remote: str | None, local: str, split: str | None) -> None:
        from streaming import StreamingDataset

        self.dataset = StreamingDataset(remote=remote, local=local, split=split, batch_size=1, shuffle=False)

    def __len__(self) -> int:
        return self.dataset.num_samples

    def __getitem__(self, index: int) -> tuple[str, int, bytes]:
        sample = self.dataset.get_item(index)
        return str(sample["id"]), int(sample.get("label", -1)), sample["image"]


def _is_remote(path_or_uri: str) -> bool:
    return urlparse(path_or_uri).scheme not in ("", "file")


def build_eval_dataset(
    path_or_uri: str,
    *,
    image_size: int,
    split: str | None = None,
    format: Literal["auto", "mds", "folder"] = "auto",
    cache_dir: str = "/tmp/dino-ctl-cache",
) -> EvalDataset:
    """Evaluation dataset over MDS shards or an image folder.

    Args:
        path_or_uri: local directory, ``file://`` path, or object-store URI (MDS only).
        image_size: output side S (resize short side to S * 256/224, centre crop S).
        split: optional sub-directory (``train``/``test``...) of ``path_or_uri``.
        format: ``auto`` picks MDS when an ``index.json`` is present (or for any URI), else an image folder.
        cache_dir: where remote shards are downloaded.
    """
    if image_size <= 0:
        raise ValueError(f"image_size: invalid value {image_size!r}; allowed: a positive number of pixels")
    if format not in ("auto", "mds", "folder"):
        raise ValueError(f"format: invalid value {format!r}; allowed: auto, mds, folder")
    if _is_remote(path_or_uri):
        if format == "folder":
            raise ValueError(f"format: 'folder' cannot read {path_or_uri!r}; allowed for URIs: mds")
        digest = hashlib.sha1(path_or_uri.encode()).hexdigest()[:16]
        records: Any = _MDSRecords(path_or_uri, os.path.join(cache_dir, "eval", digest), split)
        return EvalDataset(records, image_size=image_size)
    root = Path(urlparse(path_or_uri).path if path_or_uri.startswith("file://") else path_or_uri)
    if not root.is_dir():
        raise FileNotFoundError(f"eval data: {str(root)!r} is not a directory; allowed: MDS shards or an image folder")
    is_mds = (root / (split or "") / "index.json").is_file()
    if format == "mds" or (format == "auto" and is_mds):
        records = _MDSRecords(None, str(root.resolve()), split)
    else:
        records = _FolderRecords(root / split if split else root)
    return EvalDataset(records, image_size=image_size)
