"""Training entry point: ``python -m trainer.train --config STAGE.yaml [--override key=value ...]``.

Launched by torchrun (also elastic: ``--nnodes=MIN:MAX --rdzv-backend=c10d``) or as a single process on CPU. Reads
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE. Always resumes from the newest complete checkpoint in
``checkpoint.dir``, so a restarted pod, a torchrun group restart or a resized job continues the run.

Exit codes: 0 finished, 1 error (a storage failure is one line naming the URI: :class:`trainer.storage.StorageError`),
2 invalid config, 143 (:data:`PREEMPTED_EXIT_CODE`) stopped by SIGTERM after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import ConfigError, TrainConfig, load_config_file, validate_config
from trainer.layout import PREEMPTED_EXIT_CODE
from trainer.meta_arch import NonFiniteLossError
from trainer.runtime import Runtime
from trainer.storage import StorageError

logger = logging.getLogger("trainer.train")


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = config.parallel.device == "cuda" or (config.parallel.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


class _Preemption:
    """SIGTERM sets a flag; the loop finishes the current step, checkpoints, then exits with 143."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        if self.requested_at is None:
            self.requested_at = time.monotonic()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got SIGTERM (ranks must stop at the same iteration)."""
        flag = torch.tensor([1.0 if self.requested_at is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(config: TrainConfig) -> int:
    """Run (or resume) one stage to completion. Returns the process exit code."""
    rank, world_size, device = _init_distributed(config)
    validate_config(config, world_size=world_size)
    preemption = _Preemption()
    runtime = Runtime(config, rank=rank, world_size=world_size, device=device)
    try:
        if rank == 0:
            runtime.write_resolved_config()
        iteration = runtime.resume_or_init()
        batches = iter(runtime.loader)
        while iteration < config.optim.iterations:
            wait_start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # loading must not consume the training RNG (exact resume)
                batch = runtime.to_device(next(batches))
            data_wait = time.perf_counter() - wait_start
            runtime.step(batch, iteration, data_wait=data_wait)
            iteration += 1
            if preemption.agreed(device):
                runtime.save(iteration, reason="preemption")
                logger.warning("preempted: checkpoint at iteration %d written, exiting %d", iteration,
                               PREEMPTED_EXIT_CODE)
                return PREEMPTED_EXIT_CODE
            if iteration % config.checkpoint.interval_iterations == 0 and iteration < config.optim.iterations:
                runtime.save(iteration, reason="interval")
        runtime.finish(iteration)
        return 0
    finally:
        runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="stage config YAML (a resolved TrainConfig or recipe + values)")
    parser.add_argument("--recipe", help="recipe name when the YAML names none (default: tiny)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = train(load_config_file(args.config, args.override, recipe=args.recipe))
    except ConfigError as exc:
        logger.error("invalid config: %s", exc)
        return 2
    except NonFiniteLossError as exc:  # the run cannot continue; the last complete checkpoint is intact
        logger.error("%s", exc)
        return 1
    except StorageError as exc:  # bucket, credentials or endpoint: nothing was published, the message says what
        logger.error("storage: %s", exc)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
