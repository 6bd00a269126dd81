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
from trainer.config.validate import MAX_SEED

from dino_ctl.errors import SpecError, SpecErrors
from dino_ctl.naming import child_name
from dino_ctl.render.common import trainer_env
from dino_ctl.spec import DinoExperiment, parse_spec
from dino_ctl.stages import ResolvedExperiment, resolve_experiment, stage_config_error, stage_order, world_sizes

__all__ = [
    "MAX_GPUS_PER_NODE",
    "MAX_ITEMS",
    "MAX_NODES",
    "MAX_PROCS_PER_NODE",
    "RDZV_PORT",
    "experiment_warnings",
    "load_spec",
    "stage_order",
    "validate_experiment",
    "world_sizes",
]

logger = logging.getLogger(__name__)

RDZV_PORT = 29400
"""torchrun's c10d rendezvous port (PyTorchJob elastic) and Trainer v2's PET_MASTER_PORT."""
MAX_NODES = 512
"""Nodes per stage (4,096 GPUs at 8 per node; no DINOv2 recipe comes near): a typo is not a world size."""
MAX_GPUS_PER_NODE = 16
"""GPUs per node (the largest GPU servers have 8 or 16)."""
MAX_PROCS_PER_NODE = 64
"""Trainer processes per node (CPU nodes: procsPerNode without GPUs)."""
MAX_ITEMS = {"spec.stages": 32, "spec.env": 256, "spec.data.streams": 256, "spec.imagePullSecrets": 64,
             "spec.resources.tolerations": 64, "spec.storage.credentials.envKeys": 64}
"""Longest lists (checked before anything else, so no later rule meets a list it would be slow on)."""
RESERVED_ENV_PREFIX = "PET_"
"""torchrun's settings, which the training-operator and Kubeflow Trainer inject into every trainer container."""
_SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)


def _list_lengths(experiment: DinoExperiment) -> dict[str, int]:
    spec = experiment.spec
    credentials = spec.storage.credentials
    return {"spec.stages": len(spec.stages), "spec.env": len(spec.env), "spec.data.streams": len(spec.data.streams),
            "spec.imagePullSecrets": len(spec.image_pull_secrets),
            "spec.resources.tolerations": len(spec.resources.tolerations),
            "spec.storage.credentials.envKeys": len(credentials.env_keys) if credentials is not None else 0}


def _size_errors(experiment: DinoExperiment) -> Iterator[SpecError]:
    """Lists no longer than :data:`MAX_ITEMS`; node counts and GPUs within their bounds."""
    for path, length in _list_lengths(experiment).items():
        if length > MAX_ITEMS[path]:
            yield SpecError(path, f"{length} items", f"at most {MAX_ITEMS[path]} (a sane upper bound)")
    spec = experiment.spec
    ranges = [("spec.resources.nodes", spec.resources.nodes)]
    ranges += [(f"spec.stages[{i}].nodes", s.nodes) for i, s in enumerate(spec.stages) if s.nodes is not None]
    for path, nodes in ranges:
        for end in ("min", "max"):
            if getattr(nodes, end) > MAX_NODES:
                yield SpecError(f"{path}.{end}", getattr(nodes, end),
                                f"at most {MAX_NODES} nodes (a sane upper bound; is there an extra digit?)")
    resources = spec.resources
    if resources.gpus_per_node > MAX_GPUS_PER_NODE:
        yield SpecError("spec.resources.gpusPerNode", resources.gpus_per_node,
                        f"at most {MAX_GPUS_PER_NODE} (the GPUs of one node)")
    if resources.procs_per_node is not None and resources.procs_per_node > MAX_PROCS_PER_NODE:
        yield SpecError("spec.resources.procsPerNode", resources.procs_per_node, f"at most {MAX_PROCS_PER_NODE}")


def _seed_errors(experiment: DinoExperiment) -> Iterator[SpecError]:
    seeds = [("spec.seed", experiment.spec.seed)]
    seeds += [(f"spec.stages[{i}].seed", s.seed) for i, s in enumerate(experiment.spec.stages) if s.seed is not None]
    for path, seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            yield SpecError(path, seed, f"0..{MAX_SEED} (NumPy's seed range; negative seeds fail)")


def _env_errors(experiment: DinoExperiment) -> Iterator[SpecError]:
    """Env names the trainer container gets once each: the API server refuses a pod template with a name twice
    (server-side apply: HTTP 500 'duplicate entries for key [name="A"]'), and the ones dino-ctl and the operators
    set are theirs."""
    spec = experiment.spec
    credentials = spec.storage.credentials
    if credentials is not None and credentials.mount == "env":
        seen: dict[str, int] = {}
        for k, key in enumerate(credentials.env_keys):
            if key in seen:
                yield SpecError(f"spec.storage.credentials.envKeys[{k}]", key,
                                f"a key not already listed (envKeys[{seen[key]}])")
            seen.setdefault(key, k)
    ours = _dino_ctl_env(experiment)
    first: dict[str, int] = {}
    for i, var in enumerate(spec.env):
        if var.name in first:
            yield SpecError(f"spec.env[{i}].name", var.name, f"a name no other env entry uses (spec.env[{first[var.name]}])")
        elif var.name in ours:
            yield SpecError(f"spec.env[{i}].name", var.name, f"a name dino-ctl does not set itself ({ours[var.name]})")
        elif var.name.startswith(RESERVED_ENV_PREFIX):
            yield SpecError(f"spec.env[{i}].name", var.name, f"a name without the {RESERVED_ENV_PREFIX} prefix (torchrun "
                            "settings the training operators inject)")
        first.setdefault(var.name, i)
    seen_secrets: dict[str, int] = {}
    for i, name in enumerate(spec.image_pull_secrets):
        if name in seen_secrets:
            yield SpecError(f"spec.imagePullSecrets[{i}]", name, f"a Secret not already listed "
                            f"(imagePullSecrets[{seen_secrets[name]}])")
        seen_secrets.setdefault(name, i)


def _dino_ctl_env(experiment: DinoExperiment) -> dict[str, str]:
    """``{name: where it comes from}`` of every env var the renderers set besides ``spec.env`` (read from the
    renderers' own list, so the two cannot drift)."""
    without_user_env = experiment.model_copy(update={"spec": experiment.spec.model_copy(update={"env": []})})
    names = {var["name"]: "set by dino-ctl" for var in trainer_env(without_user_env, experiment.spec.stages[0].name)}
    credentials = experiment.spec.storage.credentials
    for key in credentials.env_keys if credentials is not None and credentials.mount == "env" else ():
        names[key] = "spec.storage.credentials.envKeys"
    if experiment.spec.storage.endpoint_url:
        names.update(AWS_ENDPOINT_URL="spec.storage.endpointUrl", S3_ENDPOINT_URL="spec.storage.endpointUrl")
    return names


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
        links = (("init.from", stage.init), ("teacher.from", stage.teacher), ("data.from", stage.data))
        refs += [(field, ref.from_) for field, ref in links if ref is not None]
        for field, name in refs:
            if name == stage.name or name not in names:
                yield SpecError(f"spec.stages[{i}].{field}", name, f"the name of another stage: {others}")
    cycle = _find_cycle(experiment)
    if cycle:
        index = names.index(cycle[0])
        yield SpecError(f"spec.stages[{index}].after", cycle[0], "an acyclic stage graph; found " + " -> ".join(cycle))


def _kind_errors(experiment: DinoExperiment, backend: str) -> Iterator[SpecError]:
    """Each stage trains (``recipe``) or curates (``curation``); a curation stage has no trainer settings; ``data:
    {from: X}`` names a curation stage that writes a dataset."""
    stages = experiment.spec.stages
    curations = [s.name for s in stages if s.is_curation]
    for i, stage in enumerate(stages):
        if stage.recipe is None and stage.curation is None:
            yield SpecError(f"spec.stages[{i}].recipe", None, "a recipe (a training stage) or a curation section (a "
                            "curation stage)")
        elif stage.recipe is not None and stage.curation is not None:
            yield SpecError(f"spec.stages[{i}].curation", "<curation section>", "no curation section beside recipe: "
                            "a stage either trains (recipe) or curates (curation)")
        if stage.is_curation:
            trainer_only = {"overrides": stage.overrides or None, "init": stage.init, "teacher": stage.teacher,
                            "data": stage.data}
            for field, value in trainer_only.items():
                if value is not None:
                    shown = value.model_dump(by_alias=True) if hasattr(value, "model_dump") else value
                    yield SpecError(f"spec.stages[{i}].{field}", shown, "nothing on a curation stage: it runs "
                                    "curation.launch, not the trainer (set its steps in curation)")
        if stage.data is not None and stage.data.from_ in {s.name for s in stages} and stage.data.from_ != stage.name:
            source = experiment.spec.stage(stage.data.from_)
            if not source.is_curation:
                yield SpecError(f"spec.stages[{i}].data.from", stage.data.from_,
                                "a curation stage: " + (", ".join(curations) or "the spec has none"))
            elif isinstance(source.curation, dict) and isinstance(source.curation.get("write"), dict) and (
                    source.curation["write"].get("enabled") is False):
                yield SpecError(f"spec.stages[{i}].data.from", stage.data.from_, "a curation stage whose write step "
                                "is enabled (its write.enabled is false: it writes no dataset)")


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
    for i, stage in enumerate(spec.stages):
        output = (stage.curation or {}).get("output")
        if isinstance(output, str) and output.startswith("file://") and not on_this_machine:
            yield SpecError(f"spec.stages[{i}].curation.output", output, f"pvc://claim/path for backend {backend}: "
                            "file:// is pod-local disk, which the next stage's pods cannot read")
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


def _stage_link_errors(resolved: ResolvedExperiment) -> Iterator[SpecError]:
    """A high-resolution stage raises the global crop size of the stage it starts from (``init``): at the same or a
    smaller size it would repeat (or undo) the pretraining, not adapt it to a higher resolution."""
    experiment = resolved.experiment
    for stage in resolved:
        spec_stage = experiment.spec.stage(stage.name)
        if spec_stage.init is None or stage.config.stage.kind != "highres":
            continue
        parent = resolved.stage(spec_stage.init.from_)
        size, parent_size = stage.config.data.crops.global_size, parent.config.data.crops.global_size
        if size <= parent_size:
            allowed = (f"more than {parent_size}, the global crop size of {parent.name} (init.from): a highres stage "
                       "raises the resolution")
            yield stage_config_error(experiment, stage.name, ConfigError("data.crops.global_size", size, allowed))


def experiment_warnings(resolved: ResolvedExperiment) -> list[str]:
    """Settings that are valid but probably not meant (printed on stderr; ``validate -o json`` lists them).

    - ``checkpoint.interval_iterations >= optim.iterations``: no checkpoint before the final one, so a pod lost to
      anything but a SIGTERM (which still writes one) restarts the stage from its first step. A warning, not an
      error: it is also the only way to ask for the final checkpoint alone, which short stages and tests want.
    - an elastic stage without ``spec.data.numCanonicalNodes``.
    """
    experiment, found = resolved.experiment, []
    for stage in resolved:
        interval, iterations = stage.config.checkpoint.interval_iterations, stage.config.optim.iterations
        if interval >= iterations:
            found.append(
                f"spec.stages[{stage.index}]: checkpoint.interval_iterations {interval} >= optim.iterations "
                f"{iterations}: stage {stage.name} writes no checkpoint before its last step, so a failed pod "
                "restarts it from the beginning (a SIGTERM still writes one)"
            )
        nodes = stage.nodes
        if nodes.min != nodes.max and experiment.spec.data.num_canonical_nodes is None and stage.config.data.streams:
            found.append(f"stage {stage.name} is elastic ({nodes.min}..{nodes.max} nodes) and "
                         f"spec.data.numCanonicalNodes is unset: using {nodes.max}")
    return found


def validate_experiment(experiment: DinoExperiment, *, backend: str | None = None) -> ResolvedExperiment:
    """Run every cross-field rule; raise :class:`SpecErrors` listing all violations; return the resolved experiment.

    ``backend`` overrides ``spec.backend`` (``dino-ctl render --backend``) for the backend-specific rules. Warnings
    (:func:`experiment_warnings`) are logged.
    """
    backend = backend or experiment.spec.backend
    errors = list(_size_errors(experiment))
    if not errors:  # the other rules walk the lists: only once they are known to be short
        errors = [
            *_seed_errors(experiment),
            *_graph_errors(experiment),
            *_kind_errors(experiment, backend),
            *_resource_errors(experiment, backend),
            *_storage_errors(experiment, backend),
            *_env_errors(experiment),
            *_child_name_errors(experiment),
        ]
    resolved = None
    if not errors:  # trainer configs need a sound graph (init/teacher resolution follows it)
        try:
            resolved = resolve_experiment(experiment)
        except SpecErrors as exc:
            errors.extend(exc.errors)
        else:
            errors.extend(_stage_link_errors(resolved))
            errors.extend(_world_size_errors(resolved))
    unique = list({str(error): error for error in errors}.values())  # a shared field fails once, not per stage
    if unique:
        raise SpecErrors(unique)
    assert resolved is not None
    for warning in experiment_warnings(resolved):
        logger.warning("%s", warning)
    return resolved


def load_spec(path: str | Path) -> DinoExperiment:
    """Read a spec file, check its shape and every cross-field rule; raise :class:`SpecErrors`.

    The file is read by ``trainer.config.read_yaml_mapping``, the loader of every command that reads a spec
    (``validate``, ``render``, ``submit``, ``run``, ``checkpoints --spec``; ``curate`` for its own spec): one UTF-8
    YAML mapping of at most 256 KiB, no duplicate keys, no alias expansion beyond 10,000 nodes, JSON types only (the
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
