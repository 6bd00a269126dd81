"""Image descriptors for the embed step: a DINOv2 backbone (the real one) or a pixel thumbnail (a baseline).

Both return float32, L2-normalised rows, so cosine similarity is an inner product everywhere downstream.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from curation.config import EmbedConfig
from curation.sources import ImageSource
from curation.storage import l2_normalize
from trainer.config import config_from_dict

__all__ = ["EmbeddedBatch", "Embedder", "ThumbnailEmbedder", "BackboneEmbedder", "build_embedder"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class EmbeddedBatch:
    """Embeddings of the decodable images of a batch of rows (undecodable rows are left out and counted)."""

    rows: np.ndarray
    ids: list[str]
    embeddings: np.ndarray
    num_bad: int


class Embedder:
    """Base class: ``embed_rows`` yields one :class:`EmbeddedBatch` per ``batch_size`` rows, in row order."""

    batch_size: int

    def embed_rows(self, source: ImageSource, rows: Sequence[int]) -> Iterator[EmbeddedBatch]:
        raise NotImplementedError


def _decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class ThumbnailEmbedder(Embedder):
    """Centre-cropped ``size x size`` RGB thumbnail, mean-centred per image, L2-normalised.

    Invariant to brightness offsets and contrast scaling, close under small crops and re-encoding: enough to find
    planted copies in tests. It has no notion of semantics: use a backbone for real curation.
    """

    def __init__(self, *, size: int, batch_size: int) -> None:
        self.size, self.batch_size = size, batch_size

    def describe(self, data: bytes) -> np.ndarray:
        image = _decode_rgb(data)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).reshape(-1)
        return pixels - pixels.mean()

    def embed_rows(self, source: ImageSource, rows: Sequence[int]) -> Iterator[EmbeddedBatch]:
        for start in range(0, len(rows), self.batch_size):
            kept, ids, vectors, bad = [], [], [], 0
            for row in rows[start : start + self.batch_size]:
                record = source.read(row)
                try:
                    vectors.append(self.describe(record.image))
                except (OSError, ValueError) as exc:  # PIL raises these for truncated or unknown files
                    logger.warning(
                        "source %s row %d (%s): undecodable image skipped: %s", source.name, row, record.id, exc
                    )
                    bad += 1
                    continue
                kept.append(row)
                ids.append(record.id)
            dim = 3 * self.size * self.size
            matrix = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
            yield EmbeddedBatch(rows=np.asarray(kept, np.int64), ids=ids, embeddings=l2_normalize(matrix), num_bad=bad)


class _RowDataset:
    """torch map-style dataset over some rows of a source; decoding runs in DataLoader workers."""

    def __init__(self, source: ImageSource, rows: Sequence[int], transform: Callable[[Image.Image], Any]) -> None:
        self.source, self.rows, self.transform = source, list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, str, Any]:
        record = self.source.read(self.rows[i])
        try:
            return self.rows[i], record.id, self.transform(_decode_rgb(record.image))
        except (OSError, ValueError) as exc:
            logger.warning(
                "source %s row %d (%s): undecodable image skipped: %s", self.source.name, self.rows[i], record.id, exc
            )
            return self.rows[i], record.id, None


def _collate(items: list[tuple[int, str, Any]]) -> tuple[list[int], list[str], Any, int]:
    import torch

    good = [it for it in items if it[2] is not None]
    tensors = torch.stack([it[2] for it in good]) if good else None
    return [it[0] for it in good], [it[1] for it in good], tensors, len(items) - len(good)


class BackboneEmbedder(Embedder):
    """Normalised CLS token of a DINOv2 backbone (``trainer.models.build_backbone``) at ``image_size``."""

    def __init__(self, config: EmbedConfig) -> None:
        import torch
        from torchvision import transforms

        from trainer.models import build_backbone

        self.config, self.batch_size = config, config.batch_size
        model = config.model
        if isinstance(model, dict):
            model = config_from_dict({"model": model}).model
        want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("embed.device is 'cuda' but torch sees no CUDA device")
        self.device = torch.device("cuda" if want_cuda else "cpu")
        self.model = build_backbone(model, checkpoint=config.checkpoint).eval().to(self.device)
        # The DINOv2 evaluation transform: resize to 256/224 of the crop, centre crop, ImageNet normalisation.
        self.transform = transforms.Compose(
            [
                transforms.Resize(
                    round(config.image_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.CenterCrop(config.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def embed_rows(self, source: ImageSource, rows: Sequence[int]) -> Iterator[EmbeddedBatch]:
        import torch

        loader = torch.utils.data.DataLoader(
            _RowDataset(source, rows, self.transform),
            batch_size=self.batch_size,
            num_workers=self.config.num_workers,
            collate_fn=_collate,
        )
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for kept, ids, images, bad in loader:
            if images is None:
                yield EmbeddedBatch(
                    rows=np.zeros(0, np.int64), ids=[], embeddings=np.zeros((0, 0), np.float32), num_bad=bad
                )
                continue
            with torch.inference_mode(), autocast:
                features = self.model(images.to(self.device, non_blocking=True)).float()
            features = torch.nn.functional.normalize(features, dim=-1).cpu().numpy()
            yield EmbeddedBatch(rows=np.asarray(kept, np.int64), ids=ids, embeddings=features, num_bad=bad)


def build_embedder(config: EmbedConfig) -> Embedder:
    """The embedder named by ``embed.model`` (torch is imported only for backbones)."""
    if config.model == "thumbnail":
        return ThumbnailEmbedder(size=config.thumbnail_size, batch_size=config.batch_size)
    return BackboneEmbedder(config)
