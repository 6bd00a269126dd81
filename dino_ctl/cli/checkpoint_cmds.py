"""``dino-ctl checkpoints list | show | promote``: the checkpoint registry, read directly from storage (no torch).

The source is ``--spec FILE`` (every stage under ``spec.storage.checkpoints``) or ``--dir`` (one stage directory: a
path or an fsspec URI such as s3://bucket/runs/x/pretrain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dino_ctl.cli.output import OutputFormat, OutputOption, console, emit, fail, fail_spec, load_spec_or_exit, table
from dino_ctl.errors import SpecError

__all__ = ["register"]

app = typer.Typer(name="checkpoints", help="List, inspect and promote stage checkpoints.", no_args_is_help=True)

SpecOption = Annotated[Path | None, typer.Option("--spec", help="Spec file (or give --dir).")]
DirOption = Annotated[str | None, typer.Option("--dir", help="One stage's checkpoint directory or URI.")]
StageOption = Annotated[str | None, typer.Option(help="Only this stage.")]


def _stages(spec_path: Path | None, directory: str | None, stage: str | None, output: OutputFormat) -> list[Any]:
    from dino_ctl.checkpoints import stage_checkpoints

    if (spec_path is None) == (directory is None):
        fail_spec(SpecError("--spec/--dir", None, "exactly one of --spec FILE or --dir DIRECTORY"), output)
    experiment = load_spec_or_exit(spec_path, output) if spec_path is not None else None
    try:
        return stage_checkpoints(experiment, directory=directory, stage=stage)
    except SpecError as exc:
        fail_spec(exc, output)
    except OSError as exc:
        fail(f"cannot read checkpoints: {exc}", output)


@app.command("list")
def list_command(spec_path: SpecOption = None, directory: DirOption = None, stage: StageOption = None,
                 output: OutputOption = OutputFormat.TEXT) -> None:
    """Every checkpoint of each stage: iteration, complete or interrupted, published."""
    rows = [row for found in _stages(spec_path, directory, stage, output) for row in found.rows()]
    if output == OutputFormat.JSON:
        emit({"checkpoints": [{k: v for k, v in row.items() if k != "meta"} for row in rows]})
        return
    table("checkpoints", ["stage", "checkpoint", "iteration", "complete", "published"],
          [[r["stage"], r["name"], r["iteration"], "yes" if r["complete"] else "no (interrupted)",
            "*" if r["published"] else ""] for r in rows])


def _single_stage(
    spec_path: Path | None, directory: str | None, stage: str | None, output: OutputFormat
) -> Any:
    """The one stage a command acts on; with a multi-stage spec ``--stage`` must pick it (exit 2 otherwise)."""
    found = _stages(spec_path, directory, stage, output)
    if len(found) != 1:
        fail_spec(SpecError("--stage", stage, "one of " + ", ".join(f.stage for f in found)), output)
    return found[0]


@app.command("show")
def show(
    checkpoint: Annotated[str | None, typer.Argument(help="Name or iteration (default: newest complete).")] = None,
    spec_path: SpecOption = None,
    directory: DirOption = None,
    stage: StageOption = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """One checkpoint's completion record (iteration, world size, time, losses) and its location."""
    from dino_ctl.checkpoints import find_checkpoint

    selected = _single_stage(spec_path, directory, stage, output)
    try:
        info = find_checkpoint(selected, checkpoint)
    except SpecError as exc:
        fail_spec(exc, output)
    published = selected.published is not None and info.path.endswith("/" + selected.published)
    record = {"stage": selected.stage, "path": info.path, "iteration": info.iteration, "complete": info.complete,
              "published": published, "meta": info.meta}
    if output == OutputFormat.JSON:
        emit(record)
        return
    console.print(f"[bold]{info.path}[/]  iteration {info.iteration}  "
                  f"{'complete' if info.complete else 'INTERRUPTED (not usable)'}{'  published' if published else ''}")
    for key, value in info.meta.items():
        console.print(f"  {key}: {value}", markup=False)


@app.command("promote")
def promote_command(
    checkpoint: Annotated[str | None, typer.Argument(help="Name or iteration (default: newest complete).")] = None,
    spec_path: SpecOption = None,
    directory: DirOption = None,
    stage: StageOption = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Publish a complete checkpoint (PUBLISHED.json): later stages start from it."""
    from dino_ctl.checkpoints import promote

    selected = _single_stage(spec_path, directory, stage, output)
    try:
        info = promote(selected, checkpoint)
    except SpecError as exc:
        fail_spec(exc, output)
    except OSError as exc:
        fail(f"cannot promote: {exc}", output)
    if output == OutputFormat.JSON:
        emit({"stage": selected.stage, "published": info.path, "iteration": info.iteration})
    else:
        console.print(f"published {info.path} (iteration {info.iteration}) for stage {selected.stage}")


def register(root: typer.Typer) -> None:
    """Add the ``checkpoints`` sub-app."""
    root.add_typer(app)
