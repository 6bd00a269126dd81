"""Shape checks of the DinoExperiment document: every field error names its path, the bad value and what is allowed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from dino_ctl.errors import SpecErrors
from dino_ctl.spec import DinoExperiment, parse_spec
from dino_ctl.validation import load_spec
from tests.dino_ctl.spec_helpers import EXAMPLES, document, example_specs


def _errors(doc: object) -> list[str]:
    with pytest.raises(SpecErrors) as info:
        parse_spec(doc)
    return [str(error) for error in info.value.errors]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["spec"].update(backend="slurm"),
         "spec.backend: invalid value 'slurm'; allowed: one of 'pytorchjob', 'trainjob', 'torchx', 'local'"),
        (lambda d: d["spec"].pop("image"), "spec.image: invalid value None; allowed: a value: this field is required"),
        (lambda d: d["spec"]["storage"].update(checkpoints="/local/disk"),
         "spec.storage.checkpoints: invalid value '/local/disk'; allowed: a URI s3://bucket/path, gs://bucket/path, "
         "file:///absolute/path or pvc://claim/path"),
        (lambda d: d["spec"]["storage"].update(checkpoints="file://relative"),
         "spec.storage.checkpoints: invalid value 'file://relative'; allowed: file:// followed by an absolute path "
         "(file:///data/runs) or, for dino-ctl run, a path relative to the current directory (file://./runs)"),
        (lambda d: d["spec"]["storage"].update(checkpoints="pvc://Bad_Claim/x"),
         "spec.storage.checkpoints: invalid value 'pvc://Bad_Claim/x'; allowed: pvc://claim/path where claim is the "
         "name of a PersistentVolumeClaim"),
        (lambda d: d["spec"]["storage"]["credentials"].update(accessKey="AKIA..."),
         "spec.storage.credentials.accessKey: invalid value 'AKIA...'; allowed: a known key: secretName, mount, "
         "envKeys, key"),
        (lambda d: d["spec"]["resources"].update(shmSize="lots"),
         "spec.resources.shmSize: invalid value 'lots'; allowed: a Kubernetes quantity such as 16Gi, 500m or 8"),
        (lambda d: d["spec"]["resources"].update(gpusPerNode=-1),
         "spec.resources.gpusPerNode: invalid value -1; allowed: input should be greater than or equal to 0"),
        (lambda d: d["spec"]["resources"]["nodes"].update(min=0),
         "spec.resources.nodes.min: invalid value 0; allowed: input should be greater than or equal to 1"),
        (lambda d: d["spec"]["resources"].update(tolerations=[{"key": "gpu", "operator": "Maybe"}]),
         "spec.resources.tolerations[0].operator: invalid value 'Maybe'; allowed: one of 'Exists', 'Equal'"),
        (lambda d: d["spec"]["stages"][0].update(name="Pre_Train"),
         "spec.stages[0].name: invalid value 'Pre_Train'; allowed: a DNS-1035 label: lowercase letters, digits and "
         "'-', starting with a letter, <= 63 chars"),
        (lambda d: d["spec"]["stages"][1].update(init={}),
         "spec.stages[1].init.from: invalid value None; allowed: a value: this field is required"),
        (lambda d: d["spec"]["stages"][1].update(init={"from": "pretrain", "stage": "x"}),
         "spec.stages[1].init.stage: invalid value 'x'; allowed: a known key: from"),
        (lambda d: d["spec"].update(stages=[]),
         "spec.stages: invalid value []; allowed: list should have at least 1 item after validation, not 0"),
        (lambda d: d["spec"].update(monitoring={"port": 70000}),
         "spec.monitoring.port: invalid value 70000; allowed: input should be less than or equal to 65535"),
        (lambda d: d["spec"]["data"]["streams"][0].update(proportion=0),
         "spec.data.streams[0].proportion: invalid value 0; allowed: input should be greater than 0"),
        (lambda d: d.update(kind="PyTorchJob"),
         "kind: invalid value 'PyTorchJob'; allowed: one of 'DinoExperiment'"),
        (lambda d: d["metadata"].update(name="x" * 64),
         f"metadata.name: invalid value '{'x' * 64}'; allowed: a DNS-1035 label: lowercase letters, digits and "
         "'-', starting with a letter, <= 63 chars"),
    ],
)
def test_field_errors_name_path_value_and_allowed(edit, message: str) -> None:
    doc = document()
    edit(doc)
    assert _errors(doc) == [message]


def test_all_shape_errors_are_reported_together() -> None:
    doc = document(backend="slurm")
    doc["spec"]["resources"]["shmSize"] = "lots"
    assert [e.split(":")[0] for e in _errors(doc)] == ["spec.backend", "spec.resources.shmSize"]


def test_not_a_mapping() -> None:
    assert _errors(["a", "list"]) == [
        "<document>: invalid value ['a', 'list']; allowed: a mapping with apiVersion, kind, metadata and spec"
    ]


def test_camel_case_wire_names_and_defaults() -> None:
    experiment = parse_spec(document())
    spec = experiment.spec
    assert spec.backend == "pytorchjob"
    assert spec.resources.shm_size == "32Gi"
    assert spec.resources.num_procs_per_node == 8
    assert spec.failure_budget.failure == 3 and spec.failure_budget.preemption is None
    assert spec.stages[1].init is not None and spec.stages[1].init.from_ == "pretrain"
    wire = experiment.to_document()
    assert wire["spec"]["resources"]["shmSize"] == "32Gi"
    assert wire["spec"]["stages"][1]["init"] == {"from": "pretrain"}
    assert parse_spec(wire) == experiment  # the record written to the cluster reads back identically


def test_after_accepts_a_name_or_a_list_and_dependencies_merge_links() -> None:
    doc = document()
    doc["spec"]["stages"][2]["after"] = "pretrain"
    stage = parse_spec(doc).spec.stages[2]
    assert stage.after == ["pretrain"]
    assert stage.dependencies() == ["pretrain", "highres"]


def test_cpu_quantity_accepts_numbers() -> None:
    doc = document()
    doc["spec"]["resources"]["cpu"] = 96
    assert parse_spec(doc).spec.resources.cpu == "96"


def test_server_metadata_is_ignored_when_reading_a_custom_resource() -> None:
    doc = document()
    doc["metadata"].update(uid="1234", resourceVersion="7", generation=2)
    doc["status"] = {"phase": "Running"}
    experiment = parse_spec(doc)
    assert experiment.metadata.name == "demo" and experiment.status == {"phase": "Running"}
    assert "status" not in experiment.to_document()


def test_load_spec_reads_exactly_one_document(tmp_path: Path) -> None:
    """A spec file is one YAML mapping (tests/dino_ctl/test_spec_loading.py has a test per loading rule)."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document()))
    assert isinstance(load_spec(path), DinoExperiment)
    path.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}},
                                        document()]))
    with pytest.raises(SpecErrors, match=r"invalid value 'a second YAML document' at line 5; allowed: one document"):
        load_spec(path)
    path.write_text("spec: [unclosed")
    with pytest.raises(SpecErrors, match=r"invalid value \"did not find expected ',' or ']' at line 2, column 1\"; "
                                         r"allowed: valid YAML"):
        load_spec(path)


@pytest.mark.parametrize("name", [p.name for p in example_specs()])
def test_examples_validate(name: str) -> None:
    experiment = load_spec(EXAMPLES / name)
    assert experiment.spec.stages


def test_the_three_required_examples_exist() -> None:
    names = {p.name for p in example_specs()}
    assert {"vitl14-pretrain-highres-distill.yaml", "trainjob-vits14.yaml", "torchx-vits14-volcano.yaml"} <= names


def test_spec_modules_do_not_import_torch() -> None:
    import subprocess

    code = ("import sys, dino_ctl.spec, dino_ctl.validation, dino_ctl.plan, dino_ctl.render, dino_ctl.schema, "
            "dino_ctl.kube, dino_ctl.checkpoints, dino_ctl.cli.main; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
