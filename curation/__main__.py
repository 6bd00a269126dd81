"""``python -m curation SPEC.yaml [options]``: the same command as ``dino-ctl curate`` (used by the Jobs' pods)."""

import typer

from curation.cli import curate


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(curate)
    app()


if __name__ == "__main__":
    main()
