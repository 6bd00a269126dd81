"""``with_overrides``: dotted overrides on top of an already resolved config (what the quickstart benches do)."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, resolve_config, with_overrides


def test_with_overrides_keeps_the_config_and_applies_the_overrides_on_top() -> None:
    base = resolve_config("tiny", overrides={"optim.iterations": 77, "data.crops.num_local": 2})
    changed = with_overrides(base, {"data.crops.flip_probability": 0.0, "data.crops.aspect_ratio": [1.0, 1.0]})
    assert changed.recipe == base.recipe == "tiny"
    assert (changed.optim.iterations, changed.data.crops.num_local) == (77, 2)  # the earlier overrides survive
    assert changed.data.crops.flip_probability == 0.0 and changed.data.crops.aspect_ratio == (1.0, 1.0)
    assert base.data.crops.flip_probability == 0.5  # the input is not modified
    assert with_overrides(base, {}) == base


def test_with_overrides_validates_the_result() -> None:
    base = resolve_config("tiny")
    with pytest.raises(ConfigError, match=r"data\.crops\.flip_probability"):
        with_overrides(base, {"data.crops.flip_probability": 2})
