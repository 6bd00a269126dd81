"""The ``DinoExperiment`` document: typed models of one experiment, loaded from YAML or a custom resource.

One schema serves the CLI (``dino-ctl validate/render/submit``), the in-cluster controller (the same document is a
``dino-ctl.io/v1alpha1`` custom resource whose CRD schema :mod:`dino_ctl.schema` generates from these models) and the
trainer (each stage resolves to a ``trainer.config.TrainConfig``, see :mod:`dino_ctl.stages`).

Field names on the wire are camelCase as in every Kubernetes API; Python attributes are snake_case. Unknown keys are
errors. This module checks the shape of each field (:func:`parse_spec`); :mod:`dino_ctl.validation` checks the rules
that span fields (stage graph, world sizes, recipes) and loads spec files (``load_spec``). Nothing here imports torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError
from pydantic.alias_generators import to_camel
from pydantic.json_schema import WithJsonSchema
from trainer.config import pydantic_errors

from dino_ctl.errors import SpecError, SpecErrors

__all__ = [
    "API_VERSION",
    "BACKENDS",
    "DNS_LABEL",
    "GROUP",
    "KIND",
    "DataSpec",
    "DinoExperiment",
    "EnvVar",
    "EvaluationSpec",
    "ExperimentSpec",
    "FailureBudget",
    "Metadata",
    "MonitoringSpec",
    "NodeRange",
    "PrepareSpec",
    "QueueSpec",
    "ResourcesSpec",
    "SecretKeyRef",
    "SpecError",
    "SpecErrors",
    "StageDataRef",
    "StageRef",
    "StageSpec",
    "StorageCredentials",
    "StorageSpec",
    "StreamSpec",
    "Toleration",
    "TorchXSpec",
    "TrainJobSpec",
    "parse_spec",
]

GROUP = "dino-ctl.io"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "DinoExperiment"
BACKENDS = ("pytorchjob", "trainjob", "torchx", "local")
STORAGE_SCHEMES = ("s3", "gs", "file", "pvc")

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes resource.Quantity: a decimal number with an optional binary/decimal SI suffix or exponent.
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")
_URI = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<rest>.+)$")


def _dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise ValueError("a DNS-1035 label: lowercase letters, digits and '-', starting with a letter, <= 63 chars")
    return value


def _quantity(value: str | int) -> str:
    text = str(value)
    if not _QUANTITY.match(text):
        raise ValueError("a Kubernetes quantity such as 16Gi, 500m or 8")
    return text


def _storage_uri(value: str) -> str:
    match = _URI.match(value)
    if not match or match["scheme"] not in STORAGE_SCHEMES:
        raise ValueError("a URI s3://bucket/path, gs://bucket/path, file:///absolute/path or pvc://claim/path")
    if match["scheme"] == "file" and not match["rest"].startswith(("/", "./", "../")):
        raise ValueError(
            "file:// followed by an absolute path (file:///data/runs) or, for dino-ctl run, a path relative to the "
            "current directory (file://./runs)"
        )
    if match["scheme"] == "pvc" and not DNS_LABEL.match(match["rest"].split("/", 1)[0]):
        raise ValueError("pvc://claim/path where claim is the name of a PersistentVolumeClaim")
    return value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# WithJsonSchema: the generated JSON Schema and CRD carry the same constraints the validators enforce.
DnsLabel = Annotated[
    str,
    AfterValidator(_dns_label),
    WithJsonSchema({"type": "string", "maxLength": 63, "pattern": DNS_LABEL.pattern}),
]
Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]
StorageUri = Annotated[
    str,
    AfterValidator(_storage_uri),
    WithJsonSchema({"type": "string", "pattern": f"^({'|'.join(STORAGE_SCHEMES)})://.+$"}),
]


class SpecModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown keys rejected, immutable after validation."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True, use_attribute_docstrings=True
    )


class Metadata(BaseModel):
    """Kubernetes object metadata. Server-set fields (uid, resourceVersion, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, use_attribute_docstrings=True)

    name: DnsLabel
    """Experiment name; prefix of every child object's name."""
    namespace: DnsLabel = "default"
    """Namespace of the experiment and all its child objects."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels copied onto every child object."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations of the experiment (state annotations are written by dino-ctl)."""


class QueueSpec(SpecModel):
    """Kueue admission: the LocalQueue the jobs are submitted to and an optional WorkloadPriorityClass."""

    name: DnsLabel
    """LocalQueue name (label ``kueue.x-k8s.io/queue-name``); jobs are created suspended and Kueue admits them."""
    priority_class: DnsLabel | None = None
    """WorkloadPriorityClass (label ``kueue.x-k8s.io/priority-class``)."""


class SecretKeyRef(SpecModel):
    """One key of a Kubernetes Secret."""

    name: DnsLabel
    key: str


class StorageCredentials(SpecModel):
    """Object-store credentials, by Secret reference only: no credential ever appears in the spec."""

    secret_name: DnsLabel
    """Secret holding the credentials."""
    mount: Literal["env", "file"] = "env"
    """``env``: the Secret's ``envKeys`` become env vars of the same names (S3 and compatible stores).
    ``file``: the Secret is mounted read-only and GOOGLE_APPLICATION_CREDENTIALS points at ``key`` (GCS)."""
    env_keys: list[str] = Field(
        default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], min_length=1
    )
    """Keys of the Secret exported as env vars when ``mount: env``."""
    key: str = "credentials.json"
    """Key of the credentials file when ``mount: file``."""


class StorageSpec(SpecModel):
    """Where checkpoints live: shared storage, never pod-local disk."""

    checkpoints: StorageUri
    """Root URI; stage ``X`` writes to ``<checkpoints>/X``. s3://, gs://, pvc://claim/path, file:// (local only)."""
    credentials: StorageCredentials | None = None
    endpoint_url: str | None = None
    """S3-compatible endpoint (e.g. MinIO), exported as AWS_ENDPOINT_URL and S3_ENDPOINT_URL."""


class PrepareSpec(SpecModel):
    """How ``dino-ctl run`` writes a dataset that is missing (on a cluster, run ``dino-ctl data prepare`` first)."""

    format: Literal["fashion-mnist", "folder", "list"]
    """``fashion-mnist``: the Debian package's idx files; ``folder``: class sub-folders; ``list``: a file of paths."""
    source: str | None = None
    """Input location; defaults to /usr/share/datasets/fashion-mnist for ``fashion-mnist``."""
    split: Literal["train", "test"] = "train"
    limit: int | None = Field(default=None, gt=0)
    """Keep the first N images."""


class StreamSpec(SpecModel):
    """One MDS stream of training data (mosaicml-streaming ``Stream``)."""

    remote: StorageUri | None = None
    local: str | None = None
    proportion: float | None = Field(default=None, gt=0)
    repeat: float | None = Field(default=None, gt=0)
    choose: int | None = Field(default=None, gt=0)
    prepare: PrepareSpec | None = None
    """Write the shards at ``local`` (or a file:// ``remote``) before a local run when they are missing."""


class EvaluationSpec(SpecModel):
    """Frozen-feature evaluation of the final backbone after ``dino-ctl run`` (next to a random-init baseline)."""

    train: str
    """Labelled MDS dataset or image folder the classifier is fitted on."""
    test: str
    """Labelled MDS dataset or image folder it is scored on."""
    prepare_train: PrepareSpec | None = None
    prepare_test: PrepareSpec | None = None
    limit_train: int | None = Field(default=None, gt=0)
    limit_test: int | None = Field(default=None, gt=0)
    protocols: list[Literal["knn", "linear"]] = Field(default_factory=lambda: ["knn"], min_length=1)


class DataSpec(SpecModel):
    """Training data shared by all stages (a stage may still override ``data.*`` keys)."""

    streams: list[StreamSpec] = Field(default_factory=list)
    num_canonical_nodes: int | None = Field(default=None, gt=0)
    """Fixes the sample order across world sizes; defaults to ``resources.nodes.max`` when unset."""


class NodeRange(SpecModel):
    """Elastic node range: torchrun accepts any node count in ``[min, max]``; equal values mean a fixed size."""

    min: int = Field(default=1, ge=1)
    max: int = Field(default=1, ge=1)


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class ResourcesSpec(SpecModel):
    """The GPU node pool one stage runs on."""

    nodes: NodeRange = Field(default_factory=NodeRange)
    gpus_per_node: int = Field(default=8, ge=0)
    """GPUs per node (``nvidia.com/gpu`` limit); 0 runs on CPU."""
    procs_per_node: int | None = Field(default=None, ge=1)
    """Trainer processes per node; defaults to gpusPerNode (1 on CPU nodes)."""
    cpu: Quantity | None = None
    memory: Quantity | None = None
    shm_size: Quantity = "32Gi"
    """Size of the memory-backed /dev/shm (the container default of 64M breaks data-loader workers)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"

    @property
    def num_procs_per_node(self) -> int:
        """Processes per node after defaulting."""
        return self.procs_per_node or max(self.gpus_per_node, 1)


class MonitoringSpec(SpecModel):
    """Prometheus scraping of the trainer's /metrics."""

    port: int = Field(default=9400, ge=1, le=65535)
    """Container port named ``metrics``."""
    pod_monitor: bool = True
    """Render a PodMonitor selecting ``dino-ctl.io/experiment``."""
    release: str | None = None
    """Value of the ``release`` label kube-prometheus-stack selects monitors by (e.g. kube-prometheus-stack)."""
    scrape_interval: str = "30s"


class FailureBudget(SpecModel):
    """Stage resubmissions allowed per reason. Preemption and eviction never count against ``failure``."""

    failure: int = Field(default=3, ge=0)
    """Resubmissions after a genuine failure (non-zero exit other than 143, not evicted)."""
    preemption: int | None = Field(default=None, ge=0)
    """Cap on resubmissions after exit 143 (checkpoint written after SIGTERM); null is unlimited."""
    eviction: int | None = Field(default=None, ge=0)
    """Cap on resubmissions after pods were evicted or their node was lost; null is unlimited."""
    elastic_restarts: int = Field(default=3, ge=0)
    """Worker-group restarts torchrun does inside one job (elasticPolicy.maxRestarts, JobSet maxRestarts)."""


class EnvVar(SpecModel):
    """An env var of the trainer container: a plain ``value`` or a ``secretKeyRef``."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    value: str | None = None
    secret_key_ref: SecretKeyRef | None = None


class TrainJobSpec(SpecModel):
    """Kubeflow Trainer v2 settings (backend ``trainjob``)."""

    trainer_version: Literal["2.0", "2.1", "2.2"] = "2.2"
    """Installed Trainer minor version; the pod-override field differs between them."""
    runtime: DnsLabel = "dino-ctl-torch"
    """ClusterTrainingRuntime name (``dino-ctl render --backend trainjob`` also prints the project's runtime)."""
    gang_scheduler: Literal["coscheduling", "volcano", "none"] = "coscheduling"


class TorchXSpec(SpecModel):
    """TorchX settings (backend ``torchx``)."""

    scheduler: Literal["kubernetes", "local_cwd"] = "kubernetes"
    """``kubernetes`` renders a Volcano Job; ``local_cwd`` runs processes on this machine."""
    volcano_queue: str = "default"


class StageRef(SpecModel):
    """A reference to another stage whose published checkpoint this stage starts from."""

    from_: DnsLabel = Field(alias="from")


class StageDataRef(SpecModel):
    """The training data of one stage: the MDS dataset a curation stage of the same experiment writes."""

    from_: DnsLabel = Field(alias="from")
    """A stage with ``curation``: its output dataset becomes this stage's only data stream."""


class StageSpec(SpecModel):
    """One stage: a training stage (``recipe``, dotted overrides) or a curation stage (``curation``), and its place
    in the stage graph."""

    name: DnsLabel
    recipe: str | None = None
    """A ``trainer.config.RECIPES`` name (short_vitl16, long_vitl14, highres518, distill_vits14, tiny, ...); every
    stage without ``curation`` has one."""
    curation: dict[str, Any] | None = None
    """A curation stage: the curation spec (``curation.config.CurationSpec``, the file ``dino-ctl curate`` reads,
    snake_case keys) without ``jobs``; ``name`` defaults to the stage name and ``output`` to
    ``<storage.checkpoints>/<stage>`` (pvc:// or file:// storage; give a pvc:// URI otherwise). It runs under torchrun
    (``python -m curation.launch``) on the stage's nodes; its MDS dataset feeds stages whose ``data`` names it."""
    data: StageDataRef | None = None
    """``{from: CURATION_STAGE}``: train on the dataset that curation stage writes instead of ``spec.data.streams``."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted trainer-config keys, e.g. ``optim.iterations: 625000``."""
    after: Annotated[
        list[DnsLabel],
        BeforeValidator(_one_or_many),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    ] = Field(default_factory=list)
    """Stages that must have succeeded before this one starts (a name or a list)."""
    init: StageRef | None = None
    """Initialise student and teacher from this stage's published checkpoint (high-resolution adaptation)."""
    teacher: StageRef | None = None
    """Frozen teacher from this stage's published checkpoint (distillation)."""
    nodes: NodeRange | None = None
    """Node range of this stage; defaults to ``spec.resources.nodes``."""
    seed: int | None = None
    """Defaults to ``spec.seed``."""

    @property
    def is_curation(self) -> bool:
        """Whether this is a curation stage (it has a ``curation`` section)."""
        return self.curation is not None

    def dependencies(self) -> list[str]:
        """Every stage this one waits for: ``after`` plus the ``init``/``teacher``/``data`` sources, in order, no
        repeats."""
        names = [*self.after, *(ref.from_ for ref in (self.init, self.teacher, self.data) if ref is not None)]
        return list(dict.fromkeys(names))


class ExperimentSpec(SpecModel):
    """Everything one experiment needs: image, backend, placement, storage, data and the stage graph."""

    image: str = Field(min_length=1, pattern=r"^\S+$")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[DnsLabel] = Field(default_factory=list)
    service_account_name: DnsLabel | None = None
    backend: Literal["pytorchjob", "trainjob", "torchx", "local"] = "pytorchjob"
    seed: int = 0
    queue: QueueSpec | None = None
    storage: StorageSpec
    data: DataSpec = Field(default_factory=DataSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    failure_budget: FailureBudget = Field(default_factory=FailureBudget)
    env: list[EnvVar] = Field(default_factory=list)
    train_job: TrainJobSpec = Field(default_factory=TrainJobSpec)
    torchx: TorchXSpec = Field(default_factory=TorchXSpec)
    evaluation: EvaluationSpec | None = None
    stages: list[StageSpec] = Field(min_length=1)

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name``; :class:`SpecError` listing the stage names when there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise SpecError("stage", name, "one of " + ", ".join(s.name for s in self.stages))

    def stage_index(self, name: str) -> int:
        """Position of stage ``name`` in ``stages`` (used in field paths)."""
        return self.stages.index(self.stage(name))

    def stage_nodes(self, name: str) -> NodeRange:
        """The node range of stage ``name`` after defaulting to ``resources.nodes``."""
        return self.stage(name).nodes or self.resources.nodes


class DinoExperiment(SpecModel):
    """The whole document: ``apiVersion``, ``kind``, ``metadata``, ``spec`` (and ``status`` when read back)."""

    api_version: Literal["dino-ctl.io/v1alpha1"] = API_VERSION
    kind: Literal["DinoExperiment"] = KIND
    metadata: Metadata
    spec: ExperimentSpec
    status: dict[str, Any] | None = None
    """Written by the controller; ignored on input."""
    _resolved: Any = PrivateAttr(default=None)
    """Memo of :func:`dino_ctl.stages.resolve_experiment` (the document is immutable, so it is resolved once)."""

    def __eq__(self, other: object) -> bool:
        """Equal documents are equal experiments, resolved or not (the memo takes no part; pydantic's own ``==``
        compares private attributes too)."""
        if not isinstance(other, DinoExperiment):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """``metadata.namespace``."""
        return self.metadata.namespace

    def to_document(self) -> dict[str, Any]:
        """The document as plain data with wire (camelCase) names, defaults included, unset optionals and status
        left out (the CRD schema has no nullable fields: a null would make the API server reject the object)."""
        return self.model_dump(mode="json", by_alias=True, exclude={"status"}, exclude_none=True)


def parse_spec(document: Any) -> DinoExperiment:
    """Validate a parsed YAML/JSON document into a :class:`DinoExperiment` (shape checks only).

    Raises :class:`SpecErrors` with one :class:`SpecError` per invalid field.
    """
    if not isinstance(document, dict):
        raise SpecErrors([SpecError("<document>", document, "a mapping with apiVersion, kind, metadata and spec")])
    try:
        return DinoExperiment.model_validate(document)
    except ValidationError as exc:  # Kubernetes-style wire paths (camelCase), every error at once
        raise SpecErrors(pydantic_errors(exc.errors(include_url=False), DinoExperiment, make=SpecError)) from None
