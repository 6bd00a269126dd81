"""``fuzz`` tests run only when asked for (``-m fuzz``): the default suite (``pytest -q``, ``-m "not cluster"``)
deselects them, whatever other ``-m`` expression it was given."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("fuzz") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("fuzz") is None]
