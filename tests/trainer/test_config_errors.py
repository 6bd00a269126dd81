"""``pydantic_errors``: the one translation of pydantic's errors into ``ConfigError``s (spec and curation spec)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import ConfigError, pydantic_errors


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["a", "b"] = "a"
    size: int = Field(default=1, ge=1)


class _Root(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    inner: _Inner | None = None
    items: list[_Inner] = Field(default_factory=list)
    choice: str | _Inner = "x"


def _errors(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        _Root.model_validate(data)
    return [str(error) for error in pydantic_errors(info.value.errors(include_url=False), _Root)]


def test_paths_values_and_what_is_allowed() -> None:
    assert _errors({"inner": {"kind": "c", "sise": 2}, "items": [{}, {"size": 0}]}) == [
        "name: invalid value None; allowed: a value: this field is required",
        "inner.kind: invalid value 'c'; allowed: one of 'a', 'b'",
        "inner.sise: invalid value 2; allowed: a known key: kind, size",
        "items[1].size: invalid value 0; allowed: input should be greater than or equal to 1",
    ]


def test_union_member_tags_are_not_part_of_the_path() -> None:
    assert _errors({"name": "n", "choice": {"size": "big"}}) == [
        "choice: invalid value {'size': 'big'}; allowed: input should be a valid string",  # pydantic's 'str' member
        "choice.size: invalid value 'big'; allowed: input should be a valid integer, unable to parse string as an "
        "integer",  # pydantic's '_Inner' member
    ]


def test_errors_are_built_by_the_given_type() -> None:
    class Custom(ConfigError):
        pass

    with pytest.raises(ValidationError) as info:
        _Root.model_validate([])
    [error] = pydantic_errors(info.value.errors(include_url=False), _Root, make=Custom, empty_path="spec")
    assert isinstance(error, Custom) and error.path == "spec"
