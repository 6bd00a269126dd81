"""World-size rules: ``dino-ctl validate`` refuses (exit 2, naming the field) what every pod of a size would die of.

One test per rule of ``trainer.config.validate_world_size``, through the CLI, for every size a stage may run at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.dino_ctl.spec_helpers import EXAMPLES, document

runner = CliRunner()


def _validate(tmp_path: Path, doc: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Exit code and the reported errors of ``dino-ctl validate -o json`` on ``doc``."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(path), "-o", "json"])
    report = json.loads(result.stdout)
    return result.exit_code, report.get("errors", [])


def _with_pretrain_overrides(doc: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    doc["spec"]["stages"][0].setdefault("overrides", {}).update(overrides)
    return doc


def test_fsdp_off_on_the_sixteen_node_example_is_refused(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "vitl14-pretrain-highres-distill.yaml").read_text())
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"parallel.fsdp": "off"}))
    assert code == 2
    assert [error["message"] for error in errors] == [
        "spec.stages[0].overrides.parallel.fsdp: invalid value 'off' with world size 128; allowed: 'auto' or 'on' "
        "(gradients are synchronised by FSDP2) [nodes 16..16 x 8 processes; 16 nodes give world size 128]"
    ]


def test_fsdp_off_is_fine_on_one_rank(tmp_path: Path) -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 1}, "gpusPerNode": 1})
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"parallel.fsdp": "off"}))
    assert (code, errors) == (0, [])


def test_fsdp_off_is_refused_at_the_first_elastic_size_above_one(tmp_path: Path) -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 2}, "gpusPerNode": 1},
                   data={"streams": [{"remote": "s3://bucket/data/a"}], "numCanonicalNodes": 2})
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"parallel.fsdp": "off"}))
    assert code == 2 and len(errors) == 1
    assert errors[0]["path"] == "spec.stages[0].overrides.parallel.fsdp"
    assert "with world size 2" in errors[0]["message"] and "2 nodes give world size 2" in errors[0]["message"]


def test_batch_share_must_be_even_at_every_size(tmp_path: Path) -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 3}, "gpusPerNode": 8},
                   data={"streams": [{"remote": "s3://bucket/data/a"}], "numCanonicalNodes": 3})
    code, errors = _validate(tmp_path, doc)
    assert code == 2
    assert errors[0]["message"] == (
        "spec.stages[0].overrides.optim.global_batch_size: invalid value 32; allowed: a multiple of the world size "
        "(24) so every rank gets the same batch [nodes 1..3 x 8 processes; 3 nodes give world size 24]"
    )


def test_koleo_needs_two_samples_per_rank(tmp_path: Path) -> None:
    code, errors = _validate(tmp_path, document(resources={"nodes": {"min": 4, "max": 4}, "gpusPerNode": 8}))
    assert code == 2
    assert errors[0]["path"] == "spec.stages[0].overrides.optim.global_batch_size"
    assert "at least 2 samples per rank with KoLeo enabled (world size 32 gives 1)" in errors[0]["message"]


def test_micro_batches_must_split_the_rank_batch_evenly(tmp_path: Path) -> None:
    # 80 images over 8 ranks = 10 per rank; a cap of 4 needs 3 micro-batches, and 10 / 3 is not whole.
    doc = document(resources={"nodes": {"min": 1, "max": 1}, "gpusPerNode": 8})
    for stage in doc["spec"]["stages"]:
        stage["overrides"]["optim.global_batch_size"] = 80
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"optim.max_micro_batch_size": 4}))
    assert code == 2
    assert [error["message"] for error in errors] == [
        "spec.stages[0].overrides.optim.max_micro_batch_size: invalid value 4 with world size 8 (10 per rank gives "
        "3 unequal micro-batches); allowed: a cap that splits the per-rank batch into equal micro-batches, such as 2 "
        "(a divisor of 10) [nodes 1..1 x 8 processes; 1 nodes give world size 8]"
    ]


def test_koleo_needs_two_samples_per_micro_batch(tmp_path: Path) -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 1}, "gpusPerNode": 8})  # 32 / 8 = 4 per rank
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"optim.max_micro_batch_size": 1}))
    assert code == 2
    assert errors[0]["path"] == "spec.stages[0].overrides.optim.max_micro_batch_size"
    assert "at least 2 with KoLeo enabled: KoLeo runs on each micro-batch" in errors[0]["message"]
    doc = _with_pretrain_overrides(doc, **{"optim.max_micro_batch_size": 2})
    assert _validate(tmp_path, doc) == (0, [])


@pytest.mark.parametrize("cap", [0, -3])
def test_micro_batch_cap_must_be_positive(tmp_path: Path, cap: int) -> None:
    code, errors = _validate(tmp_path, _with_pretrain_overrides(document(), **{"optim.max_micro_batch_size": cap}))
    assert code == 2
    assert errors[0]["message"] == (
        f"spec.stages[0].overrides.optim.max_micro_batch_size: invalid value {cap}; allowed: null (no cap) or an "
        "integer >= 1"
    )
