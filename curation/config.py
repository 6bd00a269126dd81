"""The curation spec: one YAML file naming the image sources and configuring each step.

Torch-free (pydantic only) so ``dino-ctl curate --render`` and spec validation start fast. Every mistake raises
:class:`trainer.config.ConfigError` naming the dotted field path, the bad value and what is allowed.

Defaults are the DINOv2 paper's (appendix A) and Vo et al. 2024's where the spec does not say otherwise; the
thresholds depend on the descriptor model, so they are configuration, not constants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import ARCHS, ConfigError, config_from_dict, pydantic_errors, read_yaml_mapping

__all__ = [
    "BalanceConfig",
    "ClusterRetrievalConfig",
    "CurationSpec",
    "DedupConfig",
    "EmbedConfig",
    "IndexConfig",
    "JobsConfig",
    "RetrieveConfig",
    "SourceConfig",
    "WriteConfig",
    "load_spec",
    "spec_from_dict",
]

STEP_NAMES = ("embed", "dedup", "retrieve", "balance", "write")
"""The pipeline's steps, in execution order."""

_NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SourceConfig(_Model):
    """One image source (or a set of precomputed embeddings)."""

    name: str = Field(pattern=_NAME_PATTERN)
    """Unique name: lower-case DNS-label style, used in sample ids, file names and provenance."""
    kind: Literal["folder", "filelist", "mds", "embeddings"]
    """``folder``: image files under ``path`` (recursive); ``filelist``: a text file with one image path per line
    (relative paths are relative to the list); ``mds``: an uncompressed or compressed local MDS dataset following
    ``trainer/data/contract.py``; ``embeddings``: precomputed embedding shards (see ``curation.storage``), no images."""
    path: str
    role: Literal["pool", "eval", "query"] = "pool"
    """``pool``: images to curate; ``eval``: evaluation images to deduplicate against; ``query``: retrieval queries."""
    retrieval: Literal["sample", "cluster"] = "sample"
    """Query sets only: ``sample`` takes the k nearest pool images per query; ``cluster`` takes whole k-means
    clusters of the pool that hold enough query images (the paper uses it for small query sets)."""
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    """``folder`` only: file suffixes (case-insensitive) that count as images."""


class IndexConfig(_Model):
    """How k-NN searches are run (faiss)."""

    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq"] = "auto"
    """``auto`` picks exact ``flat`` below ``flat_max_size`` vectors, ``ivf_pq`` from ``ivf_pq_min_size``,
    ``ivf_flat`` in between (the paper's large-scale setting is IVF-PQ on GPUs)."""
    flat_max_size: int = Field(default=50_000, ge=1)
    ivf_pq_min_size: int = Field(default=5_000_000, ge=1)
    nlist: int | None = Field(default=None, ge=1)
    """IVF lists; default ``4 * sqrt(n)`` (faiss guideline), capped so every list gets >= 39 training points."""
    nprobe: int = Field(default=16, ge=1)
    pq_bytes: int = Field(default=32, ge=1)
    """IVF-PQ bytes per code (sub-quantisers of 8 bits); must divide the embedding dimension."""
    gpu: Literal["auto", "on", "off"] = "auto"
    """``auto`` uses faiss-gpu when it is installed and sees a GPU; ``on`` fails if it cannot."""
    batch_size: int = Field(default=16_384, ge=1)
    """Queries per faiss search call (bounds memory, drives the progress bar)."""


class EmbedConfig(_Model):
    """Batch inference of a backbone over every source with images."""

    model: str | dict[str, Any] = "vit_small"
    """A ``trainer.config.ARCHS`` preset name, a ``ModelConfig`` mapping, or ``thumbnail`` (a torch-free
    mean-centred pixel thumbnail: a baseline descriptor for tests and sanity checks, not for real curation)."""
    checkpoint: str | None = None
    """Backbone weights (a checkpoint of this project or a released DINOv2 ``.pth``/``.safetensors``)."""
    image_size: int = Field(default=224, ge=8)
    thumbnail_size: int = Field(default=16, ge=2)
    """``model: thumbnail`` only: side of the thumbnail (descriptor dimension 3 * side^2)."""
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=0, ge=0)
    """Decoding processes of the torch DataLoader (0 decodes in the main process)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the embedding shards (computation is float32 or bf16 autocast on CUDA)."""
    num_shards: int = Field(default=1, ge=1)
    """Index-range shards per source; the ranks of ``curation.launch`` (or ``--shard-index`` workers) share them out,
    and each shard commits on its own, so a restart computes only the missing ones."""


class DedupConfig(_Model):
    """Copy-detection style self-deduplication and deduplication against the evaluation sets."""

    enabled: bool = True
    k: int = Field(default=64, ge=1)
    """Neighbours per image whose similarity is tested (paper: 64)."""
    threshold: float = Field(default=0.6, gt=-1.0, le=1.0)
    """Cosine above which two pool images are copies (paper: 0.6 with SSCD descriptors)."""
    eval_threshold: float = Field(default=0.45, gt=-1.0, le=1.0)
    """Stricter cosine for evaluation sets: a component touching an evaluation image is dropped whole."""
    index: IndexConfig = IndexConfig()


class ClusterRetrievalConfig(_Model):
    """Cluster-based retrieval (paper: 100k clusters, > 3 queries, 10k images per cluster, 1M per query set)."""

    num_clusters: int = Field(default=100_000, ge=1)
    min_queries: int = Field(default=3, ge=0)
    """A cluster is taken when it holds MORE than this many query images."""
    images_per_cluster: int = Field(default=10_000, ge=1)
    max_per_query_set: int = Field(default=1_000_000, ge=1)
    iterations: int = Field(default=20, ge=1)


class RetrieveConfig(_Model):
    """Retrieval of pool images close to the query sets; a pass-through when the spec has no query source."""

    k: int = Field(default=4, ge=1)
    """Sample-based retrieval: nearest pool images per query (paper: 4, 32 for ImageNet-1k)."""
    cluster: ClusterRetrievalConfig = ClusterRetrievalConfig()
    index: IndexConfig = IndexConfig()


class BalanceConfig(_Model):
    """Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024)."""

    enabled: bool = False
    levels: tuple[int, ...] = (10_000, 1_000, 100)
    """Clusters per level, bottom-up (level 1 clusters the embeddings, level t+1 the centroids of level t)."""
    resampling_rounds: int = Field(default=10, ge=0)
    resample_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    """Points kept per cluster in a resampling round, as a fraction of the level's mean cluster size."""
    iterations: int = Field(default=20, ge=1)
    """k-means iterations of the first fit; resampling rounds warm-start with a quarter of it."""
    target_size: int | None = Field(default=None, ge=1)
    """Number of images to sample (required when enabled)."""
    sampling: Literal["random", "closest"] = "random"
    """How images are picked inside a leaf cluster: uniformly at random or closest to its centroid first."""
    index: IndexConfig = IndexConfig()


class WriteConfig(_Model):
    """MDS output following ``trainer/data/contract.py``."""

    enabled: bool = True
    num_shards: int = Field(default=1, ge=1)
    """Writer partitions (shared out over the ranks), merged into one dataset index at the end."""
    size_limit: int = Field(default=1 << 26, ge=1024)
    compression: str | None = None
    """MDS compression (e.g. ``zstd``); the paper-scale default is none: JPEG bytes barely compress."""
    remote: str | None = None
    """Object-store URI (``s3://bucket/datasets/name``, ``gs://...``) the finished dataset is published to: every
    partition, ``manifest.json``, then ``index.json`` last, so readers (``data.streams[].remote``) never see a
    half-published dataset. ``output`` stays the working directory (embeddings, indexes, markers)."""


class JobsConfig(_Model):
    """How :func:`curation.kube.render_curation_jobs` renders the run as one elastic PyTorchJob (``dino-ctl curate
    --render``); a curation stage inside a DinoExperiment takes these settings from the experiment instead."""

    namespace: str = Field(default="default", pattern=_NAME_PATTERN)
    pvc: str | None = None
    """A ReadWriteMany PersistentVolumeClaim mounted at ``mount_path`` (``output`` and the sources must lie on it)."""
    mount_path: str = "/data"
    gpus_per_pod: int = Field(default=1, ge=0)
    cpu: str = "8"
    memory: str = "64Gi"
    parallelism: int | None = Field(default=None, ge=1)
    """Pods (nodes) of the PyTorchJob (default 1); each runs ``max(gpus_per_pod, 1)`` ranks."""
    backoff_limit_per_index: int = Field(default=3, ge=0)
    """torchrun's ``maxRestarts`` (the name is kept from the indexed-Job renderer, so older specs stay valid)."""
    node_selector: dict[str, str] = {}
    service_account: str | None = None


class CurationSpec(_Model):
    """A whole curation run: sources, output directory and one section per step."""

    name: str = Field(pattern=_NAME_PATTERN)
    output: str
    """Working and output directory: step outputs, done markers, the MDS dataset and ``manifest.json``."""
    seed: int = 0
    sources: tuple[SourceConfig, ...]
    embed: EmbedConfig = EmbedConfig()
    dedup: DedupConfig = DedupConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    balance: BalanceConfig = BalanceConfig()
    write: WriteConfig = WriteConfig()
    jobs: JobsConfig = JobsConfig()

    def sources_with_role(self, role: str) -> tuple[SourceConfig, ...]:
        """Sources of one role in spec order (the order that fixes global row numbers)."""
        return tuple(s for s in self.sources if s.role == role)


def _check_model(model: str | dict[str, Any]) -> None:
    if isinstance(model, str):
        if model != "thumbnail" and model not in ARCHS:
            raise ConfigError("embed.model", model, "thumbnail, one of " + ", ".join(ARCHS) + ", or a ModelConfig")
        return
    try:
        config_from_dict({"model": model})
    except ConfigError as exc:
        raise ConfigError(f"embed.{exc.path}", exc.value, exc.allowed) from None


def _check_semantics(spec: CurationSpec) -> None:
    """Cross-field rules pydantic's per-field types cannot express."""
    seen: set[str] = set()
    for i, source in enumerate(spec.sources):
        if source.name in seen:
            raise ConfigError(f"sources[{i}].name", source.name, "a name not used by another source")
        seen.add(source.name)
        if source.role == "pool" and source.kind == "embeddings" and spec.write.enabled:
            raise ConfigError(
                f"sources[{i}].kind", source.kind, "an image source (folder, filelist, mds) while write.enabled is true"
            )
    if not spec.sources_with_role("pool"):
        raise ConfigError("sources", [s.name for s in spec.sources], "at least one source with role 'pool'")
    _check_model(spec.embed.model)
    levels = spec.balance.levels
    if not levels or min(levels) < 1 or any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ConfigError("balance.levels", list(levels), "positive cluster counts, strictly decreasing bottom-up")
    if spec.balance.enabled and spec.balance.target_size is None:
        raise ConfigError("balance.target_size", None, "a positive integer when balance.enabled is true")


def spec_from_dict(data: dict[str, Any]) -> CurationSpec:
    """Validate a mapping into a :class:`CurationSpec`; the first problem raises :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError("spec", data, "a mapping with name, output, sources and step sections")
    try:
        spec = CurationSpec.model_validate(data)
    except ValidationError as exc:  # the first problem, with its dotted path
        raise pydantic_errors(exc.errors(include_url=False), CurationSpec, empty_path="spec")[0] from None
    _check_semantics(spec)
    return spec


def load_spec(path: str | Path) -> CurationSpec:
    """Read and validate a curation spec YAML file (``trainer.config.read_yaml_mapping``: the loader of the
    experiment spec too, so both refuse duplicate keys, alias bombs, non-UTF-8 and multi-document files alike)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("spec", str(path), "an existing YAML file")
    return spec_from_dict(read_yaml_mapping(path))
