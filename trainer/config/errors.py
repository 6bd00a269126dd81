"""One error type for every configuration mistake, and the translation of pydantic's errors into it.

:class:`ConfigError` names the dotted field path, the bad value and what is allowed. The trainer's config raises it,
the control plane's ``SpecError`` is a subclass, and curation raises it; both pydantic-modelled specs (the
``DinoExperiment`` document and the curation spec) turn pydantic's errors into it with :func:`pydantic_errors`.
Standard library only: pydantic's errors are read as the plain dicts ``ValidationError.errors()`` returns.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ConfigError", "pydantic_errors", "short_repr"]


class ConfigError(ValueError):
    """A user mistake in a configuration: names the dotted field path, the bad value and what is allowed.

    ``context`` says under which circumstance the value is invalid (``with world size 16``) where that is not the
    value alone. Every configuration error of the project has this shape: the control plane's ``SpecError`` is a
    subclass and the curation spec raises this class.
    """

    def __init__(self, path: str, value: Any, allowed: str, *, context: str = "") -> None:
        self.path, self.value, self.allowed, self.context = path, value, allowed, context
        where = f" {context}" if context else ""
        super().__init__(f"{path}: invalid value {short_repr(value)}{where}; allowed: {allowed}")


MAX_VALUE_REPR = 200
"""Characters of a bad value shown in an error message (a 100,000-element list stays one readable line)."""


def short_repr(value: Any, limit: int = MAX_VALUE_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters, with the length of what was cut."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a self-containing or enormous value
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# pydantic's names of union members and validator branches inside ``loc``: not fields
_BRANCH_TAGS = ("list[str]", "str", "int", "dict[str,any]")  # outside a model (where field names tell them apart)


def _model_fields(model: Any) -> dict[str, Any]:
    """``{wire name: FieldInfo}`` of a pydantic model class (aliases where set), or {} for anything else."""
    fields = getattr(model, "model_fields", None)
    return {(info.alias or name): info for name, info in fields.items()} if isinstance(fields, dict) else {}


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``), or None."""
    candidates = [annotation, *typing.get_args(annotation)]
    candidates += [inner for arg in candidates for inner in typing.get_args(arg)]
    return next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)


def _path_and_parent(root: Any, loc: Iterable[int | str], *, unknown_key: bool) -> tuple[str, Any]:
    """The dotted path of ``loc`` (list indices as ``[i]``, pydantic's union and validator tags dropped) and the model
    holding its last field. ``unknown_key``: the last part is a key the model does not have (kept in the path)."""
    path, model = "", root
    parts = list(loc)
    for position, part in enumerate(parts):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        fields = _model_fields(model)
        last = position == len(parts) - 1
        if fields and part not in fields and not (unknown_key and last):
            continue  # a union member's tag ('str', 'ModelSpec', 'function-after[...]') inside a model's field
        if not fields and (part.startswith("function-") or part in _BRANCH_TAGS):
            continue
        path = f"{path}.{part}" if path else part
        if not last:
            model = _inner_model(fields[part].annotation) if part in fields else None
    return path, model


def _allowed(error: dict[str, Any], parent: Any) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "missing":
        return "a value: this field is required"
    if kind == "extra_forbidden":
        keys = list(_model_fields(parent))
        return "a known key: " + ", ".join(keys) if keys else "only the documented keys"
    if kind == "literal_error":
        return f"one of {ctx.get('expected', '')}".replace(" or ", ", ")
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"][0].lower() + error["msg"][1:]


def pydantic_errors(
    errors: Iterable[dict[str, Any]],
    root: Any,
    *,
    make: Callable[[str, Any, str], ConfigError] = ConfigError,
    empty_path: str = "<document>",
) -> list[ConfigError]:
    """``ValidationError.errors()`` of model class ``root`` as :class:`ConfigError`\\s (built by ``make``) naming
    the dotted wire path (``spec.stages[0].name``), the bad value (None when missing) and what is allowed: an unknown
    key lists the known keys of its model, a literal lists its choices, a validator's message is kept."""
    found = []
    for error in errors:
        path, parent = _path_and_parent(root, error["loc"], unknown_key=error["type"] == "extra_forbidden")
        value = None if error["type"] == "missing" else error.get("input")
        found.append(make(path or empty_path, value, _allowed(error, parent)))
    return found
