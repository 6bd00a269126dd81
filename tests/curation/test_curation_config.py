"""The curation spec: defaults, and errors that name the field, the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from curation.config import load_spec, spec_from_dict
from trainer.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _spec(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "demo",
        "output": "/tmp/out",
        "sources": [{"name": "pool", "kind": "folder", "path": "/p"}],
    }
    data.update(changes)
    return data


def test_defaults_are_the_papers() -> None:
    spec = spec_from_dict(_spec())
    assert (spec.dedup.k, spec.dedup.threshold, spec.dedup.eval_threshold) == (64, 0.6, 0.45)
    assert spec.retrieve.k == 4
    cluster = spec.retrieve.cluster
    assert (cluster.num_clusters, cluster.min_queries, cluster.images_per_cluster, cluster.max_per_query_set) == (
        100_000,
        3,
        10_000,
        1_000_000,
    )
    assert spec.balance.resampling_rounds == 10 and not spec.balance.enabled


@pytest.mark.parametrize(
    "changes,path,allowed",
    [
        ({"dedup": {"k": 0}}, "dedup.k", "greater than or equal to 1"),
        ({"dedup": {"treshold": 0.5}}, "dedup.treshold", "a known key: enabled, k, threshold"),
        ({"dedup": {"index": {"kind": "hnsw"}}}, "dedup.index.kind", "one of 'auto', 'flat', 'ivf_flat', 'ivf_pq'"),
        ({"sources": [{"name": "pool", "kind": "folder", "path": "/p", "role": "train"}]}, "sources[0].role", "'pool'"),
        ({"sources": [{"name": "Pool!", "kind": "folder", "path": "/p"}]}, "sources[0].name", "pattern"),
        (
            {"sources": [{"name": "a", "kind": "folder", "path": "/p"}, {"name": "a", "kind": "mds", "path": "/q"}]},
            "sources[1].name",
            "a name not used by another source",
        ),
        (
            {"sources": [{"name": "q", "kind": "folder", "path": "/p", "role": "query"}]},
            "sources",
            "at least one source with role 'pool'",
        ),
        ({"sources": [{"name": "p", "kind": "embeddings", "path": "/p"}]}, "sources[0].kind", "while write.enabled"),
        ({"embed": {"model": "vit_huge"}}, "embed.model", "thumbnail, one of vit_pico"),
        ({"embed": {"model": {"arch": "vit_small", "depth": "deep"}}}, "embed.model.depth", "int or null"),
        ({"balance": {"levels": [10, 100]}}, "balance.levels", "strictly decreasing bottom-up"),
        ({"balance": {"enabled": True}}, "balance.target_size", "a positive integer when balance.enabled"),
        ({"name": "demo", "output": "/o"}, "sources", "this field is required"),
    ],
)
def test_mistakes_name_the_field(changes: dict[str, Any], path: str, allowed: str) -> None:
    data = _spec(**changes)
    if "sources" not in changes and path == "sources":
        data.pop("sources")
    with pytest.raises(ConfigError) as info:
        spec_from_dict(data)
    assert info.value.path == path
    assert allowed in info.value.allowed


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_spec(tmp_path / "nope.yaml")


def test_example_spec_is_valid() -> None:
    spec = load_spec(REPO / "examples" / "curation.yaml")
    assert spec.sources_with_role("pool")
