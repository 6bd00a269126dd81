"""Kubernetes rendering: indexed Jobs per sharded step, strict schema validation, golden file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from curation.config import load_spec, spec_from_dict
from curation.kube import render_curation_jobs

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "curation_jobs.yaml"
IMAGE = "registry.example.com/dino-ctl:0.1.0"


def _rendered() -> list[dict]:
    return render_curation_jobs(load_spec(REPO / "examples" / "curation.yaml"), image=IMAGE)


def test_matches_golden_file() -> None:
    text = yaml.safe_dump_all(_rendered(), sort_keys=False)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "rendering changed: rerun with UPDATE_GOLDEN=1 and review the diff"


def test_objects_pass_strict_schema_validation() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in _rendered():
        kubernetes_validate.validate(obj, "1.31", strict=True)


def test_indexed_jobs_follow_the_shard_counts_and_run_in_order() -> None:
    config_map, embed, select, write = _rendered()
    assert config_map["kind"] == "ConfigMap" and "spec.yaml" in config_map["data"]
    assert load_spec_text(config_map["data"]["spec.yaml"]).embed.num_shards == 64
    assert embed["spec"]["completionMode"] == "Indexed" and embed["spec"]["completions"] == 64
    assert embed["spec"]["parallelism"] == 16
    assert write["spec"]["completionMode"] == "Indexed" and write["spec"]["completions"] == 32
    assert "completionMode" not in select["spec"] and select["spec"]["completions"] == 1
    assert "suspend" not in embed["spec"]
    assert select["spec"]["suspend"] and select["metadata"]["annotations"]["dino-ctl.io/after"] == "web-pool-v1-embed"
    assert write["metadata"]["annotations"]["dino-ctl.io/after"] == "web-pool-v1-select"
    commands = [job["spec"]["template"]["spec"]["containers"][0]["command"][-1] for job in (embed, select, write)]
    assert commands == ["embed", "dedup,retrieve,balance", "write"]
    write_limits = write["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in write_limits  # writing MDS needs no GPU
    assert embed["spec"]["template"]["spec"]["volumes"][2] == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "curation-data"},
    }


def load_spec_text(text: str):
    return spec_from_dict(yaml.safe_load(text))


def test_long_names_stay_valid_dns_labels() -> None:
    spec = spec_from_dict(
        {"name": "a" * 60, "output": "/o", "sources": [{"name": "p", "kind": "folder", "path": "/p"}]}
    )
    names = [obj["metadata"]["name"] for obj in render_curation_jobs(spec, image=IMAGE)]
    assert all(len(n) <= 63 for n in names) and len(set(names)) == 4
    assert names[1].endswith("-embed")


def test_image_is_required() -> None:
    spec = spec_from_dict({"name": "x", "output": "/o", "sources": [{"name": "p", "kind": "folder", "path": "/p"}]})
    with pytest.raises(ValueError, match="image must name the container image"):
        render_curation_jobs(spec, image="")
