"""From a spec's stage to the trainer's resolved ``TrainConfig`` (torch-free).

Resolution of stage ``X`` (``trainer.config.resolve_config``): dataclass defaults <- ``RECIPES[X.recipe]`` <-
values the spec decides (checkpoint dir, data streams, metrics port, seed, stage links) <- ``X.overrides``.

- ``checkpoint.dir`` is ``<storage.checkpoints>/<stage>``: the trainer resumes from the newest complete checkpoint
  there, so every restart of the stage continues it.
- ``init: {from: P}`` sets ``stage.init_from`` to P's checkpoint dir and inherits P's ``model``/``heads`` (the
  high-resolution recipe keeps the pretraining architecture; only its crop size is its own).
- ``teacher: {from: T}`` sets ``stage.teacher_from`` to T's checkpoint dir and ``stage.teacher_model`` to T's model.
- ``pvc://claim/path`` becomes the path where the renderers mount the claim (:func:`pvc_mount_path`).
"""

from __future__ import annotations

from typing import Any

from trainer.config import ConfigError, TrainConfig, config_to_dict, resolve_config

from dino_ctl.errors import SpecError
from dino_ctl.spec import DinoExperiment

__all__ = [
    "PVC_MOUNT_ROOT",
    "pvc_claims",
    "pvc_mount_path",
    "stage_checkpoint_dir",
    "stage_config_error",
    "stage_train_config",
    "trainer_path",
]

PVC_MOUNT_ROOT = "/mnt/dino-ctl"


def pvc_mount_path(claim: str) -> str:
    """Where the renderers mount PersistentVolumeClaim ``claim`` in the trainer container."""
    return f"{PVC_MOUNT_ROOT}/{claim}"


def trainer_path(uri: str) -> str:
    """The location the trainer process uses for ``uri``: pvc:// and file:// become paths, object stores stay URIs."""
    if uri.startswith("pvc://"):
        claim, _, rest = uri[len("pvc://") :].partition("/")
        return "/".join(part for part in (pvc_mount_path(claim), rest.strip("/")) if part)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri


def pvc_claims(experiment: DinoExperiment) -> list[str]:
    """Every PersistentVolumeClaim the spec's storage and data streams reference, in order, no repeats."""
    spec = experiment.spec
    uris = [spec.storage.checkpoints, *(stream.remote or "" for stream in spec.data.streams)]
    claims = [uri[len("pvc://") :].split("/", 1)[0] for uri in uris if uri.startswith("pvc://")]
    return list(dict.fromkeys(claims))


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
        return SpecError(f"{prefix}.overrides.{error.path}", error.value, error.allowed)
    if error.path == "recipe":
        return SpecError(f"{prefix}.recipe", error.value, error.allowed)
    if error.path in ("stage.init_from", "stage.teacher_from"):
        field = "init" if error.path == "stage.init_from" else "teacher"
        kind = "highres" if field == "init" else "distill"
        return SpecError(f"{prefix}.{field}", None, f"{field}: {{from: STAGE}}: a {kind} stage starts from another "
                         "stage's published checkpoint")
    if error.path.startswith("data.streams"):
        return SpecError("spec.data.streams" + error.path[len("data.streams"):].replace("[]", "[*]"), error.value,
                         error.allowed)
    return SpecError(f"{prefix}.overrides.{error.path}", error.value, error.allowed)


def _spec_values(experiment: DinoExperiment, stage_name: str, resolve: Any) -> dict[str, Any]:
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


def stage_train_config(experiment: DinoExperiment, stage_name: str) -> TrainConfig:
    """The resolved ``TrainConfig`` of stage ``stage_name`` (what its ConfigMap holds and the trainer reads).

    Stages referenced by ``init``/``teacher`` are resolved first. Raises :class:`SpecError` with the spec field path
    when the trainer rejects a value (unknown recipe or override key, crop size not a multiple of the patch, ...).
    The stage graph must be acyclic (checked by :func:`dino_ctl.validation.validate_experiment`).
    """
    cache: dict[str, TrainConfig] = {}

    def resolve(name: str) -> TrainConfig:
        if name not in cache:
            stage = experiment.spec.stage(name)
            values = _spec_values(experiment, name, resolve)
            try:
                cache[name] = resolve_config(stage.recipe, file_values=values, overrides=dict(stage.overrides))
            except ConfigError as exc:
                raise stage_config_error(experiment, name, exc) from exc
        return cache[name]

    return resolve(stage_name)
