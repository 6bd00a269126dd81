"""Loading a spec file and the rules that span its fields: checked after the shape checks, before anything is
rendered or submitted.

Each rule returns :class:`SpecError` values naming the field path, the bad value and what is allowed;
:func:`validate_experiment` raises them together as :class:`SpecErrors` (the CLI exits with code 2). Rules that need a
sound stage graph (trainer configs, world sizes) run only when the graph checks passed; they read the experiment's
one :class:`~dino_ctl.stages.ResolvedExperiment`, which :func:`validate_experiment` returns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from trainer.config import ConfigError, read_yaml_mapping, validate_world_size

from dino_ctl.errors import SpecError, SpecErrors
from dino_ctl.naming import child_name
from dino_ctl.spec import DinoExperiment, parse_spec
from dino_ctl.stages import ResolvedExperiment, resolve_experiment, stage_config_error, stage_order, world_sizes

__all__ = ["RDZV_PORT", "load_spec", "stage_order", "validate_experiment", "world_sizes"]

logger = logging.getLogger(__name__)

RDZV_PORT = 29400
"""torchrun's c10d rendezvous port (PyTorchJob elastic) and Trainer v2's PET_MASTER_PORT."""
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)


def _graph_errors(experiment: DinoExperiment) -> Iterator[SpecError]:
    stages = experiment.spec.stages
    names = [stage.name for stage in stages]
    for i, stage in enumerate(stages):
        if stage.name in names[:i]:
            first = names.index(stage.name)
            yield SpecError(f"spec.stages[{i}].name", stage.name, f"a name no other stage uses (stages[{first}])")
    for i, stage in enumerate(stages):
        others = ", ".join(dict.fromkeys(n for n in names if n != stage.name)) or "no other stage exists"
        refs = [(f"after[{k}]", name) for k, name in enumerate(stage.after)]
        links = (("init.from", stage.init), ("teacher.from", stage.teacher))
        refs += [(field, ref.from_) for field, ref in links if ref is not None]
        for field, name in refs:
            if name == stage.name or name not in names:
                yield SpecError(f"spec.stages[{i}].{field}", name, f"the name of another stage: {others}")
    cycle = _find_cycle(experiment)
    if cycle:
        index = names.index(cycle[0])
        yield SpecError(f"spec.stages[{index}].after", cycle[0], "an acyclic stage graph; found " + " -> ".join(cycle))


def _find_cycle(experiment: DinoExperiment) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, or None. Unknown references are ignored here."""
    names = {stage.name for stage in experiment.spec.stages}
    deps = {s.name: [d for d in s.dependencies() if d in names and d != s.name] for s in experiment.spec.stages}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in deps[name]:
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[name] = 2
        return None

    for stage in experiment.spec.stages:
        if stage.name not in state and (found := visit(stage.name, [stage.name])):
            return found
    return None


def _resource_errors(experiment: DinoExperiment, backend: str) -> Iterator[SpecError]:
    spec = experiment.spec
    ranges = [("spec.resources.nodes", spec.resources.nodes)]
    ranges += [(f"spec.stages[{i}].nodes", s.nodes) for i, s in enumerate(spec.stages) if s.nodes is not None]
    for path, nodes in ranges:
        if nodes.min > nodes.max:
            yield SpecError(f"{path}.min", nodes.min, f"at most {path}.max ({nodes.max})")
        elif backend == "trainjob" and nodes.min != nodes.max:
            yield SpecError(
                path,
                {"min": nodes.min, "max": nodes.max},
                "min == max for backend trainjob "
                "(Kubeflow Trainer v2 has no elastic resizing; use pytorchjob or torchx)",
            )
    resources = spec.resources
    if resources.gpus_per_node and resources.num_procs_per_node > resources.gpus_per_node:
        yield SpecError(
            "spec.resources.procsPerNode", resources.procs_per_node, f"at most gpusPerNode ({resources.gpus_per_node})"
        )
    if spec.monitoring.port == RDZV_PORT:
        yield SpecError("spec.monitoring.port", RDZV_PORT, f"any port but {RDZV_PORT} (torchrun's rendezvous port)")


def _storage_errors(experiment: DinoExperiment, backend: str) -> Iterator[SpecError]:
    spec = experiment.spec
    on_this_machine = backend == "local" or (backend == "torchx" and spec.torchx.scheduler == "local_cwd")
    if spec.storage.checkpoints.startswith("file://") and not on_this_machine:
        yield SpecError(
            "spec.storage.checkpoints",
            spec.storage.checkpoints,
            f"s3://, gs:// or pvc:// for backend {backend}: "
            "file:// is pod-local disk, so a restart would lose progress",
        )
    for i, env in enumerate(spec.env):
        if (env.value is None) == (env.secret_key_ref is None):
            yield SpecError(f"spec.env[{i}]", env.name, "exactly one of value or secretKeyRef")
        elif env.value is not None and _SECRET_NAME.search(env.name):
            yield SpecError(
                f"spec.env[{i}].value", "<redacted>", "a secretKeyRef: credentials come from Secrets, never the spec"
            )


def _child_name_errors(experiment: DinoExperiment) -> Iterator[SpecError]:
    if len({s.name for s in experiment.spec.stages}) < len(experiment.spec.stages):
        return  # duplicate stage names are reported by the graph rules
    seen: dict[str, int] = {}
    for i, stage in enumerate(experiment.spec.stages):
        name = child_name(experiment.name, stage.name)
        if name in seen:  # only reachable through a hash collision of two truncated names
            allowed = f"a name whose job name {name} differs from stages[{seen[name]}]"
            yield SpecError(f"spec.stages[{i}].name", stage.name, allowed)
        seen[name] = i


def _world_size_errors(resolved: ResolvedExperiment) -> Iterator[SpecError]:
    """The rules that depend on the world size (``trainer.config.validate_world_size``: FSDP, batch share,
    micro-batches, KoLeo's minimum), for every size each stage may run at; the first failure per stage."""
    experiment = resolved.experiment
    for stage in resolved:
        nodes, procs = stage.nodes, stage.procs_per_node
        for size in stage.world_sizes:
            try:
                validate_world_size(stage.config, size)
            except ConfigError as exc:
                error = stage_config_error(experiment, stage.name, exc)
                where = f"nodes {nodes.min}..{nodes.max} x {procs} processes; {size // procs} nodes give world size {size}"
                yield SpecError(error.path, error.value, f"{error.allowed} [{where}]", context=error.context)
                break
        if nodes.min != nodes.max and experiment.spec.data.num_canonical_nodes is None and stage.config.data.streams:
            logger.warning(
                "stage %s is elastic (%d..%d nodes) and spec.data.numCanonicalNodes is unset: using %d",
                stage.name, nodes.min, nodes.max, nodes.max,
            )


def validate_experiment(experiment: DinoExperiment, *, backend: str | None = None) -> ResolvedExperiment:
    """Run every cross-field rule; raise :class:`SpecErrors` listing all violations; return the resolved experiment.

    ``backend`` overrides ``spec.backend`` (``dino-ctl render --backend``) for the backend-specific rules.
    """
    backend = backend or experiment.spec.backend
    errors = [
        *_graph_errors(experiment),
        *_resource_errors(experiment, backend),
        *_storage_errors(experiment, backend),
        *_child_name_errors(experiment),
    ]
    resolved = None
    if not errors:  # trainer configs need a sound graph (init/teacher resolution follows it)
        try:
            resolved = resolve_experiment(experiment)
        except SpecErrors as exc:
            errors.extend(exc.errors)
        else:
            errors.extend(_world_size_errors(resolved))
    unique = list({str(error): error for error in errors}.values())  # a shared field fails once, not per stage
    if unique:
        raise SpecErrors(unique)
    assert resolved is not None
    return resolved


def load_spec(path: str | Path) -> DinoExperiment:
    """Read a spec file, check its shape and every cross-field rule; raise :class:`SpecErrors`.

    The file is read by ``trainer.config.read_yaml_mapping``, the loader of every command that reads a spec
    (``validate``, ``render``, ``submit``, ``run``, ``checkpoints --spec``; ``curate`` for its own spec): one UTF-8
    YAML mapping of at most 1 MiB, no duplicate keys, no alias expansion beyond 10,000 nodes, JSON types only (the
    rules in :mod:`trainer.config.loading`). The returned document carries its resolution
    (:func:`~dino_ctl.stages.resolve_experiment` returns it without resolving again).
    """
    try:
        document = read_yaml_mapping(path)
    except ConfigError as exc:
        raise SpecErrors([SpecError(exc.path, exc.value, exc.allowed, context=exc.context)]) from None
    experiment = parse_spec(document)
    validate_experiment(experiment)
    return experiment
