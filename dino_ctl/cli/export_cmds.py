"""Placeholder until its owner lands it."""

import typer


def register(app: typer.Typer) -> None:
    del app
