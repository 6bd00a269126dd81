"""``dino-ctl run SPEC``: the same experiment spec on this machine (the embedded default).

Validates the spec exactly like ``submit`` (exit 2, nothing run), prepares datasets that a stream or the evaluation
declares with ``prepare`` and that are missing, runs every stage in dependency order as a child process (training:
torchrun, TorchX ``local_cwd``, or a plain process; curation: ``python -m curation.launch``, under torchrun with
``--nproc`` > 1, its dataset feeding the stages whose ``data`` names it), shows live progress, evaluates the final
backbone with k-NN next to a random-init backbone and raw pixels, draws the loss curves and the k-NN result into
``report.png`` beside the checkpoints, and with ``--output json`` prints one JSON summary as its last line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from trainer.layout import PREEMPTED_EXIT_CODE, write_stage_config

from dino_ctl.cli.eval_cmds import run_eval
from dino_ctl.cli.output import OutputFormat, OutputOption
from dino_ctl.errors import SpecError, SpecErrors
from dino_ctl.local import LocalStageResult, read_log_records, run_curation, run_stage

console = Console(stderr=True)


def _load(spec_path: str):
    """The spec file, validated for this machine, and its resolution (every stage's config)."""
    from dino_ctl.validation import load_spec, validate_experiment

    return validate_experiment(load_spec(spec_path), backend="local")


def _prepare_missing(prepare: Any, location: str) -> None:
    """Write the MDS shards a ``prepare`` block describes unless ``location`` already holds an index."""
    if prepare is None or Path(location, "index.json").exists():
        return
    from trainer.data.prepare import FASHION_MNIST_DIR, prepare_dataset

    source = prepare.source or (FASHION_MNIST_DIR if prepare.format == "fashion-mnist" else None)
    if source is None:
        raise SpecError("prepare.source", None, f"the input location for format {prepare.format}")
    console.print(f"preparing {prepare.format} ({prepare.split}) -> {location}")
    result = prepare_dataset(source, location, format=prepare.format, split=prepare.split, limit=prepare.limit)
    console.print(f"wrote {result.num_samples} samples ({result.num_skipped} skipped) to {location}")


def _progress_callback(progress: Progress, task: Any, stage: str):
    def on_record(record: dict[str, Any]) -> None:
        if record.get("event") != "step":
            return
        progress.update(
            task,
            completed=record["iteration"],
            total=record["iterations"],
            description=(
                f"{stage} loss {record.get('loss/total', float('nan')):.3f} "
                f"{record.get('images_per_second', 0.0):.0f} img/s"
            ),
        )

    return on_record


def _train_stage(config, stage: str, *, nproc: int, launcher: str, quiet: bool) -> LocalStageResult:
    # The stage's config.yaml beside its checkpoints: the file the trainer reads here and rewrites at start.
    config_path = write_stage_config(config.checkpoint.dir, config)
    log_path = Path(config.metrics.log_file or Path(config.checkpoint.dir) / "train_log.jsonl")
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        task = progress.add_task(stage, total=config.optim.iterations)
        return run_stage(
            config_path, log_path, nproc=nproc, launcher=launcher,
            on_record=_progress_callback(progress, task, stage),
        )


def _curate_stage(curation, *, nproc: int) -> LocalStageResult:
    """Run a curation stage here: its resolved spec written as ``curation.yaml`` in its output directory."""
    output = Path(curation.spec.output)
    output.mkdir(parents=True, exist_ok=True)
    spec_path = output / "curation.yaml"
    spec_path.write_text(curation.spec_text())
    console.print(f"curating {curation.name} -> {output} ({nproc} rank{'s' if nproc > 1 else ''})")
    return run_curation(str(spec_path), output / "curation-report.json", nproc=nproc)


def _curation_summary(curation, result: LocalStageResult) -> dict[str, Any]:
    dataset = curation.dataset.get("local") or curation.dataset.get("remote")
    return {"name": curation.name, "kind": "curation", "exit_code": result.exit_code,
            "seconds": round(result.seconds, 1), "curation_steps": result.records, "dataset": dataset}


def _plot(log_path: Path, knn: dict[str, float] | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, _ = read_log_records(log_path)
    steps = [r for r in records if r.get("event") == "step"]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(11 if knn else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    for name in ("total", "dino_global", "dino_local", "ibot", "koleo"):
        values = [(r["iteration"], r[f"loss/{name}"]) for r in steps if f"loss/{name}" in r]
        if values:
            loss_ax.plot(*zip(*values), label=name)
    loss_ax.set_xlabel("iteration")
    loss_ax.set_ylabel("loss")  # linear: KoLeo goes negative once features spread out
    loss_ax.legend()
    loss_ax.set_title("training losses")
    if knn:
        bar_ax = axes[0][1]
        bar_ax.bar(list(knn), list(knn.values()), color=["tab:green", "tab:gray", "tab:blue"][: len(knn)])
        for index, value in enumerate(knn.values()):
            bar_ax.text(index, value, f"{value:.3f}", ha="center", va="bottom")
        bar_ax.set_ylim(0, 1)
        bar_ax.set_title("k-NN top-1")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _stage_summary(name: str, config, result: LocalStageResult) -> dict[str, Any]:
    last = result.last_step or {}
    return {
        "name": name,
        "exit_code": result.exit_code,
        "seconds": round(result.seconds, 1),
        "steps": last.get("iteration", 0),
        "images_per_second": last.get("images_per_second"),
        "final_losses": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("loss/")},
        "checkpoint_dir": config.checkpoint.dir,
    }


def run(
    spec: Annotated[str, typer.Argument(help="DinoExperiment YAML")],
    stage: Annotated[list[str] | None, typer.Option("--stage", help="run only these stages (repeatable)")] = None,
    nproc: Annotated[int, typer.Option(help="processes per stage on this machine")] = 1,
    launcher: Annotated[str, typer.Option(help="auto, python, torchrun or torchx")] = "auto",
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="k-NN evaluation after training")] = True,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Run an experiment spec on this machine: prepare data, train every stage, evaluate, plot."""
    if launcher not in ("auto", "python", "torchrun", "torchx"):
        raise typer.BadParameter(
            f"invalid value {launcher!r}; allowed: auto, python, torchrun, torchx", param_hint="--launcher"
        )
    try:
        resolved = _load(spec)
        experiment, order = resolved.experiment, resolved.order
        selected = [name for name in order if not stage or name in stage]
        unknown = sorted(set(stage or ()) - set(order))
        if unknown:
            raise SpecError("--stage", unknown[0], "a stage of the spec: " + ", ".join(order))
        configs = {name: resolved.config(name) for name in selected if not resolved.is_curation(name)}
    except (SpecError, SpecErrors) as exc:
        console.print(f"[red]invalid spec:[/red] {exc}")
        raise typer.Exit(2) from exc

    spec_obj = experiment.spec
    for stream in spec_obj.data.streams:
        _prepare_missing(getattr(stream, "prepare", None), stream.local or stream.remote or "")
    summaries = []
    for name in selected:
        if resolved.is_curation(name):
            result = _curate_stage(resolved.curation(name), nproc=nproc)
            summaries.append(_curation_summary(resolved.curation(name), result))
            if result.exit_code != 0:
                console.print(f"[red]curation stage {name} failed with exit code {result.exit_code}[/red]")
                raise typer.Exit(result.exit_code)
            continue
        config = configs[name]
        result = _train_stage(config, name, nproc=nproc, launcher=launcher, quiet=output == OutputFormat.JSON)
        summaries.append(_stage_summary(name, config, result))
        if result.exit_code == PREEMPTED_EXIT_CODE:
            console.print(f"[yellow]stage {name} was preempted after a checkpoint; rerun to resume[/yellow]")
            raise typer.Exit(PREEMPTED_EXIT_CODE)
        if result.exit_code != 0:
            console.print(f"[red]stage {name} failed with exit code {result.exit_code}[/red]")
            raise typer.Exit(result.exit_code)

    report: dict[str, Any] = {"experiment": experiment.metadata.name, "stages": summaries}
    trained = [name for name in selected if name in configs]
    if not trained:  # only curation stages ran: their datasets are the result
        _print_report(report, output)
        return
    final_dir = Path(configs[trained[-1]].checkpoint.dir)
    evaluation = getattr(spec_obj, "evaluation", None)
    knn = None
    if evaluate and evaluation is not None:
        _prepare_missing(evaluation.prepare_train, evaluation.train)
        _prepare_missing(evaluation.prepare_test, evaluation.test)
        result = run_eval("knn", str(final_dir), evaluation.train, evaluation.test,
                          limit_train=evaluation.limit_train, limit_test=evaluation.limit_test)
        knn = result["top1"]
        report["knn"] = result
    report["checkpoint"] = str(final_dir)
    report["plot"] = str(_plot(final_dir / "train_log.jsonl", knn, final_dir / "report.png"))
    _print_report(report, output)


def _print_report(report: dict[str, Any], output: OutputFormat) -> None:
    if output == OutputFormat.JSON:
        typer.echo(json.dumps(report))
        return
    from rich.table import Table

    table = Table(title=f"experiment {report['experiment']}")
    for column in ("stage", "steps", "img/s", "final total loss", "seconds"):
        table.add_column(column)
    for s in report["stages"]:
        if s.get("kind") == "curation":
            table.add_row(s["name"], "curation", "-", "-", str(s["seconds"]))
            continue
        ips = s["images_per_second"]
        table.add_row(s["name"], str(s["steps"]), f"{ips:.1f}" if ips else "-",
                      f"{s['final_losses'].get('total', float('nan')):.4f}", str(s["seconds"]))
    Console().print(table)
    if "knn" in report:
        top1 = report["knn"]["top1"]
        Console().print("k-NN top-1: " + ", ".join(f"{k} {v:.4f}" for k, v in top1.items()))
    for s in report["stages"]:
        if s.get("kind") == "curation":
            Console().print(f"dataset of {s['name']}: {s['dataset']}")
    if "checkpoint" in report:
        Console().print(f"checkpoints: {report['checkpoint']}\nplot: {report['plot']}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
