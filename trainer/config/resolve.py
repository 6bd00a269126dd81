"""From a recipe, file values and dotted overrides to a checked :class:`~trainer.config.schema.TrainConfig`.

Resolution order: dataclass defaults <- recipe preset <- YAML file <- dotted overrides. Unknown keys are errors that
name their dotted path; values are type-checked against the annotations (lists become tuples, ints floats where the
field says so); :func:`~trainer.config.validate.validate_config` runs the semantic checks last.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from typing import Any, Literal

from trainer.config.errors import ConfigError
from trainer.config.loading import read_yaml_mapping
from trainer.config.recipes import RECIPES, merge
from trainer.config.schema import ModelConfig, TrainConfig
from trainer.config.validate import validate_config

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config_file",
    "model_config_from_dict",
    "parse_override",
    "resolve_config",
    "with_overrides",
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting lists to tuples, ints to floats, dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, value, _type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(path, value, _type_name(tp))
    if tp is type(None):
        if value is not None:
            raise ConfigError(path, value, "null")
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"a mapping of {tp.__name__} fields")
        return _from_dict(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, value, f"a list of {len(args)} numbers")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, f"a list of {_type_name(arg)}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # internal: a field type this module cannot check


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(path, value, f"a known key of {prefix or 'the config'}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict; unknown keys and wrong types raise :class:`ConfigError`."""
    return _from_dict(TrainConfig, data)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a dict (an export's ``model.json``), checked like the full tree."""
    return _coerce(data, ModelConfig, "model")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-Python dict (tuples become lists) suitable for YAML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML-ish JSON (numbers, true/false, null, lists) or a string."""
    if "=" not in text:
        raise ConfigError("override", text, "KEY=VALUE with a dotted key, e.g. optim.iterations=1000")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    lowered = {"true": True, "false": False, "null": None, "none": None, "~": None}
    if raw.lower() in lowered:
        return key.strip(), lowered[raw.lower()]
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted ``{"optim.iterations": 10}`` overrides onto a nested dict. Keys are checked later, with paths."""
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(dotted, value, f"{part} is not a mapping, so it has no sub-keys")
            node = nxt
        node[parts[-1]] = value
    return out


def resolve_config(
    recipe: str,
    *,
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """defaults <- ``RECIPES[recipe]`` <- ``file_values`` <- dotted ``overrides``, then :func:`validate_config`."""
    if recipe not in RECIPES:
        raise ConfigError("recipe", recipe, "one of " + ", ".join(sorted(RECIPES)))
    data = merge(RECIPES[recipe], file_values or {})
    data["recipe"] = recipe
    data = apply_overrides(data, overrides or {})
    config = config_from_dict(data)
    validate_config(config)
    return config


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``config`` with dotted ``overrides`` on top, resolved and validated again (same recipe)."""
    values = config_to_dict(config)
    values.pop("recipe", None)
    return resolve_config(config.recipe, file_values=values, overrides=overrides)


def load_config_file(path: str | None, overrides: list[str], *, recipe: str | None = None) -> TrainConfig:
    """defaults <- recipe <- YAML file <- ``key=value`` overrides; the recipe comes from the file's ``recipe`` key
    unless ``recipe`` is given (default ``tiny`` when neither names one)."""
    file_values: dict[str, Any] = {}
    if path:
        file_values = read_yaml_mapping(path, allow_empty=True)
    name = recipe or file_values.pop("recipe", None) or "tiny"
    file_values.pop("recipe", None)
    parsed = dict(parse_override(item) for item in overrides)
    return resolve_config(name, file_values=file_values, overrides=parsed)
