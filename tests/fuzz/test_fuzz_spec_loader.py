"""The atheris fuzz target of the spec loader and validator (tests/fuzz/fuzz_spec_loader.py), in a subprocess.

- default suite: a short seeded run (5,000 inputs, ``-seed=1``, a few seconds) from a corpus built of the examples
  (loader mode) and random bytes (structured mode), and a replay of every reproducer in ``tests/fuzz/crashes/``;
- ``-m fuzz``: a bounded run of ``$DINO_CTL_FUZZ_SECONDS`` (default 600) seconds that prints the execution count.

A crash, a stall (``-timeout=10`` per input) or a memory blow-up (``-rss_limit_mb=2048``) makes libFuzzer exit
non-zero and leave the input in the run's artifact folder: copy it to ``tests/fuzz/crashes/`` (it becomes a test).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HERE = Path(__file__).resolve().parent
TARGET = HERE / "fuzz_spec_loader.py"
CRASHES = HERE / "crashes"
EXAMPLES = HERE.parents[1] / "examples"
OPTIONS = ["-max_len=4096", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]


def _seed_corpus(folder: Path) -> Path:
    folder.mkdir()
    for path in sorted(EXAMPLES.glob("*.yaml")):
        (folder / f"raw-{path.stem}").write_bytes(b"\x00" + path.read_bytes())
    rng = random.Random(1)
    for i in range(8):
        (folder / f"structured-{i}").write_bytes(bytes([1]) + rng.randbytes(64))
    return folder


def _fuzz(tmp_path: Path, *options: str, timeout: float) -> subprocess.CompletedProcess[str]:
    corpus, seeds = tmp_path / "corpus", _seed_corpus(tmp_path / "seeds")
    corpus.mkdir()
    command = [sys.executable, str(TARGET), *OPTIONS, f"-artifact_prefix={tmp_path}/", *options, str(corpus),
               str(seeds)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert result.returncode == 0 and not artifacts, (artifacts, result.stderr[-4000:])
    return result


def _executions(result: subprocess.CompletedProcess[str]) -> int:
    return int(re.findall(r"stat::number_of_executed_units: (\d+)", result.stderr)[-1])


def test_a_short_seeded_run(tmp_path: Path) -> None:
    result = _fuzz(tmp_path, "-runs=5000", "-seed=1", timeout=300)
    assert _executions(result) >= 5000


def test_the_reproducers_in_crashes_pass() -> None:
    reproducers = sorted(str(path) for path in CRASHES.glob("*") if path.is_file() and path.suffix != ".md")
    if not reproducers:
        pytest.skip("no reproducer in tests/fuzz/crashes/ (the fuzzer has not found a crash)")
    result = subprocess.run([sys.executable, str(TARGET), *OPTIONS, *reproducers], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.fuzz
def test_fuzz_for_a_while(tmp_path: Path) -> None:
    seconds = int(os.environ.get("DINO_CTL_FUZZ_SECONDS", "600"))
    result = _fuzz(tmp_path, f"-max_total_time={seconds}", timeout=seconds + 300)
    print(f"fuzzed {seconds} s: {_executions(result):,} executions, no crash, stall or memory blow-up")
