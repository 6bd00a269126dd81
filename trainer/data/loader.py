"""The training data loader: streaming MDS (or synthetic) samples -> crop-major batches, resumable to the sample.

:func:`build_train_loader` returns a :class:`TrainLoader`: iterating it yields batches forever (epochs roll over);
``state_dict()`` is the global position reached (epoch, samples consumed in it, and what fixes the order) and
``load_state_dict()`` makes the next ``iter()`` continue exactly there, at any world size up to the global batch
(each rank reads its contiguous share of every global batch, :func:`trainer.config.batch_share`). The state counts
the samples of the batches handed to the caller, never those prefetched by workers, and it is the same on every
rank.

Why not ``StreamingDataLoader``: it counts a dict batch by the length of its first value and multiplies by the
world size; that works with ``sample_ids`` first, but it cannot roll epochs over or resume synthetic data. Here each
epoch's start is written into streaming's resume slot explicitly, so streaming and this loader never disagree.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from trainer.config import TrainConfig, batch_share
from trainer.data.collate import MultiCropCollate, finish_deferred_colour
from trainer.data.dataset import build_streaming_dataset
from trainer.data.synthetic import SyntheticDataset, synthetic_image_size
from trainer.data.workers import worker_init

__all__ = ["TrainLoader", "build_train_loader", "sync_world_env"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_stale_shm_cleaned = False


def sync_world_env(*, rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (what streaming reads) agree with the trainer's view.

    Unset variables are set (DataLoader workers inherit them); a variable that disagrees raises ValueError.
    """
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size or world_size % local_world_size:
        raise ValueError(
            f"rank {rank}, world_size {world_size}, local_rank {local_rank}, local_world_size {local_world_size}: "
            "allowed: 0 <= rank < world_size, 0 <= local_rank < local_world_size, world_size a multiple of "
            "local_world_size"
        )
    expected = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_world_size}
    for name, value in expected.items():
        current = os.environ.get(name)
        if current is None:
            os.environ[name] = str(value)
        elif current.strip() != str(value):
            raise ValueError(
                f"environment {name}={current!r} disagrees with {name.lower()}={value} given to the data loader; "
                "mosaicml-streaming reads the environment, so both must describe the same process"
            )


def _clean_stale_shared_memory_once() -> None:
    """Remove streaming's shared memory left by crashed runs (once per process, before any dataset exists)."""
    global _stale_shm_cleaned
    if not _stale_shm_cleaned:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        _stale_shm_cleaned = True


class TrainLoader:
    """Endless iterable of training batches with exact, world-size-independent resume.

    Args:
        dataset: a ``PositionedStreamingDataset`` or a :class:`SyntheticDataset` for this rank.
        collate: the batch builder (runs in the DataLoader workers).
        batch_size: this rank's share of each global batch (may differ by one image between ranks).
        global_batch_size: images per step over all ranks.
        num_workers / prefetch_factor: DataLoader settings.
        device: where deferred colour ops run (``gpu_augment``); None when the workers finish the crops.
        order: ``num_canonical_nodes``, ``shuffle_seed`` and ``initial_physical_nodes`` of a streaming dataset.
    """

    def __init__(
        self,
        *,
        dataset: IterableDataset,
        collate: MultiCropCollate,
        batch_size: int,
        global_batch_size: int,
        num_workers: int,
        prefetch_factor: int,
        device: torch.device | None,
        order: dict[str, Any] | None,
    ) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.global_batch_size = global_batch_size
        self.num_workers, self.prefetch_factor, self.device = num_workers, prefetch_factor, device
        self.order = dict(order) if order is not None else None
        self.kind = "mds" if order is not None else "synthetic"
        self.epoch = 0
        self.sample_in_epoch = 0
        """Global samples of the current epoch handed out (all ranks together)."""
        self.samples_seen = 0
        """Global samples handed out since the start of training."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position, identical on every rank."""
        state = {
            "version": STATE_VERSION,
            "dataset": self.kind,
            "epoch": self.epoch,
            "sample_in_epoch": self.sample_in_epoch,
            "samples_seen": self.samples_seen,
            "global_batch_size": self.global_batch_size,
        }
        if self.order is not None:
            state.update(self.order)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()`` (saved at any world size)."""
        if state.get("dataset") != self.kind:
            raise ValueError(
                f"loader state: dataset {state.get('dataset')!r} cannot resume a {self.kind!r} loader; "
                "allowed: a state saved by the same kind of dataset"
            )
        if state.get("global_batch_size") != self.global_batch_size:
            logger.warning(
                "loader state saved with global batch %s, resuming with %s: same sample order, other batch borders",
                state.get("global_batch_size"),
                self.global_batch_size,
            )
        self.epoch, self.sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        self.samples_seen = int(state["samples_seen"])
        if self.order is not None:
            for key in ("num_canonical_nodes", "shuffle_seed", "initial_physical_nodes"):
                if self.order.get(key) != state.get(key):
                    logger.info("loader state sets %s=%s (configured %s)", key, state.get(key), self.order.get(key))
                self.order[key] = state.get(key)

    def _prepare_pass(self) -> None:
        """Point the dataset at (epoch, sample_in_epoch) before a new DataLoader pass starts its workers."""
        if self.kind == "synthetic":
            self.dataset.start_sample = self.samples_seen
            return
        self.dataset.epoch, self.dataset.sample_in_epoch = self.epoch, self.sample_in_epoch
        # Streaming resumes from this slot only if it is not older than its own epoch counter, which its workers
        # advance at every pass: rewind the counter too, so a second iter() mid-epoch resumes rather than skipping.
        self.dataset.next_epoch = self.epoch
        self.dataset.load_state_dict({"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch, **self.order})

    def _pass(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            collate_fn=self.collate,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            pin_memory=self.device is not None and self.device.type == "cuda",
            drop_last=True,  # every rank steps on full, equal batches; the ragged epoch tail is skipped
            persistent_workers=False,  # workers must see each pass's start position
            worker_init_fn=worker_init if workers else None,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            self._prepare_pass()
            started_at = self.sample_in_epoch
            for batch in self._pass():
                self.sample_in_epoch += self.global_batch_size
                self.samples_seen += self.global_batch_size
                if self.device is not None:
                    batch = finish_deferred_colour(batch, self.device)
                yield batch
            if self.kind == "synthetic":
                raise RuntimeError("synthetic data ended")  # internal: the synthetic stream is endless
            if started_at == 0 and self.sample_in_epoch == 0:
                raise RuntimeError(
                    f"data: an epoch of {self.dataset.epoch_size} samples yields no full batch of "
                    f"{self.global_batch_size} over all ranks; use more data or a smaller batch"
                )
            logger.info("data epoch %d done after %d samples", self.epoch, self.sample_in_epoch)
            self.epoch, self.sample_in_epoch = self.epoch + 1, 0


def _deferred_device(config: TrainConfig, device: torch.device | str | None) -> torch.device | None:
    if not config.data.crops.gpu_augment:
        return None
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_train_loader(
    config: TrainConfig,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    seed: int,
    device: torch.device | str | None = None,
    clean_stale_shm: bool = True,
) -> TrainLoader:
    """The training loader of one rank: its contiguous share (:func:`trainer.config.batch_share`) of every global batch
    of ``optim.global_batch_size`` images, ``ceil`` or ``floor`` of the global batch over ``world_size``.

    Args:
        config: the stage config (``data``, ``optim.global_batch_size``, ``model.patch_size``).
        rank / world_size / local_rank / local_world_size: this process in the job; the streaming environment
            variables are set to match (or checked against) these.
        seed: augmentation, masking and shuffle seed.
        device: where ``gpu_augment`` runs the colour ops (default: the current CUDA device, else the CPU).
        clean_stale_shm: remove streaming shared memory left by crashed runs (once per process).
    """
    share = batch_share(config, world_size, rank)
    global_batch = config.optim.global_batch_size
    collate = MultiCropCollate.from_config(config, seed=seed)
    data = config.data
    common = dict(
        collate=collate,
        batch_size=len(share),
        global_batch_size=global_batch,
        num_workers=data.num_workers,
        prefetch_factor=data.prefetch_factor,
        device=_deferred_device(config, device),
    )
    if data.dataset == "synthetic":
        dataset = SyntheticDataset(
            image_size=synthetic_image_size(data.crops.global_size),
            global_batch_size=global_batch,
            share=share,
            seed=seed,
        )
        return TrainLoader(dataset=dataset, order=None, **common)

    sync_world_env(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size)
    if clean_stale_shm:
        _clean_stale_shared_memory_once()
    num_nodes = world_size // local_world_size
    num_canonical_nodes = data.num_canonical_nodes
    if num_canonical_nodes is None:
        num_canonical_nodes = num_nodes
        logger.warning(
            "data.num_canonical_nodes is not set: using %d (this run's node count); a run resumed on another "
            "number of nodes keeps it through the loader state, but set it explicitly for elastic jobs",
            num_nodes,
        )
    dataset = build_streaming_dataset(
        data, global_batch_size=global_batch, share=share, seed=seed, num_canonical_nodes=num_canonical_nodes
    )
    order = {"num_canonical_nodes": num_canonical_nodes, "shuffle_seed": seed, "initial_physical_nodes": num_nodes}
    return TrainLoader(dataset=dataset, order=order, **common)
