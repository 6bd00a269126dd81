"""Progress reporting for the steps: a silent default for library use, a rich one for the command line."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["LogReporter", "Reporter", "RichReporter"]

logger = logging.getLogger(__name__)

Advance = Callable[[int], None]


class Reporter:
    """Receives step progress; the base class only logs (library and test use). Usable as a context manager."""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def task(self, description: str, total: int | None) -> Advance:
        """Start a progress task; the returned callable advances it by a number of items."""
        logger.info("%s (%s items)", description, total if total is not None else "?")
        return lambda num: None

    def step_done(self, name: str, *, summary: dict[str, Any], reused: bool, seconds: float) -> None:
        """Called once per step with its summary (``reused``: the step's committed output was kept)."""
        logger.info("step %s %s in %.1f s: %s", name, "reused" if reused else "done", seconds, summary)


class LogReporter(Reporter):
    """Progress as INFO log lines of ``curation.progress`` (``python -m curation.launch`` shows them): for pods and
    non-interactive runs, where progress bars would flood the log. A task reports when it starts, at every further
    quarter and when done."""

    def __init__(self, *, prefix: str = "", emit: Callable[[str], None] | None = None) -> None:
        self.prefix = f"{prefix}: " if prefix else ""
        self.emit = emit or (lambda line: logger.info("%s", line))

    def task(self, description: str, total: int | None) -> Advance:
        self.emit(f"{self.prefix}{description} ({total if total is not None else '?'} items)")
        if not total:
            return lambda num: None
        state = {"done": 0, "next": 0.25}

        def advance(num: int) -> None:
            state["done"] += num
            fraction = state["done"] / total
            if fraction >= state["next"]:
                self.emit(f"{self.prefix}{description}: {state['done']}/{total} ({fraction:.0%})")
                state["next"] = (int(fraction * 4) + 1) / 4

        return advance

    def step_done(self, name: str, *, summary: dict[str, Any], reused: bool, seconds: float) -> None:
        status = "reused" if reused else "done"
        self.emit(f"{self.prefix}step {name} {status} in {seconds:.1f} s: {summary}")


class RichReporter(Reporter):
    """A rich progress bar per task and a summary table per step (used by ``dino-ctl curate``)."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def task(self, description: str, total: int | None) -> Advance:
        task_id = self.progress.add_task(description, total=total)
        return lambda num: self.progress.advance(task_id, num)

    def step_done(self, name: str, *, summary: dict[str, Any], reused: bool, seconds: float) -> None:
        from rich.table import Table

        status = "[yellow]reused[/]" if reused else "[green]done[/]"
        table = Table(show_header=False)
        for key, value in summary.items():
            table.add_row(str(key), str(value))
        self.progress.console.print(f"[bold]{name}[/]: {status} in {seconds:.1f} s")
        self.progress.console.print(table)
