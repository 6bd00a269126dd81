"""The one place curation talks to torch.distributed: numpy arrays in, numpy arrays out.

Every helper works in a single process without a process group (the identity, or a list of one), so each step has
one code path for 1 and N ranks. Collectives run on CPU tensors: gloo on CPU-only machines; on GPU machines the group
is ``cpu:gloo,cuda:nccl`` (the trainer's machinery), and these helpers use its gloo half, since what they move
(k x D sums, edge lists, selected rows) lives in host memory next to faiss.

Ownership: with ``n`` items and ``W`` ranks, rank ``r`` owns the contiguous range :func:`owned_range` (sizes differ
by at most one), so concatenating the ranks' parts in rank order gives the global order back.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_gather_arrays",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_arrays",
    "get_rank",
    "get_world_size",
    "global_offset",
    "is_distributed",
    "owned_range",
    "process_group",
]

from trainer.distributed import get_rank, get_world_size, is_distributed  # noqa: E402  (one definition)

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "DINO_CURATION_DIST_TIMEOUT_S"
"""Collective timeout in seconds (default 7200: a rank may wait at a barrier while slower ranks embed)."""


def owned_range(num_items: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Items ``[start, stop)`` owned by ``rank`` (default: this rank): contiguous, sizes differing by at most one."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


@contextlib.contextmanager
def process_group(*, world_size: int, rank: int) -> Iterator[None]:
    """Join the default process group for the duration (nothing with one rank, or when one already exists)."""
    if world_size <= 1 or dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "7200")))
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    logger.info("rank %d of %d joined the process group (%s)", rank, world_size, backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.uint64:
        array = array.view(np.int64)  # gloo has no uint64; the bits travel unchanged
    return torch.from_numpy(array.copy())


def _from_tensor(tensor: torch.Tensor, like: np.dtype) -> np.ndarray:
    out = tensor.numpy()
    if like == np.bool_:
        return out.astype(bool)
    if like == np.uint64:
        return out.view(np.uint64)
    return out


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Elementwise sum over ranks (a copy; the input is unchanged)."""
    array = np.asarray(array)
    if not is_distributed():
        return array.copy()
    tensor = _to_tensor(array)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return _from_tensor(tensor, array.dtype)


def all_reduce_max(array: np.ndarray) -> np.ndarray:
    """Elementwise maximum over ranks."""
    array = np.asarray(array)
    if not is_distributed():
        return array.copy()
    tensor = _to_tensor(array)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return _from_tensor(tensor, array.dtype)


def all_gather_arrays(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's array (same dtype and trailing shape, any length), in rank order."""
    array = np.asarray(array)
    if not is_distributed():
        return [array]
    world = dist.get_world_size()
    lengths = np.zeros(world, np.int64)
    lengths[dist.get_rank()] = len(array)
    lengths = all_reduce_sum(lengths)
    longest = int(lengths.max())
    padded = np.zeros((longest, *array.shape[1:]), array.dtype)
    padded[: len(array)] = array
    tensor = _to_tensor(padded)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return [_from_tensor(part, array.dtype)[: int(n)] for part, n in zip(parts, lengths, strict=True)]


def gather_arrays(array: np.ndarray, dst: int = 0) -> list[np.ndarray] | None:
    """Every rank's array (same dtype and trailing shape, any length) on ``dst`` in rank order; None elsewhere."""
    array = np.asarray(array)
    if not is_distributed():
        return [array]
    world, rank = dist.get_world_size(), dist.get_rank()
    lengths = np.zeros(world, np.int64)
    lengths[rank] = len(array)
    lengths = all_reduce_sum(lengths)
    padded = np.zeros((int(lengths.max()), *array.shape[1:]), array.dtype)
    padded[: len(array)] = array
    tensor = _to_tensor(padded)
    parts = [torch.empty_like(tensor) for _ in range(world)] if rank == dst else None
    dist.gather(tensor, parts, dst=dst)
    if parts is None:
        return None
    return [_from_tensor(part, array.dtype)[: int(n)] for part, n in zip(parts, lengths, strict=True)]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's (picklable, small) value, in rank order."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``src``'s (picklable) value on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def global_offset(num_local: int) -> tuple[int, int]:
    """``(offset, total)``: where this rank's ``num_local`` items start in the rank-ordered concatenation."""
    sizes = all_gather_object(int(num_local))
    rank = get_rank()
    return int(sum(sizes[:rank])), int(sum(sizes))
