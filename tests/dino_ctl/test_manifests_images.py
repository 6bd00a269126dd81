"""The Dockerfiles parse and agree with the chart, the spec defaults, .dockerignore and the pinned versions.

No Docker engine runs here: these checks read the files the way ``docker build`` would.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import yaml

from dino_ctl.spec import MonitoringSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "trainer": REPO_ROOT / "docker/trainer.Dockerfile",
    "controller": REPO_ROOT / "docker/controller.Dockerfile",
}
INSTRUCTIONS = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit inside a continuation; docker drops them too
        pending += " " + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "dangling line continuation"
    return instructions


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last pattern matching the path or one of its parents decides."""
    parents = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in parents):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_is_well_formed(image: str, dockerignore: list[str]) -> None:
    instructions = parse_dockerfile(DOCKERFILES[image].read_text())
    assert {keyword for keyword, _ in instructions} <= INSTRUCTIONS
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    for keyword, value in instructions:
        if keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value.split()[0])
            assert re.search(r":[0-9][\w.-]*$", base), f"base image {base} must carry a version tag"
    final = _stages(instructions)[-1]
    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage must set USER"
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), "final stage must run as a numeric non-root uid"
    for keyword, value in instructions:
        if keyword != "COPY" or value.startswith("--from="):
            continue
        for source in value.split()[:-1]:
            assert (REPO_ROOT / source).exists(), f"COPY source {source} missing"
            sample = next((p for p in (REPO_ROOT / source).rglob("*.py")), REPO_ROOT / source)
            relative = str(sample.relative_to(REPO_ROOT))
            assert not _ignored(relative, dockerignore), f"{relative} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small(dockerignore: list[str]) -> None:
    excluded = (".venv/bin/python", ".git/HEAD", "tests/dino_ctl/test_chart.py", "runs/x/ckpt",
                "dino_ctl/__pycache__/a.pyc")
    for path in excluded:
        assert _ignored(path, dockerignore), path
    for path in ("pyproject.toml", "constraints.txt", "dino_ctl/spec.py", "trainer/train.py", "curation/__init__.py"):
        assert not _ignored(path, dockerignore), path


def test_trainer_image_matches_the_pins_and_the_spec() -> None:
    instructions = parse_dockerfile(DOCKERFILES["trainer"].read_text())
    base = next(a for k, a in instructions if k == "ARG" and a.startswith("BASE_IMAGE="))
    pin = re.search(r"^torch==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pin is not None
    assert f":{pin.group(1)}-cuda" in base, "the base image's torch must equal the constraints.txt pin"
    exposed = {int(p) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    assert MonitoringSpec().port in exposed
    installs = " ".join(a for k, a in instructions if k == "RUN" and "pip install" in a)
    assert '".[gpu]"' in installs and "faiss-cpu" not in installs


def test_controller_image_is_slim_and_matches_the_chart() -> None:
    instructions = parse_dockerfile(DOCKERFILES["controller"].read_text())
    installs = " ".join(a for k, a in instructions if k == "RUN" and "pip install" in a)
    packages = [token for args in re.findall(r"pip install ([^&]+)", installs) for token in args.split()]
    assert "--no-deps" in packages and "." in packages
    assert not [p for p in packages if p.lower().startswith(("torch", "nvidia", "faiss"))], packages
    assert ("ENTRYPOINT", '["python", "-m", "dino_ctl.controller"]') in instructions
    values = yaml.safe_load((REPO_ROOT / "charts/dino-ctl/values.yaml").read_text())
    exposed = {int(p) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    assert exposed == {values["controller"]["healthPort"], values["controller"]["metricsPort"]}
    deployment = (REPO_ROOT / "charts/dino-ctl/templates/deployment.yaml").read_text()
    user = next(a for k, a in reversed(instructions) if k == "USER")
    assert f"runAsUser: {user.split(':')[0]}" in deployment
