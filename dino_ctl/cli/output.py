"""Output helpers shared by the CLI commands: rich tables for people, ``--output json`` for scripts, exit codes.

Exit codes: 0 success; 1 a runtime failure (cluster unreachable, API error, experiment failed); 2 a user mistake
(invalid spec, bad argument), with the field path in the message. In JSON mode errors are printed as JSON on stdout
too, so a script always gets one parseable document.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table

from dino_ctl.errors import DinoCtlError, KubeError, SpecError, SpecErrors

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "OutputFormat",
    "OutputOption",
    "check_backend_or_exit",
    "console",
    "emit",
    "fail",
    "fail_spec",
    "load_spec_or_exit",
    "table",
    "yaml_stream",
]

EXIT_FAILURE = 1
EXIT_USAGE = 2

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="text (rich, for people) or json (one document, for scripts).")
]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (resolved configs, the recorded spec) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def yaml_stream(objects: list[dict[str, Any]]) -> str:
    """Objects as one YAML stream (``---`` separated), keys in render order."""
    return yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False)


def emit(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout."""
    typer.echo(json.dumps(data, indent=2, default=str))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a rich table."""
    view = Table(title=title, title_justify="left")
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(view)


def _error_dict(error: SpecError) -> dict[str, Any]:
    return {"path": error.path, "value": error.value, "allowed": error.allowed, "message": str(error)}


def fail_spec(errors: SpecErrors | SpecError, output: OutputFormat, *, source: str = "") -> NoReturn:
    """Report invalid-spec errors (each with its field path) and exit with code 2."""
    items = errors.errors if isinstance(errors, SpecErrors) else (errors,)
    if output == OutputFormat.JSON:
        emit({"valid": False, "source": source, "errors": [_error_dict(e) for e in items]})
    else:
        prefix = f"{source}: " if source else ""
        err_console.print(f"[bold red]invalid spec[/] {prefix}{len(items)} error(s)")
        for error in items:
            err_console.print(f"  {error}", markup=False)
    raise typer.Exit(EXIT_USAGE)


def fail(error: DinoCtlError | str, output: OutputFormat, *, code: int = EXIT_FAILURE) -> NoReturn:
    """Report a runtime error and exit (code 1 unless given; 2 for permanent API refusals caused by input)."""
    message = str(error)
    if isinstance(error, KubeError) and error.status in (400, 422):
        code = EXIT_USAGE
    if output == OutputFormat.JSON:
        emit({"error": message, "exitCode": code})
    else:
        err_console.print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


def load_spec_or_exit(path: Path, output: OutputFormat, *, backend: str | None = None) -> Any:
    """:func:`dino_ctl.validation.load_spec` with exit code 2 on any error (re-validated for ``backend`` when
    given)."""
    from dino_ctl.validation import load_spec

    if not path.is_file():
        fail_spec(SpecError("SPEC", str(path), "a path to an existing spec file"), output)
    try:
        experiment = load_spec(path)
    except (SpecErrors, SpecError) as exc:
        fail_spec(exc, output, source=str(path))
    if backend and backend != experiment.spec.backend:
        check_backend_or_exit(experiment, backend, output, source=str(path))
    return experiment


def check_backend_or_exit(experiment: Any, backend: str, output: OutputFormat, *, source: str = "") -> None:
    """Re-run the backend-specific rules on a loaded spec for ``backend`` (exit code 2 on any error)."""
    from dino_ctl.validation import validate_experiment

    try:
        validate_experiment(experiment, backend=backend)
    except (SpecErrors, SpecError) as exc:
        fail_spec(exc, output, source=source)
