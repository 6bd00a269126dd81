"""Sharded training checkpoints with atomic publication (torch.distributed.checkpoint, DCP).

The directory layout is :mod:`trainer.layout`'s. What a ``state`` dict passed to :meth:`CheckpointManager.save` may
hold, and where each kind goes:

- ``nn.Module``: its model state dict (``get_model_state_dict``: DTensor shards under FSDP2) in the DCP files, keyed
  ``<key>.<parameter name>``; resharded on load, so a checkpoint loads at any world size.
- ``torch.optim.Optimizer`` (paired with the module of ``state`` that holds its parameters) or an explicit
  :class:`OptimizerState` ``(model, optimizer)``: the optimiser state keyed by parameter name
  (``get_optimizer_state_dict``), in the DCP files; resharded like the model.
- anything else (an object with ``state_dict()``/``load_state_dict()``, or a plain dict loaded in place): per-rank,
  non-tensor state in ``extra-rank%05d.json`` (data-loader position, RNG, counters). It must be JSON-serialisable
  (NumPy/torch scalars are converted).

Loading extras at another world size: every rank reads **rank 0's** file. The data loader's state is a global
sample position (identical on all ranks), counters are replicated, and :class:`trainer.rng.RNGState` notices that it
got another rank's state and reseeds distinctly per rank. At the same world size each rank reads its own file, which
makes resumes bit-exact.

Publication: all ranks write into ``ckpt-XXXXXXXXX/``; after every rank finished (a barrier) rank 0 writes
``COMPLETE.json`` last (temp file + rename on a local filesystem, a single PUT on an object store). A directory
without the marker is an interrupted write: resume ignores it, and saving that iteration again removes it first.
Retention unpublishes first: it deletes a checkpoint's marker, alone, before any of its data, so a kill in the
middle of pruning leaves an interrupted write, never a marker beside missing data.

Object stores (s3://, gs://): every rank checks at construction that the bucket exists and the credentials work
(:func:`trainer.storage.check_reachable`), no directory is ever "created" (s3fs would create a missing bucket),
and storage failures surface as one :class:`trainer.storage.StorageError` naming the URI.

Collectives run on a private gloo group created by the constructor (collective: every rank constructs the manager),
so async saves do not interleave with training collectives and CPU-side coordination works under NCCL as well.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer import layout, storage
from trainer.config import CheckpointConfig, ConfigError
from trainer.storage import storage_errors

__all__ = [
    "CheckpointManager",
    "OptimizerState",
    "load_model_weights",
    "resolve_checkpoint",
]

logger = logging.getLogger(__name__)

# Keys of COMPLETE.json written by the manager; user ``meta`` may not reuse them.
_RESERVED_META = ("iteration", "world_size", "time", "save_seconds")
# DCP warns on every save/load without a process group (also from async saves' threads, where a scoped
# catch_warnings is not thread-safe); one process is a supported mode here, so the warning is noise.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized", module="torch.distributed"
)
# An object store's PUT is durable when it returns; there is nothing to fsync (DCP warns once per file on s3://).
warnings.filterwarnings("ignore", message="fsync not supported for this stream", module="torch.distributed")


class OptimizerState(Stateful):
    """An optimiser paired with the model whose parameters it updates, checkpointed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Not strict: a parameter that never had a gradient (a mask token without masking, prototypes still
        # frozen) has no saved state and must get none now, as in the run that saved it.
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=StateDictOptions(strict=False))

    def drop_unsaved(self, state_dict: dict[str, Any], saved_keys: set[str], *, prefix: str) -> None:
        """Remove from a load target the parameters whose state the checkpoint (flat DCP keys) does not hold."""
        per_param = state_dict["state"]
        for name in list(per_param):
            if any(f"{prefix}.state.{name}.{field}" not in saved_keys for field in per_param[name]):
                del per_param[name]


class _ModelState(Stateful):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict)


def _owner(optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module], key: str) -> nn.Module:
    """The module of ``state`` that holds every parameter ``optimizer`` updates (its state is keyed by their names)."""
    wanted = {id(param) for group in optimizer.param_groups for param in group["params"]}
    for module in modules.values():
        if wanted <= {id(param) for param in module.parameters()}:
            return module
    raise TypeError(
        f"state[{key!r}]: no nn.Module in the state holds all of this optimizer's parameters; add that module to "
        "the state or pass OptimizerState(model, optimizer)"
    )


def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, Stateful], dict[str, Any]]:
    """(sharded DCP entries, per-rank extras) of a ``state`` dict; see the module docstring."""
    modules = {key: value for key, value in state.items() if isinstance(value, nn.Module)}
    sharded: dict[str, Stateful] = {}
    extras: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            sharded[key] = _ModelState(value)
        elif isinstance(value, OptimizerState):
            sharded[key] = value
        elif isinstance(value, torch.optim.Optimizer):
            sharded[key] = OptimizerState(_owner(value, modules, key), value)
        elif isinstance(value, dict) or (hasattr(value, "state_dict") and hasattr(value, "load_state_dict")):
            extras[key] = value
        else:
            raise TypeError(
                f"state[{key!r}]: unsupported type {type(value).__name__}; allowed: nn.Module, torch.optim.Optimizer, "
                "OptimizerState, a dict, or an object with state_dict()/load_state_dict()"
            )
    return sharded, extras


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # NumPy and 0-d torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _extras_json(extras: Mapping[str, Any]) -> str:
    payload = {key: value if isinstance(value, dict) else value.state_dict() for key, value in extras.items()}
    try:
        return json.dumps(payload, default=_json_default)
    except TypeError as error:
        raise TypeError(f"state: per-rank entries {sorted(extras)} must be JSON-serialisable: {error}") from error


def _storage(url: str, *, reader: bool) -> dcp.StorageReader | dcp.StorageWriter:
    """DCP storage for a checkpoint directory: the plain filesystem one for local paths, fsspec otherwise."""
    fs, root = fsspec.core.url_to_fs(url)
    if storage.is_local(fs):
        return dcp.FileSystemReader(root) if reader else dcp.FileSystemWriter(root)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecReader(url) if reader else FsspecWriter(url)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a complete checkpoint, else the published (or newest complete) one under it."""
    storage.check_reachable(path)  # a missing bucket is not "no checkpoint"
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(f"{root.rstrip('/')}/{layout.COMPLETE_MARKER}"):
        return path.rstrip("/")
    info = layout.published_or_latest(path)
    if info is None:
        raise FileNotFoundError(f"no complete checkpoint at or under {path!r} (a ckpt-* directory with COMPLETE.json)")
    return info.path


@dataclass
class _PendingSave:
    iteration: int
    thread: threading.Thread | None = None
    error: BaseException | None = None


class CheckpointManager:
    """Saves, publishes, finds, loads and prunes the checkpoints of one stage under ``config.dir``.

    Every method except :meth:`prune` is collective: all ranks call it with the same arguments.
    """

    def __init__(self, config: CheckpointConfig, *, rank: int = 0, world_size: int = 1) -> None:
        if _is_distributed() and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"rank/world_size: invalid value {(rank, world_size)!r}; allowed: the process group's "
                f"{(dist.get_rank(), dist.get_world_size())!r}"
            )
        if config.keep_last < 0:  # validate_config's rule, for a manager built from a config it has not seen
            raise ConfigError("checkpoint.keep_last", config.keep_last, ">= 0 (0 keeps all)")
        self.config = config
        self.directory = config.dir.rstrip("/")
        self.rank, self.world_size = rank, world_size
        self._fs, self._root = fsspec.core.url_to_fs(self.directory)
        storage.check_reachable(self.directory)  # before any collective: every rank fails alike, none waits
        self._group = dist.new_group(backend="gloo") if _is_distributed() else None
        self._pending: _PendingSave | None = None
        self.last_save_seconds: float | None = None
        """Wall time of the last published save, from the call to COMPLETE.json (async: includes the upload)."""
        self.last_saved_iteration: int | None = None
        self.last_load_seconds: float | None = None
        self.loaded_meta: dict[str, Any] | None = None
        """COMPLETE.json of the checkpoint loaded last (``world_size`` tells whether the job was resized)."""

    # ---------------------------------------------------------------- paths and collectives

    def path_for(self, iteration: int) -> str:
        return layout.join(self.directory, layout.checkpoint_name(iteration))

    def _local(self, path: str) -> str:
        """The filesystem path of a URL under ``self.directory`` (what ``self._fs`` takes)."""
        return self._root.rstrip("/") + path[len(self.directory) :]

    def _broadcast(self, value: Any) -> Any:
        if self._group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    # ---------------------------------------------------------------- save

    def save(
        self, iteration: int, state: Mapping[str, Any], *, meta: Mapping[str, Any], blocking: bool = True
    ) -> float:
        """Write ``state`` as checkpoint ``iteration`` and publish it; returns the seconds this call blocked.

        ``meta`` (JSON-serialisable, e.g. losses) goes into COMPLETE.json. The save is asynchronous only when
        ``blocking=False`` and ``config.async_save``: the tensors are staged to host memory, the call returns, and
        the upload and publication finish in the background; the next collective call, or :meth:`wait`, waits for
        them. Keep ``blocking=True`` for the final and the preemption checkpoint. A complete checkpoint of the same
        iteration is kept, not rewritten.
        """
        clash = sorted(set(meta) & set(_RESERVED_META))
        if clash:
            raise ValueError(f"meta: invalid keys {clash}; allowed: any key except {list(_RESERVED_META)}")
        sharded, extras = _split_state(state)
        self.wait()
        started = time.monotonic()
        extras_json = _extras_json(extras)  # a value JSON cannot hold fails here, before storage is touched
        path = self.path_for(iteration)
        with storage_errors(path, self._fs):
            if not self._prepare_directory(path):
                logger.info("checkpoint %s is already complete; not rewriting it", path)
                return time.monotonic() - started
            with self._fs.open(f"{self._local(path)}/extra-rank{self.rank:05d}.json", "w") as handle:
                handle.write(extras_json)
            tensors = {key: value.state_dict() for key, value in sharded.items()}
            if blocking or not self.config.async_save:
                dcp.save(tensors, storage_writer=_storage(path, reader=False), process_group=self._group)
                self._publish(path, iteration, dict(meta), started)
                return time.monotonic() - started
            future = dcp.async_save(tensors, storage_writer=_storage(path, reader=False), process_group=self._group)
        pending = _PendingSave(iteration)
        pending.thread = threading.Thread(
            target=self._finish_async,
            args=(pending, future, path, dict(meta), started),
            name=f"checkpoint-{iteration}",
            daemon=True,
        )
        pending.thread.start()
        self._pending = pending
        return time.monotonic() - started

    def _finish_async(self, pending: _PendingSave, future: Any, path: str, meta: dict, started: float) -> None:
        try:
            with storage_errors(path, self._fs):
                future.result()
                self._publish(path, pending.iteration, meta, started)
        except BaseException as error:  # re-raised in the training thread by wait()
            pending.error = error

    def wait(self) -> None:
        """Block until an in-flight async save is published; re-raise its error here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        assert pending.thread is not None
        pending.thread.join()
        if isinstance(pending.error, storage.StorageError):
            raise pending.error  # already names the checkpoint's URI and what to check
        if pending.error is not None:
            raise RuntimeError(f"async checkpoint of iteration {pending.iteration} failed") from pending.error

    def _prepare_directory(self, path: str) -> bool:
        """Rank 0 removes a stale incomplete directory; False (on all ranks) when ``path`` is already complete."""
        complete = False
        if self.rank == 0:
            self._fs.invalidate_cache()  # object-store listings are cached per filesystem instance
            local = self._local(path)
            complete = self._fs.exists(f"{local}/{layout.COMPLETE_MARKER}")
            if not complete and self._fs.exists(local):
                logger.warning("removing incomplete checkpoint directory %s (an interrupted save)", path)
                self._fs.rm(local, recursive=True)
            if not complete:
                storage.makedirs(self._fs, local)
        complete = self._broadcast(complete)
        return not complete

    def _publish(self, path: str, iteration: int, meta: dict[str, Any], started: float) -> None:
        """After every rank's files are written, rank 0 writes COMPLETE.json last and applies retention."""
        self._barrier()
        seconds = time.monotonic() - started
        if self.rank == 0:
            record = {"iteration": iteration, "world_size": self.world_size, "time": time.time(),
                      "save_seconds": seconds, **meta}
            self._write_marker(self._local(path), json.dumps(record, default=_json_default))
            self.prune()
        self._barrier()  # so that on every rank a returned save (or wait) means a published checkpoint
        self.last_save_seconds, self.last_saved_iteration = seconds, iteration
        logger.info("checkpoint %s published in %.2f s", path, seconds)

    def _write_marker(self, local_dir: str, text: str) -> None:
        marker = f"{local_dir}/{layout.COMPLETE_MARKER}"
        if not storage.is_local(self._fs):
            self._fs.pipe_file(marker, text.encode())  # one PUT: object stores publish whole objects
            return
        # Durable, then renamed: readers never see a partial marker, and it never outlives a lost write.
        with open(marker + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(marker + ".tmp", marker)

    # ---------------------------------------------------------------- find and load

    def latest(self) -> layout.CheckpointInfo | None:
        """The newest complete checkpoint of this stage (rank 0's view, shared with all ranks)."""
        self._fs.invalidate_cache()
        if self.rank != 0:
            return self._broadcast(None)
        with storage_errors(self.directory, self._fs):
            return self._broadcast(layout.latest_complete(self.directory))

    def load_latest(self, state: Mapping[str, Any]) -> int | None:
        """Load the newest complete checkpoint into ``state``; its iteration, or None when there is none."""
        self.wait()
        info = self.latest()
        if info is None:
            logger.info("no complete checkpoint under %s; starting from scratch", self.directory)
            return None
        self.load(info.path, state)
        return info.iteration

    def load(self, path: str, state: Mapping[str, Any]) -> dict[str, Any]:
        """Load the complete checkpoint at ``path`` into ``state`` in place; returns its COMPLETE.json record.

        ``state`` has the shape given to :meth:`save`; every key must exist in the checkpoint.
        """
        self.wait()
        started = time.monotonic()
        fs, root = fsspec.core.url_to_fs(path)
        marker = f"{root.rstrip('/')}/{layout.COMPLETE_MARKER}"
        with storage_errors(path, fs):
            if not fs.exists(marker):
                raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no {layout.COMPLETE_MARKER})")
            with fs.open(marker, "r") as handle:
                record = json.load(handle)
            sharded, extras = _split_state(state)
            if sharded:
                self._load_sharded(path, sharded)
            if extras:
                self._load_extras(fs, root.rstrip("/"), extras, saved_world_size=record["world_size"])
        self._barrier()
        self.last_load_seconds = time.monotonic() - started
        self.loaded_meta = record
        logger.info("loaded checkpoint %s (iteration %d, saved by %d ranks) in %.2f s",
                    path, record["iteration"], record["world_size"], self.last_load_seconds)
        return record

    def _load_sharded(self, path: str, sharded: Mapping[str, Stateful]) -> None:
        # DCP's Stateful protocol done by hand, to fit optimizer targets to what the checkpoint holds first.
        reader = _storage(path, reader=True)
        saved_keys = set(reader.read_metadata().state_dict_metadata)
        targets = {key: value.state_dict() for key, value in sharded.items()}
        for key, value in sharded.items():
            if isinstance(value, OptimizerState):
                value.drop_unsaved(targets[key], saved_keys, prefix=key)
        dcp.load(targets, storage_reader=reader, process_group=self._group)
        for key, value in sharded.items():
            value.load_state_dict(targets[key])

    def _load_extras(self, fs: fsspec.AbstractFileSystem, root: str, extras: Mapping[str, Any], *,
                     saved_world_size: int) -> None:
        # Same world size: this rank's own file (bit-exact resume). Resized: rank 0's (see the module docstring).
        source = self.rank if saved_world_size == self.world_size else 0
        if source != self.rank:
            logger.warning("world size changed %d -> %d: rank %d loads rank 0's per-rank state",
                           saved_world_size, self.world_size, self.rank)
        with fs.open(f"{root}/extra-rank{source:05d}.json", "r") as handle:
            saved = json.load(handle)
        missing = sorted(set(extras) - set(saved))
        if missing:
            raise KeyError(f"state keys {missing} are not in the checkpoint's per-rank state {sorted(saved)}")
        for key, target in extras.items():
            if isinstance(target, dict):
                target.clear()
                target.update(saved[key])
            else:
                target.load_state_dict(saved[key])

    # ---------------------------------------------------------------- retention

    def prune(self) -> list[str]:
        """Apply ``keep_last`` on rank 0 (a no-op elsewhere); returns the removed checkpoint paths.

        Keeps the newest ``keep_last`` complete checkpoints and always the newest complete and the PUBLISHED one;
        removes incomplete directories older than the newest complete checkpoint (debris of interrupted saves;
        newer ones may be an async save in flight). A checkpoint is unpublished before its data goes
        (:meth:`_remove`).
        """
        if self.rank != 0:
            return []
        self._fs.invalidate_cache()
        found = layout.list_checkpoints(self.directory)
        complete = [info for info in found if info.complete]
        if not complete:
            return []
        keep_last = self.config.keep_last or len(complete)  # 0 keeps every complete checkpoint
        keep = {info.path for info in complete[-keep_last:]}
        published = layout.published_or_latest(self.directory)
        if published is not None:
            keep.add(published.path)
        doomed = [info.path for info in complete if info.path not in keep]
        doomed += [info.path for info in found if not info.complete and info.iteration < complete[-1].iteration]
        for path in doomed:
            logger.info("retention: removing %s", path)
            with storage_errors(path, self._fs):
                self._remove(path)
        return doomed

    def _remove(self, path: str) -> None:
        """Delete checkpoint ``path``: its COMPLETE.json alone first, then the rest.

        A recursive remove takes files in listing order (an object store's bulk delete in any order), so a kill in
        its middle could leave the marker beside missing shards: a checkpoint that `dino-ctl checkpoints` would call
        complete. Without its marker the directory is an interrupted write to every reader from the first delete on.
        """
        local = self._local(path)
        try:
            self._fs.rm_file(f"{local}/{layout.COMPLETE_MARKER}")
        except FileNotFoundError:
            pass  # already unpublished (an interrupted earlier prune) or never published
        self._fs.invalidate_cache(local)
        self._fs.rm(local, recursive=True)

    def close(self) -> None:
        """Wait for an in-flight save and release the private process group."""
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


Resize = Callable[[str, torch.Tensor, torch.Size], torch.Tensor]
"""``resize(checkpoint_key, saved_tensor, wanted_shape) -> tensor of wanted_shape`` (e.g. interpolate pos_embed)."""


def load_model_weights(
    path: str, modules: Mapping[str, nn.Module], *, resize: Resize | None = None
) -> dict[str, torch.Tensor]:
    """Initialise ``modules`` from the weights of a training checkpoint (stage init: highres, distill teacher).

    ``modules`` maps a dotted prefix of the checkpoint's keys to the module that receives the weights below it:
    ``{"student": s, "teacher": t}`` restores both models of a pretraining checkpoint, ``{"teacher": t}`` only the
    teacher, ``{"teacher.backbone": b}`` only the teacher's backbone. ``path`` is a checkpoint directory or a
    stage directory (its published, else newest complete, checkpoint). Works for sharded (FSDP2) and plain modules
    at any world size; collective when a process group is initialised.

    A parameter whose saved shape differs (the position embedding of a higher resolution) is passed to ``resize``
    when given; without ``resize`` it is left untouched and returned, keyed by checkpoint key, with the saved
    tensor, for the caller to adapt and assign.
    """
    path = resolve_checkpoint(path)
    reader = _storage(path, reader=True)
    targets = {prefix: get_model_state_dict(module) for prefix, module in modules.items()}
    to_load, mismatched = _weight_targets(path, reader.read_metadata().state_dict_metadata, targets)
    dcp.load(to_load, storage_reader=reader)
    unresolved: dict[str, torch.Tensor] = {}
    for key, (prefix, name) in mismatched.items():
        target = targets[prefix][name]
        if resize is None:
            unresolved[key] = to_load[key]
            del targets[prefix][name]
            continue
        value = resize(key, to_load[key], target.shape).to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements)
        targets[prefix][name] = value
    for prefix, module in modules.items():
        partial = any(key.startswith(f"{prefix}.") for key in unresolved)
        set_model_state_dict(module, targets[prefix], options=StateDictOptions(strict=not partial))
    logger.info("initialised %s from %s (%d shape changes, %d left to the caller)",
                sorted(modules), path, len(mismatched), len(unresolved))
    return unresolved


def _weight_targets(
    path: str, saved: Mapping[str, Any], targets: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """DCP load targets keyed like the checkpoint: the module's own tensors (loaded in place, shards included), or
    a full tensor of the saved shape where shapes differ; and those ``{key: (prefix, name)}``."""
    to_load: dict[str, Any] = {}
    mismatched: dict[str, tuple[str, str]] = {}
    for prefix, state in targets.items():
        for name, tensor in state.items():
            key = f"{prefix}.{name}"
            if key not in saved:
                raise KeyError(f"{key!r} is not in checkpoint {path!r} (wrong prefix {prefix!r} or architecture?)")
            if saved[key].size == tensor.shape:
                to_load[key] = tensor
            else:
                to_load[key] = torch.empty(saved[key].size, dtype=saved[key].properties.dtype)
                mismatched[key] = (prefix, name)
    return to_load, mismatched
