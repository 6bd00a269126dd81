"""Entry point of the ``dino-ctl`` command.

Each command module exposes ``register(app: typer.Typer) -> None``. Modules import torch lazily (inside the
command functions) so ``dino-ctl validate`` and ``render`` start fast and work without the trainer's dependencies.
"""

from __future__ import annotations

import importlib

import typer

from dino_ctl import __version__

COMMAND_MODULES = (
    "dino_ctl.cli.spec_cmds",  # validate, render
    "dino_ctl.cli.cluster_cmds",  # submit, status, logs, cancel, resume
    "dino_ctl.cli.checkpoint_cmds",  # checkpoints list/show/promote
    "dino_ctl.cli.run_cmds",  # run (the embedded default)
    "dino_ctl.cli.data_cmds",  # data prepare
    "dino_ctl.cli.curate_cmds",  # curate
    "dino_ctl.cli.eval_cmds",  # eval knn / eval linear
    "dino_ctl.cli.export_cmds",  # export / import
)

app = typer.Typer(
    name="dino-ctl",
    help="Pretrain DINOv2 models on Kubernetes (or this machine) from one declarative spec.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dino-ctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """dino-ctl: validate, render, submit and run DINOv2 experiments."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
