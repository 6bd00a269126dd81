"""A ``StreamingDataset`` whose samples know their position in the epoch's global sample sequence.

Streaming lays an epoch out as one global sequence, fixed by the shuffle seed and ``num_canonical_nodes`` and not by
the world size: after the ``sample_in_epoch`` samples already consumed, physical node ``n`` of ``P`` takes every
``P``-th sample, rank ``r`` of the node's ``R`` ranks every ``R``-th of those, and each rank's sequence is cut into
batches dealt round-robin to its DataLoader workers (padding, skipped when iterating, only at the tails).
:class:`PositionedStreamingDataset` inverts that layout to tag each sample with its global position, which seeds the
sample's augmentation: a resumed or resized run draws the very same crops.
"""

from __future__ import annotations

from typing import Any, Iterator

from streaming import StreamingDataset
from torch.utils.data import get_worker_info

__all__ = ["PositionedStreamingDataset"]


class PositionedStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose samples carry ``_epoch`` and ``_position`` (global position in the epoch).

    The loader sets :attr:`epoch` and :attr:`sample_in_epoch` before each ``iter`` and writes the same values as
    streaming's resume state, so the positions describe the samples streaming actually yields.
    """

    epoch: int = 0
    sample_in_epoch: int = 0

    def position_of(self, worker_sample: int, *, worker: int, num_workers: int) -> int:
        """Global position of the ``worker_sample``-th sample yielded by DataLoader worker ``worker``."""
        world = self._parallel_rank_world
        batch_round, offset = divmod(worker_sample, self.batch_size)
        rank_sample = (batch_round * num_workers + worker) * self.batch_size + offset
        node_sample = rank_sample * world.ranks_per_node + world.rank_of_node
        first = self.sample_in_epoch - self.sample_in_epoch % world.num_nodes  # streaming's drop_first rounding
        return first + node_sample * world.num_nodes + world.node

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for worker_sample, sample in enumerate(super().__iter__()):
            sample["_epoch"] = self.epoch
            sample["_position"] = self.position_of(worker_sample, worker=worker, num_workers=num_workers)
            yield sample
