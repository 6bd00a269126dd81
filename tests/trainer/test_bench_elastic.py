"""bench/elastic_step.py prints one JSON object with its three configurations measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_elastic_bench_prints_one_json_object_with_its_baselines():
    proc = subprocess.run(
        [sys.executable, "bench/elastic_step.py", "--steps", "1", "--warmup", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["w2_even"]["shares"] == [4, 4]
    assert result["w3_uneven"]["shares"] == [3, 3, 2] and result["w3_uneven"]["global_batch"] == 8
    assert result["w3_even"]["shares"] == [3, 3, 3]
    ratio = result["w3_uneven"]["step_s"] / result["w3_even"]["step_s"]
    assert abs(result["uneven_vs_even_same_largest_share"] - ratio) < 1e-9
    assert result["ideal_efficiency_w3_uneven"] == pytest.approx(8 / 9)


def test_elastic_bench_refuses_a_batch_that_cannot_show_both_cases():
    proc = subprocess.run([sys.executable, "bench/elastic_step.py", "--global-batch", "12"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a multiple of 3" in proc.stderr
