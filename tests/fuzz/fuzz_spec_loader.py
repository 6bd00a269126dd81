"""Atheris fuzz target of the spec path: ``python tests/fuzz/fuzz_spec_loader.py [libFuzzer options] CORPUS...``.

Each input's first byte picks a mode:

- even: the rest are the bytes of a spec file: ``trainer.config.parse_yaml_mapping`` (the loader every command
  uses), then ``parse_spec`` and ``validate_experiment`` on what it loaded;
- odd: the rest drive structured mutations (``atheris.FuzzedDataProvider``) of a valid spec: trainer override keys
  and spec fields set to fuzzed values; validated, and rendered when valid.

The only exceptions allowed are ``ConfigError`` (the loader's, and ``SpecError``) and ``SpecErrors``; any other is a
crash, a per-input run over libFuzzer's ``-timeout`` a stall, growth past ``-rss_limit_mb`` a memory blow-up. A crash
file found becomes a reproducer in ``tests/fuzz/crashes/``, replayed by the default suite.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

import atheris
import pydantic  # noqa: F401 - imported before instrumentation: only the project's modules are instrumented
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports(include=["trainer.config", "dino_ctl"]):
    from dino_ctl.errors import SpecErrors
    from dino_ctl.render import render
    from dino_ctl.spec import parse_spec
    from dino_ctl.validation import validate_experiment
    from trainer.config import ConfigError, TrainConfig, parse_yaml_mapping

SEEDS = [yaml.safe_load(path.read_text()) for path in sorted((REPO / "examples").glob("*.yaml"))
         if "DinoExperiment" in path.read_text()]
SPEC_FIELDS = [("resources", "gpusPerNode"), ("resources", "procsPerNode"), ("seed",), ("backend",),
               ("monitoring", "port"), ("data", "numCanonicalNodes"), ("failureBudget", "failure")]


def _config_paths(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    hints, paths = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        paths.append(prefix + field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            paths += _config_paths(hints[field.name], f"{prefix}{field.name}.")
    return paths


CONFIG_PATHS = _config_paths()


def check(document: Any) -> None:
    """Validate ``document``; render it when valid. Raises only what a crash is."""
    try:
        experiment = parse_spec(document)
        validate_experiment(experiment)
    except SpecErrors as exc:
        assert all("\n" not in error.allowed for error in exc.errors)
        return
    render(experiment, backend="pytorchjob" if experiment.spec.backend == "local" else None)


def _value(fdp: atheris.FuzzedDataProvider) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    if kind == 1:
        return fdp.ConsumeIntInRange(-3, 70000)
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return fdp.ConsumeProbability() * 2 - 0.5
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(12)
    if kind == 5:
        return fdp.ConsumeBool()
    if kind == 6:
        return [_scalar(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return None


def _scalar(fdp: atheris.FuzzedDataProvider) -> Any:
    return fdp.ConsumeIntInRange(-5, 5000) if fdp.ConsumeBool() else fdp.ConsumeRegularFloat()


def structured(fdp: atheris.FuzzedDataProvider) -> None:
    document = copy.deepcopy(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)])
    spec = document["spec"]
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice <= 1:
            stage = spec["stages"][fdp.ConsumeIntInRange(0, len(spec["stages"]) - 1)]
            stage.setdefault("overrides", {})[CONFIG_PATHS[fdp.ConsumeIntInRange(0, len(CONFIG_PATHS) - 1)]] = \
                _value(fdp)
        elif choice == 2:
            *parents, last = SPEC_FIELDS[fdp.ConsumeIntInRange(0, len(SPEC_FIELDS) - 1)]
            node = spec
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = _value(fdp)
        else:
            names = ["A", "B", "PET_X", "DINO_CTL_STAGE", "AWS_ACCESS_KEY_ID"]
            spec["env"] = [{"name": names[fdp.ConsumeIntInRange(0, 4)], "value": "1"}
                           for _ in range(fdp.ConsumeIntInRange(0, 3))]
            spec["resources"]["nodes"] = {"min": fdp.ConsumeIntInRange(-1, 600), "max": fdp.ConsumeIntInRange(-1, 600)}
    check(document)


def one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2:
        structured(atheris.FuzzedDataProvider(data[1:]))
        return
    try:
        document = parse_yaml_mapping(data[1:], source="fuzz.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    check(document)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
