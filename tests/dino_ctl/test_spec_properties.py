"""Property-based tests of the spec path (Hypothesis; hypothesis-jsonschema draws from ``dino-ctl schema``).

Examples per property (default suite; ``DINO_CTL_PROPERTY_SCALE=10`` multiplies them and draws fresh examples):

- documents drawn from the generated JSON Schema: validation raises nothing but SpecErrors ........ 150
- mutations of valid specs (values, deletions, trainer override keys at edge values): the same, and
  every mutant that still validates renders and passes the upstream CRD schemas ..................... 400
- generated valid specs: every rendered object and the custom resource pass the CRD schemas ........ 60
- spec -> custom resource -> spec round-trips (also through JSON and through YAML and the loader) .. 150
- the loader reads back what ``yaml.safe_dump`` writes ............................................ 200
- the loader, given any bytes or text, raises nothing but ConfigError ............................ 300

The default runs are derandomised (the same examples each run, so the suite is deterministic) and keep no example
database in the work tree.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import typing
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dino_ctl.errors import SpecErrors
from dino_ctl.render import render
from dino_ctl.schema import json_schema
from dino_ctl.spec import DNS_LABEL, DinoExperiment, parse_spec
from dino_ctl.validation import RDZV_PORT, validate_experiment
from tests.dino_ctl.spec_helpers import example_specs, object_validator
from trainer.config import ConfigError, TrainConfig, parse_yaml_mapping

SCALE = int(os.environ.get("DINO_CTL_PROPERTY_SCALE", "1"))


def _settings(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


def _validate(document: Any) -> DinoExperiment | None:
    """The validated experiment, or None when the spec is refused: any exception but SpecErrors fails the test."""
    try:
        experiment = parse_spec(document)
        validate_experiment(experiment)
    except SpecErrors as exc:
        assert exc.errors and all(error.path for error in exc.errors)
        for error in exc.errors:
            assert "\n" not in error.allowed
        return None
    return experiment


def _render_and_check(experiment: DinoExperiment) -> None:
    """Every object of the experiment's backend (a local spec renders as pytorchjob) passes the strict offline
    validator (built-in kinds, upstream CRDs), and so does the custom resource itself."""
    validator = object_validator()
    backend = "pytorchjob" if experiment.spec.backend == "local" else experiment.spec.backend
    try:
        validate_experiment(experiment, backend=backend)
    except SpecErrors:
        return  # valid for this machine only (file:// checkpoints): not something a cluster backend renders
    for obj in render(experiment, backend=backend):
        if obj["kind"] == "TrainJob" and experiment.spec.train_job.trainer_version != "2.2":
            continue  # the stored TrainJob CRD is Trainer 2.2's; 2.0/2.1's override fields have golden files
        validator.validate(obj)
    validator.validate(experiment.to_document())


# --- documents drawn from the JSON Schema --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_documents() -> st.SearchStrategy[Any]:
    from hypothesis_jsonschema import from_schema

    return from_schema(json_schema())


def test_schema_drawn_documents_validate_or_fail_cleanly(schema_documents: st.SearchStrategy[Any]) -> None:
    @_settings(150)
    @given(schema_documents)
    def check(document: Any) -> None:
        experiment = _validate(document)
        if experiment is not None:
            _render_and_check(experiment)

    check()


# --- mutated specs -------------------------------------------------------------------------------------------------


def _config_paths(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted field path of the trainer config (the keys stage overrides may set)."""
    paths = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = f"{prefix}{field.name}"
        paths.append(path)
        if dataclasses.is_dataclass(hints[field.name]):
            paths += _config_paths(hints[field.name], f"{path}.")
    return paths


CONFIG_PATHS = _config_paths()
EDGES = [0, 1, -1, 2, 3, 7, 14, 16, 32, 0.5, 1.0, 1.5, -0.5, 1e-9, 2**31, 2**32, 2**63 - 1, -(2**63), 10**6, 4097,
         "", "x", "vit_small", "highres", "distill", "s3://b/x", None, True, False, [], {}, [1, 2], [0.1, 0.9],
         {"a": 1}, {"min": 1, "max": 2}]
BASES = [yaml.safe_load(path.read_text()) for path in example_specs()]
json_scalars = st.one_of(st.sampled_from(EDGES).map(copy.deepcopy),  # copies: mutations edit them in place
                         st.integers(-(2**63), 2**63 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    from tests.dino_ctl.spec_helpers import document

    doc = copy.deepcopy(draw(st.sampled_from([document(), *BASES])))
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):  # a trainer override key of a stage at an edge value
            spec = doc.get("spec")
            stages = spec.get("stages") if isinstance(spec, dict) else None
            stage = draw(st.sampled_from(stages)) if isinstance(stages, list) and stages else None
            if isinstance(stage, dict):
                stage.setdefault("overrides", {})[draw(st.sampled_from(CONFIG_PATHS))] = draw(json_values)
            continue
        node, key = doc, None  # node[key] is the place mutated
        while True:
            children = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not children:
                break
            key = draw(st.sampled_from(children))
            child = node[key]
            if not isinstance(child, (dict, list)) or not child or draw(st.integers(0, 3)) == 0:
                break
            node, key = child, None
        if key is None:
            continue
        operation = draw(st.sampled_from(["replace", "delete", "add"]))
        if operation == "replace":
            node[key] = draw(json_values)
        elif operation == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=10))] = draw(json_values)
        else:
            node.append(draw(json_values))
    return doc


@_settings(400)
@given(mutated_specs())
def test_mutated_specs_validate_or_fail_cleanly_and_render_when_valid(document: Any) -> None:
    experiment = _validate(document)
    if experiment is not None:
        _render_and_check(experiment)


# --- generated valid specs -----------------------------------------------------------------------------------------

dns_labels = st.from_regex(DNS_LABEL, fullmatch=True).filter(lambda name: len(name) <= 63)
env_names = st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True).filter(
    lambda name: not name.startswith(("PET_", "DINO_CTL_", "AWS_", "S3_", "GOOGLE_", "PYTHON", "TORCH_")) and not any(
        word in name for word in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "PRIVATE_KEY", "CREDENTIAL")))
plain_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    backend = draw(st.sampled_from(["pytorchjob", "trainjob", "torchx"]))
    low = draw(st.integers(1, 3))
    high = low if backend == "trainjob" else draw(st.integers(low, 4))
    gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
    sizes = [n * max(gpus, 1) for n in range(low, high + 1)]
    batch = 2 * math.lcm(*sizes)  # every world size divides it, two samples per rank for KoLeo
    checkpoints = draw(st.sampled_from(["s3://bucket/runs", "gs://bucket/runs", "pvc://claim/runs"]))
    base = {"data.dataset": "mds", "optim.global_batch_size": batch, "optim.iterations": draw(st.integers(20, 10**6)),
            "checkpoint.interval_iterations": 10}  # the tiny recipe warms up for 20 iterations
    stages = [{"name": "pretrain", "recipe": "tiny", "overrides": dict(base)}]
    shape = draw(st.sampled_from(["pretrain", "highres", "chain", "distill"]))
    if shape in ("highres", "chain"):
        stages.append({"name": "highres", "recipe": "tiny", "init": {"from": "pretrain"}, "overrides": {
            **base, "stage.kind": "highres", "model.img_size": 64, "data.crops.global_size": draw(
                st.sampled_from([36, 48, 64]))}})
    if shape in ("chain", "distill"):
        stages.append({"name": "distill", "recipe": "tiny", "teacher": {"from": stages[-1]["name"]},
                       "overrides": {**base, "stage.kind": "distill", "model.depth": draw(st.integers(1, 4))}})
    spec: dict[str, Any] = {
        "image": draw(st.from_regex(r"[a-z0-9./:-]{1,30}", fullmatch=True)),
        "backend": backend,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "storage": {"checkpoints": checkpoints},
        "data": {"streams": [{"remote": f"{checkpoints.rsplit('/', 1)[0]}/data/{i}"}
                             for i in range(draw(st.integers(1, 3)))], "numCanonicalNodes": high},
        "resources": {"nodes": {"min": low, "max": high}, "gpusPerNode": gpus,
                      "nodeSelector": draw(st.dictionaries(dns_labels, dns_labels, max_size=2)),
                      "tolerations": draw(st.lists(st.fixed_dictionaries({"key": dns_labels, "operator": st.just(
                          "Exists"), "effect": st.sampled_from(["NoSchedule", "NoExecute"])}), max_size=2))},
        "monitoring": {"port": draw(st.integers(1024, 65535).filter(lambda port: port != RDZV_PORT)),
                       "podMonitor": draw(st.booleans()), "scrapeInterval": draw(st.sampled_from(["15s", "1m"]))},
        "failureBudget": {"failure": draw(st.integers(0, 5))},
        "env": [{"name": name, "value": draw(plain_text)}
                for name in draw(st.lists(env_names, max_size=4, unique=True))],
        "imagePullSecrets": draw(st.lists(dns_labels, max_size=2, unique=True)),
        "stages": stages,
    }
    if draw(st.booleans()):
        spec["storage"]["credentials"] = {"secretName": draw(dns_labels), "mount": draw(st.sampled_from(["env",
                                                                                                         "file"]))}
    if draw(st.booleans()):
        spec["storage"]["endpointUrl"] = "http://minio.storage:9000"
    if draw(st.booleans()):
        spec["queue"] = {"name": draw(dns_labels)}
    if backend == "trainjob":
        spec["trainJob"] = {"trainerVersion": draw(st.sampled_from(["2.0", "2.1", "2.2"]))}
    labels = draw(st.dictionaries(dns_labels, dns_labels, max_size=2))
    return {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment",
            "metadata": {"name": draw(dns_labels), "namespace": draw(dns_labels), "labels": labels}, "spec": spec}


@_settings(60)
@given(valid_specs())
def test_valid_specs_render_and_pass_the_crd_schemas(document: dict[str, Any]) -> None:
    experiment = _validate(document)
    assert experiment is not None, "the generator makes valid specs"
    _render_and_check(experiment)


@_settings(150)
@given(st.one_of(valid_specs(), mutated_specs()))
def test_spec_custom_resource_spec_round_trip(document: dict[str, Any]) -> None:
    experiment = _validate(document)
    assume(experiment is not None)
    resource = experiment.to_document()
    assert parse_spec(resource) == experiment
    assert parse_spec(json.loads(json.dumps(resource))).to_document() == resource
    assert parse_spec(parse_yaml_mapping(yaml.safe_dump(resource))) == experiment
    validate_experiment(parse_spec(resource))


# --- the loader on its own -----------------------------------------------------------------------------------------

# no surrogates (not UTF-8) and no control characters: PyYAML's emitter writes DEL and NEL unescaped, which libyaml's
# reader refuses (DEL) or reads as a line break (NEL); and not JSON's exponent numbers: PyYAML writes the text '1e5'
# unquoted (a string in YAML 1.1), which the loader, like YAML 1.2 and Kubernetes, reads as a number
yaml_text = st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=12).filter(
    lambda text: not re.match(r"^-?(0|[1-9][0-9]*)(\.[0-9]*)?[eE][-+]?[0-9]+$", text))
loader_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), yaml_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(yaml_text, inner, max_size=4)),
    max_leaves=20)


@_settings(200)
@given(st.dictionaries(yaml_text, loader_values, max_size=5))
def test_the_loader_reads_what_yaml_writes(document: dict[str, Any]) -> None:
    for text in (yaml.safe_dump(document), yaml.safe_dump(document, default_flow_style=True),
                 json.dumps(document, ensure_ascii=False)):  # libyaml reads no \\ud800-style surrogate pairs
        assert parse_yaml_mapping(text) == document


@_settings(300)
@given(st.one_of(st.binary(max_size=300), yaml_text.map(str.encode),
                 st.text(st.sampled_from(list("{}[]:-&*!|>'\"#%@`?,<= \n\tab01.~")), max_size=80).map(str.encode)))
def test_the_loader_raises_only_config_errors(data: bytes) -> None:
    try:
        result = parse_yaml_mapping(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(result, dict)
