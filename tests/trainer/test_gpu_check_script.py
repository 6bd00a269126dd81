"""scripts/gpu_check.sh stays runnable: every benchmark and flag it names exists, and its trainer overrides resolve.

The script itself needs a GPU; this keeps it from rotting on machines without one.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from trainer.config import parse_override, resolve_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _commands() -> list[list[str]]:
    """The script's step commands, continuation lines joined, shell variables left as words."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [shlex.split(line.split("step ", 1)[1]) for line in text.splitlines() if line.startswith("step ")]


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_benchmark_and_flag_it_names_exists():
    benches = [cmd for cmd in _commands() if any(word.startswith("bench/") for word in cmd)]
    assert len(benches) == 4
    for cmd in benches:
        path = next(word for word in cmd if word.startswith("bench/"))
        help_text = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=120, check=True).stdout
        for flag in (word for word in cmd if word.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", help_text), f"{path} has no {flag}"


def test_its_trainer_overrides_resolve_for_the_recipe():
    (cmd,) = [cmd for cmd in _commands() if "trainer.train" in cmd]
    recipe = cmd[cmd.index("--recipe") + 1]
    overrides = dict(parse_override(cmd[i + 1]) for i, word in enumerate(cmd) if word == "--override")
    overrides["checkpoint.dir"] = "/tmp/gpu-check"  # the script's is a shell variable
    config = resolve_config(recipe, overrides=overrides)
    assert config.optim.iterations == 30 and config.data.dataset == "synthetic" and config.metrics.port == -1
