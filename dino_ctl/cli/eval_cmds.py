"""``dino-ctl eval knn|linear``: frozen-feature top-1 of any checkpoint next to a random-init baseline."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from trainer.storage import StorageError, check_reachable, storage_errors

from dino_ctl.cli.output import OutputFormat, OutputOption

eval_app = typer.Typer(help="Evaluate frozen features of a trained backbone (k-NN, linear probe).", no_args_is_help=True)
console = Console(stderr=True)

Source = Annotated[str, typer.Argument(help="stage dir, ckpt-* dir, export dir, or released-layout .pth/.safetensors")]
TrainData = Annotated[str, typer.Option("--train", help="labelled MDS dataset or image folder to fit on")]
TestData = Annotated[str, typer.Option("--test", help="labelled MDS dataset or image folder to score")]
Network = Annotated[str, typer.Option(help="final (teacher, or student EMA after distillation), teacher, student")]
ImageSize = Annotated[int | None, typer.Option(help="eval resolution (default: the model's img_size)")]
LimitTrain = Annotated[int | None, typer.Option(help="use the first N training samples")]
LimitTest = Annotated[int | None, typer.Option(help="use the first N test samples")]
Baseline = Annotated[bool, typer.Option(help="also score a random-init backbone and raw pixels")]


def run_eval(
    protocol: str,
    source: str,
    train: str,
    test: str,
    *,
    network: str = "final",
    image_size: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    baseline: bool = True,
    seed: int = 0,
) -> dict:
    """Load, extract, score; returns the JSON-able report (used by ``eval`` and ``run``)."""
    import torch

    from trainer.artifacts import load_backbone
    from trainer.evaluate import evaluate_backbone, labelled_batches
    from trainer.models import build_backbone

    with storage_errors(source):
        backbone, model_config = load_backbone(source, network=network)  # type: ignore[arg-type]
    size = image_size or model_config.img_size
    with storage_errors(train):
        check_reachable(train)
        train_batches = labelled_batches(train, image_size=size, limit=limit_train)
    with storage_errors(test):
        check_reachable(test)
        test_batches = labelled_batches(test, image_size=size, limit=limit_test)
    random_backbone = None
    if baseline:
        torch.manual_seed(seed)
        random_backbone = build_backbone(model_config, drop_path_rate=0.0).eval()
    scores = evaluate_backbone(
        backbone, train=train_batches, test=test_batches, protocols=(protocol,),
        random_backbone=random_backbone, raw_pixels=baseline,
    )
    return {
        "protocol": protocol,
        "source": source,
        "network": network,
        "image_size": size,
        "num_train": sum(len(labels) for _, labels in train_batches),
        "num_test": sum(len(labels) for _, labels in test_batches),
        "top1": scores[protocol],
    }


def _report(report: dict, output: OutputFormat) -> None:
    if output == OutputFormat.JSON:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"{report['protocol']} top-1 ({report['num_train']} train / {report['num_test']} test)")
    table.add_column("features")
    table.add_column("top-1", justify="right")
    for name, value in report["top1"].items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


def _command(protocol: str):
    def command(
        source: Source,
        train: TrainData,
        test: TestData,
        network: Network = "final",
        image_size: ImageSize = None,
        limit_train: LimitTrain = None,
        limit_test: LimitTest = None,
        baseline: Baseline = True,
        output: OutputOption = OutputFormat.TEXT,
    ) -> None:
        if network not in ("final", "teacher", "student", "student_ema"):
            raise typer.BadParameter(
                f"invalid value {network!r}; allowed: final, teacher, student, student_ema", param_hint="--network"
            )
        try:
            report = run_eval(protocol, source, train, test, network=network, image_size=image_size,
                              limit_train=limit_train, limit_test=limit_test, baseline=baseline)
        except StorageError as exc:  # bucket, credentials or endpoint of one of the three locations
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
        except (FileNotFoundError, ValueError, KeyError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        _report(report, output)

    command.__doc__ = f"{'k-NN (k=20, T=0.07)' if protocol == 'knn' else 'Linear-probe'} top-1 of frozen features."
    return command


eval_app.command("knn")(_command("knn"))
eval_app.command("linear")(_command("linear"))


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
