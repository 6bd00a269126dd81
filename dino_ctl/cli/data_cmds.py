"""``dino-ctl data prepare``: turn an image folder, an image list or Fashion-MNIST into MDS shards.

The shards follow ``trainer/data/contract.py`` (original encoded bytes, deterministic ids) and can be written to a
local directory or an object-store URI (s3://, gs://, ...; streaming uploads them). The trainer is imported lazily.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from trainer.storage import StorageError

from dino_ctl.cli.output import EXIT_USAGE, OutputFormat, OutputOption, console, emit, err_console, fail

__all__ = ["register"]

app = typer.Typer(name="data", help="Prepare training and evaluation data (MDS shards).", no_args_is_help=True)


class SourceFormat(StrEnum):
    FOLDER = "folder"
    LIST = "list"
    FASHION_MNIST = "fashion-mnist"


class Split(StrEnum):
    TRAIN = "train"
    TEST = "test"


def _shard_size(value: str) -> int:
    from streaming.base.util import bytes_to_int

    try:
        size = bytes_to_int(value)
    except ValueError as exc:
        raise typer.BadParameter(f"invalid value {value!r}; allowed: bytes like 67108864, 64mb, 1gb") from exc
    if size <= 0:
        raise typer.BadParameter(f"invalid value {value!r}; allowed: a positive size")
    return size


def _run_with_progress(source: str, out: str, *, show_progress: bool, **options: object) -> object:
    """``prepare_dataset`` under a rich progress bar on stderr."""
    from trainer.data.prepare import prepare_dataset

    columns = (TextColumn("[bold]preparing[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(source, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return prepare_dataset(source, out, progress=advance, **options)


@app.command("prepare")
def prepare(
    source: Annotated[
        str,
        typer.Argument(help="Image folder (class sub-folders -> labels), image list file, or Fashion-MNIST idx dir."),
    ],
    out: Annotated[str, typer.Option("--out", help="Output directory or object-store URI (s3://, gs://, ...).")],
    format: Annotated[SourceFormat, typer.Option("--format", help="How to read SOURCE.")] = SourceFormat.FOLDER,
    split: Annotated[Split, typer.Option(help="Fashion-MNIST split.")] = Split.TRAIN,
    limit: Annotated[int | None, typer.Option(min=1, help="Keep the first N samples (in SOURCE's order).")] = None,
    shard_size: Annotated[str, typer.Option(help="Shard size limit, e.g. 64mb.")] = "64mb",
    overwrite: Annotated[bool, typer.Option(
        help="Replace what --out holds (a local directory's contents; on an object store the dataset, its index.json "
             "removed first).")] = False,
    verify: Annotated[bool, typer.Option(help="Decode every image and skip those that fail.")] = False,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Write SOURCE as MDS shards (columns id, image, label, source, provenance) to --out."""
    size_limit = _shard_size(shard_size)
    try:
        result = _run_with_progress(
            source, out, format=format.value, split=split.value, limit=limit, shard_size=size_limit,
            overwrite=overwrite, verify=verify, show_progress=output == OutputFormat.TEXT,
        )
    except StorageError as exc:  # bucket, credentials, endpoint: a runtime failure, and no index.json was written
        fail(str(exc), output)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        if output == OutputFormat.JSON:
            emit({"error": str(exc), "exitCode": EXIT_USAGE})
        else:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(EXIT_USAGE) from exc
    summary = {
        "out": result.out,
        "samples": result.num_samples,
        "skipped": result.num_skipped,
        "classes": result.classes,
        "format": format.value,
    }
    if output == OutputFormat.JSON:
        emit(summary)
        return
    skipped = f", skipped {result.num_skipped} undecodable" if result.num_skipped else ""
    console.print(f"[green]wrote[/] {result.num_samples} samples to {result.out}{skipped}")


def register(root: typer.Typer) -> None:
    root.add_typer(app)
