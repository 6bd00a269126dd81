"""The config schema documents itself: every field of every section has a docstring under it."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import trainer.config
from trainer.config import TrainConfig, schema


def _undocumented_fields() -> list[str]:
    """``Section.field`` for each dataclass field of :mod:`trainer.config.schema` with no string right below it."""
    tree = ast.parse(inspect.getsource(schema))
    missing = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for index, item in enumerate(body):
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                after = body[index + 1] if index + 1 < len(body) else None
                documented = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                              and isinstance(after.value.value, str) and after.value.value.strip())
                if not documented:
                    missing.append(f"{node.name}.{item.target.id}")
    return missing


def _sections(cls: type) -> set[type]:
    """``cls`` and every dataclass reachable through its fields' annotations."""
    found = {cls}
    for field in dataclasses.fields(cls):
        for candidate in vars(schema).values():
            if dataclasses.is_dataclass(candidate) and candidate.__name__ in str(field.type) and candidate not in found:
                found |= _sections(candidate)
    return found


def test_every_schema_field_has_a_docstring() -> None:
    assert _undocumented_fields() == []


def test_every_section_of_the_tree_lives_in_the_schema_module() -> None:
    assert {cls.__module__ for cls in _sections(TrainConfig)} == {"trainer.config.schema"}
    assert len(_sections(TrainConfig)) == 13


def test_the_package_reexports_what_its_modules_export() -> None:
    from trainer.config import errors, recipes, resolve, validate

    for module in (errors, recipes, resolve, schema, validate):
        for name in module.__all__:
            if name != "merge":
                assert getattr(trainer.config, name) is getattr(module, name), name
