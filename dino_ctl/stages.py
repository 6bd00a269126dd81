"""From a spec to its resolved stages: :func:`resolve_experiment` (torch-free).

An experiment is resolved once into a :class:`ResolvedExperiment`: the stage order, each stage's resolved and
validated ``TrainConfig``, its node range and world sizes, and its checkpoint directory. Validation computes it
(:func:`dino_ctl.validation.validate_experiment` returns it); the renderers, ``dino-ctl run``, the planner and the
controller read the same object, memoised on the (immutable) spec document, so no stage is resolved twice.

Resolution of stage ``X`` (``trainer.config.resolve_config``): dataclass defaults <- ``RECIPES[X.recipe]`` <-
values the spec decides (checkpoint dir, data streams, metrics port, seed, stage links) <- ``X.overrides``.

- ``checkpoint.dir`` is ``<storage.checkpoints>/<stage>``: the trainer resumes from the newest complete checkpoint
  there, so every restart of the stage continues it.
- ``init: {from: P}`` sets ``stage.init_from`` to P's checkpoint dir and inherits P's ``model``/``heads`` (the
  high-resolution recipe keeps the pretraining architecture; only its crop size is its own).
- ``teacher: {from: T}`` sets ``stage.teacher_from`` to T's checkpoint dir and ``stage.teacher_model`` to T's model.
- ``data: {from: C}`` (C a curation stage) makes C's MDS dataset the stage's only stream (``data.dataset: mds``).
- ``pvc://claim/path`` becomes the path where the renderers mount the claim (:func:`pvc_mount_path`).

Curation stages resolve to a :class:`~dino_ctl.curation_stage.ResolvedCuration` (:mod:`dino_ctl.curation_stage`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainer.config import ConfigError, TrainConfig, config_to_dict, resolve_config

from dino_ctl.curation_stage import ResolvedCuration, curation_claims, resolve_curation
from dino_ctl.errors import SpecError, SpecErrors
from dino_ctl.locations import PVC_MOUNT_ROOT, pvc_claim, pvc_mount_path, trainer_path
from dino_ctl.spec import DinoExperiment, NodeRange

__all__ = [
    "PVC_MOUNT_ROOT",
    "ResolvedCuration",
    "ResolvedExperiment",
    "ResolvedStage",
    "pvc_claims",
    "pvc_mount_path",
    "resolve_experiment",
    "stage_checkpoint_dir",
    "stage_config_error",
    "stage_order",
    "stage_train_config",
    "trainer_path",
    "world_sizes",
]

def pvc_claims(experiment: DinoExperiment) -> list[str]:
    """Every PersistentVolumeClaim the spec's storage, data streams and curation stages reference, in order, no
    repeats (every stage's pods mount them all: a training stage reads what a curation stage wrote)."""
    spec = experiment.spec
    uris = [spec.storage.checkpoints, *(stream.remote or "" for stream in spec.data.streams)]
    claims = [claim for uri in uris if (claim := pvc_claim(uri))]
    return list(dict.fromkeys([*claims, *curation_claims(experiment)]))


def stage_checkpoint_dir(experiment: DinoExperiment, stage: str) -> str:
    """``<storage.checkpoints>/<stage>`` as the trainer sees it (pvc:// mapped to the mount path)."""
    return trainer_path(experiment.spec.storage.checkpoints).rstrip("/") + "/" + stage


def _set_by_overrides(path: str, overrides: dict[str, Any]) -> bool:
    """Whether the config field ``path`` (or a parent of it) is set by one of the stage's dotted overrides."""
    parts = path.replace("[]", "").split(".")
    return any(".".join(parts[:n]) in overrides for n in range(1, len(parts) + 1))


def stage_config_error(experiment: DinoExperiment, stage: str, error: ConfigError) -> SpecError:
    """Re-home a trainer ``ConfigError`` (path relative to TrainConfig) onto the spec field the user edits.

    Fields the spec itself decides (recipe, init/teacher links, data streams) point at their spec field unless the
    stage's overrides set them; everything else points into ``spec.stages[i].overrides``.
    """
    spec_stage = experiment.spec.stage(stage)
    prefix = f"spec.stages[{experiment.spec.stage_index(stage)}]"
    if _set_by_overrides(error.path, spec_stage.overrides):
        return SpecError(f"{prefix}.overrides.{error.path}", error.value, error.allowed, context=error.context)
    if error.path == "recipe":
        return SpecError(f"{prefix}.recipe", error.value, error.allowed)
    if error.path == "seed":  # the spec decides it: the stage's own seed, else spec.seed
        path = f"{prefix}.seed" if spec_stage.seed is not None else "spec.seed"
        return SpecError(path, error.value, error.allowed, context=error.context)
    if error.path in ("stage.init_from", "stage.teacher_from"):
        field = "init" if error.path == "stage.init_from" else "teacher"
        kind = "highres" if field == "init" else "distill"
        return SpecError(f"{prefix}.{field}", None, f"{field}: {{from: STAGE}}: a {kind} stage starts from another "
                         "stage's published checkpoint")
    if error.path.startswith("data.streams") and spec_stage.data is not None:
        return SpecError(f"{prefix}.data.from", spec_stage.data.from_, error.allowed, context=error.context)
    if error.path.startswith("data.streams"):
        return SpecError("spec.data.streams" + error.path[len("data.streams"):].replace("[]", "[*]"), error.value,
                         error.allowed, context=error.context)
    return SpecError(f"{prefix}.overrides.{error.path}", error.value, error.allowed, context=error.context)


def _spec_values(
    experiment: DinoExperiment, stage_name: str, resolve: Any, curations: dict[str, ResolvedCuration]
) -> dict[str, Any]:
    """The file-level values the spec decides for one stage (before the stage's own overrides)."""
    spec = experiment.spec
    stage = spec.stage(stage_name)
    values: dict[str, Any] = {
        "seed": spec.seed if stage.seed is None else stage.seed,
        "checkpoint": {"dir": stage_checkpoint_dir(experiment, stage_name)},
        "metrics": {"port": spec.monitoring.port},
        "stage": {},
    }
    if spec.data.streams:
        streams = [stream.model_dump(exclude_none=True, exclude={"prepare"}) for stream in spec.data.streams]
        for stream in streams:
            if "remote" in stream:
                stream["remote"] = trainer_path(stream["remote"])
        values["data"] = {
            "streams": streams,
            # Fixed across resizes so the global sample order does not change with the world size.
            "num_canonical_nodes": spec.data.num_canonical_nodes or spec.stage_nodes(stage_name).max,
        }
    if stage.data is not None:  # the curated dataset is the stage's only stream, read as MDS whatever the recipe says
        values["data"] = {
            "dataset": "mds",
            "streams": [dict(curations[stage.data.from_].dataset)],
            "num_canonical_nodes": spec.data.num_canonical_nodes or spec.stage_nodes(stage_name).max,
        }
    if stage.init is not None:
        parent = resolve(stage.init.from_)
        values["stage"]["init_from"] = stage_checkpoint_dir(experiment, stage.init.from_)
        values["heads"] = config_to_dict(parent.heads)
        # Inherit the architecture, not the input size: the recipe's img_size (518 for highres) is the stage's own.
        values["model"] = {k: v for k, v in config_to_dict(parent.model).items() if k != "img_size"}
    if stage.teacher is not None:
        teacher = resolve(stage.teacher.from_)
        values["stage"]["teacher_from"] = stage_checkpoint_dir(experiment, stage.teacher.from_)
        values["stage"]["teacher_model"] = config_to_dict(teacher.model)
    return values


def world_sizes(nodes: NodeRange, procs_per_node: int) -> list[int]:
    """Every world size torchrun may form: each node count in ``[min, max]`` times the processes per node."""
    return [count * procs_per_node for count in range(nodes.min, nodes.max + 1)]


def stage_order(experiment: DinoExperiment) -> list[str]:
    """Stage names in a dependency-respecting order (ties keep document order).

    Raises :class:`SpecError` when the graph has a cycle or a reference to a missing stage (validation reports
    those with their exact field first; this only keeps an unvalidated document from looping).
    """
    done: list[str] = []
    pending = [stage.name for stage in experiment.spec.stages]
    while pending:
        ready = next((n for n in pending if all(d in done for d in experiment.spec.stage(n).dependencies())), None)
        if ready is None:
            raise SpecError("spec.stages", pending, "an acyclic stage graph of existing stages")
        done.append(ready)
        pending.remove(ready)
    return done


@dataclass(frozen=True, kw_only=True)
class ResolvedStage:
    """One stage after resolution: what its ConfigMap holds and where and at which sizes it runs."""

    name: str
    index: int
    """Position in ``spec.stages`` (error paths name it)."""
    config: TrainConfig
    """The resolved ``TrainConfig``, checked by ``validate_config`` (the world-size rules are validation's)."""
    nodes: NodeRange
    """The stage's node range (its own or ``spec.resources.nodes``)."""
    procs_per_node: int
    """Trainer processes per node."""
    checkpoint_dir: str
    """``<storage.checkpoints>/<stage>`` as the trainer sees it (pvc:// mapped to the mount path)."""

    @property
    def world_sizes(self) -> list[int]:
        """Every world size this stage may run at (each node count in its range times ``procs_per_node``)."""
        return world_sizes(self.nodes, self.procs_per_node)


@dataclass(frozen=True, kw_only=True)
class ResolvedExperiment:
    """An experiment resolved once: its stages in dependency order, each training stage with its resolved config and
    each curation stage with its resolved curation spec."""

    experiment: DinoExperiment
    """The document this was resolved from."""
    stages: tuple[ResolvedStage, ...]
    """Every training stage, in dependency order (:func:`stage_order`); iterating the experiment yields these."""
    curations: tuple[ResolvedCuration, ...] = ()
    """Every curation stage, in dependency order."""
    names: tuple[str, ...] = ()
    """Every stage name (training and curation) in dependency order; empty: the training stages' order."""

    @property
    def order(self) -> list[str]:
        """Every stage name, training and curation, in dependency order (what the planner and renderers walk)."""
        return list(self.names) or [stage.name for stage in self.stages]

    def is_curation(self, name: str) -> bool:
        """Whether stage ``name`` is a curation stage."""
        return any(curation.name == name for curation in self.curations)

    def stage(self, name: str) -> ResolvedStage:
        """The resolved training stage ``name``; :class:`SpecError` listing the training stages when there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise SpecError("stage", name, "a training stage: one of " + ", ".join(s.name for s in self.stages))

    def curation(self, name: str) -> ResolvedCuration:
        """The resolved curation stage ``name``; :class:`SpecError` listing the curation stages when there is none."""
        for curation in self.curations:
            if curation.name == name:
                return curation
        found = ", ".join(c.name for c in self.curations) or "the spec has none"
        raise SpecError("stage", name, "a curation stage: " + found)

    def config(self, name: str) -> TrainConfig:
        """The resolved ``TrainConfig`` of training stage ``name``."""
        return self.stage(name).config

    def __iter__(self) -> Iterator[ResolvedStage]:
        """The training stages (every rule about trainer configs and world sizes walks these)."""
        return iter(self.stages)


def _resolve_stages(
    experiment: DinoExperiment,
) -> tuple[dict[str, TrainConfig], dict[str, ResolvedCuration], list[SpecError]]:
    """Each stage's config (or curation spec) in dependency order, and the errors of those that failed (a child of a
    failed stage is skipped: its parent's error is reported once, at the parent)."""
    configs: dict[str, TrainConfig] = {}
    curations: dict[str, ResolvedCuration] = {}
    errors: list[SpecError] = []
    for name in stage_order(experiment):
        stage = experiment.spec.stage(name)
        if any(dep not in configs and dep not in curations for dep in stage.dependencies()):
            continue
        if stage.is_curation:
            try:
                curations[name] = resolve_curation(experiment, name)
            except SpecError as exc:
                errors.append(exc)
            continue
        values = _spec_values(experiment, name, configs.__getitem__, curations)
        try:
            configs[name] = resolve_config(stage.recipe, file_values=values, overrides=dict(stage.overrides))
        except ConfigError as exc:
            errors.append(stage_config_error(experiment, name, exc))
    return configs, curations, errors


def resolve_experiment(experiment: DinoExperiment) -> ResolvedExperiment:
    """The :class:`ResolvedExperiment` of ``experiment``, computed on the first call and memoised on the document.

    Raises :class:`SpecErrors` naming the spec field of every stage whose config the trainer rejects (unknown recipe
    or override key, crop size not a multiple of the patch, ...) or whose curation section curation rejects. The
    stage graph must be sound (checked first by :func:`dino_ctl.validation.validate_experiment`).
    """
    memo = experiment._resolved  # noqa: SLF001 - the document's memo slot, owned by this function
    if isinstance(memo, ResolvedExperiment) and memo.experiment is experiment:  # a model_copy carries a stale one
        return memo
    try:
        configs, curations, errors = _resolve_stages(experiment)
    except SpecError as exc:
        raise SpecErrors([exc]) from None
    if errors:
        raise SpecErrors(list({str(error): error for error in errors}.values()))
    spec = experiment.spec
    stages = tuple(
        ResolvedStage(
            name=name,
            index=spec.stage_index(name),
            config=config,
            nodes=spec.stage_nodes(name),
            procs_per_node=spec.resources.num_procs_per_node,
            checkpoint_dir=stage_checkpoint_dir(experiment, name),
        )
        for name, config in configs.items()
    )
    names = tuple(name for name in stage_order(experiment) if name in configs or name in curations)
    resolved = ResolvedExperiment(experiment=experiment, stages=stages, curations=tuple(curations.values()),
                                  names=names)
    experiment._resolved = resolved  # noqa: SLF001
    return resolved


def stage_train_config(experiment: DinoExperiment, stage_name: str) -> TrainConfig:
    """The resolved ``TrainConfig`` of stage ``stage_name``: ``resolve_experiment(experiment).config(stage_name)``.

    Raises :class:`SpecErrors` when a stage's config is invalid (see :func:`resolve_experiment`).
    """
    return resolve_experiment(experiment).config(stage_name)
