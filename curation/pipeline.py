"""The step runner: embed -> dedup -> retrieve -> balance -> write, each resumable.

A step is skipped when its done marker holds the hash of its current configuration and inputs (the upstream steps'
hashes, the sources' fingerprints, the seed); otherwise it runs and commits. The sharded steps (embed, write) commit
each shard on its own, so the ranks of ``curation.launch``, ``--shard-index`` workers or a rerun after a crash only
compute the shards that are missing; whoever completes the last shard commits the step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from curation import steps as step_impls
from curation.config import STEP_NAMES, CurationSpec
from curation.context import SHARDED_STEPS, Context, FailureHook, step_directory
from curation.distributed import barrier, broadcast_object, get_rank, get_world_size
from curation.metrics import CurationMetrics
from curation.progress import Reporter
from curation.storage import hash_json, read_marker
from trainer.config import ConfigError
from trainer.storage import check_reachable

__all__ = ["Context", "StepResult", "run_pipeline", "resolve_shard", "select_steps", "step_directory"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """Outcome of one step in this invocation."""

    name: str
    status: str
    """``done`` (ran and committed), ``reused`` (committed earlier with the same hash) or ``partial`` (this worker's
    shards are committed, others are missing)."""
    summary: dict[str, Any]
    seconds: float


def resolve_shard(shard_index: int | None, *, env: dict[str, str] | None = None) -> int | None:
    """``shard_index``, else ``JOB_COMPLETION_INDEX`` (set by Kubernetes in indexed Jobs, for a hand-written Job that
    runs one shard per pod), else None."""
    if shard_index is not None:
        return shard_index
    value = (env if env is not None else os.environ).get("JOB_COMPLETION_INDEX")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ConfigError("JOB_COMPLETION_INDEX", value, "a non-negative integer")
    return int(value)


def select_steps(steps: Sequence[str] | None, shard_index: int | None) -> list[str]:
    """The named steps in pipeline order (all by default); an unknown name raises :class:`ConfigError`."""
    chosen = list(STEP_NAMES) if not steps else list(steps)
    for name in chosen:
        if name not in STEP_NAMES:
            raise ConfigError("--steps", name, "one of " + ", ".join(STEP_NAMES))
    if shard_index is not None and any(name not in SHARDED_STEPS for name in chosen):
        raise ConfigError("--steps", ",".join(chosen), "only embed or write with --shard-index (the others run once)")
    return [name for name in STEP_NAMES if name in chosen]


def step_hash(context: Context, name: str) -> str:
    """The hash a step's marker must hold: its config, the seed and its inputs' hashes."""
    return hash_json({"step": name, "seed": context.spec.seed, "inputs": step_impls.STEP_INPUTS[name](context)})


def run_pipeline(
    spec: CurationSpec,
    *,
    steps: Sequence[str] | None = None,
    shard_index: int | None = None,
    reporter: Reporter | None = None,
    failure_hook: FailureHook | None = None,
    metrics: CurationMetrics | None = None,
) -> list[StepResult]:
    """Run the named steps (default: all) in pipeline order, reusing committed ones; returns one result per step.

    A step whose upstream step is not committed raises RuntimeError naming the missing step.
    """
    context = Context(
        spec=spec,
        reporter=reporter or Reporter(),
        failure_hook=failure_hook,
        shard_index=shard_index,
        metrics=metrics or CurationMetrics(),
        rank=get_rank(),
        world_size=get_world_size(),
    )
    if context.world_size > 1 and shard_index is not None:
        raise ConfigError("--shard-index", shard_index, "no shard index when running under torchrun (ranks shard)")
    if spec.write.enabled and spec.write.remote is not None:
        check_reachable(spec.write.remote)  # a wrong bucket fails now, not after hours of embedding
    context.root.mkdir(parents=True, exist_ok=True)
    results = []
    for name in select_steps(steps, shard_index):
        _require_upstream(context, name)
        start = time.perf_counter()
        config_hash = step_hash(context, name)
        context.hashes[name] = config_hash
        marker = read_marker(step_directory(context.root, name), config_hash=config_hash)
        # Every rank takes rank 0's branch: a marker landing between two ranks' reads must not split the group.
        marker = broadcast_object(marker)
        if marker is not None:
            status, summary = "reused", marker["summary"]
        else:
            status, summary = step_impls.STEP_RUNNERS[name](context, config_hash)
        barrier()  # the step is committed for every rank before any rank reads its output
        seconds = time.perf_counter() - start
        context.reporter.step_done(name, summary=summary, reused=status == "reused", seconds=seconds)
        if status != "partial":
            context.metrics.step_done(name, seconds)
        results.append(StepResult(name=name, status=status, summary=summary, seconds=seconds))
        if status == "partial":
            break  # later steps need every shard
    return results


def _require_upstream(context: Context, name: str) -> None:
    """Make sure every earlier step is committed with its current hash (hashes chain through the pipeline)."""
    for upstream in STEP_NAMES[: STEP_NAMES.index(name)]:
        if upstream in context.hashes:
            continue
        config_hash = step_hash(context, upstream)
        if read_marker(step_directory(context.root, upstream), config_hash=config_hash) is None:
            raise RuntimeError(
                f"step {name!r} needs step {upstream!r} to be complete with the current spec; run it first "
                f"(dino-ctl curate SPEC --steps {upstream})"
            )
        context.hashes[upstream] = config_hash
