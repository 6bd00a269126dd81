"""``python -m curation.launch --spec PATH [--steps embed,dedup,...] [--metrics-port N]``: one curation rank.

The entry point the cluster runs (a PyTorchJob / TrainJob pod, or ``torchrun --nproc-per-node N -m
curation.launch ...`` on one machine). Under torchrun it reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` from the environment and joins the default process group (nccl when CUDA is
available, else gloo), each rank computing its shard of every step (see :mod:`curation.distributed`). With
``WORLD_SIZE`` unset or 1 it runs in this process without a process group.

Exit codes: 0 when the requested steps are done, 2 on a bad spec or argument (one line naming the field, the value
and what is allowed), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from curation.metrics import CurationMetrics
from curation.progress import LogReporter, RichReporter
from trainer.config import ConfigError

__all__ = ["main"]

logger = logging.getLogger(__name__)

KILL_AT_ENV = "DINO_CURATION_KILL_AT"
"""Crash injection for the resumption tests: ``<checkpoint name>@<rank>`` makes that rank SIGKILL itself when it
reaches that checkpoint (e.g. ``embed:pool:part-00001-of-00004@1``); unset in production."""


class _BadArgument(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too, but prints usage: keep it to one line
        raise _BadArgument(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m curation.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, type=Path, help="curation spec YAML")
    parser.add_argument("--steps", default=None, help="comma-separated steps (embed,dedup,retrieve,balance,write)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port "
                        "(rank 0 binds it; every other rank binds port + LOCAL_RANK; 0 picks a free port)")
    parser.add_argument("--report", type=Path, default=None, help="rank 0 writes the step results here as JSON")
    parser.add_argument("--verbose", "-v", action="store_true", help="log at INFO level")
    return parser


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    if not value.isdigit():
        raise ConfigError(name, value, "a non-negative integer (set by torchrun)")
    return int(value)


def _kill_hook(rank: int):
    """The failure hook of ``DINO_CURATION_KILL_AT`` (None when unset)."""
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return None
    name, _, at_rank = target.rpartition("@")
    if not name or not at_rank.isdigit():
        raise ConfigError(KILL_AT_ENV, target, "<checkpoint>@<rank>, e.g. embed:pool:part-00001-of-00004@1")

    def hook(checkpoint: str) -> None:
        if checkpoint == name and rank == int(at_rank):
            logging.getLogger(__name__).warning("%s: rank %d kills itself at %s", KILL_AT_ENV, rank, checkpoint)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> int:
    """Run the requested curation steps as this rank; returns the exit code (0 done, 1 failure, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except _BadArgument as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("curation.progress").setLevel(logging.INFO)  # step progress is this command's output
    steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    try:
        from curation.config import load_spec
        from curation.pipeline import select_steps

        spec = load_spec(args.spec)
        select_steps(steps, None)
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if rank >= max(world_size, 1):
            raise ConfigError("RANK", rank, f"0 <= RANK < WORLD_SIZE ({world_size})")
        hook = _kill_hook(rank)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(spec, steps, args, rank=rank, world_size=world_size, hook=hook)
    except ConfigError as exc:  # found while running (e.g. more clusters than points)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the process's exit code is the interface; the traceback goes to the log
        logger.exception("curation failed on rank %d", rank)
        print(f"error (rank {rank}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _run(spec, steps, args, *, rank: int, world_size: int, hook) -> int:
    from curation.distributed import process_group
    from curation.pipeline import run_pipeline

    metrics = CurationMetrics(enabled=args.metrics_port is not None, rank=rank)
    if args.metrics_port is not None:
        port = args.metrics_port + (_env_int("LOCAL_RANK", 0) if args.metrics_port else 0)
        metrics.start_server(port)
    start = time.perf_counter()
    with process_group(world_size=world_size, rank=rank):
        # Rank 0 reports progress; the others only with --verbose (their shares, through this module's logger).
        reporter = _reporter(rank) if rank == 0 else LogReporter(prefix=f"rank {rank}", emit=logger.info)
        with reporter:
            results = run_pipeline(spec, steps=steps, reporter=reporter, failure_hook=hook, metrics=metrics)
    if rank == 0 and args.report is not None:
        report = {
            "world_size": world_size,
            "seconds": round(time.perf_counter() - start, 3),
            "steps": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "summary": r.summary}
                      for r in results],
        }
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    metrics.stop_server()
    return 0


def _reporter(rank: int):
    """Rich progress bars on an interactive stderr, log lines otherwise (pods, tests)."""
    if sys.stderr.isatty():
        return RichReporter()
    return LogReporter(prefix=f"rank {rank}")


if __name__ == "__main__":
    sys.exit(main())
