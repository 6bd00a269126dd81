"""``dino-ctl curate SPEC.yaml`` (also ``python -m curation SPEC.yaml``): run or render a curation pipeline.

Importing this module is cheap (typer and rich only); numpy, faiss and torch load when a step runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from curation.progress import RichReporter
from trainer.config import ConfigError

__all__ = ["curate", "register"]

SpecArg = Annotated[Path, typer.Argument(help="curation spec YAML (see examples/curation.yaml)")]
StepsOpt = Annotated[
    str | None,
    typer.Option("--steps", help="comma-separated steps to run (embed,dedup,retrieve,balance,write); default all"),
]
ShardOpt = Annotated[
    int | None,
    typer.Option(
        "--shard-index", min=0, help="compute only this shard of embed/write (default: $JOB_COMPLETION_INDEX, else all)"
    ),
]
NumShardsOpt = Annotated[
    int | None,
    typer.Option("--num-shards", min=1, help="override embed.num_shards / write.num_shards of the steps run"),
]
RenderOpt = Annotated[bool, typer.Option("--render", help="print the Kubernetes ConfigMap and PyTorchJob as YAML and exit")]
ImageOpt = Annotated[str | None, typer.Option("--image", help="container image for --render")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log at INFO level")]
RanksOpt = Annotated[
    int,
    typer.Option("--ranks", min=1, help="run N local ranks (torchrun + python -m curation.launch, gloo on CPU)"),
]


def _load(spec_path: Path, steps: list[str] | None, num_shards: int | None):  # -> CurationSpec
    from curation.config import load_spec

    spec = load_spec(spec_path)
    if num_shards is not None:
        chosen = steps or ["embed", "write"]
        if "embed" in chosen:
            spec = spec.model_copy(update={"embed": spec.embed.model_copy(update={"num_shards": num_shards})})
        if "write" in chosen:
            spec = spec.model_copy(update={"write": spec.write.model_copy(update={"num_shards": num_shards})})
    return spec


def curate(
    spec_path: SpecArg,
    steps: StepsOpt = None,
    shard_index: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    render: RenderOpt = False,
    image: ImageOpt = None,
    verbose: VerboseOpt = False,
    ranks: RanksOpt = 1,
) -> None:
    """Curate an image pool: embed, deduplicate, retrieve, balance, write MDS shards (each step resumable)."""
    from rich.console import Console

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    console = Console(stderr=True)
    step_list = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
    try:
        spec = _load(spec_path, step_list, num_shards)
        if render:
            _render(spec, image)
            return
        if ranks > 1:
            if shard_index is not None or num_shards is not None:
                raise ConfigError("--ranks", ranks, "1 with --shard-index or --num-shards (ranks shard the steps)")
        else:
            results = _run(spec, step_list, shard_index, console)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    except (RuntimeError, OSError) as exc:  # OSError: also trainer.storage.StorageError (write.remote)
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    if ranks > 1:  # outside the try: typer.Exit is a RuntimeError
        raise typer.Exit(code=_run_ranks(spec_path, steps, ranks, verbose))
    _print_results(console, results, Path(spec.output))


def _run_ranks(spec_path: Path, steps: str | None, ranks: int, verbose: bool) -> int:
    """``torchrun --standalone --nproc-per-node RANKS -m curation.launch``: the cluster's entry point, locally."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "curation.launch", "--spec", str(spec_path)]
    command += (["--steps", steps] if steps else []) + (["--verbose"] if verbose else [])
    # Each rank gets an equal share of the cores (torchrun would otherwise default every rank to one thread).
    threads = max(1, (os.cpu_count() or 1) // ranks)
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=False).returncode


def _render(spec, image: str | None) -> None:
    from curation.kube import render_curation_jobs

    if not image:
        raise typer.BadParameter("--render needs --image (the container image holding dino-ctl)")
    typer.echo(yaml.safe_dump_all(render_curation_jobs(spec, image=image), sort_keys=False), nl=False)


def _run(spec, steps: list[str] | None, shard_index: int | None, console):
    from curation.pipeline import resolve_shard, run_pipeline

    with RichReporter(console) as reporter:
        return run_pipeline(spec, steps=steps, shard_index=resolve_shard(shard_index), reporter=reporter)


def _print_results(console, results, output: Path) -> None:
    from rich.table import Table

    table = Table(title="curation steps")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for result in results:
        table.add_row(result.name, result.status, f"{result.seconds:.1f}")
    console.print(table)
    if results and results[-1].name == "write" and results[-1].status != "partial":
        console.print(f"dataset: {output / 'dataset'}  manifest: {output / 'manifest.json'}")


def register(app: typer.Typer) -> None:
    """Add ``curate`` to the ``dino-ctl`` application."""
    app.command("curate")(curate)
