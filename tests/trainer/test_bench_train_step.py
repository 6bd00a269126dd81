"""bench/train_step.py runs end to end and prints the JSON object issue 2 asks for (values sane, not timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_step_bench_prints_one_json_object_with_the_reference_baseline():
    proc = subprocess.run(
        [sys.executable, "bench/train_step.py", "--preset", "tiny", "--device", "cpu", "--steps", "1",
         "--warmup", "0", "--batch-size", "4", "--profile", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "step_time_s", "peak_mem_bytes", "model_flops_per_image", "speedup_vs_unpacked",
                "speedup_vs_reference", "memory_ratio_vs_reference"):
        assert result[key] > 0, key
    assert result["images_per_s"] == 4 / result["step_time_s"]
    assert result["reference"]["implementation"] == "dinov2==0.0.1.dev2"
    # the reference's own step with its packed list forward; no xformers on a CPU: the test-only stand-in's attention
    assert result["reference"]["student_forward"] == "packed list (xformers stand-in: PyTorch SDPA per block)"
    assert result["speedup_vs_reference"] == result["reference"]["step_time_s"] / result["step_time_s"]
    assert "mfu" not in result  # CPU: no peak FLOPs to divide by
    assert result["head_prototypes"] == {"dino": 256, "ibot": 256}
    profile = result["profile"]  # --profile 5: one more step of ours, its 5 costliest operators
    assert len(profile) == 5 and all(isinstance(row["op"], str) and row["op"] for row in profile)
    assert any(row["op"].startswith("aten::") for row in profile)  # operators, not only Python-level ranges
    times = [row["self_ms"] for row in profile]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    assert 0 < sum(row["share"] for row in profile) <= 1.0001 and all(row["calls"] >= 1 for row in profile)
    assert "profile" not in result["baseline_unpacked"] and "profile" not in result["reference"]
