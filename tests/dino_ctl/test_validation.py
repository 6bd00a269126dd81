"""Cross-field rules: one test per rule with its exact message; errors block rendering (the CLI exits 2)."""

from __future__ import annotations

import logging

import pytest

from dino_ctl.errors import SpecErrors
from dino_ctl.spec import parse_spec
from dino_ctl.validation import stage_order, validate_experiment, world_sizes
from tests.dino_ctl.spec_helpers import document, experiment


def _messages(doc: dict, *, backend: str | None = None) -> list[str]:
    with pytest.raises(SpecErrors) as info:
        validate_experiment(parse_spec(doc), backend=backend)
    return [str(error) for error in info.value.errors]


def _stage(doc: dict, index: int) -> dict:
    return doc["spec"]["stages"][index]


def test_valid_document_passes_and_orders_stages() -> None:
    assert stage_order(experiment()) == ["pretrain", "highres", "distill"]


def test_stage_order_follows_dependencies_not_document_order() -> None:
    doc = document()
    doc["spec"]["stages"].reverse()
    assert stage_order(experiment(doc)) == ["pretrain", "highres", "distill"]


def test_duplicate_stage_names() -> None:
    doc = document()
    doc["spec"]["stages"].append({**_stage(doc, 0), "overrides": {"data.dataset": "mds"}})
    assert _messages(doc) == [
        "spec.stages[3].name: invalid value 'pretrain'; allowed: a name no other stage uses (stages[0])"
    ]


def test_reference_to_a_missing_stage() -> None:
    doc = document()
    _stage(doc, 2)["teacher"] = {"from": "hires"}
    assert _messages(doc) == [
        "spec.stages[2].teacher.from: invalid value 'hires'; allowed: the name of another stage: pretrain, highres"
    ]


def test_reference_to_itself() -> None:
    doc = document()
    _stage(doc, 0)["after"] = ["pretrain"]
    assert _messages(doc) == [
        "spec.stages[0].after[0]: invalid value 'pretrain'; allowed: the name of another stage: highres, distill"
    ]


def test_cycle_in_the_stage_graph() -> None:
    doc = document()
    _stage(doc, 0)["after"] = ["distill"]
    assert _messages(doc) == [
        "spec.stages[0].after: invalid value 'pretrain'; allowed: an acyclic stage graph; "
        "found pretrain -> distill -> highres -> pretrain"
    ]


def test_an_elastic_range_needs_one_image_per_rank_at_its_largest_size() -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 3}, "gpusPerNode": 8}, data={
        "streams": [{"remote": "s3://bucket/data/a"}], "numCanonicalNodes": 3})
    for stage in doc["spec"]["stages"]:
        stage["overrides"].update({"optim.global_batch_size": 20, "loss.koleo_loss_weight": 0.0})
    assert _messages(doc)[0] == (
        "spec.stages[0].overrides.optim.global_batch_size: invalid value 20; allowed: at least the world size (24): "
        "every rank trains on at least one image per step [nodes 1..3 x 8 processes; 3 nodes give world size 24]"
    )
    for stage in doc["spec"]["stages"]:
        stage["overrides"]["optim.global_batch_size"] = 24  # 24 over 8, 16 (2/1 shares) and 24 ranks
    validate_experiment(parse_spec(doc))


def test_koleo_needs_two_samples_per_rank() -> None:
    doc = document(resources={"nodes": {"min": 4, "max": 4}, "gpusPerNode": 8})
    assert _messages(doc)[0] == (
        "spec.stages[0].overrides.optim.global_batch_size: invalid value 32; allowed: at least 2 images on every "
        "rank with KoLeo enabled (world size 32 gives 1 to the smallest share); KoLeo needs a nearest neighbour, or "
        "set loss.koleo_loss_weight=0 [nodes 4..4 x 8 processes; 4 nodes give world size 32]"
    )
    for stage in doc["spec"]["stages"]:
        stage["overrides"]["loss.koleo_loss_weight"] = 0.0
    validate_experiment(parse_spec(doc))  # one sample per rank is fine without KoLeo


def test_per_stage_nodes_are_checked_with_their_own_range() -> None:
    doc = document()
    _stage(doc, 2)["nodes"] = {"min": 4, "max": 4}
    assert _messages(doc) == [
        "spec.stages[2].overrides.optim.global_batch_size: invalid value 32; allowed: at least 2 images on every "
        "rank with KoLeo enabled (world size 32 gives 1 to the smallest share); KoLeo needs a nearest neighbour, or "
        "set loss.koleo_loss_weight=0 [nodes 4..4 x 8 processes; 4 nodes give world size 32]"
    ]


def test_node_range_min_above_max() -> None:
    doc = document()
    _stage(doc, 1)["nodes"] = {"min": 3, "max": 2}
    assert _messages(doc) == [
        "spec.stages[1].nodes.min: invalid value 3; allowed: at most spec.stages[1].nodes.max (2)"
    ]


def test_trainjob_needs_a_fixed_node_count() -> None:
    doc = document(backend="trainjob", resources={"nodes": {"min": 1, "max": 2}, "gpusPerNode": 8})
    assert _messages(doc) == [
        "spec.resources.nodes: invalid value {'min': 1, 'max': 2}; allowed: min == max for backend trainjob "
        "(Kubeflow Trainer v2 has no elastic resizing; use pytorchjob or torchx)"
    ]


def test_backend_override_is_validated_too() -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 2}, "gpusPerNode": 8})
    validate_experiment(parse_spec(doc))
    assert _messages(doc, backend="trainjob")[0].startswith("spec.resources.nodes: invalid value")


def test_processes_per_node_at_most_gpus() -> None:
    doc = document(resources={"nodes": {"min": 2, "max": 2}, "gpusPerNode": 4, "procsPerNode": 8})
    assert _messages(doc) == ["spec.resources.procsPerNode: invalid value 8; allowed: at most gpusPerNode (4)"]


def test_metrics_port_must_not_be_the_rendezvous_port() -> None:
    assert _messages(document(monitoring={"port": 29400})) == [
        "spec.monitoring.port: invalid value 29400; allowed: any port but 29400 (torchrun's rendezvous port)"
    ]


@pytest.mark.parametrize(("backend", "torchx", "valid"), [
    ("pytorchjob", None, False), ("trainjob", None, False), ("torchx", "kubernetes", False),
    ("torchx", "local_cwd", True), ("local", None, True)])
def test_file_storage_only_on_this_machine(backend: str, torchx: str | None, valid: bool) -> None:
    doc = document(backend=backend, storage={"checkpoints": "file:///data/runs"})
    if torchx:
        doc["spec"]["torchx"] = {"scheduler": torchx}
    if valid:
        validate_experiment(parse_spec(doc))
    else:
        assert _messages(doc) == [
            f"spec.storage.checkpoints: invalid value 'file:///data/runs'; allowed: s3://, gs:// or pvc:// for "
            f"backend {backend}: file:// is pod-local disk, so a restart would lose progress"
        ]


def test_credentials_only_by_secret_reference() -> None:
    doc = document(env=[{"name": "HF_TOKEN", "value": "hunter2"}, {"name": "NCCL_DEBUG", "value": "WARN"},
                        {"name": "WANDB_API_TOKEN", "secretKeyRef": {"name": "wandb", "key": "token"}}])
    assert _messages(doc) == [
        "spec.env[0].value: invalid value '<redacted>'; allowed: a secretKeyRef: credentials come from Secrets, "
        "never the spec"
    ]


def test_env_needs_exactly_one_source() -> None:
    assert _messages(document(env=[{"name": "FOO"}])) == [
        "spec.env[0]: invalid value 'FOO'; allowed: exactly one of value or secretKeyRef"
    ]


def test_unknown_recipe() -> None:
    doc = document()
    _stage(doc, 0)["recipe"] = "vit_huge"
    assert _messages(doc) == [
        "spec.stages[0].recipe: invalid value 'vit_huge'; allowed: one of distill_vitb14, distill_vitl14, "
        "distill_vits14, highres518, long_vitg14, long_vitl14, short_vitl16, tiny, vits14"
    ]


def test_unknown_override_key_is_prefixed_with_its_spec_path() -> None:
    doc = document()
    _stage(doc, 1)["overrides"]["optim.iteratoins"] = 10
    assert _messages(doc) == [
        "spec.stages[1].overrides.optim.iteratoins: invalid value 10; allowed: a known key of optim: "
        "global_batch_size, iterations, base_lr, min_lr, warmup_iterations, weight_decay, weight_decay_end, "
        "momentum_teacher, momentum_teacher_end, layerwise_decay, patch_embed_lr_mult, freeze_last_layer_iterations, "
        "clip_grad, adamw_beta1, adamw_beta2, max_micro_batch_size"
    ]


def test_override_with_the_wrong_type() -> None:
    doc = document()
    _stage(doc, 0)["overrides"]["optim.iterations"] = "many"
    assert _messages(doc) == ["spec.stages[0].overrides.optim.iterations: invalid value 'many'; allowed: an integer"]


def test_crop_size_must_fit_the_patch_size() -> None:
    doc = document()
    _stage(doc, 0)["overrides"]["data.crops.local_size"] = 18
    assert _messages(doc) == [
        "spec.stages[0].overrides.data.crops.local_size: invalid value 18; allowed: a positive multiple of "
        "model.patch_size (4)"
    ]


def test_highres_stage_needs_init() -> None:
    doc = document()
    del _stage(doc, 1)["init"]
    assert _messages(doc) == [
        "spec.stages[1].init: invalid value None; allowed: init: {from: STAGE}: a highres stage starts from "
        "another stage's published checkpoint"
    ]


def test_distill_stage_needs_teacher() -> None:
    doc = document()
    del _stage(doc, 2)["teacher"]
    assert _messages(doc) == [
        "spec.stages[2].teacher: invalid value None; allowed: teacher: {from: STAGE}: a distill stage starts from "
        "another stage's published checkpoint"
    ]


def test_missing_data_streams_is_reported_once_at_the_spec_field() -> None:
    assert _messages(document(data={"streams": []})) == [
        "spec.data.streams: invalid value []; allowed: at least one stream with a remote or local MDS location"
    ]


def test_stream_proportions_on_all_or_none() -> None:
    doc = document(data={"streams": [{"remote": "s3://b/a", "proportion": 0.5}, {"remote": "s3://b/b"}]})
    assert _messages(doc) == [
        "spec.data.streams[*].proportion: invalid value [0.5, None]; allowed: set on every stream or on none"
    ]


def test_an_error_in_a_parent_stage_is_reported_once() -> None:
    doc = document()
    _stage(doc, 0)["overrides"]["model.patch_size"] = 5
    messages = _messages(doc)
    assert len(messages) == 1 and messages[0].startswith("spec.stages[0].overrides.")


def test_elastic_without_canonical_nodes_warns(caplog: pytest.LogCaptureFixture) -> None:
    doc = document(resources={"nodes": {"min": 1, "max": 2}, "gpusPerNode": 8})
    with caplog.at_level(logging.WARNING, logger="dino_ctl.validation"):
        validate_experiment(parse_spec(doc))
    assert "stage pretrain is elastic (1..2 nodes) and spec.data.numCanonicalNodes is unset: using 2" in caplog.text


def test_world_sizes() -> None:
    from dino_ctl.spec import NodeRange

    assert world_sizes(NodeRange(min=2, max=4), 8) == [16, 24, 32]
