"""``dino-ctl validate``, ``render`` and ``schema``: everything that needs only the spec file (no cluster)."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from dino_ctl.cli.output import (
    OutputFormat,
    OutputOption,
    check_backend_or_exit,
    console,
    emit,
    fail_spec,
    load_spec_or_exit,
    table,
    yaml_stream,
)
from dino_ctl.errors import SpecError

__all__ = ["register"]

SpecArgument = Annotated[
    Path, typer.Argument(help="DinoExperiment spec (YAML).", exists=False, dir_okay=False, show_default=False)
]


class Backend(StrEnum):
    PYTORCHJOB = "pytorchjob"
    TRAINJOB = "trainjob"
    TORCHX = "torchx"


class SchemaKind(StrEnum):
    JSON_SCHEMA = "json-schema"
    CRD = "crd"


def _stage_rows(experiment: Any) -> list[list[Any]]:
    from dino_ctl.stages import resolve_experiment

    rows = []
    resolved_experiment = resolve_experiment(experiment)
    for name in resolved_experiment.order:
        stage = experiment.spec.stage(name)
        after = ", ".join(stage.dependencies()) or "-"
        if resolved_experiment.is_curation(name):  # a dataset, not a checkpoint: its output directory
            curation = resolved_experiment.curation(name)
            nodes, sizes = curation.nodes, curation.world_sizes
            rows.append([name, "curation", after, f"{nodes.min}..{nodes.max}", f"{sizes[0]}..{sizes[-1]}", "-", "-",
                         curation.spec.output])
            continue
        resolved = resolved_experiment.stage(name)
        config, nodes, sizes = resolved.config, resolved.nodes, resolved.world_sizes
        rows.append([stage.name, stage.recipe, after, f"{nodes.min}..{nodes.max}",
                     f"{sizes[0]}..{sizes[-1]}", config.optim.global_batch_size, config.optim.iterations,
                     resolved.checkpoint_dir])
    return rows


def validate(spec_path: SpecArgument, output: OutputOption = OutputFormat.TEXT) -> None:
    """Check a spec: shape, stage graph, recipes and overrides, world sizes. Exit 0 if valid, 2 otherwise."""
    from dino_ctl.stages import resolve_experiment
    from dino_ctl.validation import experiment_warnings

    experiment = load_spec_or_exit(spec_path, output)  # warnings are logged on stderr
    rows = _stage_rows(experiment)
    if output == OutputFormat.JSON:
        stages = [dict(zip(["name", "recipe", "after", "nodes", "worldSizes", "globalBatchSize", "iterations",
                            "checkpointDir"], row)) for row in rows]
        emit({"valid": True, "source": str(spec_path), "name": experiment.name, "namespace": experiment.namespace,
              "backend": experiment.spec.backend, "stages": stages,
              "warnings": experiment_warnings(resolve_experiment(experiment))})
        return
    console.print(f"[green]valid[/] {spec_path}: DinoExperiment {experiment.name} "
                  f"(namespace {experiment.namespace}, backend {experiment.spec.backend})")
    table("stages", ["stage", "recipe", "after", "nodes", "world size", "global batch", "iterations"],
          [row[:-1] for row in rows])


def render(
    spec_path: SpecArgument,
    backend: Annotated[Backend | None, typer.Option(help="Override spec.backend.")] = None,
    stage: Annotated[str | None, typer.Option(help="Render only this stage.")] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="text: a YAML stream; json: a v1 List.")
    ] = OutputFormat.TEXT,
) -> None:
    """Print every Kubernetes object of the experiment (YAML stream on stdout). No cluster needed."""
    from dino_ctl.render import render as render_objects

    chosen = backend.value if backend else None
    experiment = load_spec_or_exit(spec_path, output, backend=chosen)
    if chosen is None and experiment.spec.backend == "local":
        # A local spec renders as the default cluster backend: check it as one (e.g. no file:// checkpoints).
        chosen = "pytorchjob"
        check_backend_or_exit(experiment, chosen, output, source=str(spec_path))
    if stage is not None and stage not in [s.name for s in experiment.spec.stages]:
        allowed = "one of " + ", ".join(s.name for s in experiment.spec.stages)
        fail_spec(SpecError("--stage", stage, allowed), output, source=str(spec_path))
    objects = render_objects(experiment, backend=chosen, stage=stage)
    if output == OutputFormat.JSON:
        emit({"apiVersion": "v1", "kind": "List", "items": objects})
    else:
        typer.echo(yaml_stream(objects), nl=False)


def schema(
    kind: Annotated[SchemaKind, typer.Option("--kind", help="json-schema or the CRD.")] = SchemaKind.JSON_SCHEMA,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="text: YAML; json: JSON.")] = OutputFormat.JSON,
) -> None:
    """Print the JSON Schema of a DinoExperiment, or its CustomResourceDefinition."""
    from dino_ctl.schema import crd_manifest, json_schema

    document = crd_manifest() if kind == SchemaKind.CRD else json_schema()
    if output == OutputFormat.JSON:
        typer.echo(json.dumps(document, indent=2))
    else:
        typer.echo(yaml.safe_dump(document, sort_keys=False), nl=False)


def register(app: typer.Typer) -> None:
    """Add ``validate``, ``render`` and ``schema`` to the root app."""
    app.command("validate")(validate)
    app.command("render")(render)
    app.command("schema")(schema)
