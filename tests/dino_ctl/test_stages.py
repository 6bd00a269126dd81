"""Stage -> trainer config: the values the spec decides, inheritance along init/teacher links, pvc:// paths."""

from __future__ import annotations

import pytest
import yaml

from dino_ctl.naming import MAX_CHILD_NAME, child_name, truncate_name
from dino_ctl.render.common import render_stage_config_map
from dino_ctl.spec import DNS_LABEL
from dino_ctl.stages import pvc_claims, stage_checkpoint_dir, stage_train_config, trainer_path
from trainer.config import config_from_dict, config_to_dict
from tests.dino_ctl.spec_helpers import EXAMPLES, experiment


def test_spec_values_fill_the_trainer_config() -> None:
    exp = experiment(seed=7)
    config = stage_train_config(exp, "pretrain")
    assert config.recipe == "tiny"
    assert config.seed == 7
    assert config.checkpoint.dir == "s3://bucket/runs/demo/pretrain"
    assert [(s.remote, s.proportion) for s in config.data.streams] == [("s3://bucket/data/a", 0.5),
                                                                        ("s3://bucket/data/b", 0.5)]
    assert config.data.num_canonical_nodes == 2  # nodes.max when spec.data.numCanonicalNodes is unset
    assert config.metrics.port == 9400  # the recipe's 0 (any port) is replaced: pods expose a fixed port
    assert config.data.dataset == "mds"  # the stage override, applied last


def test_stage_seed_beats_spec_seed() -> None:
    doc_stage_seed = experiment(seed=7)
    stages = [s.model_copy(update={"seed": 11}) if s.name == "highres" else s for s in doc_stage_seed.spec.stages]
    exp = doc_stage_seed.model_copy(update={"spec": doc_stage_seed.spec.model_copy(update={"stages": stages})})
    assert stage_train_config(exp, "highres").seed == 11


def test_init_links_checkpoint_and_inherits_architecture_but_not_input_size() -> None:
    exp = experiment()
    pretrain, highres = stage_train_config(exp, "pretrain"), stage_train_config(exp, "highres")
    assert highres.stage.kind == "highres"
    assert highres.stage.init_from == "s3://bucket/runs/demo/pretrain"
    assert highres.model.arch == pretrain.model.arch and highres.model.patch_size == pretrain.model.patch_size
    assert highres.heads == pretrain.heads
    assert highres.model.img_size == 64 and pretrain.model.img_size == 32


def test_teacher_links_checkpoint_and_teacher_model() -> None:
    exp = experiment()
    distill = stage_train_config(exp, "distill")
    assert distill.stage.teacher_from == "s3://bucket/runs/demo/highres"
    assert distill.stage.teacher_model == stage_train_config(exp, "highres").model
    assert (distill.model.arch, distill.model.depth) == ("vit_pico", 2)  # a student smaller than its teacher


def test_highres_example_keeps_the_vitl14_architecture_at_518() -> None:
    from dino_ctl.validation import load_spec

    exp = load_spec(EXAMPLES / "vitl14-pretrain-highres-distill.yaml")
    highres = stage_train_config(exp, "highres")
    assert (highres.model.arch, highres.model.ffn, highres.model.patch_size, highres.model.img_size) == (
        "vit_large", "swiglu", 14, 518)
    assert highres.heads.dino_prototypes == 131072
    distill = stage_train_config(exp, "distill-vits14")
    assert distill.stage.teacher_model is not None and distill.stage.teacher_model.img_size == 518


def test_pvc_storage_becomes_the_mount_path() -> None:
    exp = experiment(storage={"checkpoints": "pvc://ckpts/runs/demo"},
                     data={"streams": [{"remote": "pvc://datasets/in1k"}, {"remote": "s3://b/x"}]})
    config = stage_train_config(exp, "pretrain")
    assert config.checkpoint.dir == "/mnt/dino-ctl/ckpts/runs/demo/pretrain"
    assert [s.remote for s in config.data.streams] == ["/mnt/dino-ctl/datasets/in1k", "s3://b/x"]
    assert pvc_claims(exp) == ["ckpts", "datasets"]
    assert stage_checkpoint_dir(exp, "distill") == "/mnt/dino-ctl/ckpts/runs/demo/distill"


@pytest.mark.parametrize(("uri", "path"), [("file:///data/x", "/data/x"), ("s3://b/x", "s3://b/x"),
                                           ("pvc://claim", "/mnt/dino-ctl/claim")])
def test_trainer_path(uri: str, path: str) -> None:
    assert trainer_path(uri) == path


def test_config_map_holds_the_resolved_config_the_trainer_reads_back() -> None:
    exp = experiment()
    config = stage_train_config(exp, "highres")
    config_map = render_stage_config_map(exp, "highres", config)
    text = config_map["data"]["config.yaml"]
    assert config_from_dict(yaml.safe_load(text)) == config
    assert config_to_dict(config)["stage"]["init_from"] == "s3://bucket/runs/demo/pretrain"


def test_child_names_are_valid_labels_and_truncated_with_a_hash() -> None:
    assert child_name("demo", "pretrain") == "demo-pretrain"
    long_a = child_name("e" * 40, "stage-" + "a" * 20)
    long_b = child_name("e" * 40, "stage-" + "b" * 20)
    assert len(long_a) == MAX_CHILD_NAME and long_a != long_b
    assert long_a.startswith("e" * 22 + "-stage-" + "a" * 16 + "-") and DNS_LABEL.match(long_a)
    assert child_name("e" * 40, "x", "config", max_length=63) == "e" * 40 + "-x-config"


def test_truncation_never_leaves_a_dash_before_the_hash() -> None:
    name = truncate_name("a" * 44 + "-" * 3 + "b" * 20)
    assert "--" not in name and DNS_LABEL.match(name) and len(name) <= MAX_CHILD_NAME


THREE_STAGES = EXAMPLES / "vitl14-pretrain-highres-distill.yaml"


def _count_resolutions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the recipe of every ``resolve_config`` call the control plane makes."""
    import dino_ctl.stages

    calls: list[str] = []
    real = dino_ctl.stages.resolve_config

    def counting(recipe: str, **kwargs: object) -> object:
        calls.append(recipe)
        return real(recipe, **kwargs)

    monkeypatch.setattr(dino_ctl.stages, "resolve_config", counting)
    return calls


def test_loading_validating_and_rendering_resolves_each_stage_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from dino_ctl.render import render
    from dino_ctl.stages import resolve_experiment
    from dino_ctl.validation import load_spec, validate_experiment

    calls = _count_resolutions(monkeypatch)
    exp = load_spec(THREE_STAGES)
    resolved = validate_experiment(exp)
    validate_experiment(exp, backend="torchx")
    objects = render(exp)
    assert calls == ["long_vitl14", "highres518", "distill_vits14"]
    assert resolve_experiment(exp) is resolved and resolved.order == ["pretrain", "highres", "distill-vits14"]
    assert [obj["kind"] for obj in objects].count("ConfigMap") == 3


def test_the_render_command_resolves_each_stage_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from dino_ctl.cli.main import app

    calls = _count_resolutions(monkeypatch)
    result = CliRunner().invoke(app, ["render", str(THREE_STAGES)])
    assert result.exit_code == 0, result.output
    assert calls == ["long_vitl14", "highres518", "distill_vits14"]


def test_a_copied_document_is_resolved_again() -> None:
    from dino_ctl.stages import resolve_experiment

    exp = experiment(seed=7)
    copy = exp.model_copy(update={"spec": exp.spec.model_copy(update={"seed": 8})})
    assert resolve_experiment(exp).config("pretrain").seed == 7
    assert resolve_experiment(copy).config("pretrain").seed == 8


def test_resolving_a_document_does_not_change_what_it_equals() -> None:
    from dino_ctl.spec import parse_spec
    from dino_ctl.stages import resolve_experiment
    from tests.dino_ctl.spec_helpers import document

    resolved, other, fresh = experiment(), experiment(), parse_spec(document())
    resolve_experiment(resolved), resolve_experiment(other)
    assert resolved == other and resolved == fresh and resolved != experiment(seed=3)
