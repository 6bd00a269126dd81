"""The semantic rules of docs/contracts.md ('Spec rules'): for each, a spec that breaks it (exit 2 naming the field)
and one that just satisfies it (the boundary value). Table-driven on the three-stage document of spec_helpers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from dino_ctl.errors import SpecErrors
from dino_ctl.spec import parse_spec
from dino_ctl.validation import experiment_warnings, validate_experiment
from tests.dino_ctl.spec_helpers import document

Edit = Callable[[dict[str, Any]], None]


def _override(key: str, value: Any, stage: int = 0) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["spec"]["stages"][stage]["overrides"][key] = value
    return edit


def _spec(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        node = doc["spec"]
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return edit


def _all_stages(key: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        for stage in doc["spec"]["stages"]:
            stage["overrides"][key] = value
    return edit


def _both(*edits: Edit) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        for one in edits:
            one(doc)
    return edit


def _env(*names: str) -> Edit:
    return _spec("env", [{"name": name, "value": "1"} for name in names])


def _stage_chain(count: int) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["spec"]["stages"] = [{"name": f"s{i}", "recipe": "tiny", "overrides": {"data.dataset": "mds"}}
                                 for i in range(count)]
    return edit


# (rule id, edit that just satisfies the rule, edit that breaks it, the error the break gives)
RULES: list[tuple[str, Edit, Edit, str]] = [
    # --- ranges of momenta, probabilities, ratios, temperatures, weights (trainer.config.validate) ---------------
    ("momentum_teacher", _override("optim.momentum_teacher", 1.0), _override("optim.momentum_teacher", 1.001),
     "spec.stages[0].overrides.optim.momentum_teacher: invalid value 1.001; allowed: a finite number [0, 1] (an EMA "
     "momentum: above 1 the teacher diverges, below 0 it oscillates)"),
    ("momentum_teacher>=0", _override("optim.momentum_teacher", 0.0), _override("optim.momentum_teacher", -0.01),
     "spec.stages[0].overrides.optim.momentum_teacher: invalid value -0.01; allowed: a finite number [0, 1]"),
    ("momentum_teacher_end", _override("optim.momentum_teacher_end", 1.0), _override("optim.momentum_teacher_end", 2),
     "spec.stages[0].overrides.optim.momentum_teacher_end: invalid value 2.0; allowed: a finite number [0, 1]"),
    ("center_momentum", _override("loss.center_momentum", 1.0), _override("loss.center_momentum", 1.1),
     "spec.stages[0].overrides.loss.center_momentum: invalid value 1.1; allowed: a finite number [0, 1] (an EMA "
     "momentum)"),
    ("adamw_beta1", _override("optim.adamw_beta1", 0.999999), _override("optim.adamw_beta1", 1.0),
     "spec.stages[0].overrides.optim.adamw_beta1: invalid value 1.0; allowed: a finite number [0, 1) (a moment's "
     "decay rate)"),
    ("adamw_beta2", _override("optim.adamw_beta2", 0.0), _override("optim.adamw_beta2", -0.1),
     "spec.stages[0].overrides.optim.adamw_beta2: invalid value -0.1; allowed: a finite number [0, 1)"),
    ("layerwise_decay", _override("optim.layerwise_decay", 1.0), _override("optim.layerwise_decay", 0.0),
     "spec.stages[0].overrides.optim.layerwise_decay: invalid value 0.0; allowed: a finite number (0, 1] (a factor "
     "per block below the top; 1 switches it off)"),
    ("student_temp", _override("loss.student_temp", 1e-6), _override("loss.student_temp", 0),
     "spec.stages[0].overrides.loss.student_temp: invalid value 0.0; allowed: a finite number > 0 (logits are "
     "divided by it)"),
    ("teacher_temp", _override("loss.teacher_temp", 1e-6), _override("loss.teacher_temp", -0.04),
     "spec.stages[0].overrides.loss.teacher_temp: invalid value -0.04; allowed: a finite number > 0"),
    ("warmup_teacher_temp", _override("loss.warmup_teacher_temp", 1e-6), _override("loss.warmup_teacher_temp", 0),
     "spec.stages[0].overrides.loss.warmup_teacher_temp: invalid value 0.0; allowed: a finite number > 0"),
    ("loss weights", _override("loss.koleo_loss_weight", 0), _override("loss.koleo_loss_weight", -0.1),
     "spec.stages[0].overrides.loss.koleo_loss_weight: invalid value -0.1; allowed: a finite number >= 0 (0 switches "
     "the term off)"),
    ("a loss term", _override("loss.dino_loss_weight", 0),
     _both(_override("loss.dino_loss_weight", 0), _override("loss.ibot_loss_weight", 0)),
     "spec.stages[0].overrides.loss.dino_loss_weight: invalid value 0.0; allowed: > 0 unless loss.ibot_loss_weight "
     "is (no term would train the heads)"),
    ("weight_decay", _override("optim.weight_decay", 0), _override("optim.weight_decay", -0.04),
     "spec.stages[0].overrides.optim.weight_decay: invalid value -0.04; allowed: a finite number >= 0"),
    ("weight_decay_end", _override("optim.weight_decay_end", 0), _override("optim.weight_decay_end", -1),
     "spec.stages[0].overrides.optim.weight_decay_end: invalid value -1.0; allowed: a finite number >= 0"),
    ("min_lr", _override("optim.min_lr", 0), _override("optim.min_lr", -1e-6),
     "spec.stages[0].overrides.optim.min_lr: invalid value -1e-06; allowed: a finite number >= 0"),
    ("patch_embed_lr_mult", _override("optim.patch_embed_lr_mult", 0), _override("optim.patch_embed_lr_mult", -0.2),
     "spec.stages[0].overrides.optim.patch_embed_lr_mult: invalid value -0.2; allowed: a finite number >= 0"),
    ("clip_grad", _override("optim.clip_grad", 0), _override("optim.clip_grad", -3),
     "spec.stages[0].overrides.optim.clip_grad: invalid value -3.0; allowed: a finite number >= 0 (0 switches it "
     "off)"),
    ("freeze_last_layer", _override("optim.freeze_last_layer_iterations", 0),
     _override("optim.freeze_last_layer_iterations", -1),
     "spec.stages[0].overrides.optim.freeze_last_layer_iterations: invalid value -1; allowed: an integer >= 0"),
    ("warmup_teacher_temp_iterations", _override("loss.warmup_teacher_temp_iterations", 0),
     _override("loss.warmup_teacher_temp_iterations", -1),
     "spec.stages[0].overrides.loss.warmup_teacher_temp_iterations: invalid value -1; allowed: >= 0"),
    ("layerscale_init", _override("model.layerscale_init", 0.0), _override("model.layerscale_init", -1e-5),
     "spec.stages[0].overrides.model.layerscale_init: invalid value -1e-05; allowed: a finite number >= 0"),
    ("preemption_grace_seconds", _override("checkpoint.preemption_grace_seconds", 0.5),
     _override("checkpoint.preemption_grace_seconds", 0),
     "spec.stages[0].overrides.checkpoint.preemption_grace_seconds: invalid value 0.0; allowed: a finite number > 0"),
    # --- counts that must be positive (0 fell back to a preset silently, or divided by zero) ---------------------
    ("model.patch_size", _all_stages("model.patch_size", 1), _override("model.patch_size", 0),
     "spec.stages[0].overrides.model.patch_size: invalid value 0; allowed: an integer >= 1 (pixels)"),
    ("model.depth", _all_stages("model.depth", 1), _override("model.depth", 0),
     "spec.stages[0].overrides.model.depth: invalid value 0; allowed: null (the vit_pico preset's) or an integer "
     ">= 1"),
    ("model.embed_dim", _all_stages("model.embed_dim", 3), _override("model.embed_dim", 0),
     "spec.stages[0].overrides.model.embed_dim: invalid value 0; allowed: null (the vit_pico preset's) or an integer "
     ">= 1"),
    ("heads", _override("heads.dino_hidden", 1), _override("heads.dino_hidden", 0),
     "spec.stages[0].overrides.heads.dino_hidden: invalid value 0; allowed: an integer >= 1"),
    ("log_interval", _override("metrics.log_interval", 1), _override("metrics.log_interval", 0),
     "spec.stages[0].overrides.metrics.log_interval: invalid value 0; allowed: an integer >= 1"),
    ("prefetch_factor", _override("data.prefetch_factor", 1), _override("data.prefetch_factor", 0),
     "spec.stages[0].overrides.data.prefetch_factor: invalid value 0; allowed: an integer >= 1"),
    ("shuffle_block_size", _override("data.shuffle_block_size", 1), _override("data.shuffle_block_size", 0),
     "spec.stages[0].overrides.data.shuffle_block_size: invalid value 0; allowed: null or an integer >= 1"),
    ("shuffle_algo", _override("data.shuffle_algo", "naive"), _override("data.shuffle_algo", "py1x"),
     "spec.stages[0].overrides.data.shuffle_algo: invalid value 'py1x'; allowed: one of py1e, py1br, py1s, py2s, "
     "naive"),
    ("one stream weighting", _spec("data.streams", [{"remote": "s3://b/a", "repeat": 2.0}]),
     _spec("data.streams", [{"remote": "s3://b/a", "repeat": 2.0, "choose": 10}]),
     "spec.data.streams[0].choose: invalid value 10; allowed: null: at most one of proportion, repeat, choose per "
     "stream (repeat is set)"),
    # --- sane upper bounds ----------------------------------------------------------------------------------------
    ("num_local", _override("data.crops.num_local", 32), _override("data.crops.num_local", 33),
     "spec.stages[0].overrides.data.crops.num_local: invalid value 33; allowed: at most 32 (a sane upper bound; is "
     "there an extra digit?)"),
    ("global_batch_size", _all_stages("optim.global_batch_size", 1 << 20),
     _all_stages("optim.global_batch_size", (1 << 20) + 16),
     "spec.stages[0].overrides.optim.global_batch_size: invalid value 1048592; allowed: at most 1,048,576"),
    ("iterations", _override("optim.iterations", 100_000_000), _override("optim.iterations", 1_000_000_000),
     "spec.stages[0].overrides.optim.iterations: invalid value 1000000000; allowed: at most 100,000,000"),
    ("global_size", _both(_override("data.crops.global_size", 4096, 1), _override("model.img_size", 4096, 1)),
     _override("data.crops.global_size", 8192, 1),
     "spec.stages[1].overrides.data.crops.global_size: invalid value 8192; allowed: at most 4,096"),
    ("prototypes", _override("heads.dino_prototypes", 1 << 20), _override("heads.dino_prototypes", 1 << 21),
     "spec.stages[0].overrides.heads.dino_prototypes: invalid value 2097152; allowed: at most 1,048,576"),
    ("registers", _override("model.num_register_tokens", 64), _override("model.num_register_tokens", 65),
     "spec.stages[0].overrides.model.num_register_tokens: invalid value 65; allowed: at most 64"),
    ("num_workers", _override("data.num_workers", 256), _override("data.num_workers", 257),
     "spec.stages[0].overrides.data.num_workers: invalid value 257; allowed: at most 256"),
    ("gpusPerNode", _both(_spec("resources.gpusPerNode", 16), _spec("resources.nodes", {"min": 1, "max": 1})),
     _spec("resources.gpusPerNode", 17),
     "spec.resources.gpusPerNode: invalid value 17; allowed: at most 16 (the GPUs of one node)"),
    ("nodes", _both(_spec("resources.nodes", {"min": 512, "max": 512}), _spec("resources.gpusPerNode", 0),
                    _all_stages("optim.global_batch_size", 1024)),
     _spec("resources.nodes", {"min": 2, "max": 513}),
     "spec.resources.nodes.max: invalid value 513; allowed: at most 512 nodes (a sane upper bound; is there an "
     "extra digit?)"),
    ("procsPerNode", _both(_spec("resources.gpusPerNode", 0), _spec("resources.procsPerNode", 64),
                           _all_stages("optim.global_batch_size", 256)),
     _both(_spec("resources.gpusPerNode", 0), _spec("resources.procsPerNode", 65)),
     "spec.resources.procsPerNode: invalid value 65; allowed: at most 64"),
    ("stages", _stage_chain(32), _stage_chain(33),
     "spec.stages: invalid value '33 items'; allowed: at most 32 (a sane upper bound)"),
    ("env entries", _env(*(f"E{i}" for i in range(256))), _env(*(f"E{i}" for i in range(257))),
     "spec.env: invalid value '257 items'; allowed: at most 256 (a sane upper bound)"),
    ("seed", _spec("seed", 2**32 - 1), _spec("seed", 2**32),
     "spec.seed: invalid value 4294967296; allowed: 0..4294967295 (NumPy's seed range; negative seeds fail)"),
    ("seed>=0", _spec("seed", 0), _spec("seed", -1),
     "spec.seed: invalid value -1; allowed: 0..4294967295"),
    # --- env names: the API server refuses a name twice (server-side apply: HTTP 500) ------------------------------
    ("duplicate env", _env("A", "B"), _env("A", "B", "A"),
     "spec.env[2].name: invalid value 'A'; allowed: a name no other env entry uses (spec.env[0])"),
    ("env dino-ctl sets", _env("DINO_CTL_STAGES"), _env("DINO_CTL_STAGE"),
     "spec.env[0].name: invalid value 'DINO_CTL_STAGE'; allowed: a name dino-ctl does not set itself (set by "
     "dino-ctl)"),
    ("env of the credentials", _env("AWS_REGION"), _env("AWS_ACCESS_KEY_ID"),
     "spec.env[0].name: invalid value 'AWS_ACCESS_KEY_ID'; allowed: a name dino-ctl does not set itself "
     "(spec.storage.credentials.envKeys)"),
    ("env of the operators", _env("PETS"), _env("PET_NNODES"),
     "spec.env[0].name: invalid value 'PET_NNODES'; allowed: a name without the PET_ prefix"),
    ("envKeys", _spec("storage.credentials", {"secretName": "s3", "envKeys": ["A", "B"]}),
     _spec("storage.credentials", {"secretName": "s3", "envKeys": ["A", "B", "A"]}),
     "spec.storage.credentials.envKeys[2]: invalid value 'A'; allowed: a key not already listed (envKeys[0])"),
    ("imagePullSecrets", _spec("imagePullSecrets", ["a", "b"]), _spec("imagePullSecrets", ["a", "a"]),
     "spec.imagePullSecrets[1]: invalid value 'a'; allowed: a Secret not already listed (imagePullSecrets[0])"),
    # --- stage links -----------------------------------------------------------------------------------------------
    ("highres raises the crop size", _override("data.crops.global_size", 36, stage=1),
     _override("data.crops.global_size", 32, stage=1),
     "spec.stages[1].overrides.data.crops.global_size: invalid value 32; allowed: more than 32, the global crop size "
     "of pretrain (init.from): a highres stage raises the resolution"),
    ("distill: same patch size", _override("model.patch_size", 4, stage=2), _override("model.patch_size", 8, stage=2),
     "spec.stages[2].overrides.model.patch_size: invalid value 8; allowed: the teacher's patch size (4): iBOT matches "
     "patch tokens one to one"),
    ("distill: student not larger", _override("model.depth", 4, stage=2), _override("model.depth", 5, stage=2),
     "spec.stages[2].overrides.model.arch: invalid value 'vit_pico'; allowed: a student no larger than its teacher: "
     "the teacher (vit_pico, width 96, depth 4) has 477,888 backbone parameters, this student (width 96, depth 5) "
     "571,488"),
]


@pytest.mark.parametrize(("satisfy", "break_", "message"), [rule[1:] for rule in RULES], ids=[r[0] for r in RULES])
def test_rule(satisfy: Edit, break_: Edit, message: str) -> None:
    doc = document()
    satisfy(doc)
    validate_experiment(parse_spec(doc))  # the boundary value is valid
    doc = document()
    break_(doc)
    with pytest.raises(SpecErrors) as info:
        validate_experiment(parse_spec(doc))
    messages = [str(error) for error in info.value.errors]
    assert any(text.startswith(message) for text in messages), messages


def test_seed_set_by_a_stage_is_named_there() -> None:
    doc = document()
    doc["spec"]["stages"][1]["seed"] = -5
    with pytest.raises(SpecErrors) as info:
        validate_experiment(parse_spec(doc))
    assert str(info.value.errors[0]).startswith("spec.stages[1].seed: invalid value -5; allowed: 0..4294967295")


def test_backbone_parameter_count_matches_the_model() -> None:
    """The distillation rule's parameter count (torch-free) is the backbone's own count."""
    from trainer.config import ModelConfig, backbone_num_parameters
    from trainer.models import build_backbone

    for model in (ModelConfig(arch="vit_pico", patch_size=4, img_size=32, num_register_tokens=4),
                  ModelConfig(arch="vit_pico", patch_size=14, img_size=28, ffn="swiglu", depth=2),
                  ModelConfig(arch="vit_tiny", patch_size=16, img_size=64, depth=3)):
        backbone = build_backbone(model)
        assert backbone_num_parameters(model) == sum(p.numel() for p in backbone.parameters()), model


def _checkpoint_interval_doc(interval: int) -> dict[str, Any]:
    doc = document()
    doc["spec"]["stages"][0]["overrides"].update({"optim.iterations": 200, "checkpoint.interval_iterations": interval})
    return doc


def test_checkpoint_interval_as_long_as_the_stage_warns_and_passes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dino_ctl.validation"):
        resolved = validate_experiment(parse_spec(_checkpoint_interval_doc(200)))
    warning = ("spec.stages[0]: checkpoint.interval_iterations 200 >= optim.iterations 200: stage pretrain writes no "
               "checkpoint before its last step, so a failed pod restarts it from the beginning (a SIGTERM still "
               "writes one)")
    assert caplog.messages == [warning] and experiment_warnings(resolved) == [warning]
    assert experiment_warnings(validate_experiment(parse_spec(_checkpoint_interval_doc(199)))) == []


def test_checkpoint_interval_warning_on_the_cli(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Exit 0; the warning is logged (stderr: the CLI configures no handler, so Python's last-resort handler prints
    it) and listed in the JSON report."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_checkpoint_interval_doc(1000)))
    with caplog.at_level(logging.WARNING, logger="dino_ctl.validation"):
        result = CliRunner().invoke(app, ["validate", str(path), "-o", "json"])
    assert result.exit_code == 0, result.output
    [warning] = json.loads(result.stdout)["warnings"]
    assert warning.startswith("spec.stages[0]: checkpoint.interval_iterations 1000 >= optim.iterations 200")
    assert caplog.messages == [warning]
