"""Fixtures of the data tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def world_env(monkeypatch: pytest.MonkeyPatch):
    """Set the streaming rank variables of a single process (restored after the test)."""

    def set_world(rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1) -> None:
        values = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank}
        for name, value in {**values, "LOCAL_WORLD_SIZE": local_world_size}.items():
            monkeypatch.setenv(name, str(value))

    set_world()
    return set_world


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
