"""What every curation step shares: the step's output directory and the :class:`Context` it runs in.

Below both the step runner (:mod:`curation.pipeline`) and the steps (:mod:`curation.step_embed`, ...), so the
steps never import the runner that calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from curation.config import CurationSpec
from curation.metrics import CurationMetrics
from curation.progress import Reporter
from trainer.config import ConfigError

__all__ = ["SHARDED_STEPS", "Context", "FailureHook", "step_directory"]

FailureHook = Callable[[str], None]
"""Called with a checkpoint name (e.g. ``write:part-00001``) at points where a crash must be survivable; tests
raise from it to simulate one."""

SHARDED_STEPS = ("embed", "write")
_DIRECTORIES = {"embed": "embed", "dedup": "dedup", "retrieve": "retrieve", "balance": "balance", "write": "dataset"}


def step_directory(root: str | Path, step: str) -> Path:
    """Where a step's output and done marker live (``write`` produces the MDS dataset in ``dataset/``)."""
    return Path(root) / _DIRECTORIES[step]


@dataclass(kw_only=True)
class Context:
    """What a step needs: the spec, the output root, progress, the crash hook and this worker's shard."""

    spec: CurationSpec
    reporter: Reporter = field(default_factory=Reporter)
    failure_hook: FailureHook | None = None
    shard_index: int | None = None
    """Only this shard of the sharded steps (None: all shards, one after the other)."""
    hashes: dict[str, str] = field(default_factory=dict)
    """Hash of every step whose inputs are known (filled in step order)."""
    metrics: CurationMetrics = field(default_factory=CurationMetrics)
    rank: int = 0
    """This process's rank in the default process group (0 without one)."""
    world_size: int = 1
    """Ranks in the default process group (1 without one): every step splits its work over them."""

    @property
    def root(self) -> Path:
        return Path(self.spec.output)

    def checkpoint(self, name: str) -> None:
        """A point where the process may die; the hook lets tests make it die there."""
        if self.failure_hook is not None:
            self.failure_hook(name)

    def shards(self, num_shards: int, field_name: str) -> range:
        """The shard numbers this worker computes: one with ``shard_index``, else every ``world_size``-th shard
        starting at ``rank`` (all of them in one process)."""
        if self.shard_index is None:
            return range(self.rank, num_shards, self.world_size)
        if self.shard_index >= num_shards:
            raise ConfigError("--shard-index", self.shard_index, f"0 <= index < {field_name} ({num_shards})")
        return range(self.shard_index, self.shard_index + 1)
