"""``dino-ctl submit | status | logs | cancel | resume``: experiments in the current kubeconfig context.

Every command talks to the cluster only through :mod:`dino_ctl.kube` (server-side apply) and decides through
:func:`dino_ctl.plan.plan`; the state lives in the cluster, so ``status`` and ``resume`` work from any machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dino_ctl.cli.output import (
    OutputFormat,
    OutputOption,
    console,
    emit,
    fail,
    fail_spec,
    load_spec_or_exit,
    table,
    yaml_stream,
)
from dino_ctl.errors import DinoCtlError, SpecError, SpecErrors
from dino_ctl.kube import KubeClient
from dino_ctl.naming import LABEL_EXPERIMENT, LABEL_STAGE
from dino_ctl.observe import LABEL_ATTEMPT, observe

__all__ = ["register"]

NameArgument = Annotated[str, typer.Argument(help="Experiment name (metadata.name).", show_default=False)]
NamespaceOption = Annotated[str | None, typer.Option("--namespace", "-n", help="Default: the context's namespace.")]
ContextOption = Annotated[str | None, typer.Option("--context", help="kubeconfig context (default: current).")]
WaitOption = Annotated[bool, typer.Option("--wait", help="Keep reconciling until the experiment ends.")]
PollOption = Annotated[float, typer.Option("--poll-seconds", min=0.0, help="Seconds between passes with --wait.")]
TimeoutOption = Annotated[float | None, typer.Option("--timeout", min=0.0, help="Stop waiting after N seconds.")]
ForceConflictsOption = Annotated[bool, typer.Option(
    "--force-conflicts",
    help="Take ownership of fields another field manager (kubectl edit, another tool) changed; without it such a "
         "conflict is reported and nothing is overwritten.")]


def _client(context: str | None, output: OutputFormat, *, force_conflicts: bool = False) -> Any:
    try:
        return KubeClient.from_kubeconfig(context=context, force_conflicts=force_conflicts)
    except DinoCtlError as exc:
        fail(exc, output)


def _stage_report(experiment: Any, observed: Any) -> list[dict[str, Any]]:
    from dino_ctl.validation import stage_order

    report = []
    for name in stage_order(experiment):
        obs = observed.stage(name)
        report.append({
            "stage": name, "phase": obs.phase.value, "job": obs.job_name, "kind": obs.job_kind,
            "attempt": obs.attempt, "restarts": {"failure": obs.restarts.failure,
                                                 "preemption": obs.restarts.preemption,
                                                 "eviction": obs.restarts.eviction},
            "exitCodes": sorted(set(obs.exit_codes)), "evictions": sorted(set(obs.evictions)), "message": obs.message,
        })
    return report


def _print_pass(experiment: Any, result: Any, output: OutputFormat) -> None:
    actions = [{"kind": a.kind.value, "stage": a.stage, "reason": a.reason, "message": a.message}
               for a in result.actions]
    stages = _stage_report(experiment, result.observed)
    if output == OutputFormat.JSON:
        emit({"name": experiment.name, "namespace": experiment.namespace, "phase": result.phase.value,
              "stages": stages, "actions": actions})
        return
    console.print(f"experiment [bold]{experiment.name}[/] ({experiment.namespace}): {result.phase.value}")
    table("stages", ["stage", "phase", "job", "attempt", "restarts f/p/e", "exit codes", "message"],
          [[s["stage"], s["phase"], s["job"] or "-", s["attempt"],
            "/".join(str(v) for v in s["restarts"].values()), ",".join(map(str, s["exitCodes"])) or "-",
            s["message"]] for s in stages])
    for action in actions:
        console.print(f"  -> {action['kind']} {action['stage'] or ''} {action['reason']} {action['message']}".rstrip())


def _print_dry_run(experiment: Any, output: OutputFormat) -> None:
    """What a submission would apply now: the record, then each stage the planner starts first."""
    from dino_ctl.plan import ActionKind, plan
    from dino_ctl.render import render_stage
    from dino_ctl.render.common import render_experiment_record

    objects = [render_experiment_record(experiment)]
    for action in plan(experiment, observe([], experiment=experiment.name)):
        if action.kind == ActionKind.SUBMIT and action.stage is not None:
            objects += render_stage(experiment, action.stage, attempt=action.attempt)
    if output == OutputFormat.JSON:
        emit({"apiVersion": "v1", "kind": "List", "items": objects})
    else:
        typer.echo(yaml_stream(objects), nl=False)


def submit(
    spec_path: Annotated[Path, typer.Argument(help="DinoExperiment spec (YAML).", show_default=False)],
    wait: WaitOption = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be applied; touch no cluster.")] = False,
    poll_seconds: PollOption = 30.0,
    timeout: TimeoutOption = None,
    force_conflicts: ForceConflictsOption = False,
    context: ContextOption = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Validate, record the experiment in the cluster and start its first stages (with --wait: all of them)."""
    from dino_ctl import reconcile

    experiment = load_spec_or_exit(spec_path, output)
    if experiment.spec.backend == "local":
        fail_spec(SpecError("spec.backend", "local", "pytorchjob, trainjob or torchx to submit to a cluster; "
                            "`dino-ctl run` runs backend local on this machine"), output, source=str(spec_path))
    if dry_run:
        _print_dry_run(experiment, output)
        return
    client = _client(context, output, force_conflicts=force_conflicts)
    try:
        result = reconcile.submit(client, experiment)
        _print_pass(experiment, result, output)
        if wait:
            phase = reconcile.wait(client, experiment, poll_seconds=poll_seconds, timeout_seconds=timeout,
                                   on_pass=lambda p: _print_pass(experiment, p, output))
            raise typer.Exit(0 if phase.value == "Succeeded" else 1)
    except SpecErrors as exc:
        fail_spec(exc, output, source=str(spec_path))
    except DinoCtlError as exc:
        fail(exc, output)


def _load(client: Any, name: str, namespace: str | None, output: OutputFormat) -> Any:
    from dino_ctl.reconcile import load_experiment

    try:
        return load_experiment(client, name, namespace=namespace)
    except SpecErrors as exc:
        fail_spec(exc, output, source=f"experiment {name} (as recorded in the cluster)")
    except DinoCtlError as exc:
        fail(exc, output)


def status(name: NameArgument, namespace: NamespaceOption = None, context: ContextOption = None,
           output: OutputOption = OutputFormat.TEXT) -> None:
    """Show the experiment's phase, each stage's job, restarts by reason and exit codes (read-only)."""
    from dino_ctl.plan import experiment_phase, plan
    from dino_ctl.reconcile import Pass, read_state

    client = _client(context, output)
    experiment = _load(client, name, namespace, output)
    try:
        observed = read_state(client, experiment)
    except DinoCtlError as exc:
        fail(exc, output)
    pending = plan(experiment, observed)  # what the next reconcile pass would do, shown but not executed
    _print_pass(experiment, Pass(observed, pending, experiment_phase(experiment, observed)), output)


def logs(
    name: NameArgument,
    stage: Annotated[str | None, typer.Option(help="Stage (default: the newest stage with pods).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream while the pod runs.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    all_pods: Annotated[bool, typer.Option("--all-pods", help="Every node's pod, not only the first.")] = False,
    namespace: NamespaceOption = None,
    context: ContextOption = None,
) -> None:
    """Print the trainer log of a stage's pods of the current attempt."""
    output = OutputFormat.TEXT
    client = _client(context, output)
    experiment = _load(client, name, namespace, output)
    try:
        pods = client.list("v1", "Pod", namespace=experiment.namespace, selector=f"{LABEL_EXPERIMENT}={name}")
        if stage is not None:
            experiment.spec.stage(stage)
            pods = [p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == stage]
        if not pods:
            fail(f"no pods of experiment {name}" + (f" stage {stage}" if stage else ""), output)
        newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
        labels = newest["metadata"]["labels"]
        chosen = sorted((p for p in pods if p["metadata"]["labels"].get(LABEL_STAGE) == labels[LABEL_STAGE]
                         and p["metadata"]["labels"].get(LABEL_ATTEMPT) == labels.get(LABEL_ATTEMPT)),
                        key=lambda p: p["metadata"]["name"])
        for pod in chosen if all_pods else chosen[:1]:
            pod_name = pod["metadata"]["name"]
            waiting = _not_started(pod)
            if waiting:  # the API server answers 204 (nothing) for such a pod: say why instead
                if not all_pods:
                    fail(f"pod {pod_name} {waiting}: it has no log yet", output)
                typer.echo(f"[{pod_name}] ({waiting}: no log yet)", err=True)
                continue
            container = pod["spec"]["containers"][0]["name"]
            for line in client.pod_logs(pod_name, namespace=experiment.namespace, container=container,
                                        tail_lines=tail, follow=follow):
                typer.echo(f"[{pod_name}] {line}" if all_pods else line)
    except SpecError as exc:
        fail_spec(exc, output)
    except DinoCtlError as exc:
        fail(exc, output)


def _not_started(pod: dict[str, Any]) -> str | None:
    """Why a pod has no log yet (not scheduled, or Pending), or None when its containers have started."""
    status = pod.get("status") or {}
    if not (pod.get("spec") or {}).get("nodeName"):
        return "is not scheduled to a node yet"
    if status.get("phase") == "Pending" and not any("running" in (c.get("state") or {}) or
                                                    "terminated" in (c.get("state") or {})
                                                    for c in status.get("containerStatuses") or []):
        return "is Pending (its containers have not started)"
    return None


def cancel(name: NameArgument, namespace: NamespaceOption = None, force_conflicts: ForceConflictsOption = False,
           context: ContextOption = None, output: OutputOption = OutputFormat.TEXT) -> None:
    """Stop the experiment: record the cancel request and delete every running job (checkpoints stay)."""
    from dino_ctl.reconcile import reconcile_once, set_cancel

    client = _client(context, output, force_conflicts=force_conflicts)
    experiment = _load(client, name, namespace, output)
    try:
        set_cancel(client, experiment, cancel=True)
        _print_pass(experiment, reconcile_once(client, experiment), output)
    except DinoCtlError as exc:
        fail(exc, output)


def resume(
    name: NameArgument,
    wait: WaitOption = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Give failed stages a new budget.")] = False,
    poll_seconds: PollOption = 30.0,
    timeout: TimeoutOption = None,
    namespace: NamespaceOption = None,
    force_conflicts: ForceConflictsOption = False,
    context: ContextOption = None,
    output: OutputOption = OutputFormat.TEXT,
) -> None:
    """Continue an experiment from the cluster's state (after a cancel, a failure or a dead CLI machine)."""
    from dino_ctl import reconcile

    client = _client(context, output, force_conflicts=force_conflicts)
    experiment = _load(client, name, namespace, output)
    try:
        reconcile.set_cancel(client, experiment, cancel=False)
        result = reconcile.reconcile_once(client, experiment, retry_failed=retry_failed)
        _print_pass(experiment, result, output)
        if wait:
            phase = reconcile.wait(client, experiment, poll_seconds=poll_seconds, timeout_seconds=timeout,
                                   on_pass=lambda p: _print_pass(experiment, p, output))
            raise typer.Exit(0 if phase.value == "Succeeded" else 1)
    except DinoCtlError as exc:
        fail(exc, output)


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the root app."""
    for command in (submit, status, logs, cancel, resume):
        app.command(command.__name__)(command)
