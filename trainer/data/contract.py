"""The MDS data contract shared by ``dino-ctl data prepare``, ``curation`` (writer side) and the trainer (reader side).

Columns (mosaicml-streaming encodings):

============  ========  ================================================================================
column        encoding  meaning
============  ========  ================================================================================
``id``        str       stable sample id, unique within a dataset (used for exact-resume checks, bad-data logs)
``image``     bytes     the ORIGINAL encoded file bytes (JPEG/PNG/...): never re-encoded (no generation loss,
                        content hashes stay valid)
``label``     int       optional class index (-1 when unknown); used by ``dino-ctl eval``
``source``    str       optional source dataset name
``provenance``json      optional dict written by curation (step, query id, component, cluster)
============  ========  ================================================================================

Torch-free: only the writer helper imports ``streaming`` (lazily).
"""

from __future__ import annotations

from typing import Any

__all__ = ["COLUMNS", "REQUIRED_COLUMNS", "open_writer", "make_sample"]

COLUMNS: dict[str, str] = {
    "id": "str",
    "image": "bytes",
    "label": "int",
    "source": "str",
    "provenance": "json",
}
REQUIRED_COLUMNS = ("id", "image")
DEFAULT_SHARD_SIZE = 1 << 26  # 64 MiB per shard


def make_sample(
    sample_id: str,
    image_bytes: bytes,
    *,
    label: int = -1,
    source: str = "",
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One MDS row following :data:`COLUMNS`."""
    if not isinstance(image_bytes, (bytes, bytearray)) or not image_bytes:
        raise ValueError(f"sample {sample_id!r}: image must be non-empty encoded bytes, got {type(image_bytes).__name__}")
    return {
        "id": str(sample_id),
        "image": bytes(image_bytes),
        "label": int(label),
        "source": source,
        "provenance": provenance or {},
    }


def open_writer(out: str, *, size_limit: int = DEFAULT_SHARD_SIZE, compression: str | None = None, **kwargs: Any):
    """An ``MDSWriter`` with the contract's columns. ``out`` is a local path, a URI, or ``(local, remote)``."""
    from streaming import MDSWriter

    return MDSWriter(out=out, columns=COLUMNS, size_limit=size_limit, compression=compression, **kwargs)
