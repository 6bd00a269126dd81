"""bench/sinkhorn.py and bench/dino_loss.py print one JSON object; their baselines compute what ours computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from trainer.losses.centering import sinkhorn_knopp
from trainer.losses.dino import dino_cross_entropy

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.dino_loss import einsum_cross_entropy  # noqa: E402
from bench.sinkhorn import recipe_pass_structure  # noqa: E402


def test_the_benchmark_baseline_is_the_recipe_and_agrees_with_ours():
    logits = 2.0 * torch.rand(24, 512, generator=torch.Generator().manual_seed(0)) - 1.0
    baseline = recipe_pass_structure(logits, 0.04, 3)
    torch.testing.assert_close(baseline.sum(dim=1), torch.ones(24))  # rows are distributions
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.04, 3), baseline, rtol=1e-5, atol=1e-8)


def test_sinkhorn_bench_prints_one_json_object():
    proc = subprocess.run(
        [sys.executable, "bench/sinkhorn.py", "--rows", "64", "--prototypes", "4096", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [64, 4096] and result["iterations"] == 3
    assert result["ours_ms"] > 0 and result["recipe_passes_ms"] > 0
    assert abs(result["speedup"] - result["recipe_passes_ms"] / result["ours_ms"]) < 0.01
    assert result["max_abs_difference"] < 1e-6


def test_the_loss_benches_reject_a_bad_size():
    proc = subprocess.run([sys.executable, "bench/sinkhorn.py", "--rows", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--rows: invalid value 0; allowed: >= 1" in proc.stderr
    proc = subprocess.run([sys.executable, "bench/dino_loss.py", "--batch", "x"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--batch: invalid value 'x'; allowed: an integer >= 1" in proc.stderr


def test_dino_loss_bench_compares_equal_losses_and_gradients():
    proc = subprocess.run(
        [sys.executable, "bench/dino_loss.py", "--batch", "4", "--prototypes", "512", "--locals", "3", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == {"global": [2, 4, 512], "local": [3, 4, 512]}
    assert result["ours_ms"] > 0 and result["einsum_ms"] > 0
    assert abs(result["speedup"] - result["einsum_ms"] / result["ours_ms"]) < 0.01
    assert result["loss_difference"] < 1e-5 and result["grad_max_difference"] < 1e-7


def test_the_dino_loss_bench_baseline_is_the_same_loss():
    gen = torch.Generator().manual_seed(1)
    student_global, student_local = torch.randn(2, 5, 64, generator=gen), torch.randn(4, 5, 64, generator=gen)
    teacher = torch.softmax(torch.randn(2, 5, 64, generator=gen), dim=-1)
    for ours, theirs in zip(dino_cross_entropy(student_global, student_local, teacher),
                            einsum_cross_entropy(student_global, student_local, teacher)):
        torch.testing.assert_close(ours, theirs)
