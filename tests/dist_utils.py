"""Run a test function in N real ``torch.distributed`` processes (gloo on CPU).

Usage::

    def _check(rank: int, world_size: int, tmp: str) -> float:   # module level: it is pickled for spawn
        ...collectives on the default process group...
        return value

    def test_something(tmp_path):
        results = run_distributed(_check, world_size=2, args=(str(tmp_path),))   # [rank0 value, rank1 value]

Each worker gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set, a default process group
already initialised (gloo unless ``backend`` says otherwise; destroyed after the function returns) and one intra-op
thread (the CI machine has two cores). An exception in any rank fails the call with that rank's traceback; a hang
fails it after ``timeout_s``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.processes import free_port

__all__ = ["find_free_port", "run_distributed"]


find_free_port = free_port
"""A TCP port that was free a moment ago on 127.0.0.1 (:func:`tests.processes.free_port`)."""


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    args: Sequence[Any],
    result_dir: str,
    timeout_s: float,
    backend: str,
) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(Path(result_dir) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout_s: float = 120.0,
    backend: str = "gloo",
    start_method: str = "spawn",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the per-rank results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function) with the default ``spawn`` start method.
    ``backend`` is passed to ``init_process_group`` (``"cpu:gloo,cuda:nccl"`` for GPU tests; each rank then uses
    CUDA device ``rank % device_count``).
    Raises ``torch.multiprocessing.ProcessRaisedException`` (carrying the failing rank's traceback) when a rank
    raises, ``ProcessExitedException`` when one dies, and ``TimeoutError`` when the group is still running after
    ``timeout_s`` seconds (all ranks are killed first).
    """
    if world_size < 1:
        raise ValueError(f"world_size: invalid value {world_size!r}; allowed: >= 1")
    with tempfile.TemporaryDirectory(prefix="dist-test-") as result_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, find_free_port(), tuple(args), result_dir, timeout_s, backend),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout_s
        # join() returns False while processes are running and raises as soon as one of them fails.
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                        process.join()
                raise TimeoutError(f"ranks {alive} of {world_size} still running after {timeout_s:.0f} s")
        results = []
        for rank in range(world_size):
            with open(Path(result_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
        return results
