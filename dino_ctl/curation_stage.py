"""Curation stages: a stage with ``curation: {...}`` turns a raw image pool into the MDS dataset later stages train on.

The stage's ``curation`` section is a curation spec (:class:`curation.config.CurationSpec`, the file
``dino-ctl curate`` reads, snake_case keys) without ``jobs``: placement comes from the experiment (``spec.resources``,
the stage's ``nodes``), like a training stage's. Resolution (:func:`resolve_curation`, torch-free):

- ``name`` defaults to the stage name, ``seed`` to the stage's seed (else ``spec.seed``); ``output`` (a
  ``pvc://claim/path`` or, for ``dino-ctl run``, a ``file://`` URI) defaults to ``<storage.checkpoints>/<stage>`` when the checkpoints live on a PVC or a local disk; with an
  object store for checkpoints it must be given (curation works on a shared filesystem; ``write.remote`` publishes
  the finished dataset to an object store).
- pvc:// and file:// URIs in ``output``, ``sources[].path`` and ``embed.checkpoint`` become the paths the pods see
  (PVCs are mounted under :data:`dino_ctl.locations.PVC_MOUNT_ROOT`, like the training stages' storage).
- The result is validated by curation's own model (``curation.config.spec_from_dict``); its ``ConfigError`` becomes a
  :class:`SpecError` at ``spec.stages[i].curation.<field>``.
- The dataset a ``data: {from: STAGE}`` stage trains on is ``<output>/dataset`` (``curation.context.step_directory``
  of the write step), or ``write.remote`` when the dataset is published to an object store.

The stage runs ``python -m torch.distributed.run ... -m curation.launch --spec <mounted curation.yaml>`` (each rank
owns a shard of the pool); its ConfigMap carries the resolved spec as ``curation.yaml``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from curation.config import CurationSpec, spec_from_dict
from curation.context import step_directory
from trainer.config import ConfigError

from dino_ctl.errors import SpecError
from dino_ctl.locations import pvc_claim, trainer_path
from dino_ctl.spec import DinoExperiment, NodeRange

__all__ = [
    "CURATION_FILE",
    "CURATION_GRACE_SECONDS",
    "OUTPUT_SCHEMES",
    "ResolvedCuration",
    "curation_claims",
    "curation_output_uri",
    "curation_stage_error",
    "resolve_curation",
]

CURATION_FILE = "curation.yaml"
"""The resolved curation spec's file name in the stage ConfigMap (and beside the output for ``dino-ctl run``)."""
CURATION_GRACE_SECONDS = 60
"""Pod grace period of a curation stage: every step is resumable from its finished shards, nothing to save."""
OUTPUT_SCHEMES = ("pvc", "file")
"""Where a curation stage may work: a filesystem the pods (or this machine) share."""


def curation_stage_error(experiment: DinoExperiment, stage: str, error: ConfigError) -> SpecError:
    """Re-home a curation ``ConfigError`` (path relative to the curation spec) onto ``spec.stages[i].curation``."""
    prefix = f"spec.stages[{experiment.spec.stage_index(stage)}].curation"
    path = prefix if error.path in ("", "spec") else f"{prefix}.{error.path}"
    return SpecError(path, error.value, error.allowed, context=error.context)


def curation_output_uri(experiment: DinoExperiment, stage: str) -> str:
    """The stage's output location as a URI: its ``output`` or ``<storage.checkpoints>/<stage>``.

    Raises :class:`SpecError` when neither is a pvc:// or file:// location.
    """
    section = experiment.spec.stage(stage).curation or {}
    prefix = f"spec.stages[{experiment.spec.stage_index(stage)}].curation.output"
    output = section.get("output")
    if output is None:
        checkpoints = experiment.spec.storage.checkpoints
        if checkpoints.split("://", 1)[0] not in OUTPUT_SCHEMES:
            raise SpecError(prefix, None, f"pvc://claim/path (file:// for dino-ctl run): spec.storage.checkpoints is "
                            f"{checkpoints}, and curation works on a shared filesystem (write.remote publishes the "
                            "dataset to an object store)")
        return checkpoints.rstrip("/") + "/" + stage
    if not isinstance(output, str) or output.split("://", 1)[0] not in OUTPUT_SCHEMES or "://" not in output:
        raise SpecError(prefix, output, "pvc://claim/path, or file:///absolute/path for dino-ctl run (curation works "
                        "on a shared filesystem; write.remote publishes the dataset to an object store)")
    return output


def _map_uri(value: Any) -> Any:
    return trainer_path(value) if isinstance(value, str) and value.startswith(("pvc://", "file://")) else value


def _pod_document(experiment: DinoExperiment, stage: str) -> dict[str, Any]:
    """The stage's curation section as the pods read it: defaults filled in, pvc:// and file:// mapped to paths."""
    section = copy.deepcopy(experiment.spec.stage(stage).curation or {})
    if "jobs" in section:
        prefix = f"spec.stages[{experiment.spec.stage_index(stage)}].curation.jobs"
        raise SpecError(prefix, section["jobs"], "no jobs section in an experiment: a curation stage runs on "
                        "spec.resources and the stage's nodes (jobs is for dino-ctl curate --render)")
    spec_stage = experiment.spec.stage(stage)
    seed = experiment.spec.seed if spec_stage.seed is None else spec_stage.seed
    document = {"name": section.pop("name", stage), "output": trainer_path(curation_output_uri(experiment, stage)),
                "seed": section.pop("seed", seed), **{k: v for k, v in section.items() if k != "output"}}
    sources = document.get("sources")
    if isinstance(sources, list):
        document["sources"] = [{**s, "path": _map_uri(s.get("path"))} if isinstance(s, dict) else s for s in sources]
    embed = document.get("embed")
    if isinstance(embed, dict) and "checkpoint" in embed:
        document["embed"] = {**embed, "checkpoint": _map_uri(embed["checkpoint"])}
    return document


def curation_claims(experiment: DinoExperiment) -> list[str]:
    """PersistentVolumeClaims the curation stages' output, sources and embedding checkpoint name (pvc:// URIs)."""
    claims: list[str] = []
    for stage in experiment.spec.stages:
        section = stage.curation
        if section is None:
            continue
        uris = [section.get("output")]
        if section.get("output") is None:
            uris.append(experiment.spec.storage.checkpoints)
        sources = section.get("sources")
        uris += [s.get("path") for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []
        embed = section.get("embed")
        uris.append(embed.get("checkpoint") if isinstance(embed, dict) else None)
        claims += [claim for uri in uris if isinstance(uri, str) and (claim := pvc_claim(uri))]
    return list(dict.fromkeys(claims))


@dataclass(frozen=True, kw_only=True)
class ResolvedCuration:
    """One curation stage after resolution: the spec its pods read, where it runs and the dataset it writes."""

    name: str
    index: int
    """Position in ``spec.stages`` (error paths name it)."""
    spec: CurationSpec
    """The validated curation spec with the paths the pods see."""
    nodes: NodeRange
    procs_per_node: int
    """Ranks per node (each rank owns a shard of the pool)."""
    metrics_port: int
    """``--metrics-port`` of ``curation.launch`` (``spec.monitoring.port``; the container port named ``metrics``)."""
    output_uri: str
    """``output`` as a URI (pvc:// or file://)."""
    dataset: dict[str, str]
    """The data stream a ``data: {from: <this stage>}`` stage trains on: ``{"remote": ...}`` (a PVC path or
    ``write.remote``) or ``{"local": ...}`` (this machine's disk, read in place)."""

    @property
    def world_sizes(self) -> list[int]:
        """Every rank count this stage may run at."""
        return [count * self.procs_per_node for count in range(self.nodes.min, self.nodes.max + 1)]

    def spec_text(self) -> str:
        """``curation.yaml`` as the stage ConfigMap (and ``dino-ctl run``) writes it."""
        # ``jobs`` configures ``dino-ctl curate --render`` only; the experiment places the stage itself.
        return yaml.safe_dump(self.spec.model_dump(mode="json", exclude={"jobs"}), sort_keys=False)


def resolve_curation(experiment: DinoExperiment, stage: str) -> ResolvedCuration:
    """The :class:`ResolvedCuration` of curation stage ``stage``; :class:`SpecError` naming the spec field when the
    curation section is invalid."""
    spec = experiment.spec
    try:
        curation = spec_from_dict(_pod_document(experiment, stage))
    except ConfigError as exc:
        if isinstance(exc, SpecError):
            raise
        raise curation_stage_error(experiment, stage, exc) from None
    output_uri = curation_output_uri(experiment, stage)
    if curation.write.remote is not None:
        dataset = {"remote": curation.write.remote}
    else:
        location = str(step_directory(curation.output, "write"))
        dataset = {"local": location} if output_uri.startswith("file://") else {"remote": location}
    return ResolvedCuration(
        name=stage,
        index=spec.stage_index(stage),
        spec=curation,
        nodes=spec.stage_nodes(stage),
        procs_per_node=spec.resources.num_procs_per_node,
        metrics_port=spec.monitoring.port,
        output_uri=output_uri,
        dataset=dataset,
    )
