"""Capture and restore the process's random number generators as a JSON-serialisable dict.

Covers Python's ``random``, NumPy's legacy global generator, torch's CPU generator and the current CUDA device's
generator (when CUDA is initialised). Explicit ``np.random.Generator`` / ``torch.Generator`` objects owned by other
components (data augmentation, masking) are theirs to checkpoint.

Byte states (torch) are base64 strings so the whole dict can be written as JSON next to the sharded checkpoint
(``extra-rank%05d.json``, see :mod:`trainer.checkpoint`).
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RNGState", "capture_rng_state", "restore_rng_state", "seed_all"]

# Odd multiplier that spreads consecutive ranks over the seed space (any fixed constant works; it only has to be
# the same on every run so that resumes are reproducible).
_RANK_STRIDE = 1_000_003


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """The current state of every global generator, as plain JSON types."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": _encode(torch.get_rng_state()),
    }
    # Only when CUDA is already in use: querying would otherwise initialise a CUDA context as a side effect.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state`'s dict (a missing ``cuda`` entry leaves CUDA as is)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": np.asarray(numpy["key"], dtype=np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))


class RNGState:
    """Checkpointable (``state_dict``/``load_state_dict``) view of this rank's global generators.

    Restoring a state saved by another rank (the job was resized and :class:`trainer.checkpoint.CheckpointManager`
    handed this rank another rank's file) would give two ranks identical streams, so the generators are instead
    reseeded from a value drawn from the restored state and this rank: still reproducible, distinct per rank.
    """

    def __init__(self, *, rank: int | None = None) -> None:
        self._rank = rank

    @property
    def rank(self) -> int:
        """The rank given, else the process group's (0 without one), read when saving or loading."""
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, **capture_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)
        if state["rank"] != self.rank:
            drawn = int(torch.randint(0, 2**31 - 1, (1,)).item())
            seed_all(drawn + _RANK_STRIDE * (self.rank + 1))
