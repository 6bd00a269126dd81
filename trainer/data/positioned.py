"""A ``StreamingDataset`` that deals each global batch to the ranks in contiguous shares, and tags every sample with
its position in the epoch's global sample sequence.

Streaming lays an epoch out as one global sequence, fixed by the shuffle seed and ``num_canonical_nodes`` and not by
the world size; its own batching then gives every rank the same number of samples per step. dino-ctl cuts the
sequence into global batches of ``optim.global_batch_size`` = G samples and gives rank ``r`` of ``W`` the contiguous
share :func:`trainer.config.batch_share` of every batch (``ceil(G / W)`` or ``floor(G / W)`` samples), so any world
size up to G reads exactly the same samples per step. That layout is registered as a streaming batching method
(:data:`CONTIGUOUS_BATCHING`), so streaming's shard download-ahead, cache eviction and shared-memory plumbing work
unchanged: only the epoch's sample-id array differs. Each rank's batches are dealt round-robin to its DataLoader
workers, as streaming does.

The global sequence is streaming's ``random`` batching seen by one node with one rank and one worker: for any
physical node count that divides ``num_canonical_nodes`` it is the order streaming itself interleaves over the nodes,
so a run resumed from a checkpoint written before this layout existed sees the same samples in each global batch.

Each sample's position seeds its augmentation: a resumed or resized run draws the very same crops.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from streaming import StreamingDataset
from streaming.base import batching
from streaming.base.batching.random import generate_work_random_batching
from streaming.base.world import World
from torch.utils.data import get_worker_info

from trainer.config import split_sizes

__all__ = ["CONTIGUOUS_BATCHING", "PositionedStreamingDataset", "epoch_sequence"]

CONTIGUOUS_BATCHING = "dino_contiguous"
"""The streaming batching method of :class:`PositionedStreamingDataset` (registered at import)."""


def epoch_sequence(dataset: StreamingDataset, epoch: int, sample_in_epoch: int) -> np.ndarray:
    """Sample ids of the epoch's global sequence after the first ``sample_in_epoch`` (any world size sees these)."""
    one = World(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)
    ids = generate_work_random_batching(dataset, one, epoch, sample_in_epoch).reshape(-1)
    return ids[ids != -1]  # streaming pads the tail for its worker split


def contiguous_work(dataset: PositionedStreamingDataset, world: World, epoch: int, sample_in_epoch: int) -> np.ndarray:
    """The epoch's sample ids as streaming's work array ``[nodes, ranks per node, workers per rank, batches per
    worker, batch]``: whole global batches only (the ragged tail is skipped), rank ``r``'s contiguous share of each,
    its batches dealt round-robin to its workers; shorter shares are padded with -1 (streaming skips those)."""
    global_batch = dataset.global_batch_size
    num_ranks, workers = world.num_nodes * world.ranks_per_node, world.workers_per_rank
    sequence = epoch_sequence(dataset, epoch, sample_in_epoch)
    steps = len(sequence) // global_batch
    batches = sequence[: steps * global_batch].reshape(steps, global_batch)
    sizes = split_sizes(global_batch, num_ranks)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rounds, width = -(-steps // workers), max(sizes)
    work = np.full((num_ranks, rounds * workers, width), -1, dtype=np.int64)
    for rank, (start, size) in enumerate(zip(starts, sizes)):
        work[rank, :steps, :size] = batches[:, start : start + size]
    # batch t goes to worker t % workers as its (t // workers)-th batch
    work = work.reshape(num_ranks, rounds, workers, width).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(work).reshape(world.num_nodes, world.ranks_per_node, workers, rounds, width)


batching.batching_methods[CONTIGUOUS_BATCHING] = contiguous_work


class PositionedStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` of one rank's contiguous batch shares whose samples carry ``_epoch`` and ``_position``.

    Args:
        global_batch_size: samples per step over all ranks.
        share: this rank's offsets within each global batch (:func:`trainer.config.batch_share`); ``batch_size`` is
            its length.
        **kwargs: ``StreamingDataset`` arguments (``batching_method`` is this module's).

    The loader sets :attr:`epoch` and :attr:`sample_in_epoch` before each ``iter`` and writes the same values as
    streaming's resume state, so the positions describe the samples streaming actually yields.
    """

    epoch: int = 0
    sample_in_epoch: int = 0

    def __init__(self, *, global_batch_size: int, share: range, **kwargs: Any) -> None:
        super().__init__(batch_size=len(share), **kwargs)
        self.batching_method = CONTIGUOUS_BATCHING  # after __init__, which accepts only streaming's own names
        self.global_batch_size, self.share = global_batch_size, share

    def position_of(self, worker_sample: int, *, worker: int, num_workers: int) -> tuple[int, int]:
        """``(position in the epoch, offset in its global batch)`` of the ``worker_sample``-th sample yielded by
        DataLoader worker ``worker``."""
        batch_round, offset = divmod(worker_sample, len(self.share))
        step = batch_round * num_workers + worker
        batch_offset = self.share.start + offset
        return self.sample_in_epoch + step * self.global_batch_size + batch_offset, batch_offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for worker_sample, sample in enumerate(super().__iter__()):
            sample["_epoch"] = self.epoch
            sample["_position"], sample["_batch_offset"] = self.position_of(
                worker_sample, worker=worker, num_workers=num_workers
            )
            yield sample
