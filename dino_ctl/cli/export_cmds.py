"""``dino-ctl export`` and ``dino-ctl import``: backbones in the released DINOv2 state-dict layout."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from trainer.config import ARCHS, ModelConfig
from trainer.storage import StorageError, storage_errors

from dino_ctl.cli.output import OutputFormat, OutputOption

console = Console(stderr=True)


def export(
    source: Annotated[str, typer.Argument(help="stage dir, ckpt-* dir or export dir")],
    out: Annotated[str, typer.Option("--out", help="directory for backbone.safetensors, backbone.pth, model.json")],
    network: Annotated[str, typer.Option(help="final, teacher, student or student_ema")] = "final",
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Export a trained backbone as a released-DINOv2-layout state dict (safetensors and .pth)."""
    from trainer.artifacts import export_backbone, load_backbone

    try:
        with storage_errors(source):
            backbone, model_config = load_backbone(source, network=network)  # type: ignore[arg-type]
        with storage_errors(out):
            export_backbone(backbone, model_config, out)  # model.json, backbone.* each written whole, then moved
    except StorageError as exc:  # bucket, credentials or endpoint: a runtime failure naming the URI
        console.print(f"[red]error:[/red] {exc}", markup=True)
        raise typer.Exit(1) from exc
    except (FileNotFoundError, ValueError, KeyError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    loader = (
        "from trainer.models import build_backbone; from trainer.artifacts import read_model_config; "
        f"m = build_backbone(read_model_config('{out}/model.json'), checkpoint='{out}/backbone.pth')"
    )
    if output == OutputFormat.JSON:
        typer.echo(json.dumps({"out": out, "arch": model_config.arch, "loader": loader}))
    else:
        console.print(f"exported {model_config.arch} backbone to [bold]{out}[/bold]\nload it with:\n  {loader}")


def import_released(
    checkpoint: Annotated[str, typer.Argument(help="released dinov2_vit*14*.pth (flat or chunked blocks)")],
    out: Annotated[str, typer.Option("--out", help="export directory to write")],
    arch: Annotated[str, typer.Option(help="vit_small, vit_base, vit_large or vit_giant2")] = "vit_small",
    patch_size: Annotated[int, typer.Option(help="patch size of the release")] = 14,
    img_size: Annotated[int, typer.Option(help="pos-embed resolution of the release")] = 518,
    registers: Annotated[int, typer.Option(help="register tokens (4 for _reg4 releases)")] = 0,
) -> None:
    """Import a released DINOv2 backbone (strict key match) into an export directory usable by eval and curation."""
    from trainer.artifacts import export_backbone
    from trainer.models import build_backbone

    if arch not in ARCHS:
        raise typer.BadParameter(f"invalid value {arch!r}; allowed: {', '.join(ARCHS)}", param_hint="--arch")
    reg4 = registers > 0  # the _reg4 releases interpolate with antialias and no offset
    config = ModelConfig(
        arch=arch, patch_size=patch_size, img_size=img_size, num_register_tokens=registers, drop_path_rate=0.0,
        interpolate_antialias=reg4, interpolate_offset=0.0 if reg4 else 0.1,
        ffn="swiglu" if arch == "vit_giant2" else "mlp",
    )
    try:
        backbone = build_backbone(config, checkpoint=checkpoint)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    export_backbone(backbone, config, out)
    console.print(f"imported {checkpoint} as {arch}/{patch_size} into [bold]{out}[/bold]")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("import")(import_released)
