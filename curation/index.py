"""faiss in one place: exact or approximate inner-product k-NN, spherical k-means, guarded GPU use.

All vectors are float32 and L2-normalised, so inner product = cosine similarity. Index choice by pool size
(:class:`curation.config.IndexConfig`): exact ``IndexFlatIP`` for small pools, IVF-Flat for medium, IVF-PQ for
paper-scale pools. GPU indexes have no ``range_search``: every caller does k-NN and thresholds afterwards.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import faiss
import numpy as np

from curation.config import IndexConfig
from trainer.config import ConfigError

__all__ = [
    "assign",
    "build_index",
    "choose_index_kind",
    "gpu_available",
    "kmeans",
    "knn_search",
    "to_device",
    "training_positions",
    "untrained_index",
]

logger = logging.getLogger(__name__)

Advance = Callable[[int], None]
"""Progress callback: called with the number of items just processed."""


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _use_gpu(mode: str, field: str) -> bool:
    if mode == "on" and not gpu_available():
        raise ConfigError(field, "on", "'auto' or 'off': this faiss build has no GPU support or sees no GPU")
    return mode == "on" or (mode == "auto" and gpu_available())


def choose_index_kind(num_vectors: int, config: IndexConfig) -> str:
    """``flat``, ``ivf_flat`` or ``ivf_pq`` for a database of ``num_vectors`` (``config.kind`` unless auto)."""
    if config.kind != "auto":
        return config.kind
    if num_vectors <= config.flat_max_size:
        return "flat"
    return "ivf_pq" if num_vectors >= config.ivf_pq_min_size else "ivf_flat"


def _nlist(num_vectors: int, config: IndexConfig) -> int:
    # faiss guideline: 4*sqrt(n) lists; faiss warns below 39 training points per list, so cap there.
    nlist = config.nlist or int(4 * math.sqrt(num_vectors))
    return max(1, min(nlist, num_vectors // 39))


def untrained_index(
    num_vectors: int, dim: int, *, config: IndexConfig, field: str = "index", seed: int = 0, kind: str | None = None
) -> faiss.Index:
    """An empty CPU inner-product index for a database of ``num_vectors`` (not yet trained when approximate)."""
    kind = kind or choose_index_kind(num_vectors, config)
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    nlist = _nlist(num_vectors, config)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % config.pq_bytes:
            raise ConfigError(f"{field}.pq_bytes", config.pq_bytes, f"a divisor of the embedding dimension {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.nprobe = min(config.nprobe, nlist)
    return index


def training_positions(num_vectors: int, index: faiss.Index, seed: int) -> np.ndarray | None:
    """Sorted rows of the database an approximate index trains on (256 per list), None when it needs none."""
    if index.is_trained:
        return None
    max_points = 256 * faiss.extract_index_ivf(index).nlist
    if num_vectors <= max_points:
        return np.arange(num_vectors, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_vectors, max_points, replace=False))


def to_device(index: faiss.Index, *, config: IndexConfig, field: str = "index") -> faiss.Index:
    """The index moved to the GPU(s) when ``config.gpu`` enables it."""
    return _to_gpus(index) if _use_gpu(config.gpu, f"{field}.gpu") else index


def build_index(
    database: np.ndarray, *, config: IndexConfig, field: str = "index", seed: int = 0, kind: str | None = None
) -> faiss.Index:
    """An inner-product index over ``database`` (trained if approximate), on the GPU(s) when enabled."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    num, dim = database.shape
    index = untrained_index(num, dim, config=config, field=field, seed=seed, kind=kind)
    rows = training_positions(num, index, seed)
    if rows is not None:
        index.train(database[rows])
    index = to_device(index, config=config, field=field)
    index.add(database)
    logger.debug("built %s index over %d x %d", kind, num, dim)
    return index


_GPU_RESOURCES: dict[int, object] = {}


def _to_gpus(index: faiss.Index) -> faiss.Index:
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # One torchrun rank per GPU (curation.launch): each rank's shard goes to its own GPU only.
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True
        device = int(os.environ.get("LOCAL_RANK", "0")) % faiss.get_num_gpus()
        resources = _GPU_RESOURCES.setdefault(device, faiss.StandardGpuResources())  # must outlive the index
        return faiss.index_cpu_to_gpu(resources, device, index, options)
    # Shard the database across GPUs (each holds 1/G of the vectors, queries fan out), fp16 storage for flat/IVF.
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


def knn_search(
    index: faiss.Index, queries: np.ndarray, k: int, *, batch_size: int = 16_384, advance: Advance | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities [nq, k] float32, ids [nq, k] int64)``; missing neighbours have id -1 and similarity -inf."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        sims[start:stop], ids[start:stop] = index.search(queries[start:stop], k)
        if advance is not None:
            advance(stop - start)
    sims[ids < 0] = -np.inf
    return sims, ids


def kmeans(
    x: np.ndarray,
    num_clusters: int,
    *,
    iterations: int,
    seed: int,
    init: np.ndarray | None = None,
    gpu: str = "auto",
    field: str = "kmeans",
) -> np.ndarray:
    """Spherical k-means centroids ``[num_clusters, D]`` (unit norm) of ``x``; ``init`` warm-starts it."""
    if num_clusters > len(x):
        raise ConfigError(f"{field}", num_clusters, f"at most the number of points to cluster ({len(x)})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        num_clusters,
        niter=iterations,
        seed=seed,
        spherical=True,
        gpu=_use_gpu(gpu, f"{field}.gpu"),
        # faiss subsamples to 256 points per centroid by default; keep that bound (it is the speed knob).
        max_points_per_centroid=256,
        verbose=False,
    )
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, np.float32))
    return km.centroids


def assign(
    x: np.ndarray, centroids: np.ndarray, *, gpu: str = "auto", batch_size: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (max inner product) of every row: ``(labels int64 [n], similarities float32 [n])``."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    if _use_gpu(gpu, "index.gpu"):
        index = _to_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, labels = knn_search(index, x, 1, batch_size=batch_size)
    return labels[:, 0], sims[:, 0]
