"""Helpers of the data tests: small encoded images, real MDS shards, tiny configs."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from trainer.config import TrainConfig, resolve_config
from trainer.data.contract import make_sample, open_writer
from trainer.data.synthetic import synthetic_image

__all__ = ["encode", "jpeg_bytes", "tiny_config", "write_mds"]


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_bytes(index: int, size: int = 40, *, quality: int = 90) -> bytes:
    """A natural-ish colour JPEG, different for every index."""
    return encode(synthetic_image(index, size, seed=7), "JPEG", quality=quality)


def write_mds(
    out: Path,
    ids: list[str],
    *,
    size: int = 40,
    labels: list[int] | None = None,
    images: dict[str, bytes] | None = None,
) -> Path:
    """MDS shards with one JPEG per id (``images`` replaces the bytes of some ids); small shards, several files."""
    images = images or {}
    with open_writer(str(out), size_limit=1 << 14) as writer:
        for index, sample_id in enumerate(ids):
            data = images.get(sample_id, jpeg_bytes(index, size))
            label = labels[index] if labels is not None else index % 3
            writer.write(make_sample(sample_id, data, label=label, source="test"))
    return out


def tiny_config(*, streams: list[dict] | None = None, **overrides) -> TrainConfig:
    """The ``tiny`` recipe (32 px global, 16 px local crops, patch 4) on MDS streams or synthetic data."""
    values = {"data.num_workers": 0, "data.num_canonical_nodes": 1, "optim.global_batch_size": 8}
    if streams is not None:
        values.update({"data.dataset": "mds", "data.streams": streams})
    values.update(overrides)
    return resolve_config("tiny", overrides=values)
