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


def test_fsdp_off_on_the_flagship_example_is_refused_at_its_smallest_size(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "vitl14-pretrain-highres-distill.yaml").read_text())
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"parallel.fsdp": "off"}))
    assert code == 2
    assert [error["message"] for error in errors] == [
        "spec.stages[0].overrides.parallel.fsdp: invalid value 'off' with world size 96; allowed: 'auto' or 'on' "
        "(gradients are synchronised by FSDP2) [nodes 12..16 x 8 processes; 12 nodes give world size 96]"
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


def test_an_elastic_range_is_valid_whenever_every_rank_gets_an_image(tmp_path: Path) -> None:
    # 32 images over 8, 16 or 24 ranks: shares 4, 2 and 2/1 (KoLeo off: one image per rank is enough)
    data = {"streams": [{"remote": "s3://bucket/data/a"}], "numCanonicalNodes": 3}
    doc = document(resources={"nodes": {"min": 1, "max": 3}, "gpusPerNode": 8}, data=data)
    for stage in doc["spec"]["stages"]:
        stage["overrides"]["loss.koleo_loss_weight"] = 0
    assert _validate(tmp_path, doc) == (0, [])
    for stage in doc["spec"]["stages"]:
        stage["overrides"]["optim.global_batch_size"] = 16
    code, errors = _validate(tmp_path, doc)
    assert code == 2
    assert errors[0]["message"] == (
        "spec.stages[0].overrides.optim.global_batch_size: invalid value 16; allowed: at least the world size (24): "
        "every rank trains on at least one image per step [nodes 1..3 x 8 processes; 3 nodes give world size 24]"
    )


def test_the_flagship_example_is_elastic_over_a_range_its_batch_does_not_divide(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "vitl14-pretrain-highres-distill.yaml").read_text())
    nodes = doc["spec"]["resources"]["nodes"]
    assert nodes["min"] < nodes["max"] and any(3072 % (n * 8) for n in range(nodes["min"], nodes["max"] + 1))
    assert _validate(tmp_path, doc) == (0, [])


def test_koleo_needs_two_samples_per_rank(tmp_path: Path) -> None:
    code, errors = _validate(tmp_path, document(resources={"nodes": {"min": 4, "max": 4}, "gpusPerNode": 8}))
    assert code == 2
    assert errors[0]["path"] == "spec.stages[0].overrides.optim.global_batch_size"
    assert ("at least 2 images on every rank with KoLeo enabled (world size 32 gives 1 to the smallest share)"
            in errors[0]["message"])


def test_every_rank_must_fill_the_same_number_of_micro_batches(tmp_path: Path) -> None:
    # 12 images over 8 ranks: shares 2,2,2,2,1,1,1,1; a cap of 1 means 2 micro-batches, and a share of 1 cannot fill 2.
    doc = document(resources={"nodes": {"min": 1, "max": 1}, "gpusPerNode": 8})
    for stage in doc["spec"]["stages"]:
        stage["overrides"].update({"optim.global_batch_size": 12, "loss.koleo_loss_weight": 0})
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"optim.max_micro_batch_size": 1}))
    assert code == 2
    assert [error["message"] for error in errors] == [
        "spec.stages[0].overrides.optim.max_micro_batch_size: invalid value 1 with world size 8; allowed: at least 2: "
        "every rank splits its share into the same number of micro-batches (2 for the largest share of 2 images), "
        "and the smallest share (1) must give each of them at least one image "
        "[nodes 1..1 x 8 processes; 1 nodes give world size 8]"
    ]


def test_koleo_needs_two_samples_per_micro_batch(tmp_path: Path) -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 1}, "gpusPerNode": 8})  # 32 / 8 = 4 per rank
    code, errors = _validate(tmp_path, _with_pretrain_overrides(doc, **{"optim.max_micro_batch_size": 1}))
    assert code == 2
    assert errors[0]["path"] == "spec.stages[0].overrides.optim.max_micro_batch_size"
    assert "a cap that leaves at least 2 images in every micro-batch with KoLeo enabled" in errors[0]["message"]
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
